"""Linear merge θ = Σ wᵢ θᵢ of validated checkpoints, accumulated in float32.

Two outputs share one arithmetic, so that they produce bit-identical tensors:

* `merge_to_directory` streams the merge to an HF-format directory. It writes the safetensors
  format itself (header first, computed from the known shapes, then the tensor bytes in order)
  because safetensors' own writer wants the whole model in memory. Tensors are cut into
  windows, mapped from every input at once, and windows into spans of a bounded number of
  elements, so memory stays a few tens of MiB whatever the model. One thread maps the next
  window while a few threads accumulate spans, and one writes and hashes them in order.
* `ResidentMerger` keeps every checkpoint in memory once and writes a merge straight into an
  already loaded model, so that a search evaluates a candidate without touching the disk.

The arithmetic for each element is `acc = 0; acc += wᵢ·xᵢ` (one fused multiply-add per input,
in checkpoint order, zero weights skipped), then one rounding to the output dtype. torch
evaluates that elementwise, so the result does not depend on how the work is split.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import shutil
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from mergerunner.checkpoint import (
    CONFIG_FILE,
    FLOAT_ITEMSIZE,
    HEAD_NAME,
    INDEX_FILE,
    SINGLE_FILE,
    MergePlan,
    PlannedTensor,
    validate_checkpoints,
)

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
# Input bytes mapped per window, all checkpoints together (at most three windows are mapped).
MAP_BUDGET_BYTES = 32 << 20
MIN_WINDOW_ELEMS = 1 << 16
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


class ModelMismatch(ValueError):
    """A loaded model does not have the checkpoints' tensors, so a merge cannot go into it."""


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
        if not math.isfinite(number):
            raise MergeWeightsError(f"weight {i} is {number}; weights must be finite")
        out.append(number)
    return tuple(out)


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
        name = SINGLE_FILE if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"
        entries = [(t.name, code, t.shape, t.numel * itemsize) for t in group]
        specs.append(
            ShardSpec(name, tuple(group), encode_header(entries, meta), sum(e[3] for e in entries))
        )
    return tuple(specs)


def digest_prefix(name: str, code: str, shape: Sequence[int]) -> bytes:
    """What the content digest hashes before a tensor's bytes: its name, dtype and shape."""
    return json.dumps([name, code, list(shape)]).encode() + b"\n"


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's raw little-endian bytes, without a copy when it is already on the CPU."""
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.contiguous().view(torch.uint8).numpy())


def content_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, bytes) of tensors in the given order.

    `merge_to_directory` computes the same digest while it writes, so a resident merge and a
    written one of the same weights and dtype have equal digests."""
    hasher = hashlib.sha256()
    for name, tensor in named:
        hasher.update(digest_prefix(name, CODE_OF_TORCH[tensor.dtype], tensor.shape))
        if tensor.numel():
            hasher.update(tensor_bytes(tensor))
    return "sha256:" + hasher.hexdigest()


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
    chunk = min(CHUNK_ELEMS, window)
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

    def __enter__(self) -> _Files:
        return self

    def __exit__(self, *_: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def fd(self, file: Path) -> int:
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
        dtype = TORCH_DTYPE[window.tensor.dtype]
        self.views = [torch.empty(0, dtype=dtype) for _ in active]
        if window.size == 0:
            return
        itemsize = FLOAT_ITEMSIZE[window.tensor.dtype]
        for row, index in enumerate(active):
            info = window.tensor.sources[index]
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
            self.views[row] = raw.view(dtype)

    def release(self) -> None:
        self.views.clear()
        for mapped in self.maps:
            with suppress(BufferError):  # a view still alive: unmapped when it is collected
                mapped.close()
        self.maps.clear()


def accumulate(acc: torch.Tensor, terms: Iterable[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """acc = Σ w·x in acc's dtype (float32): the one arithmetic both outputs use."""
    acc.zero_()
    for weight, values in terms:
        acc.add_(values, alpha=weight)
    return acc


