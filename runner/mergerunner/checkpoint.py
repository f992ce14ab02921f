"""Checkpoint layouts read from safetensors headers, and their validation against each other.

A linear merge only needs to know, for every tensor, where its bytes lie in which file; reading
the few kilobytes of each safetensors header gives that without touching the weights. Checking
every checkpoint against the others here, before a merge opens any output, is what lets a merge
fail with a precise message and leave nothing half-written behind.

Pickle-based weights (`.bin`, `.pt`, ...) are refused outright: loading them executes code.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergerunner.contract import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE
from mergerunner.trial import FailureKind

# The output head that `tie_word_embeddings` shares with the input embedding, and the names the
# input embedding has in the architectures transformers ships (Llama/Mistral/Qwen, GPT-2,
# BLOOM/Falcon, GPT-NeoX).
HEAD_NAME = "lm_head.weight"
EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
)

# safetensors dtype code -> bytes per element, for the floating types a linear merge accepts.
FLOAT_ITEMSIZE: Mapping[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_OTHER_ITEMSIZE: Mapping[str, int] = {
    "I64": 8,
    "U64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# safetensors itself refuses headers above 100 MB; a larger one means a corrupt or hostile file.
MAX_HEADER_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint cannot be read: missing, not safetensors, corrupt or inconsistent."""

    failure_kind = FailureKind.CHECKPOINT_INVALID


class CheckpointMismatch(CheckpointError):
    """Checkpoints disagree on tensor names, shapes or dtypes, so they cannot be merged."""

    failure_kind = FailureKind.CHECKPOINTS_INCOMPATIBLE


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: absolute byte range [start, end) in `file`."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class CheckpointLayout:
    """A checkpoint directory's tensors, read from headers only."""

    path: Path
    tensors: Mapping[str, TensorInfo]
    # True when the model uses its input embedding as output head (config.json says so, or says
    # nothing and the file has no head): the head, stored or not, is then the embedding.
    ties_head: bool
    embedding: str | None
    source: str | None = None  # the URI, when read from object storage (the preflight)

    @property
    def label(self) -> str:
        return self.source or str(self.path)


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor and its source in every checkpoint, in checkpoint order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    sources: tuple[TensorInfo, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class MergePlan:
    """Validated checkpoints and the tensors a merge of them produces, in name order."""

    checkpoints: tuple[CheckpointLayout, ...]
    tensors: tuple[PlannedTensor, ...]
    # True when the output stores its own head although some inputs tie theirs: the merged model
    # must then be untied (config.json's tie_word_embeddings set to false).
    unties_head: bool

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)


# ---------------------------------------------------------------------------------------------
# Reading one checkpoint
# ---------------------------------------------------------------------------------------------


