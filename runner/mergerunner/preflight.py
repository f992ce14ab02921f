"""The preflight: every configuration error a search can have, found before any GPU trial.

It runs once per search — on a cluster as one CPU-only Job (`mergerunner preflight`, the same
trial document as a trial, storage credentials, no GPU, no Kubernetes credentials), locally
inside `mergesearch run` — and reports like a trial (a `TrialResult` whose failed step is
`preflight` and whose `errorKind` says why). It checks:

- checkpoints: each one's `config.json`, index and safetensors *headers*, read with ranged
  requests (a few KB per file, never a weight), and that names, shapes and dtypes agree
  across checkpoints (the same `plan_merge` a merge runs);
- the evaluator backend's requirements;
- tasks: every task and group resolves in lm-eval's registry (or the custom tasks), its data
  is in the data bundle, code tasks are allowed, and its metric is one it reports.

Measured (bench/preflight.py): 8 checkpoints shaped like a 1.1B-parameter Llama, 2.2 GB each,
17.6 GB in all: 527 KB read in 16 ranged requests, 0.003 % of the checkpoint bytes, 0.05 s from
local disk (bench/results/preflight.json).
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergerunner.checkpoint import (
    MAX_HEADER_BYTES,
    CheckpointError,
    CheckpointLayout,
    MergePlan,
    layout_of,
    parse_header,
    plan_merge,
    read_weight_map,
)
from mergerunner.contract import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE
from mergerunner.storage import FetchError, StorageConfig, make_store, parse_uri, storage_error
from mergerunner.trial import (
    FailureKind,
    StepTimings,
    TrialDocument,
    TrialError,
    TrialResult,
    failure_kind_of,
)

if TYPE_CHECKING:
    from obstore.store import ObjectStore

# The first request of a safetensors file: its length prefix and, for the checkpoints we
# measured (a 1.1B Llama header is 23 KB, bench/preflight.py), the whole header with it; a
# longer one costs a second request.
FIRST_READ = 64 * 1024
MAX_JSON_BYTES = 64 * 2**20


class PreflightError(TrialError):
    """A configuration the search cannot run with, found before any trial."""

    failure_kind = FailureKind.CONFIG


@dataclass
class ReadStats:
    """What the checkpoint checks cost: bytes over the wire against the checkpoints' size."""

    bytes_read: int = 0
    requests: int = 0
    checkpoint_bytes: int = 0


@dataclass
class PreflightReport:
    plan: MergePlan
    stats: ReadStats
    seconds: float
    tasks: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- checkpoints


def _store(uri: str, config: StorageConfig | None) -> tuple[ObjectStore, str]:
    location = parse_uri(uri)
    if location.is_local:
        from obstore.store import LocalStore

        path = Path(location.prefix)
        if not path.is_dir():
            raise FetchError(location.uri, "not-found", "no such directory")
        return LocalStore(prefix=path), location.uri
    return make_store(location, config or StorageConfig.from_env()), location.uri


async def _get(
    store: ObjectStore, uri: str, name: str, span: tuple[int, int] | None, stats: ReadStats
) -> bytes:
    import obstore

    options: dict[str, Any] = {"range": span} if span else {}
    try:
        result = await obstore.get_async(store, name, options=options)
        data = bytes(await result.bytes_async())
    except Exception as error:
        raise storage_error(uri, error, None) from error
    stats.bytes_read += len(data)
    stats.requests += 1
    return data


async def _listing(store: ObjectStore, uri: str) -> dict[str, int]:
    import obstore

    try:
        listing = await obstore.list_with_delimiter_async(store, None)
    except Exception as error:
        raise storage_error(uri, error, None) from error
    return {meta["path"]: int(meta["size"]) for meta in listing["objects"]}


async def _header(
    store: ObjectStore, uri: str, name: str, size: int, stats: ReadStats
) -> dict[str, Any]:
    label = f"{uri.rstrip('/')}/{name}"
    if size < 8:
        raise CheckpointError(f"{label}: too short to be a safetensors file")
    first = await _get(store, uri, name, (0, min(size, FIRST_READ)), stats)
    (length,) = struct.unpack("<Q", first[:8])
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise CheckpointError(f"{label}: header length {length} is not plausible")
    raw = first[8 : 8 + length]
    if len(raw) < length:
        raw += await _get(store, uri, name, (len(first), 8 + length), stats)
    tensors, _ = parse_header(raw, Path(label), size)
    return tensors


async def _json(store: ObjectStore, uri: str, name: str, size: int, stats: ReadStats) -> Any:
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{uri}{name}: {size} bytes is not a plausible {name}")
    try:
        return json.loads(await _get(store, uri, name, None, stats))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{uri}{name}: not valid JSON ({exc})") from exc