class _ShardWriter:
    """Writes shards in order, hashing tensors as they go; verifies each file's final size."""

    def __init__(self, directory: Path, shards: Sequence[ShardSpec], code: str) -> None:
        self._directory = directory
        self._shards = shards
        self._code = code
        self._current = -1
        self._handle: Any = None
        self._hasher = hashlib.sha256()
        self.bytes_written = 0

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *_: object) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _advance_to(self, shard: int) -> None:
        while self._current < shard:
            self._close_current()
            self._current += 1
            spec = self._shards[self._current]
            self._handle = (self._directory / spec.file).open("wb")
            self._handle.write(spec.header)
            self.bytes_written += len(spec.header)

    def _close_current(self) -> None:
        if self._handle is None:
            return
        spec = self._shards[self._current]
        size = self._handle.tell()
        self._handle.close()
        self._handle = None
        if size != spec.size:
            raise OSError(f"{spec.file}: wrote {size} bytes, expected {spec.size}")

    def write(self, span: _Span, data: torch.Tensor) -> None:
        self._advance_to(span.shard)
        if span.start == 0:
            tensor = span.tensor
            self._hasher.update(digest_prefix(tensor.name, self._code, tensor.shape))
        if span.size:
            raw = memoryview(data.view(torch.uint8).numpy())
            self._hasher.update(raw)
            self._handle.write(raw)
            self.bytes_written += len(raw)

    def finish(self) -> str:
        self._advance_to(len(self._shards) - 1)
        self._close_current()
        return "sha256:" + self._hasher.hexdigest()


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Run torch ops on `count` intra-op threads. The merge parallelises over spans with its own
    threads; intra-op threads on top of those, for spans this small, only add contention."""
    before = torch.get_num_threads()
    if before != count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if before != count:
            torch.set_num_threads(before)


def _merge_span(
    acc: torch.Tensor, out: torch.Tensor, terms: Sequence[tuple[float, torch.Tensor]]
) -> torch.Tensor:
    out.copy_(accumulate(acc, terms))
    return out


def _write_when_ready(writer: _ShardWriter, span: _Span, merged: Future[torch.Tensor]) -> None:
    writer.write(span, merged.result())


class _Pipeline:
    """Spans in flight: each owns one of RING accumulator/output buffer pairs until written.

    The writer is a single thread fed in submission order, so spans computed out of order by
    the compute threads are still written (and hashed) in order.
    """

    def __init__(self, chunk: int, out: torch.dtype, computers: int) -> None:
        self.ring = 2 * computers + 2
        self.buffers = [
            (torch.empty(chunk, dtype=torch.float32), torch.empty(chunk, dtype=out))
            for _ in range(self.ring)
        ]
        self.writes: deque[Future[None]] = deque()
        self.count = 0

    def submit(
        self,
        computers: ThreadPoolExecutor,
        scribe: ThreadPoolExecutor,
        writer: _ShardWriter,
        span: _Span,
        terms: list[tuple[float, torch.Tensor]],
    ) -> Future[torch.Tensor]:
        if len(self.writes) == self.ring:
            self.writes.popleft().result()  # frees the buffers this span reuses
        acc, out = self.buffers[self.count % self.ring]
        self.count += 1
        merged = computers.submit(_merge_span, acc[: span.size], out[: span.size], terms)
        self.writes.append(scribe.submit(_write_when_ready, writer, span, merged))
        return merged

    def drain(self) -> None:
        while self.writes:
            self.writes.popleft().result()


def _stream(
    plan: MergePlan,
    shards: Sequence[ShardSpec],
    weights: Sequence[float],
    out: torch.dtype,
    code: str,
    directory: Path,
    threads: int,
) -> tuple[str, int]:
    """Map, accumulate and convert, write and hash, each stage on its own thread(s): mapping the
    next window and writing finished spans overlap with accumulating the current ones."""
    active = [i for i, w in enumerate(weights) if w != 0.0]
    itemsize = max((FLOAT_ITEMSIZE[t.dtype] for t in plan.tensors), default=4)
    window_size, chunk_size = stream_geometry(len(active), itemsize)
    pipeline = _Pipeline(chunk_size, out, threads)
    windows = list(_spans(shards, window_size))
    live: deque[tuple[_Mapped, list[Future[torch.Tensor]]]] = deque()
    with (
        _Files() as files,
        _ShardWriter(directory, shards, code) as writer,
        ThreadPoolExecutor(1, thread_name_prefix="merge-map") as mapper,
        ThreadPoolExecutor(threads, thread_name_prefix="merge-add") as computers,
        ThreadPoolExecutor(1, thread_name_prefix="merge-write") as scribe,
        _torch_threads(1),
    ):
        mapping = mapper.submit(_Mapped, files, windows[0], active) if windows else None
        for k, window in enumerate(windows):
            assert mapping is not None
            mapped = mapping.result()
            if k + 1 < len(windows):
                mapping = mapper.submit(_Mapped, files, windows[k + 1], active)
            merged = []
            for span in _split(window, chunk_size):
                lo, hi = span.start - window.start, span.stop - window.start
                terms = [(weights[i], v[lo:hi]) for i, v in zip(active, mapped.views, strict=True)]
                merged.append(pipeline.submit(computers, scribe, writer, span, terms))
            live.append((mapped, merged))
            _release(live, keep=1)
        pipeline.drain()
        _release(live, keep=0)
        digest = writer.finish()
    return digest, writer.bytes_written


def _release(live: deque[tuple[_Mapped, list[Future[torch.Tensor]]]], keep: int) -> None:
    """Unmap windows whose spans are all accumulated, keeping the newest `keep`."""
    while len(live) > keep:
        mapped, merged = live.popleft()
        for future in merged:
            future.result()
        mapped.release()


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


def _load_rows(plan: MergePlan, tensor: PlannedTensor, files: _Files) -> torch.Tensor:
    """One tensor of every checkpoint, stacked as [N, numel] in the checkpoints' dtype."""
    stacked = torch.empty((len(plan.checkpoints), tensor.numel), dtype=TORCH_DTYPE[tensor.dtype])
    mapped = _Mapped(files, _Span(0, tensor, 0, tensor.numel), range(len(plan.checkpoints)))
    for row in range(len(plan.checkpoints)):
        stacked[row].copy_(mapped.views[row])
    mapped.release()
    return stacked


