"""Fetch safetensors checkpoints from object storage into a local cache, and upload results.

A checkpoint is a "directory": `model.safetensors`, or `model.safetensors.index.json` and the
shards it names, plus the JSON and tokenizer files beside them. Only those are transferred;
pickled weights (`*.bin`, `*.pt`, `*.pkl`, ...) never are, so nothing downstream can be tempted
to unpickle them.

Cache layout: `<cache>/<key>/` holds the files under their own names (so it loads like any
local checkpoint), `<key>/.fetch-manifest.json` what was verified (size, ETag, local mtime), and
`<cache>/<key>.lock` serialises processes fetching the same checkpoint. The key is the SHA-256
of the normalised URI and of the store's identity (endpoint or account), so one spelling of a
checkpoint maps to one entry and two servers never share one. A fetch whose remote listing
matches the manifest transfers nothing but that listing.

Local paths and `file://` URIs are validated and used in place, never copied.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from blake3 import blake3

from mergerunner.checkpoint import (
    PICKLE_SUFFIXES,
    CheckpointError,
    read_layout,
    weights_entry,
)
from mergerunner.contract import CONFIG_FILE, INDEX_FILE, MODEL_FILES, WEIGHTS_FILE
from mergerunner.storage import (
    FetchError,
    Location,
    StorageConfig,
    make_store,
    parse_uri,
    storage_error,
)

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = [
    "FetchError",
    "FetchResult",
    "StorageConfig",
    "cache_key",
    "fetch_checkpoint",
    "fetch_checkpoint_result",
    "fetch_checkpoints",
    "fetch_checkpoints_async",
    "fetch_tree",
    "upload_directory",
    "upload_directory_async",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = ".fetch-manifest.json"
MANIFEST_VERSION = 1
# Everything a loader needs besides the weights: config, generation config, tokenizer files
# (JSON, sentencepiece `.model`, BPE merges/vocab `.txt`, tiktoken, chat templates).
AUX_SUFFIXES = (".json", ".model", ".txt", ".tiktoken", ".jinja")
PART_SIZE = 64 * 2**20
STREAM_CHUNK = 8 * 2**20
MAX_CONCURRENCY = 8
LOCK_TIMEOUT_S = 3600.0
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_ETAG = re.compile(r"^(?P<md5>[0-9a-f]{32})-(?P<parts>[1-9][0-9]{0,4})$")
# The user-metadata key under which our uploads store the BLAKE3 of each file's content, so
# that every download of it is verified whatever its multipart layout.
DIGEST_ATTRIBUTE = "mergesearch-blake3"
UPLOAD_PART_SIZE = 16 * 2**20
# Part sizes of common S3 clients (aws cli/boto3 8 MiB, obstore/rclone/mc 5-16 MiB, s3fs
# 50 MiB, ...): a multipart ETag is the MD5 of its parts' MD5s, so checking it needs the part
# size, which the ETag does not say. Tried when the size and part count leave many choices.
COMMON_PART_SIZES = tuple(
    sorted(
        {m * 2**20 for m in (5, 8, 10, 15, 16, 25, 32, 50, 64, 100, 128, 256, 512, 1024)}
        | {m * 10**6 for m in (5, 8, 10, 16, 50, 100)}
    )
)
MAX_PART_CANDIDATES = 4

T = TypeVar("T")


@dataclass(frozen=True)
class RemoteObject:
    """One object of a listing, by its name relative to the checkpoint's prefix."""

    name: str
    size: int
    etag: str | None
    modified: str


@dataclass(frozen=True)
class Expected:
    """What a downloaded file must match, from what the store says about it (its ETag, our
    digest attribute) or from the digest recorded when the same object was first fetched."""

    md5: str | None = None  # a single-part S3 ETag: the MD5 of the content
    multipart: tuple[str, int] | None = None  # a multipart ETag: MD5 of part MD5s, part count
    blake3: str | None = None  # our uploads' attribute, or the digest recorded at first fetch
    blake3_source: str = "attribute"


@dataclass(frozen=True)
class Verified:
    """A downloaded file's BLAKE3 (recorded in the manifest) and what vouched for it."""

    blake3: str
    # "blake3-attribute", "recorded-digest", "md5-etag", "multipart-etag", "two-downloads" or
    # "size" (nothing more to check against: GCS and Azure ETags are opaque)
    by: str


@dataclass(frozen=True)
class FetchResult:
    """What a fetch did; `downloaded` empty means only a listing crossed the network."""

    uri: str
    path: Path
    downloaded: tuple[str, ...] = ()
    reused: tuple[str, ...] = ()
    bytes_downloaded: int = 0
    local: bool = False


# --- functional core: names, plans, manifests -------------------------------------------------


def cache_key(location: Location, config: StorageConfig | None = None) -> str:
    """SHA-256 of the normalised URI and of the store it lives in (two servers, two keys)."""
    return hashlib.sha256(
        f"{_store_identity(location, config)}\n{location.uri}".encode()
    ).hexdigest()


def _store_identity(location: Location, config: StorageConfig | None) -> str:
    config = config or StorageConfig()
    if location.scheme == "file":
        return location.scheme
    if location.scheme == "s3":
        return f"s3 {(config.endpoint or 'aws').rstrip('/')}"
    if location.scheme == "az":
        return f"az {config.azure.get('azure_storage_account_name', '')}"
    return f"gs {config.gcs.get('google_base_url', '')}"


