"""Linear merge θ = Σ wᵢ θᵢ of validated checkpoints, accumulated in float32.

Two outputs share one arithmetic, so that they produce bit-identical tensors:

* `merge_to_directory` streams the merge to an HF-format directory. It writes the safetensors
  format itself (header first, computed from the known shapes, then every span of tensor bytes
  at its known offset) because safetensors' own writer wants the whole model in memory.
  Tensors are cut into windows, mapped from every input at once, and windows into spans of a
  bounded number of elements, so memory stays a few tens of MiB whatever the model. A few
  workers each claim a window, map it, accumulate its spans, hash them block by block and
  write them: no stage waits for another, nothing is handed between threads.
* `ResidentMerger` keeps every checkpoint in memory once and writes a merge straight into an
  already loaded model, so that a search evaluates a candidate without touching the disk.

The arithmetic for each element is `acc = 0; acc += wᵢ·xᵢ` (one fused multiply-add per input,
in checkpoint order, zero weights skipped), then one rounding to the output dtype. torch
evaluates that elementwise, so the result does not depend on how the work is split.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import mmap
import os
import shutil
import struct
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from blake3 import blake3

from mergerunner.checkpoint import (
    FLOAT_ITEMSIZE,
    HEAD_NAME,
    CheckpointError,
    MergePlan,
    PlannedTensor,
    validate_checkpoints,
)
from mergerunner.contract import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE
from mergerunner.trial import FailureKind, TrialError

OUTPUT_DTYPES: Mapping[str, tuple[torch.dtype, str]] = {
    "bfloat16": (torch.bfloat16, "BF16"),
    "float16": (torch.float16, "F16"),
    "float32": (torch.float32, "F32"),
}
TORCH_DTYPE: Mapping[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
CODE_OF_TORCH: Mapping[torch.dtype, str] = {v: k for k, v in TORCH_DTYPE.items()}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
RECIPE_KEY = "merge_recipe"
DATA_ALIGNMENT = 64
# Elements per accumulator pass: the float32 accumulator (1 MiB) stays in a core's L2 cache,
# which measured fastest (4 MiB in the shared L3 was a fifth slower).
CHUNK_ELEMS = 1 << 18
# Elements per block of the content digest: every tensor is hashed block by block (see
# `content_digest`), so that blocks can be hashed in parallel. Spans start on block bounds.
DIGEST_BLOCK = 1 << 16
# Input bytes mapped per window, all checkpoints together (one window per worker is mapped).
MAP_BUDGET_BYTES = 32 << 20
# At least one digest block, so that a chunk (a whole number of blocks) fits in a window.
MIN_WINDOW_ELEMS = DIGEST_BLOCK
# BLAKE3, not sha256: 2.2x faster here (256 MiB in 0.08 s against 0.18 s with SHA-NI), which
# made the digest the merge's costliest stage after the arithmetic.
DIGEST_SCHEME = "blake3:"
# Files copied from the first checkpoint besides config.json (which is rewritten).
SIDE_FILES = (
    "generation_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
SIDE_FILE_PREFIXES = ("tokenizer",)


class MergeWeightsError(ValueError):
    """The weights do not fit the checkpoints: wrong count or not finite."""

    failure_kind = FailureKind.INVALID_INPUT


class NonFiniteMerge(TrialError):
    """These weights make a tensor of the merge NaN or infinite (float32 accumulation or the
    output dtype overflows): this candidate failed, the search goes on."""

    failure_kind = FailureKind.NON_FINITE


class ModelMismatch(ValueError):
    """A loaded model does not have the checkpoints' tensors, so a merge cannot go into it."""

    failure_kind = FailureKind.CHECKPOINTS_INCOMPATIBLE


@dataclass(frozen=True)
class MergeReport:
    """What `merge_to_directory` wrote, and how long each phase took."""

    out_dir: Path
    digest: str
    bytes_written: int
    files: tuple[str, ...]
    tensors: int
    dtype: str
    weights: tuple[float, ...]
    recipe: Mapping[str, Any]
    seconds: Mapping[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Functional core: weights, recipe, shards, headers, digests
# ---------------------------------------------------------------------------------------------


def validate_weights(weights: Sequence[float], count: int) -> tuple[float, ...]:
    """Check one finite real weight per checkpoint. Any real is allowed: the search may use an
    unconstrained parameterisation, so sums other than 1 and negative weights are legitimate."""
    values = list(weights)
    if len(values) != count:
        raise MergeWeightsError(f"expected {count} weights (one per checkpoint), got {len(values)}")
    out = []
    for i, value in enumerate(values):
        try:
            if isinstance(value, (str, bytes, bool)):
                raise TypeError
            number = float(value)
        except (TypeError, ValueError):
            raise MergeWeightsError(f"weight {i} is {value!r}, not a real number") from None
        if not math.isfinite(number) or not _finite_in_float32(number):
            raise MergeWeightsError(
                f"weight {i} is {number}; weights must be finite in float32 (|w| < 3.4e38), "
                "the precision the merge multiplies in"
            )
        out.append(number)
    return tuple(out)


def _finite_in_float32(value: float) -> bool:
    """Whether `value` stays finite when rounded to float32 (torch casts `alpha` so)."""
    try:
        struct.pack("<f", value)
    except OverflowError:
        return False
    return True


def output_dtype(dtype: str) -> tuple[torch.dtype, str]:
    """torch dtype and safetensors code of an output dtype name."""
    try:
        return OUTPUT_DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"unsupported output dtype {dtype!r}; choose one of {', '.join(OUTPUT_DTYPES)}"
        ) from None


