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
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergerunner.trial import FailureKind

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

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

    @property
    def label(self) -> str:
        return str(self.path)


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

    Offsets are checked against the file size so that a truncated file fails here, not half-way
    through a merge.
    """
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + len(raw)
    tensors = {name: _tensor_info(name, entry, file, data_start) for name, entry in header.items()}
    for info in tensors.values():
        if info.end > file_size:
            raise CheckpointError(
                f"{file}: tensor {info.name!r} ends at byte {info.end} but the file has only "
                f"{file_size} bytes (truncated?)"
            )
    return tensors, dict(metadata)


def _tensor_info(name: str, entry: Any, file: Path, data_start: int) -> TensorInfo:
    try:
        dtype = str(entry["dtype"])
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: malformed header entry for tensor {name!r}") from exc
    itemsize = FLOAT_ITEMSIZE.get(dtype) or _OTHER_ITEMSIZE.get(dtype)
    if itemsize is None:
        raise CheckpointError(f"{file}: tensor {name!r} has unknown dtype {dtype!r}")
    if any(d < 0 for d in shape) or begin < 0 or end - begin != math.prod(shape) * itemsize:
        raise CheckpointError(
            f"{file}: tensor {name!r} has byte range [{begin}, {end}) that does not fit "
            f"shape {list(shape)} of {dtype}"
        )
    return TensorInfo(name, file, dtype, shape, data_start + begin, data_start + end)


def read_safetensors_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read only the header of a safetensors file: tensor name -> location, and its metadata."""
    try:
        with file.open("rb") as handle:
            size = file.stat().st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{file}: too short to be a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise CheckpointError(f"{file}: header length {length} is not plausible")
            raw = handle.read(length)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file}: file not found") from exc
    return parse_header(raw, file, size)


def read_layout(path: Path) -> CheckpointLayout:
    """Read a checkpoint directory's layout: `model.safetensors`, or shards and their index."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: not a directory")
    index = path / INDEX_FILE
    if index.is_file():
        tensors = _read_sharded(path, index)
    elif (path / SINGLE_FILE).is_file():
        tensors, _ = read_safetensors_header(path / SINGLE_FILE)
    else:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise CheckpointError(
                f"checkpoint {path}: only pickle-based weights found ({', '.join(pickled)}); "
                "these are refused because loading them can run code. Convert to safetensors."
            )
        raise CheckpointError(f"checkpoint {path}: no {SINGLE_FILE} and no {INDEX_FILE}")
    embedding = _find_embedding(tensors)
    return CheckpointLayout(path, tensors, _ties_head(path, tensors, embedding), embedding)


def _read_sharded(path: Path, index: Path) -> dict[str, TensorInfo]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {INDEX_FILE} has no valid weight_map") from exc
    files = sorted(set(weight_map.values()))
    for name in files:
        if Path(name).suffix in PICKLE_SUFFIXES:
            raise CheckpointError(
                f"checkpoint {path}: index points to pickle-based file {name}; refused"
            )
        if Path(name).name != name:
            raise CheckpointError(f"checkpoint {path}: index names a file outside it: {name!r}")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
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


def _ties_head(path: Path, tensors: Mapping[str, TensorInfo], embedding: str | None) -> bool:
    """Whether the model's output head is its input embedding.

    config.json decides when it says; when it is silent the file does: a model with an embedding
    and no head can only work tied.
    """
    config = _read_config(path)
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
    except json.JSONDecodeError as exc:
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
    sources = tuple(view[name] for view in views)
    ref = sources[0]
    for layout, info in zip(layouts[1:], sources[1:], strict=True):
        if info.shape != ref.shape:
            raise CheckpointMismatch(
                f"tensor {name!r} has shape {list(info.shape)} in checkpoint {layout.label} but "
                f"{list(ref.shape)} in checkpoint {layouts[0].label}"
            )
        if info.dtype != ref.dtype:
            raise CheckpointMismatch(
                f"tensor {name!r} has dtype {info.dtype} in checkpoint {layout.label} but "
                f"{ref.dtype} in checkpoint {layouts[0].label}"
            )
    if ref.dtype not in FLOAT_ITEMSIZE:
        raise CheckpointMismatch(
            f"tensor {name!r} has dtype {ref.dtype} in checkpoint {layouts[0].label}; "
            "a linear merge needs floating-point tensors"
        )
    return PlannedTensor(name, ref.dtype, ref.shape, sources)