def is_aux_file(name: str) -> bool:
    """A top-level non-weight file a loader may read (config, tokenizer, generation config)."""
    return "/" not in name and name != INDEX_FILE and name.endswith(AUX_SUFFIXES)


def is_model_file(name: str) -> bool:
    """A top-level file of a model: weights (safetensors or pickles), the index, config and
    tokenizer files. An export replaces all of them together."""
    return "/" not in name and (
        name.endswith((".safetensors", *PICKLE_SUFFIXES)) or name == INDEX_FILE or is_aux_file(name)
    )


def files_to_replace(existing: Iterable[str]) -> list[str]:
    """What an export removes from its destination before writing: every model file, when a
    model lives there (a `model.safetensors` or an index), so that the destination never holds
    one model's weights beside another's (a stale index next to a new single file, old shards
    next to new ones). A destination without a model keeps everything (it may be a shared
    prefix holding other things)."""
    names = set(existing)
    if WEIGHTS_FILE not in names and INDEX_FILE not in names:
        return []
    return sorted(name for name in names if is_model_file(name))


def upload_batches(files: Sequence[str]) -> list[list[str]]:
    """The order of an upload: weights, then the index and the other files, config.json last,
    so that a reader that waits for config.json finds everything, and an index never names a
    shard that is not there yet."""
    weights = [n for n in files if n.endswith(".safetensors")]
    last = [n for n in files if n == CONFIG_FILE]
    rest = [n for n in files if n not in weights and n not in last]
    return [batch for batch in (weights, rest, last) if batch]


def multipart_etag(remote: RemoteObject) -> tuple[str, int] | None:
    """(MD5 of the part MD5s, part count) of an S3 multipart ETag `…-N`, else None."""
    match = _MULTIPART_ETAG.match((remote.etag or "").strip('"').lower())
    return (match["md5"], int(match["parts"])) if match else None