@dataclass(frozen=True)
class _Target:
    tensor: PlannedTensor
    destinations: tuple[torch.Tensor, ...]


class ResidentMerger:
    """Every checkpoint's tensors held in memory once, merged into a live model on demand.

    Inputs stay in their own dtype: half the memory of float32 for bf16 checkpoints, for about
    10% more time per merge on CPU (where a merge is bound by reading N·params elements), and
    the same mixed-precision add as the streaming merge, hence identical results. Memory is N
    times one checkpoint: meant for the small models a local search evaluates many times. With
    `device="cuda"` the stacks live on the GPU next to the model.
    """

    def __init__(self, checkpoint_dirs: Sequence[Path], *, device: str | torch.device = "cpu"):
        self.plan = validate_checkpoints([Path(p) for p in checkpoint_dirs])
        self.device = torch.device(device)
        with _Files() as files:
            self._stacks = {
                t.name: _load_rows(self.plan, t, files).to(self.device) for t in self.plan.tensors
            }
        self._chunk = CHUNK_ELEMS if self.device.type == "cpu" else 1 << 26
        largest = max((t.numel for t in self.plan.tensors), default=0)
        self._acc = torch.empty(min(largest, self._chunk), dtype=torch.float32, device=self.device)
        self._identity = _inputs_identity(self.plan)

    @property
    def checkpoints(self) -> int:
        return len(self.plan.checkpoints)

    def merge_into(
        self, model: torch.nn.Module, weights: Sequence[float], *, digest: str = "content"
    ) -> str:
        """Overwrite the model's weights with Σ wᵢ θᵢ in place; return a digest of the merge.

        `digest="content"` hashes the merged tensors as `merge_to_directory` does, so the two
        are equal for the same weights when the model's dtype is the output dtype; it costs
        about a third of a CPU merge. `digest="recipe"` hashes only what determines the
        result (the inputs' identity, the weights, the dtype): free, and equal exactly when
        the same merger merges the same weights. Tied weights are written once.
        """
        if digest not in ("content", "recipe"):
            raise ValueError(f"digest must be 'content' or 'recipe', not {digest!r}")
        values = validate_weights(weights, self.checkpoints)
        active = [(w, i) for i, w in enumerate(values) if w != 0.0]
        targets = self._bind(model)
        # One intra-op thread: a merge is a few hundred short memory-bound ops, and with a
        # thread pool each op waits for its slowest thread; on a busy machine that made merges
        # ten times slower (measured), for at best a 2x gain on an idle one.
        with torch.no_grad(), _torch_threads(1):
            for target in targets:
                self._merge_one(target, active)
        if digest == "recipe":
            dtypes = sorted({str(t.destinations[0].dtype) for t in targets})
            return recipe_digest(self._identity, values, dtypes)
        return content_digest((t.tensor.name, t.destinations[0]) for t in targets)

    def _merge_one(self, target: _Target, active: Sequence[tuple[float, int]]) -> None:
        stack = self._stacks[target.tensor.name]
        first, *aliases = target.destinations
        flat = (
            first.view(-1)
            if first.is_contiguous()
            else torch.empty(first.numel(), dtype=first.dtype, device=first.device)
        )
        for start in range(0, stack.shape[1], self._chunk):
            stop = min(stack.shape[1], start + self._chunk)
            acc = self._acc[: stop - start]
            accumulate(acc, ((w, stack[i, start:stop]) for w, i in active))
            flat[start:stop].copy_(acc)
        if not first.is_contiguous():
            first.copy_(flat.view(first.shape))
        for alias in aliases:
            alias.copy_(first)

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