def library_version() -> str:
    try:
        return metadata.version("mergesearch")
    except metadata.PackageNotFoundError:
        return "unknown"


def merge_recipe(
    plan: MergePlan, weights: Sequence[float], dtype: str, names: Sequence[str]
) -> dict[str, Any]:
    """The merge's provenance, stored in every output file so a model explains itself."""
    return {
        "method": "linear",
        "checkpoints": [
            {"name": name, "path": str(layout.path)}
            for name, layout in zip(names, plan.checkpoints, strict=True)
        ],
        "weights": list(weights),
        "dtype": dtype,
        "accumulation": "float32",
        "library": "mergesearch",
        "version": library_version(),
    }


def encode_header(
    entries: Sequence[tuple[str, str, tuple[int, ...], int]], meta: Mapping[str, str]
) -> bytes:
    """A safetensors header: 8-byte little-endian length, then JSON padded with spaces (which
    the format allows) so that the tensor data starts at a multiple of DATA_ALIGNMENT bytes.
    `entries` are (name, dtype code, shape, byte size) in the order the data will be written.

    Why 64 and not the 8 the format needs: copying into the page cache runs several times
    slower on some x86 CPUs when source and destination differ in alignment within a cache
    line, and our buffers are 64-byte aligned.
    """
    header: dict[str, Any] = {"__metadata__": dict(meta)} if meta else {}
    offset = 0
    for name, code, shape, nbytes in entries:
        header[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % DATA_ALIGNMENT)
    return len(text).to_bytes(8, "little") + text


@dataclass(frozen=True)
class ShardSpec:
    """One output file: its tensors in write order and its encoded header."""

    file: str
    tensors: tuple[PlannedTensor, ...]
    header: bytes
    data_bytes: int

    @property
    def size(self) -> int:
        return len(self.header) + self.data_bytes


def plan_shards(
    tensors: Sequence[PlannedTensor], code: str, max_shard_bytes: int, meta: Mapping[str, str]
) -> tuple[ShardSpec, ...]:
    """Pack tensors, in order, into files of at most `max_shard_bytes` of data (a tensor larger
    than that gets a file of its own), named as transformers names its shards."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    itemsize = FLOAT_ITEMSIZE[code]
    groups: list[list[PlannedTensor]] = [[]]
    used = 0
    for tensor in tensors:
        nbytes = tensor.numel * itemsize
        if groups[-1] and used + nbytes > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(tensor)
        used += nbytes
    count = len(groups)
    specs = []
    for index, group in enumerate(groups, start=1):
        name = WEIGHTS_FILE if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"
        entries = [(t.name, code, t.shape, t.numel * itemsize) for t in group]
        specs.append(
            ShardSpec(name, tuple(group), encode_header(entries, meta), sum(e[3] for e in entries))
        )
    return tuple(specs)


def digest_prefix(name: str, code: str, shape: Sequence[int]) -> bytes:
    """What the content digest hashes before a tensor's block digests: name, dtype and shape."""
    return json.dumps([name, code, list(shape)]).encode() + b"\n"


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's raw little-endian bytes, without a copy when it is already on the CPU."""
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.contiguous().view(torch.uint8).numpy())


def block_digests(raw: memoryview, itemsize: int) -> bytes:
    """BLAKE3 of each DIGEST_BLOCK-element block of `raw` (the last one may be shorter),
    concatenated. `raw` must start on a block boundary of its tensor."""
    step = DIGEST_BLOCK * itemsize
    return b"".join(blake3(raw[i : i + step]).digest() for i in range(0, len(raw), step))