def part_size_candidates(size: int, parts: int) -> list[int]:
    """Part sizes P that cut `size` bytes into exactly `parts` parts ((parts-1)·P < size <=
    parts·P): every whole MiB that does when there are few, else the common sizes that do."""
    if parts == 1:
        return [max(size, 1)]
    low, high = -(-size // parts), (size - 1) // (parts - 1)  # P in [low, high]
    mib = range(-(-low // 2**20) * 2**20, high + 1, 2**20)
    if 0 < len(mib) <= MAX_PART_CANDIDATES:
        return list(mib)
    return [p for p in COMMON_PART_SIZES if low <= p <= high]


def shard_names(uri: str, index_text: str | bytes) -> list[str]:
    """The shard files an index's `weight_map` names; each must be a plain file name.

    Rejecting anything with a path separator keeps a hostile index from writing outside the
    cache entry (`../../somewhere`).
    """
    try:
        weight_map = json.loads(index_text)["weight_map"]
    except (ValueError, KeyError, TypeError) as error:
        raise FetchError(
            uri, "invalid-checkpoint", f"{INDEX_FILE} is unreadable: {error}"
        ) from error
    if not isinstance(weight_map, dict) or not weight_map:
        raise FetchError(uri, "invalid-checkpoint", f"{INDEX_FILE} has an empty weight_map")
    shards = sorted({str(shard) for shard in weight_map.values()})
    for shard in shards:
        if (
            "/" in shard
            or "\\" in shard
            or shard in ("", ".", "..")
            or not shard.endswith(".safetensors")
        ):
            raise FetchError(
                uri, "invalid-checkpoint", f"{INDEX_FILE} names an invalid shard {shard!r}"
            )
    return shards


def plan_checkpoint(uri: str, names: Iterable[str], shards: Sequence[str] | None) -> list[str]:
    """The files to have locally, weights first; fails if it is not a safetensors checkpoint.

    `model.safetensors` wins over an index when both exist, as it does in transformers.
    `shards` is the index's list, needed only when there is an index and no single file.
    """
    available = set(names)
    aux = sorted(name for name in available if is_aux_file(name))
    entry = weights_entry(available)
    if entry == WEIGHTS_FILE:
        return [WEIGHTS_FILE, *aux]
    if entry is None:
        found = ", ".join(sorted(available)[:8]) or "nothing"
        raise FetchError(
            uri,
            "invalid-checkpoint",
            f"not a safetensors checkpoint: no {WEIGHTS_FILE} nor {INDEX_FILE} (found {found})",
        )
    if shards is None:
        raise ValueError("the index's shards are needed to plan a sharded checkpoint")
    missing = [shard for shard in shards if shard not in available]
    if missing:
        raise FetchError(
            uri, "invalid-checkpoint", f"{INDEX_FILE} names missing shard(s): {', '.join(missing)}"
        )
    return [*shards, INDEX_FILE, *aux]


def needs_sharded_plan(names: Iterable[str]) -> bool:
    return weights_entry(names) == INDEX_FILE


def manifest_entry(
    remote: RemoteObject, mtime_ns: int, verified: Verified | None = None
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "size": remote.size,
        "etag": remote.etag,
        "modified": remote.modified,
        "mtime_ns": mtime_ns,
    }
    if verified is not None:
        entry["blake3"] = verified.blake3
        entry["verified"] = verified.by
    return entry


def same_remote(entry: Mapping[str, Any] | None, remote: RemoteObject) -> bool:
    """Whether a manifest entry describes this remote object (size and ETag, or modification
    time where the store gives no ETag)."""
    if entry is None:
        return False
    return entry.get("size") == remote.size and (
        entry.get("etag") == remote.etag
        if remote.etag
        else entry.get("modified") == remote.modified
    )


def is_current(
    entry: Mapping[str, Any] | None, remote: RemoteObject, local: os.stat_result | None
) -> bool:
    """Whether the cached copy is the remote object, as verified when it was downloaded.

    Remote: same size and ETag (or modification time where the store gives no ETag). Local: the
    file is the one written then (same size and mtime), not since truncated or replaced.
    """
    if entry is None or local is None:
        return False
    same_local = local.st_size == remote.size and local.st_mtime_ns == entry.get("mtime_ns")
    return same_remote(entry, remote) and same_local


def md5_expected(remote: RemoteObject, enabled: bool) -> str | None:
    """The MD5 to verify against: a single-part S3 ETag is the MD5 of the content.

    Multipart ETags (`…-N`) are checked part by part (`multipart_etag`); GCS and Azure ETags
    are opaque.
    """
    if not enabled or remote.etag is None:
        return None
    etag = remote.etag.strip('"').lower()
    return etag if _MD5_ETAG.match(etag) else None


def expected_of(
    remote: RemoteObject, attributes: Mapping[str, str], recorded: str | None, md5_etags: bool
) -> Expected:
    """What a download of `remote` is checked against: a BLAKE3 (our upload's attribute, or
    the digest recorded at an earlier fetch of the same object) when there is one, since it
    vouches for the content by itself and costs a third of an MD5 here (0.5 s against 1.4 s
    of CPU per GiB); else the S3 ETag."""
    digest = attributes.get(DIGEST_ATTRIBUTE)
    if digest or recorded:
        return Expected(
            blake3=digest or recorded, blake3_source="attribute" if digest else "recorded"
        )
    return Expected(
        md5=md5_expected(remote, md5_etags),
        multipart=multipart_etag(remote) if md5_etags else None,
    )


def normalise_etag(etag: str | None) -> str | None:
    if not etag:
        return None
    return etag.removeprefix("W/").strip('"') or None


def part_ranges(size: int, part_size: int) -> list[tuple[int, int]]:
    """Half-open byte ranges covering `size` in parts of at most `part_size`."""
    return [(start, min(start + part_size, size)) for start in range(0, size, part_size)]


# --- imperative shell: cache directory, lock, transfers ---------------------------------------


@dataclass
class _Transfer:
    """Per-call shared state: the request limiter and the tuning knobs."""

    limiter: asyncio.Semaphore
    part_size: int = PART_SIZE
    lock_timeout_s: float = LOCK_TIMEOUT_S


# How often a waiter looks whether the lock's holder is still making progress.
PROGRESS_CHECK_S = 5.0


def allocated_bytes(directory: Path) -> int:
    """Bytes allocated to the files of a cache entry, partial downloads included: it grows
    while the entry's lock holder fetches (st_blocks, since a ranged download may create its
    file at full size at once)."""
    try:
        with os.scandir(directory) as entries:
            return sum(e.stat().st_blocks * 512 for e in entries if e.is_file())
    except OSError:
        return 0


@contextlib.asynccontextmanager
async def _file_lock(
    path: Path, uri: str, timeout_s: float, progress: Callable[[], int] | None = None
) -> AsyncIterator[None]:
    """An exclusive `flock`, polled so that a wait never blocks the event loop.

    flock locks belong to the open file description, so two threads of one process exclude
    each other as two processes do, and a holder that dies releases it. So the wait ends only
    for a holder that is alive and stuck: `timeout_s` counts from the last time `progress()`
    (the entry's allocated bytes) changed. A second evaluator on a node waits for the first
    to fetch 2 TB, however long that takes, as long as bytes keep arriving.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        now = time.monotonic()
        deadline, next_check = now + timeout_s, now + PROGRESS_CHECK_S
        seen = progress() if progress else 0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if progress is not None and now >= next_check:
                    next_check = now + PROGRESS_CHECK_S
                    if (current := progress()) != seen:
                        seen, deadline = current, now + timeout_s
                if now > deadline:
                    raise FetchError(
                        uri,
                        "io",
                        f"cache entry still locked after {timeout_s:.0f}s without progress: {path}",
                    ) from None
                await asyncio.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _read_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """The verified entries, or none if the manifest is missing or unreadable (refetch then)."""
    try:
        data = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _write_manifest(directory: Path, uri: str, files: Mapping[str, Any]) -> None:
    body = json.dumps(
        {"version": MANIFEST_VERSION, "uri": uri, "files": dict(sorted(files.items()))}, indent=1
    )
    temporary = directory / f".manifest.tmp-{secrets.token_hex(4)}"
    temporary.write_text(body)
    temporary.replace(directory / MANIFEST_NAME)


def _local_stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def _prune(directory: Path, keep: Iterable[str]) -> None:
    """Remove what the plan no longer names (old shards, interrupted downloads)."""
    wanted = {*keep, MANIFEST_NAME}
    for entry in directory.iterdir():
        if entry.name in wanted:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)


async def _list_top_level(
    store: ObjectStore, uri: str, config: StorageConfig
) -> dict[str, RemoteObject]:
    import obstore

    try:
        listing = await obstore.list_with_delimiter_async(store, None)
    except Exception as error:
        raise storage_error(uri, error, config) from error
    return {meta["path"]: _remote_object(meta) for meta in listing["objects"]}


def _remote_object(meta: Mapping[str, Any]) -> RemoteObject:
    """An object of a listing, as obstore describes it."""
    return RemoteObject(
        name=meta["path"],
        size=int(meta["size"]),
        etag=normalise_etag(meta.get("e_tag")),
        modified=meta["last_modified"].isoformat(),
    )


async def _download(
    store: ObjectStore,
    uri: str,
    remote: RemoteObject,
    directory: Path,
    transfer: _Transfer,
    config: StorageConfig,
    recorded: str | None = None,
) -> Verified:
    """Download to a temporary name, verify, then rename: a cache file is always complete.

    `recorded` is the BLAKE3 recorded when this same object (size and ETag) was fetched
    before: a download that differs from it is refused even where the store vouches for
    nothing. An S3 multipart object whose ETag no likely part size reproduces is downloaded a
    second time: that copy must match the ETag, or agree with the first (bytes damaged in
    transit do not repeat themselves)."""
    target = directory / remote.name
    temporary = target.with_name(f".{target.name}.part-{secrets.token_hex(4)}")
    second = target.with_name(f".{target.name}.again-{secrets.token_hex(4)}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)  # nested names: data bundles
        attributes = await _transfer_to(temporary, store, uri, remote, transfer, config)
        expected = expected_of(remote, attributes, recorded, config.verify_md5_etag)
        verified = await asyncio.to_thread(_verify, uri, remote, temporary, expected)
        if verified.by == "size" and expected.multipart is not None:
            await _transfer_to(second, store, uri, remote, transfer, config)
            again = await asyncio.to_thread(_verify, uri, remote, second, expected)
            if again.by == "multipart-etag":  # the first copy was damaged, this one is right
                verified = again
                second.replace(temporary)
            elif again.blake3 == verified.blake3:
                verified = Verified(verified.blake3, "two-downloads")
            else:
                raise FetchError(
                    uri,
                    "storage",
                    f"{remote.name}: two downloads differ (BLAKE3 {verified.blake3} and "
                    f"{again.blake3}) and its multipart ETag vouches for neither",
                )
        temporary.replace(target)
    except OSError as error:
        raise FetchError(uri, "io", f"writing {remote.name} to the cache: {error}") from error
    finally:
        temporary.unlink(missing_ok=True)
        second.unlink(missing_ok=True)
    return verified


async def _transfer_to(
    path: Path,
    store: ObjectStore,
    uri: str,
    remote: RemoteObject,
    transfer: _Transfer,
    config: StorageConfig,
) -> dict[str, str]:
    """Download `remote` into `path` in ranged parts, durably; return its attributes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        ranges = part_ranges(remote.size, transfer.part_size) or [(0, 0)]
        attributes = await _gather(
            _fetch_range(store, uri, remote, fd, span, transfer, config) for span in ranges
        )
        # Durable before it is renamed and recorded as verified; in a worker thread so that
        # other transfers keep going while the disk catches up.
        await asyncio.to_thread(os.fsync, fd)
    finally:
        os.close(fd)
    return attributes[0]


async def _fetch_range(
    store: ObjectStore,
    uri: str,
    remote: RemoteObject,
    fd: int,
    span: tuple[int, int],
    transfer: _Transfer,
    config: StorageConfig,
) -> dict[str, str]:
    """GET one byte range (the whole object when it is small) and write it at its offset;
    return the object's attributes (its user metadata: our digest, when we uploaded it).

    `If-Match` pins every part to the listed version: an object replaced mid-download fails
    with a precondition error instead of yielding a file spliced from two versions. Writes
    happen on the event loop's thread on purpose: a write left running in a worker thread by a
    cancelled task could land in a reused file descriptor.
    """
    import obstore

    start, end = span
    options: dict[str, Any] = {}
    if remote.etag:
        options["if_match"] = f'"{remote.etag}"'
    if end > start and span != (0, remote.size):
        options["range"] = span
    offset = start
    async with transfer.limiter:
        try:
            result = await obstore.get_async(store, remote.name, options=options)
            attributes = dict(result.attributes)
            stream = result.stream(min_chunk_size=STREAM_CHUNK)
        except Exception as error:
            raise storage_error(uri, error, config) from error
        while True:
            try:
                chunk = await anext(stream)
            except StopAsyncIteration:
                break
            except Exception as error:
                raise storage_error(uri, error, config) from error
            offset += os.pwrite(fd, chunk, offset)
    if offset != end:
        cause = f"{remote.name}: received {offset - start} bytes of {end - start}"
        raise FetchError(uri, "storage", cause)
    return {str(k): str(v) for k, v in attributes.items()}


def _verify(uri: str, remote: RemoteObject, path: Path, expected: Expected) -> Verified:
    """Check a downloaded file against everything known of it, in one read: its size; its
    BLAKE3 against our upload's attribute or the digest recorded at the first fetch; its MD5
    against a single-part S3 ETag; its part MD5s against a multipart ETag, for each part size
    that fits the part count. A mismatch is a `storage` error (retried: bytes that arrived
    wrong). Returns the file's BLAKE3, recorded in the manifest, and what vouched for it."""
    size = path.stat().st_size
    if size != remote.size:
        raise FetchError(
            uri, "storage", f"{remote.name}: size {size} differs from listed {remote.size}"
        )
    whole = hashlib.md5(usedforsecurity=False) if expected.md5 else None
    parts = (
        {p: _PartHasher(p) for p in part_size_candidates(size, expected.multipart[1])}
        if expected.multipart
        else {}
    )
    content = blake3(max_threads=blake3.AUTO)
    with path.open("rb") as handle:
        offset = 0
        while block := handle.read(STREAM_CHUNK):
            content.update(block)
            if whole is not None:
                whole.update(block)
            for hasher in parts.values():
                hasher.update(block, offset)
            offset += len(block)
    digest = content.hexdigest()
    if expected.blake3 is not None and digest != expected.blake3:
        where = (
            "its upload's digest"
            if expected.blake3_source == "attribute"
            else ("the digest recorded when it was first fetched")
        )
        raise FetchError(
            uri, "storage", f"{remote.name}: BLAKE3 {digest} differs from {where} (corrupted?)"
        )
    if whole is not None and whole.hexdigest() != expected.md5:
        raise FetchError(
            uri,
            "storage",
            f"{remote.name}: MD5 {whole.hexdigest()} differs from ETag {expected.md5}",
        )
    by = "blake3-attribute" if expected.blake3_source == "attribute" else "recorded-digest"
    if expected.blake3 is not None:
        return Verified(digest, by)
    if whole is not None:
        return Verified(digest, "md5-etag")
    if expected.multipart is not None:
        if any(h.etag() == expected.multipart for h in parts.values()):
            return Verified(digest, "multipart-etag")
        log.info(
            "%s%s: the multipart ETag matches none of %d likely part sizes; downloading again",
            *(uri, remote.name, len(parts)),
        )
    return Verified(digest, "size")


class _PartHasher:
    """MD5s of consecutive `part_size`-byte parts, fed blocks in order."""

    def __init__(self, part_size: int) -> None:
        self.part_size = part_size
        self.done: list[bytes] = []
        self.current = hashlib.md5(usedforsecurity=False)

    def update(self, block: bytes, offset: int) -> None:
        view = memoryview(block)
        while view:
            room = self.part_size - offset % self.part_size
            self.current.update(view[:room])
            offset += min(room, len(view))
            view = view[room:]
            if offset % self.part_size == 0:
                self.done.append(self.current.digest())
                self.current = hashlib.md5(usedforsecurity=False)

    def etag(self) -> tuple[str, int]:
        digests = list(self.done)
        tail = self.current.copy().digest()
        if not digests or tail != hashlib.md5(b"", usedforsecurity=False).digest():
            digests.append(tail)
        return hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest(), len(digests)


async def _gather(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Run concurrently; on the first failure cancel the rest and raise that failure itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_as_coroutine(item)) for item in awaitables]
    except BaseExceptionGroup as group_error:
        raise _first_leaf(group_error) from None
    return [task.result() for task in tasks]


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        fetch_errors = [e for e in error.exceptions if isinstance(e, FetchError)]
        error = (fetch_errors or list(error.exceptions))[0]
    return error


class _CheckpointSync:
    """Brings one remote checkpoint's cache entry up to date (under the entry's lock)."""

    def __init__(
        self, location: Location, cache_dir: Path, config: StorageConfig, transfer: _Transfer
    ) -> None:
        self.location = location
        self.uri = location.uri
        self.config = config
        self.transfer = transfer
        key = cache_key(location, config)
        self.directory = cache_dir / key
        self.lock_path = cache_dir / f"{key}.lock"
        self.manifest: dict[str, dict[str, Any]] = {}
        self.recorded: dict[str, str] = {}  # digests recorded by earlier fetches of an object
        self.downloaded: list[str] = []
        self.bytes_downloaded = 0

    async def run(self) -> FetchResult:
        async with self._locked() as store:
            listing = await _list_top_level(store, self.uri, self.config)
            if not listing:
                raise FetchError(self.uri, "not-found", "no objects under this prefix")
            self.directory.mkdir(exist_ok=True)
            self.manifest = _read_manifest(self.directory)
            try:
                plan = await self._plan(store, listing)
                await self._bring_up_to_date(store, listing, plan)
                _prune(self.directory, plan)
            finally:
                _write_manifest(self.directory, self.uri, self.manifest)
            self._check_headers()
        return self._result(plan)

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[ObjectStore]:
        """Hold the cache entry's lock (waiting while another process fills it), then give a
        store to read the remote prefix with."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        async with _file_lock(
            self.lock_path,
            self.uri,
            self.transfer.lock_timeout_s,
            progress=lambda: allocated_bytes(self.directory),
        ):
            yield make_store(self.location, self.config)

    async def _bring_up_to_date(
        self, store: ObjectStore, listing: Mapping[str, RemoteObject], plan: Sequence[str]
    ) -> None:
        """Download the planned files that are not current; the manifest keeps only the plan."""
        stale = [name for name in plan if not self._current(listing[name])]
        for name in stale:
            self._forget(listing[name])
        await _gather(self._fetch_one(store, listing[name]) for name in stale)
        self.manifest = {name: self.manifest[name] for name in plan}

    def _result(self, plan: Sequence[str]) -> FetchResult:
        reused = tuple(name for name in plan if name not in self.downloaded)
        return FetchResult(
            self.uri, self.directory, tuple(self.downloaded), reused, self.bytes_downloaded
        )

    async def _plan(self, store: ObjectStore, listing: Mapping[str, RemoteObject]) -> list[str]:
        if not needs_sharded_plan(listing):
            return plan_checkpoint(self.uri, listing, None)
        index = listing[INDEX_FILE]
        if not self._current(index):
            self._forget(index)
            await self._fetch_one(store, index)
        text = (self.directory / INDEX_FILE).read_bytes()
        return plan_checkpoint(self.uri, listing, shard_names(self.uri, text))

    def _forget(self, remote: RemoteObject) -> None:
        """Drop a file's manifest entry before fetching it again, keeping its digest when the
        remote object is the same one (then the new copy must match it)."""
        entry = self.manifest.pop(remote.name, None)
        if same_remote(entry, remote) and isinstance(entry, dict) and entry.get("blake3"):
            self.recorded[remote.name] = str(entry["blake3"])

    def _check_headers(self) -> None:
        """Read the fetched checkpoint's safetensors headers, so that a checkpoint stored
        truncated or malformed fails here, named by its URI, not later by a cache path."""
        try:
            read_layout(self.directory)
        except CheckpointError as error:
            cause = str(error).replace(f"{self.directory}/", "")
            cause = cause.replace(str(self.directory), self.uri)
            raise FetchError(self.uri, "invalid-checkpoint", cause) from error

    def _current(self, remote: RemoteObject) -> bool:
        local = _local_stat(self.directory / remote.name)
        return is_current(self.manifest.get(remote.name), remote, local)

    async def _fetch_one(self, store: ObjectStore, remote: RemoteObject) -> None:
        started = time.monotonic()
        verified = await _download(
            store,
            self.uri,
            remote,
            self.directory,
            self.transfer,
            self.config,
            self.recorded.get(remote.name),
        )
        stat = (self.directory / remote.name).stat()
        self.manifest[remote.name] = manifest_entry(remote, stat.st_mtime_ns, verified)
        self.downloaded.append(remote.name)
        self.bytes_downloaded += remote.size
        log.info(
            "fetched %s%s (%d bytes, %.1fs)",
            self.uri,
            remote.name,
            remote.size,
            time.monotonic() - started,
        )


async def _list_tree(
    store: ObjectStore, uri: str, config: StorageConfig
) -> dict[str, RemoteObject]:
    """Every object under the prefix, by its path relative to it (a data bundle's tree)."""
    import obstore

    objects = {}
    try:
        async for batch in obstore.list(store, None, chunk_size=1000):
            for meta in batch:
                objects[meta["path"]] = _remote_object(meta)
    except Exception as error:
        raise storage_error(uri, error, config) from error
    return objects


def plan_tree(uri: str, names: Iterable[str], required: str) -> list[str]:
    """The files of a data bundle: every object but hidden ones, names checked to stay inside
    the cache entry; `required` (the bundle's manifest) must be among them."""
    plan = []
    for name in sorted(names):
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts) or "\\" in name:
            raise FetchError(uri, "invalid-checkpoint", f"object name {name!r} is not a plain path")
        if any(p.startswith(".") for p in parts):
            continue
        plan.append(name)
    if required not in plan:
        raise FetchError(uri, "not-found", f"no {required} under this prefix (not a data bundle)")
    return plan


def _prune_tree(directory: Path, keep: Iterable[str]) -> None:
    wanted = {*keep, MANIFEST_NAME}
    for path in sorted(directory.rglob("*"), reverse=True):
        name = path.relative_to(directory).as_posix()
        if path.is_file() and name not in wanted:
            path.unlink(missing_ok=True)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


class _TreeSync(_CheckpointSync):
    """A data bundle: a whole tree of files under a prefix, kept like a checkpoint (verified
    by size and ETag, reused when the listing matches)."""

    def __init__(self, *args: Any, required: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.required = required

    async def run(self) -> FetchResult:
        async with self._locked() as store:
            listing = await _list_tree(store, self.uri, self.config)
            plan = plan_tree(self.uri, listing, self.required)
            self.directory.mkdir(exist_ok=True)
            self.manifest = _read_manifest(self.directory)
            try:
                await self._bring_up_to_date(store, listing, plan)
                _prune_tree(self.directory, plan)
            finally:
                _write_manifest(self.directory, self.uri, self.manifest)
        return self._result(plan)


def fetch_tree(
    uri: str, cache_dir: Path, *, required: str, config: StorageConfig | None = None
) -> FetchResult:
    """A directory tree (a data bundle) at `uri`, fetched into the verified cache or, for a
    local path, checked and used in place. `required` is a file that must be in it."""
    location = parse_uri(uri)
    if location.is_local:
        path = Path(location.prefix)
        if not (path / required).is_file():
            raise FetchError(location.uri, "not-found", f"no {required} in {path}")
        return FetchResult(location.uri, path, local=True)
    config = config or StorageConfig.from_env()

    async def sync() -> FetchResult:
        transfer = _Transfer(asyncio.Semaphore(MAX_CONCURRENCY), PART_SIZE, LOCK_TIMEOUT_S)
        try:
            return await _TreeSync(
                location, Path(cache_dir), config, transfer, required=required
            ).run()
        except OSError as error:
            raise FetchError(location.uri, "io", f"cache directory {cache_dir}: {error}") from error

    return _run(sync())


def validate_local(location: Location) -> FetchResult:
    """Check a local checkpoint directory in place: complete and safetensors, nothing copied."""
    path = Path(location.prefix)
    if not path.is_dir():
        raise FetchError(location.uri, "not-found", "no such directory")
    try:
        names = [entry.name for entry in path.iterdir() if entry.is_file()]
        index = (path / INDEX_FILE).read_bytes() if needs_sharded_plan(names) else None
    except OSError as error:
        raise FetchError(location.uri, "io", f"cannot read the directory: {error}") from error
    shards = shard_names(location.uri, index) if index is not None else None
    plan = plan_checkpoint(location.uri, names, shards)
    return FetchResult(location.uri, path, reused=tuple(plan), local=True)


# --- public API -------------------------------------------------------------------------------


async def fetch_checkpoints_async(
    uris: Sequence[str],
    cache_dir: Path,
    *,
    config: StorageConfig | None = None,
    max_concurrency: int = MAX_CONCURRENCY,
    part_size: int = PART_SIZE,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
) -> list[FetchResult]:
    """Fetch several checkpoints concurrently, sharing one limit on concurrent requests.

    Files of one checkpoint, checkpoints, and parts of large files all run at once up to
    `max_concurrency` requests. A URI given twice is fetched once.
    """
    locations = [parse_uri(uri) for uri in uris]
    remote = [location for location in locations if not location.is_local]
    if remote and config is None:
        config = StorageConfig.from_env()
    transfer = _Transfer(asyncio.Semaphore(max_concurrency), part_size, lock_timeout_s)
    cache_dir = Path(cache_dir)
    unique = {location.uri: location for location in locations}
    results = await _gather(
        _fetch_location(location, cache_dir, config, transfer) for location in unique.values()
    )
    by_uri = dict(zip(unique, results, strict=True))
    return [by_uri[location.uri] for location in locations]


async def _fetch_location(
    location: Location, cache_dir: Path, config: StorageConfig | None, transfer: _Transfer
) -> FetchResult:
    if location.is_local:
        return validate_local(location)
    assert config is not None
    try:
        return await _CheckpointSync(location, cache_dir, config, transfer).run()
    except OSError as error:
        raise FetchError(location.uri, "io", f"cache directory {cache_dir}: {error}") from error


def fetch_checkpoints(
    uris: Sequence[str],
    cache_dir: Path,
    *,
    config: StorageConfig | None = None,
    max_concurrency: int = MAX_CONCURRENCY,
) -> list[Path]:
    """Local directories ready for loading, in the order of `uris`."""
    results = _run(
        fetch_checkpoints_async(uris, cache_dir, config=config, max_concurrency=max_concurrency)
    )
    return [result.path for result in results]


def fetch_checkpoint(uri: str, cache_dir: Path, *, config: StorageConfig | None = None) -> Path:
    """The local directory holding the checkpoint at `uri`, fetched or reused from the cache."""
    return fetch_checkpoint_result(uri, cache_dir, config=config).path


def fetch_checkpoint_result(
    uri: str, cache_dir: Path, *, config: StorageConfig | None = None, part_size: int = PART_SIZE
) -> FetchResult:
    """`fetch_checkpoint` with the account of what was transferred and what was reused."""
    return _run(fetch_checkpoints_async([uri], cache_dir, config=config, part_size=part_size))[0]


Destination = Literal["empty", "model"]


def check_destination(uri: str, *, config: StorageConfig | None = None) -> Destination:
    """Check an output destination before any work is done for it; say what it holds.

    Called before the first trial (local mode) and before a trial's fetch (the runner), so a
    destination that cannot take the model fails in seconds, not after a search. Refused, as
    `config` errors naming the URI: a URI that does not parse, a local path that is a file or
    a directory holding files but no model, a parent that cannot be written, a bucket that is
    missing or that these credentials cannot list. "model": an earlier export is there (what
    replaces it is the caller's decision); "empty": nothing is there yet.
    """
    location = parse_uri(uri)
    if location.is_local:
        return _check_local_destination(Path(location.prefix), location.uri)
    return _run(_check_remote_destination(location, config or StorageConfig.from_env()))


def _check_local_destination(target: Path, uri: str) -> Destination:
    if target.exists() and not target.is_dir():
        raise FetchError(uri, "config", f"output destination {target} is a file")
    if target.is_dir() and any(target.iterdir()):
        if any((target / name).exists() for name in MODEL_FILES):
            return "model"
        raise FetchError(uri, "config", f"output destination {target} holds files but no model")
    parent = target
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise FetchError(uri, "config", f"output destination: {parent} is not writable")
    return "empty"


async def _check_remote_destination(location: Location, config: StorageConfig) -> Destination:
    store = make_store(location, config)
    try:
        listed = await _list_top_level(store, location.uri, config)
    except FetchError as error:
        if error.kind in ("not-found", "access-denied"):
            raise FetchError(location.uri, "config", f"output destination: {error.cause}") from None
        raise
    if any(name in listed for name in MODEL_FILES):
        return "model"
    if listed:
        raise FetchError(location.uri, "config", "output destination holds objects but no model")
    return "empty"


async def upload_directory_async(
    local_dir: Path,
    uri: str,
    *,
    config: StorageConfig | None = None,
    max_concurrency: int = MAX_CONCURRENCY,
) -> list[str]:
    """Upload every non-hidden file under `local_dir` to the prefix `uri`; return the names.

    The destination's model is replaced as a whole: when a model is already there, all its
    model files (`files_to_replace`) are removed first, so that no reader ever finds one
    model's files beside another's (say a stale index and shards next to a new single file,
    which loaders would read instead of it or mix with it). Then weights go first and
    `config.json` last (`upload_batches`), each object carrying the BLAKE3 of its content
    (`DIGEST_ATTRIBUTE`) that every later fetch checks; a listing afterwards checks that every
    object arrived with its size.
    """
    source = Path(local_dir)
    location = parse_uri(uri)
    if not source.is_dir():
        raise FetchError(location.uri, "not-found", f"no local directory {source} to upload")
    files = _files_to_upload(source)
    if not files:
        raise FetchError(location.uri, "not-found", f"nothing to upload in {source}")
    if location.is_local:
        await asyncio.to_thread(_copy_tree, source, Path(location.prefix), files, location.uri)
        return files
    config = config or StorageConfig.from_env()
    store = make_store(location, config)
    limiter = asyncio.Semaphore(max_concurrency)
    existing = await _list_top_level(store, location.uri, config)
    await _gather(
        _delete(store, location.uri, name, limiter, config) for name in files_to_replace(existing)
    )
    ordered = upload_batches(files)
    for batch in ordered:
        await _gather(_put(store, location.uri, source, name, limiter, config) for name in batch)
    await _check_uploaded(store, location.uri, source, files, config)
    return [name for batch in ordered for name in batch]


def upload_directory(
    local_dir: Path,
    uri: str,
    *,
    config: StorageConfig | None = None,
    max_concurrency: int = MAX_CONCURRENCY,
) -> list[str]:
    """Synchronous `upload_directory_async` (the runner writes merged models with it)."""
    return _run(
        upload_directory_async(local_dir, uri, config=config, max_concurrency=max_concurrency)
    )


def _files_to_upload(source: Path) -> list[str]:
    names = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            names.append(relative.as_posix())
    return names


async def _put(
    store: ObjectStore,
    uri: str,
    source: Path,
    name: str,
    limiter: asyncio.Semaphore,
    config: StorageConfig,
) -> None:
    import obstore

    async with limiter:
        digest = await asyncio.to_thread(file_digest, source / name)
        try:
            await obstore.put_async(
                store,
                name,
                source / name,
                chunk_size=UPLOAD_PART_SIZE,
                max_concurrency=4,
                attributes={DIGEST_ATTRIBUTE: digest},
            )
        except Exception as error:
            raise storage_error(uri, error, config) from error


async def _delete(
    store: ObjectStore, uri: str, name: str, limiter: asyncio.Semaphore, config: StorageConfig
) -> None:
    import obstore

    async with limiter:
        try:
            await obstore.delete_async(store, name)
        except Exception as error:
            raise storage_error(uri, error, config) from error


def file_digest(path: Path) -> str:
    """BLAKE3 of a file's content (multi-threaded, memory-mapped)."""
    return blake3(max_threads=blake3.AUTO).update_mmap(path).hexdigest()


async def _check_uploaded(
    store: ObjectStore, uri: str, source: Path, files: Sequence[str], config: StorageConfig
) -> None:
    import obstore

    try:
        listed = await obstore.list(store, None).collect_async()
    except Exception as error:
        raise storage_error(uri, error, config) from error
    sizes = {meta["path"]: int(meta["size"]) for meta in listed}
    wrong = [name for name in files if sizes.get(name) != (source / name).stat().st_size]
    if wrong:
        raise FetchError(
            uri, "storage", f"upload incomplete, size mismatch for: {', '.join(wrong[:5])}"
        )


def _copy_tree(source: Path, target: Path, files: Sequence[str], uri: str) -> None:
    """Copy into a local destination, each file through a temporary name, after removing the
    model that was there (see `upload_directory_async`)."""
    try:
        if target.is_dir():
            present = [p.name for p in target.iterdir() if p.is_file() or p.is_symlink()]
            for name in files_to_replace(present):
                (target / name).unlink(missing_ok=True)
        for name in [n for batch in upload_batches(files) for n in batch]:
            destination = target / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            temporary = destination.with_name(f".{destination.name}.part-{secrets.token_hex(4)}")
            shutil.copyfile(source / name, temporary)
            temporary.replace(destination)
    except OSError as error:
        raise FetchError(uri, "io", f"copy failed: {error}") from error


def _run(coroutine: Awaitable[T]) -> T:
    """Run a coroutine from synchronous code, even when called inside a running event loop."""

    async def main() -> T:
        return await coroutine

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, main()).result()