async def remote_layout(
    uri: str, stats: ReadStats, config: StorageConfig | None = None
) -> CheckpointLayout:
    """A checkpoint's layout from its listing, config.json, index and safetensors headers."""
    store, uri = _store(uri, config)
    names = await _listing(store, uri)
    if not names:
        raise FetchError(uri, "not-found", "no objects under this prefix")
    stats.checkpoint_bytes += sum(names.values())
    cfg: Any = {}
    if CONFIG_FILE in names:
        cfg = await _json(store, uri, CONFIG_FILE, names[CONFIG_FILE], stats)
    if WEIGHTS_FILE in names:
        tensors = await _header(store, uri, WEIGHTS_FILE, names[WEIGHTS_FILE], stats)
    elif INDEX_FILE in names:
        raw = await _get(store, uri, INDEX_FILE, None, stats)
        weight_map = _weight_map(uri, raw)
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if s not in names]
        if missing:
            raise CheckpointError(f"{uri}: {INDEX_FILE} names missing shard(s): {missing[:3]}")
        parts = await asyncio.gather(*(_header(store, uri, s, names[s], stats) for s in shards))
        tensors = {name: info for part in parts for name, info in part.items()}
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{uri}: tensor {absent[0]!r} is in the index but no shard")
    else:
        raise CheckpointError(f"checkpoint {uri}: no {WEIGHTS_FILE} and no {INDEX_FILE}")
    return layout_of(Path(uri), tensors, cfg if isinstance(cfg, dict) else {}, source=uri)


def _weight_map(uri: str, raw: bytes) -> Mapping[str, str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / INDEX_FILE
        index.write_bytes(raw)
        try:
            return read_weight_map(index)
        except CheckpointError as exc:
            raise CheckpointError(f"{uri}: {exc}") from None


def check_checkpoints(
    uris: Sequence[str], config: StorageConfig | None = None
) -> tuple[MergePlan, ReadStats]:
    """Read every checkpoint's headers (concurrently) and check that they can be merged."""
    stats = ReadStats()

    async def read_all() -> list[CheckpointLayout]:
        return list(await asyncio.gather(*(remote_layout(u, stats, config) for u in uris)))

    layouts = asyncio.run(read_all())
    return plan_merge(layouts), stats


# --------------------------------------------------------------------------- the rest


def check_backend(doc: TrialDocument) -> None:
    """What the evaluator backend needs, present in this image."""
    backend = doc.evaluator.backend
    if backend == "vllm" and find_spec("vllm") is None:
        raise PreflightError(
            "evaluator.backend vllm: the runner image has no vllm (build it with "
            "INSTALL_VLLM=true, docs/deploy.md)"
        )


def check_tasks(doc: TrialDocument, bundle: Path | None, custom: Path | None) -> list[str]:
    """Every task resolves, its data is in the bundle, code tasks are allowed, and each
    entry's metric is one lm-eval reports for it, and unseen examples remain for a search that
    confirms (TaskSuite checks all of it as it loads);
    returns the leaf tasks."""
    from mergerunner.evaluate import TaskSuite, subset_options

    suite = TaskSuite(
        [*doc.held_in, *doc.held_out],
        include_path=custom,
        seed=doc.evaluator.seed,
        evaluator=doc.evaluator,
        bundle=bundle,
        allow_code_execution=doc.allow_code_execution,
        **subset_options(doc),  # a search that will confirm: unseen examples must remain
    )
    from mergerunner.server import check_server_tasks

    check_server_tasks(suite.output_types, doc.evaluator)  # what a server backend can score
    return [leaf for name in suite.task_names for leaf in suite.leaves_of(name)]


def run_preflight(
    doc: TrialDocument, *, cache_dir: Path, custom: Path | None = None
) -> tuple[TrialResult, PreflightReport | None]:
    """The preflight of a search whose trials look like `doc`; never raises for a finding."""
    from mergerunner.fetch import check_destination
    from mergerunner.run import fetch_bundle

    start = time.perf_counter()
    try:
        if doc.output.uri:  # where the final trial will export: usable, before any trial
            check_destination(doc.output.uri)
        plan, stats = check_checkpoints([c.uri for c in doc.checkpoints])
        check_backend(doc)
        bundle = fetch_bundle(doc.datasets_uri, cache_dir) if doc.datasets_uri else None
        tasks = check_tasks(doc, bundle, custom)
    except Exception as exc:  # every finding becomes the result, with its kind
        kind = failure_kind_of(exc)
        text = str(exc) or type(exc).__name__
        return (
            TrialResult(
                id=doc.id,
                status="failed",
                failed_step="preflight",
                error_kind=kind,
                error=text if hasattr(exc, "failure_kind") else f"{type(exc).__name__}: {text}",
                timings=StepTimings(total_s=round(time.perf_counter() - start, 4)),
            ),
            None,
        )
    seconds = time.perf_counter() - start
    result = TrialResult(
        id=doc.id, status="succeeded", timings=StepTimings(total_s=round(seconds, 4))
    )
    return result, PreflightReport(plan, stats, seconds, tasks)