def blocks_of(numel: int) -> int:
    return -(-numel // DIGEST_BLOCK)


def content_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The content digest of tensors in the given order (see `merge_to_directory`).

    `merge_to_directory` computes the same digest while it writes, so a resident merge and a
    written one of the same weights and dtype have equal digests."""
    hasher = blake3()
    for name, tensor in named:
        hasher.update(digest_prefix(name, CODE_OF_TORCH[tensor.dtype], tensor.shape))
        if tensor.numel():
            hasher.update(block_digests(tensor_bytes(tensor), tensor.element_size()))
    return DIGEST_SCHEME + hasher.hexdigest()


def updated_config(config: dict[str, Any], dtype: str, untie_head: bool) -> dict[str, Any]:
    """The first checkpoint's config.json, saying the merged model's dtype and tying."""
    out = dict(config)
    keys = [k for k in ("dtype", "torch_dtype") if k in out] or ["torch_dtype"]
    for key in keys:
        out[key] = dtype
    if untie_head:
        out["tie_word_embeddings"] = False
    return out


# ---------------------------------------------------------------------------------------------
# Streaming: spans, mapping, accumulating, writing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Span:
    """Elements [start, stop) of one tensor, written to shard `shard`."""

    shard: int
    tensor: PlannedTensor
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def stream_geometry(active_inputs: int, itemsize: int) -> tuple[int, int]:
    """(window, chunk) sizes in elements. A window is mapped from every input at once and
    bounds the mapped bytes to MAP_BUDGET_BYTES; a chunk is what one accumulator pass covers."""
    window = max(MIN_WINDOW_ELEMS, MAP_BUDGET_BYTES // (max(1, active_inputs) * itemsize))
    chunk = min(CHUNK_ELEMS, window) // DIGEST_BLOCK * DIGEST_BLOCK
    return window // chunk * chunk, chunk


def _spans(shards: Sequence[ShardSpec], size: int) -> Iterator[_Span]:
    """Every tensor of every shard, in write order, cut into spans of at most `size` elements;
    an empty tensor still gets one (empty) span so that it is hashed and ordered like others."""
    for index, shard in enumerate(shards):
        for tensor in shard.tensors:
            numel = tensor.numel
            if numel == 0:
                yield _Span(index, tensor, 0, 0)
            for start in range(0, numel, size):
                yield _Span(index, tensor, start, min(numel, start + size))


def _split(window: _Span, size: int) -> Iterator[_Span]:
    if window.size == 0:
        yield window
    for start in range(window.start, window.stop, size):
        yield _Span(window.shard, window.tensor, start, min(window.stop, start + size))


class _Files:
    """Input files opened once each, for mapping."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> _Files:
        return self

    def __exit__(self, *_: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def fd(self, file: Path) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            return fd


class _Mapped:
    """One window of every active input, memory-mapped from the page cache.

    Mapping instead of reading saves copying every input byte once (a fifth of the CPU time of
    a merge). The mapping is private (copy-on-write): torch wants a writable buffer, and nothing
    done through it can reach the checkpoint files. Pages are faulted in by the accumulating
    threads, outside the GIL (prefaulting with madvise measured no cheaper, and Python holds
    the GIL through madvise). File pages count in RSS while mapped, so windows are bounded and
    unmapped as soon as they are consumed.
    """

    def __init__(self, files: _Files, window: _Span, active: Sequence[int]) -> None:
        self.maps: list[mmap.mmap] = []
        sources = [window.tensor.sources[index] for index in active]
        self.views = [torch.empty(0, dtype=TORCH_DTYPE[info.dtype]) for info in sources]
        if window.size == 0:
            return
        for row, info in enumerate(sources):
            itemsize = FLOAT_ITEMSIZE[info.dtype]
            begin = info.start + window.start * itemsize
            end = info.start + window.stop * itemsize
            base = begin - begin % mmap.ALLOCATIONGRANULARITY
            mapped = mmap.mmap(
                files.fd(info.file),
                end - base,
                flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=base,
            )
            self.maps.append(mapped)
            raw = torch.frombuffer(
                mapped, dtype=torch.uint8, count=end - begin, offset=begin - base
            )
            self.views[row] = raw.view(TORCH_DTYPE[info.dtype])

    def release(self) -> None:
        self.views.clear()
        for mapped in self.maps:
            with suppress(BufferError):  # a view still alive: unmapped when it is collected
                mapped.close()
        self.maps.clear()


def finite_probe(values: torch.Tensor) -> torch.Tensor:
    """A sum that NaN or ±Inf among `values` makes non-finite, as cheap as torch allows: in
    the values' own dtype (accumulated in float32 by torch) for bfloat16 and float32, 14 µs per
    256 Ki bf16 elements here against 69 µs for a sum asked in float32 (a slow conversion path)
    and 1.7 ms for `isfinite().all()`; in float32 for float16, whose own range (65504) a sum of
    finite values would often exceed."""
    if values.dtype == torch.float16:
        return torch.sum(values, dtype=torch.float32)
    return torch.sum(values)


def is_finite(values: torch.Tensor) -> bool:
    """Whether every value is finite: the probe, then, if a sum of finite values overflowed,
    the exact check."""
    return bool(torch.isfinite(finite_probe(values))) or bool(torch.isfinite(values).all())


def non_finite_error(
    tensor: PlannedTensor,
    offset: int,
    merged: torch.Tensor,
    acc: torch.Tensor,
    terms: Sequence[tuple[float, torch.Tensor]],
    sources: Sequence[int],
) -> Exception:
    """Why a merged span is not finite: a non-finite input is a broken checkpoint (fatal);
    finite inputs that these weights take out of range are this candidate's failure.
    `terms` are the span's (weight, input values), from the checkpoints numbered `sources`."""
    for (_, values), index in zip(terms, sources, strict=True):
        if not bool(torch.isfinite(values).all()):
            info = tensor.sources[index]
            return CheckpointError(
                f"tensor {tensor.name!r} of checkpoint {info.file.parent} ({info.file.name}) "
                "holds NaN or Inf values"
            )
    bad = int(torch.nonzero(~torch.isfinite(merged))[0, 0])
    wide = acc[bad].item() if acc.numel() > bad else float("nan")
    cause = (
        f"{wide:.4g} overflows the output dtype {str(merged.dtype).removeprefix('torch.')}"
        if math.isfinite(wide)
        else "the float32 accumulation overflows"
    )
    return NonFiniteMerge(
        f"the merge of tensor {tensor.name!r} is not finite at element {offset + bad} "
        f"({cause}): these weights give a NaN/Inf model"
    )


def accumulate(acc: torch.Tensor, terms: Iterable[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """acc = Σ w·x in acc's dtype (float32): the one arithmetic both outputs use."""
    acc.zero_()
    for weight, values in terms:
        acc.add_(values, alpha=weight)
    return acc


class _Outputs:
    """The output shards, created with their headers, written at known offsets from any thread.

    Every tensor's place in its file is fixed by the header, so spans are written with
    `pwrite` as soon as they are merged, in whatever order the workers finish them: no thread
    has to wait for another to keep the file in order.
    """

    def __init__(self, directory: Path, shards: Sequence[ShardSpec], code: str) -> None:
        self._shards = shards
        self._itemsize = FLOAT_ITEMSIZE[code]
        self._fds: list[int] = []
        self._offset: dict[str, int] = {}  # of each tensor's data in its shard
        for spec in shards:
            fd = os.open(directory / spec.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self._fds.append(fd)
            _write_all(fd, memoryview(spec.header), 0)
            offset = len(spec.header)
            for tensor in spec.tensors:
                self._offset[tensor.name] = offset
                offset += tensor.numel * self._itemsize

    def __enter__(self) -> _Outputs:
        return self

    def __exit__(self, *_: object) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def write(self, span: _Span, raw: memoryview) -> None:
        offset = self._offset[span.tensor.name] + span.start * self._itemsize
        _write_all(self._fds[span.shard], raw, offset)

    def finish(self) -> int:
        """Check every file's size against its header; return the bytes written."""
        for spec, fd in zip(self._shards, self._fds, strict=True):
            size = os.fstat(fd).st_size
            if size != spec.size:
                raise OSError(f"{spec.file}: wrote {size} bytes, expected {spec.size}")
        return sum(spec.size for spec in self._shards)


def _write_all(fd: int, raw: memoryview, offset: int) -> None:
    while raw:
        done = os.pwrite(fd, raw, offset)
        raw, offset = raw[done:], offset + done


class _Digests:
    """Block digests of every output tensor, in write order, filled in by the workers.

    The content digest hashes each tensor's blocks separately, so that the workers hash the
    spans they merged in parallel and in any order; only the final, short pass over the
    block digests is serial. One slot of 32 bytes per DIGEST_BLOCK elements: 0.02% of a bf16
    model's size.
    """

    def __init__(self, shards: Sequence[ShardSpec], code: str) -> None:
        self._code = code
        self._itemsize = FLOAT_ITEMSIZE[code]
        self._order = [t for spec in shards for t in spec.tensors]
        self._base: dict[str, int] = {}
        slots = 0
        for tensor in self._order:
            self._base[tensor.name] = slots
            slots += blocks_of(tensor.numel)
        self._slots = bytearray(32 * slots)

    def record(self, span: _Span, raw: memoryview) -> None:
        if span.start % DIGEST_BLOCK or (
            span.stop % DIGEST_BLOCK and span.stop != span.tensor.numel
        ):
            raise AssertionError(f"span {span.start}:{span.stop} is not on digest block bounds")
        slot = self._base[span.tensor.name] + span.start // DIGEST_BLOCK
        digests = block_digests(raw, self._itemsize)
        self._slots[32 * slot : 32 * slot + len(digests)] = digests

    def finish(self) -> str:
        hasher = blake3()
        view = memoryview(self._slots)
        for tensor in self._order:
            hasher.update(digest_prefix(tensor.name, self._code, tensor.shape))
            base = 32 * self._base[tensor.name]
            hasher.update(view[base : base + 32 * blocks_of(tensor.numel)])
        return DIGEST_SCHEME + hasher.hexdigest()


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Run torch ops on `count` intra-op threads. The merge parallelises over windows with its
    own threads; intra-op threads on top of those, for spans this small, only add contention."""
    before = torch.get_num_threads()
    if before != count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if before != count:
            torch.set_num_threads(before)


@dataclass
class _Job:
    """What every worker of one streaming merge shares."""

    windows: Sequence[_Span]
    chunk: int
    weights: Sequence[float]
    active: Sequence[int]
    out: torch.dtype
    files: _Files
    outputs: _Outputs
    digests: _Digests
    claim: Iterator[int] = field(default_factory=itertools.count)
    failed: threading.Event = field(default_factory=threading.Event)


def _worker(job: _Job) -> None:
    """Claim windows one at a time; map each, merge it span by span, hash and write the spans.

    Each worker owns one accumulator and one output buffer (L2-sized), and at most one mapped
    window. `next()` on an itertools.count is atomic under the GIL, so no window is claimed
    twice. torch, blake3, pwrite and mmap release the GIL, so the workers run in parallel on
    the heavy parts (two threads hashing measured 2.1x one).
    """
    acc = torch.empty(job.chunk, dtype=torch.float32)
    buffer = torch.empty(job.chunk, dtype=job.out)
    try:
        while not job.failed.is_set():
            k = next(job.claim)
            if k >= len(job.windows):
                return
            window = job.windows[k]
            mapped = _Mapped(job.files, window, job.active)
            try:
                for span in _split(window, job.chunk):
                    lo, hi = span.start - window.start, span.stop - window.start
                    terms = [
                        (job.weights[i], v[lo:hi])
                        for i, v in zip(job.active, mapped.views, strict=True)
                    ]
                    merged = buffer[: span.size]
                    merged.copy_(accumulate(acc[: span.size], terms))
                    if not is_finite(merged):
                        raise non_finite_error(
                            span.tensor, span.start, merged, acc, terms, job.active
                        )
                    raw = memoryview(merged.view(torch.uint8).numpy())
                    if span.size:
                        job.digests.record(span, raw)
                        job.outputs.write(span, raw)
            finally:
                mapped.release()
    except BaseException:
        job.failed.set()
        raise


def _stream(
    plan: MergePlan,
    shards: Sequence[ShardSpec],
    weights: Sequence[float],
    out: torch.dtype,
    code: str,
    directory: Path,
    threads: int,
) -> tuple[str, int]:
    """Merge every window with `threads` workers, each mapping, accumulating, hashing and
    writing its own windows: no stage waits on another, and nothing is copied between threads.
    """
    active = [i for i, w in enumerate(weights) if w != 0.0]
    itemsize = max((FLOAT_ITEMSIZE[s.dtype] for t in plan.tensors for s in t.sources), default=4)
    window_size, chunk_size = stream_geometry(len(active), itemsize)
    with (
        _Files() as files,
        _Outputs(directory, shards, code) as outputs,
        _torch_threads(1),
    ):
        digests = _Digests(shards, code)
        job = _Job(
            list(_spans(shards, window_size)),
            chunk_size,
            weights,
            active,
            out,
            files,
            outputs,
            digests,
        )
        with ThreadPoolExecutor(threads, thread_name_prefix="merge") as pool:
            futures = [pool.submit(_worker, job) for _ in range(threads)]
        for future in futures:
            future.result()
        written = outputs.finish()
    return digests.finish(), written


# ---------------------------------------------------------------------------------------------
# Imperative shell: merge_to_directory
# ---------------------------------------------------------------------------------------------


def merge_to_directory(
    checkpoint_dirs: Sequence[Path],
    weights: Sequence[float],
    out_dir: Path,
    *,
    dtype: str = "bfloat16",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    checkpoint_names: Sequence[str] | None = None,
    threads: int = 2,
) -> MergeReport:
    """Write Σ wᵢ θᵢ of the checkpoints to `out_dir` as an HF-format model directory.

    Everything is validated before anything is written; the output is assembled in a sibling
    temporary directory and renamed into place only once complete, so `out_dir` either does not
    exist or holds a whole merge. `out_dir` must not exist or be an empty directory.
    `threads` accumulate spans in parallel, besides one thread mapping inputs and one writing.
    """
    begin = time.perf_counter()
    if sys.byteorder != "little":
        raise RuntimeError("safetensors data is little-endian; this host is not")
    out_torch, code = output_dtype(dtype)
    plan = validate_checkpoints([Path(p) for p in checkpoint_dirs])
    values = validate_weights(weights, len(plan.checkpoints))
    names = _names(plan, checkpoint_names)
    out_dir = Path(out_dir)
    _check_destination(out_dir)
    recipe = merge_recipe(plan, values, dtype, names)
    meta = {"format": "pt", RECIPE_KEY: json.dumps(recipe, sort_keys=True)}
    shards = plan_shards(plan.tensors, code, max_shard_bytes, meta)
    validated = time.perf_counter()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        digest, written = _stream(plan, shards, values, out_torch, code, staging, max(1, threads))
        merged = time.perf_counter()
        if len(shards) > 1:
            written += _write_index(staging, shards, recipe)
        _copy_side_files(plan, staging, dtype)
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    end = time.perf_counter()
    return MergeReport(
        out_dir=out_dir,
        digest=digest,
        bytes_written=written,
        files=tuple(sorted(p.name for p in out_dir.iterdir())),
        tensors=len(plan.tensors),
        dtype=dtype,
        weights=values,
        recipe=recipe,
        seconds={
            "validate": validated - begin,
            "merge": merged - validated,
            "finalize": end - merged,
            "total": end - begin,
        },
    )


def _names(plan: MergePlan, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [layout.path.name for layout in plan.checkpoints]
    if len(names) != len(plan.checkpoints):
        raise ValueError(f"{len(names)} checkpoint names for {len(plan.checkpoints)} checkpoints")
    return [str(n) for n in names]


def _check_destination(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: exists and is not an empty directory")


def _write_index(directory: Path, shards: Sequence[ShardSpec], recipe: Mapping[str, Any]) -> int:
    index = {
        "metadata": {"total_size": sum(s.data_bytes for s in shards), RECIPE_KEY: recipe},
        "weight_map": {t.name: s.file for s in shards for t in s.tensors},
    }
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    (directory / INDEX_FILE).write_text(text)
    return len(text.encode())


def _copy_side_files(plan: MergePlan, directory: Path, dtype: str) -> None:
    source = plan.checkpoints[0].path
    config = source / CONFIG_FILE
    if config.is_file():
        updated = updated_config(json.loads(config.read_text()), dtype, plan.unties_head)
        (directory / CONFIG_FILE).write_text(json.dumps(updated, indent=2) + "\n")
    for path in sorted(source.iterdir()):
        wanted = path.name in SIDE_FILES or path.name.startswith(SIDE_FILE_PREFIXES)
        if wanted and path.is_file():
            shutil.copyfile(path, directory / path.name)


def _publish(staging: Path, out_dir: Path) -> None:
    if out_dir.is_dir():
        out_dir.rmdir()  # empty, checked before writing; rename cannot replace it otherwise
    staging.rename(out_dir)


# ---------------------------------------------------------------------------------------------
# Resident merge into a loaded model
# ---------------------------------------------------------------------------------------------


def _load_rows(plan: MergePlan, tensor: PlannedTensor, files: _Files) -> list[torch.Tensor]:
    """One tensor of every checkpoint, each a flat copy in its own checkpoint's dtype (dtypes
    may differ between checkpoints; each is widened in the accumulator, as when streaming)."""
    mapped = _Mapped(files, _Span(0, tensor, 0, tensor.numel), range(len(plan.checkpoints)))
    rows = [view.clone() for view in mapped.views]
    mapped.release()
    return rows


@dataclass(frozen=True)
class _Target:
    tensor: PlannedTensor
    destinations: tuple[torch.Tensor, ...]


class ResidentMerger:
    """Every checkpoint's tensors held in memory once, merged into a live model on demand.

    Inputs stay in their own dtype: half the memory of float32 for bf16 checkpoints, for about
    10% more time per merge on CPU (where a merge is bound by reading N·params elements), and
    the same mixed-precision add as the streaming merge, hence identical results. Memory is N
    times one checkpoint, in host memory: 8 × 8B bf16 checkpoints are 128 GB, which no GPU
    holds beside the model. With `pin_memory` (when the model is on GPUs) the rows are
    page-locked, so each tensor's rows are copied to the device of its module asynchronously
    and merged there, chunk by chunk: the model may span several GPUs (its placement), and GPU
    memory holds the model plus one chunk of rows.
    """

    def __init__(self, checkpoint_dirs: Sequence[Path], *, pin_memory: bool = False):
        self.plan = validate_checkpoints([Path(p) for p in checkpoint_dirs])
        with _Files() as files:
            self._rows = {t.name: _load_rows(self.plan, t, files) for t in self.plan.tensors}
        if pin_memory:
            self._rows = {n: [row.pin_memory() for row in rows] for n, rows in self._rows.items()}
        self._largest = max((t.numel for t in self.plan.tensors), default=0)
        self._accs: dict[torch.device, torch.Tensor] = {}
        self._identity = _inputs_identity(self.plan)

    def _acc(self, device: torch.device) -> tuple[torch.Tensor, int]:
        """The float32 accumulator of a device and its chunk length (bounded by L2 on a CPU;
        16M elements on a GPU, so N rows of a chunk in transit stay N × 32 MiB in bf16)."""
        chunk = min(self._largest, CHUNK_ELEMS if device.type == "cpu" else 1 << 24)
        if device not in self._accs:
            self._accs[device] = torch.empty(chunk, dtype=torch.float32, device=device)
        return self._accs[device], chunk

    def _rows_on(
        self, rows: Sequence[torch.Tensor], index: int, start: int, stop: int, device: torch.device
    ) -> torch.Tensor:
        row = rows[index][start:stop]
        return row if device.type == "cpu" else row.to(device, non_blocking=True)

    @property
    def checkpoints(self) -> int:
        return len(self.plan.checkpoints)

    def merge_into(
        self,
        model: torch.nn.Module,
        weights: Sequence[float],
        *,
        digest: str = "content",
        dtype: str | None = None,
    ) -> str:
        """Overwrite the model's weights with Σ wᵢ θᵢ in place; return a digest of the merge.

        `dtype` is the merge's output dtype (`merge.dtype`): the float32 sum is rounded to it,
        exactly as `merge_to_directory` rounds it, before it is stored in the model, so a model
        held in a wider dtype (float32 on a CPU, where bfloat16 matrix products are slow)
        computes with exactly the weights that would be exported. None: the model's own dtype.
        `digest="content"` hashes the merged tensors in the output dtype as
        `merge_to_directory` does, so the two are equal for the same weights and dtype; it
        costs about a third of a CPU merge. `digest="recipe"` hashes only what determines the
        result (the inputs' identity, the weights, the dtype): free, and equal exactly when
        the same merger merges the same weights. Tied weights are written once.
        """
        if digest not in ("content", "recipe"):
            raise ValueError(f"digest must be 'content' or 'recipe', not {digest!r}")
        out = None if dtype is None else output_dtype(dtype)[0]
        values = validate_weights(weights, self.checkpoints)
        active = [(w, i) for i, w in enumerate(values) if w != 0.0]
        targets = self._bind(model)
        # One intra-op thread: a merge is a few hundred short memory-bound ops, and with a
        # thread pool each op waits for its slowest thread; on a busy machine that made merges
        # ten times slower (measured), for at best a 2x gain on an idle one.
        with torch.no_grad(), _torch_threads(1):
            totals: dict[torch.device, torch.Tensor] = {}
            for target in targets:
                device = target.destinations[0].device
                if device not in totals:
                    totals[device] = torch.zeros((), dtype=torch.float32, device=device)
                self._merge_one(target, active, out, totals[device])
            # One check (one sync) per device and merge.
            if not all(bool(torch.isfinite(total)) for total in totals.values()):
                self._raise_non_finite(targets, active, out)
        if digest == "recipe":
            dtypes = sorted({str(out or t.destinations[0].dtype) for t in targets})
            return recipe_digest(self._identity, values, dtypes)
        return content_digest(
            # Widening back from the output dtype is exact: the values were rounded to it.
            (t.tensor.name, t.destinations[0] if out is None else t.destinations[0].to(out))
            for t in targets
        )

    def _merge_one(
        self,
        target: _Target,
        active: Sequence[tuple[float, int]],
        out: torch.dtype | None,
        total: torch.Tensor,
    ) -> None:
        """Merge one tensor chunk by chunk, rounded to `out` when the model is held wider; add
        each chunk's stored values to `total`, which NaN or Inf anywhere (an overflow of the
        rounding included) makes non-finite (see `is_finite`)."""
        rows = self._rows[target.tensor.name]
        first, *aliases = target.destinations
        device = first.device
        acc_all, chunk = self._acc(device)
        flat = (
            first.view(-1)
            if first.is_contiguous()
            else torch.empty(first.numel(), dtype=first.dtype, device=device)
        )
        rounds = out is not None and out != first.dtype
        for start in range(0, target.tensor.numel, chunk):
            stop = min(target.tensor.numel, start + chunk)
            acc = acc_all[: stop - start]
            terms = ((w, self._rows_on(rows, i, start, stop, device)) for w, i in active)
            merged = accumulate(acc, terms)
            piece = flat[start:stop]
            piece.copy_(merged.to(out) if rounds else merged)
            total.add_(finite_probe(piece))
        if not first.is_contiguous():
            first.copy_(flat.view(first.shape))
        for alias in aliases:
            alias.copy_(first)

    def _raise_non_finite(
        self,
        targets: Sequence[_Target],
        active: Sequence[tuple[float, int]],
        out: torch.dtype | None,
    ) -> None:
        """Find the first tensor of the merge that is not finite and raise why; return when
        every value is finite (the sum of finite values overflowed)."""
        for target in targets:
            merged = target.destinations[0].reshape(-1)
            bad = torch.nonzero(~torch.isfinite(merged))
            if not bad.numel():
                continue
            acc_all, chunk = self._acc(merged.device)
            start = int(bad[0, 0]) // chunk * chunk
            stop = min(merged.numel(), start + chunk)
            rows = self._rows[target.tensor.name]
            terms = [(w, self._rows_on(rows, i, start, stop, merged.device)) for w, i in active]
            acc = accumulate(acc_all[: stop - start], terms)
            sources = [i for _, i in active]
            stored = merged[start:stop] if out is None else merged[start:stop].to(out)
            raise non_finite_error(target.tensor, start, stored, acc, terms, sources)

    def _bind(self, model: torch.nn.Module) -> list[_Target]:
        return bind_model(self.plan, model.state_dict(keep_vars=True))


def _inputs_identity(plan: MergePlan) -> list[Any]:
    """What identifies the inputs of a merge: every source file's path, size and mtime."""
    files = sorted({info.file for t in plan.tensors for info in t.sources})
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def recipe_digest(identity: Any, weights: Sequence[float], dtypes: Sequence[str]) -> str:
    """sha256 of a merge's inputs, exact weights (as hex floats) and output dtypes."""
    document = {"inputs": identity, "weights": [w.hex() for w in weights], "dtypes": dtypes}
    text = json.dumps(document, sort_keys=True).encode()
    return "recipe-sha256:" + hashlib.sha256(text).hexdigest()


def bind_model(plan: MergePlan, state: Mapping[str, torch.Tensor]) -> list[_Target]:
    """Match the plan's tensors to a model's state, resolving tied heads both ways.

    Tied checkpoints into an untied model: the merged embedding is written to the head too.
    Untied merge into a tied model: refused, the model cannot hold two different matrices.
    """
    planned = {t.name for t in plan.tensors}
    missing = sorted(planned - set(state))
    extra = sorted(set(state) - planned - {HEAD_NAME})
    if missing or extra:
        name, where = (missing[0], "the model lacks") if missing else (extra[0], "the model has")
        count = len(missing) + len(extra)
        raise ModelMismatch(
            f"{where} tensor {name!r} of the checkpoints' layout"
            + (f" ({count - 1} more differences)" if count > 1 else "")
        )
    targets = []
    for tensor in plan.tensors:
        dest = state[tensor.name]
        if tuple(dest.shape) != tensor.shape:
            raise ModelMismatch(
                f"tensor {tensor.name!r} has shape {list(dest.shape)} in the model but "
                f"{list(tensor.shape)} in the checkpoints"
            )
        targets.append(_Target(tensor, (dest,)))
    return _resolve_head(plan, state, targets)


def _resolve_head(
    plan: MergePlan, state: Mapping[str, torch.Tensor], targets: list[_Target]
) -> list[_Target]:
    head = state.get(HEAD_NAME)
    embedding = plan.checkpoints[0].embedding
    if head is None:
        return targets
    tied = embedding in state and _shares_storage(head, state[embedding])
    if HEAD_NAME in {t.tensor.name for t in targets}:
        if tied:
            raise ModelMismatch(
                "the model ties lm_head to its input embedding but the merge is untied (some "
                "checkpoints have their own head); load it with tie_word_embeddings=False"
            )
        return targets
    if tied:
        return targets
    if embedding is None or embedding not in state:
        raise ModelMismatch(f"the model has {HEAD_NAME!r} but the checkpoints have no head")
    return [
        _Target(t.tensor, (*t.destinations, head)) if t.tensor.name == embedding else t
        for t in targets
    ]


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.device == b.device and a.data_ptr() == b.data_ptr())