def parse_header(
    raw: bytes, file: Path, file_size: int
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Decode a safetensors header (the JSON after the 8-byte length) into tensor infos.

    As strict as the safetensors reference (its `read_metadata` and `Metadata::validate`): a
    JSON object of tensors, each with a known dtype, a shape of non-negative integers and two
    integer `data_offsets` whose distance fits the shape; `__metadata__`, if present, an
    object of strings; and the tensors' byte ranges, in offset order, tile the data section
    exactly (no gap, no overlap, no byte after the last tensor). A file the reference refuses
    is refused here, so what we merge is what every other loader reads; and a truncated file
    fails here, not half-way through a merge.
    """
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{file}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: safetensors header is not a JSON object")
    metadata = _metadata(header.pop("__metadata__", None), file)
    data_start = 8 + len(raw)
    tensors = {name: _tensor_info(name, entry, file, data_start) for name, entry in header.items()}
    _check_tiling(tensors.values(), file, data_start, file_size)
    return tensors, metadata


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: a tensor named twice is ambiguous."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears more than once")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _metadata(value: Any, file: Path) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise CheckpointError(
            f"{file}: safetensors __metadata__ must be a JSON object of strings, "
            f"got {type(value).__name__} {json.dumps(value)[:80]}"
        )
    return dict(value)


def _check_tiling(
    tensors: Iterable[TensorInfo], file: Path, data_start: int, file_size: int
) -> None:
    """The tensors' byte ranges, in offset order, must cover the data section exactly."""
    position = data_start
    for info in sorted(tensors, key=lambda t: (t.start, t.end)):
        if info.start != position:
            what = "overlaps the tensor before it" if info.start < position else "leaves a gap"
            raise CheckpointError(
                f"{file}: tensor {info.name!r} starts at data offset {info.start - data_start} "
                f"but the data before it ends at {position - data_start}: it {what}"
            )
        position = info.end
    if position > file_size:
        raise CheckpointError(
            f"{file}: the tensors end at byte {position} but the file has only {file_size} "
            "bytes (truncated?)"
        )
    if position != file_size:
        raise CheckpointError(
            f"{file}: {file_size - position} bytes follow the last tensor's data (a "
            "safetensors file ends with its last tensor)"
        )


def _tensor_info(name: str, entry: Any, file: Path, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{file}: header entry for tensor {name!r} is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(
            f"{file}: tensor {name!r} has shape {json.dumps(shape)[:80]}; a shape is a list of "
            "non-negative integers"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise CheckpointError(
            f"{file}: tensor {name!r} has data_offsets {json.dumps(offsets)[:80]}; they are "
            "two non-negative integers"
        )
    itemsize = _itemsize(dtype)
    if itemsize is None:
        raise CheckpointError(f"{file}: tensor {name!r} has unknown dtype {dtype!r}")
    begin, end = offsets
    if end - begin != math.prod(shape) * itemsize:
        raise CheckpointError(
            f"{file}: tensor {name!r} has byte range [{begin}, {end}) that does not fit "
            f"shape {list(shape)} of {dtype}"
        )
    return TensorInfo(name, file, str(dtype), tuple(shape), data_start + begin, data_start + end)


def _itemsize(dtype: Any) -> int | None:
    if not isinstance(dtype, str):
        return None
    return FLOAT_ITEMSIZE.get(dtype) or _OTHER_ITEMSIZE.get(dtype)


def _is_count(value: Any) -> bool:
    """A JSON non-negative integer: not a float (2.0), a string or a boolean."""
    return type(value) is int and value >= 0


def read_safetensors_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read only the header of a safetensors file: tensor name -> location, and its metadata."""
    try:
        with file.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{file}: too short to be a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise CheckpointError(f"{file}: header length {length} is not plausible")
            raw = handle.read(length)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file}: file not found") from exc
    except OSError as exc:  # a directory, a permission, an I/O error: still this file's fault
        raise CheckpointError(f"{file}: cannot be read ({exc.strerror or exc})") from exc
    return parse_header(raw, file, size)


def weights_entry(names: Iterable[str]) -> str | None:
    """Which file says where a checkpoint's weights are, among the names in its directory: the
    rule transformers follows (`modeling_utils`, 5.x), `model.safetensors` when it exists, else
    the index. A directory holding both is read as its single file, by the layout reader here,
    by the fetch (from a listing) and by every loader."""
    available = set(names)
    if WEIGHTS_FILE in available:
        return WEIGHTS_FILE
    return INDEX_FILE if INDEX_FILE in available else None


def weights_files(path: Path) -> tuple[str, ...]:
    """`weights_entry` of a local directory, as a tuple (empty when there is neither)."""
    present = [n for n in (WEIGHTS_FILE, INDEX_FILE) if (path / n).is_file()]
    entry = weights_entry(present)
    return (entry,) if entry else ()


def read_layout(path: Path) -> CheckpointLayout:
    """Read a checkpoint directory's layout: `model.safetensors`, or shards and their index."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: not a directory")
    found = weights_files(path)
    if found == (WEIGHTS_FILE,):
        tensors, _ = read_safetensors_header(path / WEIGHTS_FILE)
    elif found == (INDEX_FILE,):
        tensors = _read_sharded(path, path / INDEX_FILE)
    else:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise CheckpointError(
                f"checkpoint {path}: only pickle-based weights found ({', '.join(pickled)}); "
                "these are refused because loading them can run code. Convert to safetensors."
            )
        raise CheckpointError(f"checkpoint {path}: no {WEIGHTS_FILE} and no {INDEX_FILE}")
    embedding = _find_embedding(tensors)
    return CheckpointLayout(path, tensors, _ties_head(path, tensors, embedding), embedding)


def read_weight_map(index: Path) -> dict[str, str]:
    """An index's `weight_map`: tensor name -> shard file, each a plain file name in the
    checkpoint's directory (never a path, `.`, `..` or a pickle)."""
    try:
        document = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{index}: not a readable JSON document ({exc})") from exc
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index}: weight_map must be a non-empty JSON object of tensor name -> file name"
        )
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(
                f"{index}: weight_map maps {tensor!r} to {json.dumps(shard)[:80]}, not a file name"
            )
        if Path(shard).suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{index}: points to pickle-based file {shard}; refused")
        if shard in ("", ".", "..") or "/" in shard or "\\" in shard or Path(shard).name != shard:
            raise CheckpointError(f"{index}: weight_map names a file outside it: {shard!r}")
    return weight_map


def _read_sharded(path: Path, index: Path) -> dict[str, TensorInfo]:
    weight_map = read_weight_map(index)
    tensors: dict[str, TensorInfo] = {}
    for name in sorted(set(weight_map.values())):
        shard, _ = read_safetensors_header(path / name)
        for tensor, info in shard.items():
            if weight_map.get(tensor) != name:
                raise CheckpointError(
                    f"checkpoint {path}: tensor {tensor!r} is in {name} but the index maps it "
                    f"to {weight_map.get(tensor)}"
                )
            tensors[tensor] = info
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise CheckpointError(
            f"checkpoint {path}: tensor {absent[0]!r} is in the index but in none of its shards"
            + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
        )
    return tensors


def _find_embedding(tensors: Mapping[str, TensorInfo]) -> str | None:
    found = [n for n in tensors if n.endswith(EMBEDDING_SUFFIXES)]
    return found[0] if len(found) == 1 else None


def layout_of(
    path: Path,
    tensors: Mapping[str, TensorInfo],
    config: Mapping[str, Any],
    source: str | None = None,
) -> CheckpointLayout:
    """A layout from headers and a config.json read elsewhere (the preflight reads both with
    ranged requests from object storage, never downloading weights)."""
    embedding = _find_embedding(tensors)
    ties = _ties_from_config(path, config, tensors, embedding)
    return CheckpointLayout(path, tensors, ties, embedding, source)


def _ties_head(path: Path, tensors: Mapping[str, TensorInfo], embedding: str | None) -> bool:
    return _ties_from_config(path, _read_config(path), tensors, embedding)


def _ties_from_config(
    path: Path,
    config: Mapping[str, Any],
    tensors: Mapping[str, TensorInfo],
    embedding: str | None,
) -> bool:
    """Whether the model's output head is its input embedding.

    config.json decides when it says; when it is silent the file does: a model with an embedding
    and no head can only work tied.
    """
    declared = config.get("tie_word_embeddings")
    if isinstance(declared, bool):
        if declared and embedding is None:
            raise CheckpointError(
                f"checkpoint {path}: config.json ties the head to the input embedding but no "
                f"single tensor named *{'/*'.join(EMBEDDING_SUFFIXES)} was found"
            )
        return declared
    return embedding is not None and HEAD_NAME not in tensors


def _read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text())
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"checkpoint {path}: config.json is not valid JSON") from exc
    return config if isinstance(config, dict) else {}


# ---------------------------------------------------------------------------------------------
# Validating checkpoints against each other
# ---------------------------------------------------------------------------------------------


def effective_tensors(layout: CheckpointLayout) -> dict[str, TensorInfo]:
    """The tensors a checkpoint's model really uses: a tied model's stored head is ignored."""
    if layout.ties_head:
        return {n: t for n, t in layout.tensors.items() if n != HEAD_NAME}
    return dict(layout.tensors)


def validate_checkpoints(paths: Sequence[Path]) -> MergePlan:
    """Read every checkpoint's layout and check they can be merged; raise before any output.

    Tied embeddings: a tied checkpoint's head *is* its embedding. When every checkpoint is tied,
    the merge stays tied (no head tensor). When only some are, the merged head is the weighted
    sum of every checkpoint's effective head (its own, or its embedding when tied), so each
    input contributes the function it actually computes; the output is then untied.
    """
    if not paths:
        raise CheckpointError("no checkpoints to merge")
    layouts = tuple(read_layout(Path(p)) for p in paths)
    return plan_merge(layouts)


def plan_merge(layouts: Sequence[CheckpointLayout]) -> MergePlan:
    """Match the tensors of checkpoints already read; see `validate_checkpoints`."""
    views = [effective_tensors(layout) for layout in layouts]
    _check_names(layouts, views)
    # Some inputs tie their head and others store one: every untied input has a head (checked
    # above), and a tied input's head is its embedding.
    unties = any(t.ties_head for t in layouts) and any(HEAD_NAME in v for v in views)
    if unties:
        for layout, view in zip(layouts, views, strict=True):
            if layout.ties_head and layout.embedding is not None:
                view[HEAD_NAME] = layout.tensors[layout.embedding]
    planned = tuple(_plan_tensor(name, layouts, views) for name in sorted(views[0]))
    return MergePlan(tuple(layouts), planned, unties)


def _check_names(
    layouts: Sequence[CheckpointLayout], views: Sequence[dict[str, TensorInfo]]
) -> None:
    first, reference = layouts[0], views[0]
    for layout, view in zip(layouts[1:], views[1:], strict=True):
        names, ref = set(view) - {HEAD_NAME}, set(reference) - {HEAD_NAME}
        missing, extra = sorted(ref - names), sorted(names - ref)
        if missing:
            raise CheckpointMismatch(
                f"tensor {missing[0]!r} is missing from checkpoint {layout.label} "
                f"(present in {first.label})" + _more(missing)
            )
        if extra:
            raise CheckpointMismatch(
                f"tensor {extra[0]!r} of checkpoint {layout.label} is absent from checkpoint "
                f"{first.label}" + _more(extra)
            )
    for layout, view in zip(layouts, views, strict=True):
        if not layout.ties_head and HEAD_NAME not in view and any(HEAD_NAME in v for v in views):
            raise CheckpointMismatch(
                f"tensor {HEAD_NAME!r} is missing from checkpoint {layout.label}, whose "
                "config.json does not tie it to the input embedding"
            )


def _more(names: Sequence[str]) -> str:
    if len(names) == 1:
        return ""
    return f"; {len(names) - 1} more: {', '.join(repr(n) for n in names[1:6])}" + (
        ", ..." if len(names) > 6 else ""
    )


def _plan_tensor(
    name: str, layouts: Sequence[CheckpointLayout], views: Sequence[dict[str, TensorInfo]]
) -> PlannedTensor:
    """What a merge needs of one tensor: the same shape everywhere, in a floating-point dtype.

    Dtypes may differ between checkpoints (a bf16 and an fp32 fine-tune of one base): every
    input is widened to the float32 accumulator anyway, exactly for bf16/fp16 and rounded once
    for fp64, so mixing them changes nothing in the arithmetic.
    """
    sources = tuple(view[name] for view in views)
    ref = sources[0]
    for layout, info in zip(layouts[1:], sources[1:], strict=True):
        if info.shape != ref.shape:
            raise CheckpointMismatch(
                f"tensor {name!r} has shape {list(info.shape)} in checkpoint {layout.label} but "
                f"{list(ref.shape)} in checkpoint {layouts[0].label}; a linear merge needs the "
                "same tensor names and shapes in every checkpoint (dtypes may differ)"
            )
    for layout, info in zip(layouts, sources, strict=True):
        if info.dtype not in FLOAT_ITEMSIZE:
            raise CheckpointMismatch(
                f"tensor {name!r} has dtype {info.dtype} in checkpoint {layout.label}; a linear "
                f"merge needs floating-point tensors ({', '.join(FLOAT_ITEMSIZE)})"
            )
    return PlannedTensor(name, ref.dtype, ref.shape, sources)
