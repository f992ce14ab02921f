"""The merged model's files: safetensors shards written in place, the index, config and side files.

safetensors' own writer wants the whole model in memory; this one computes every header first
from the known shapes (`plan_shards`), creates the files with their headers, and then writes
each span of tensor bytes at its known offset, from any thread, in any order (`ShardOutputs`).
The model is assembled in a staging directory and published by one rename.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergerunner.checkpoint import FLOAT_ITEMSIZE, MergePlan, PlannedTensor
from mergerunner.contract import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
RECIPE_KEY = "merge_recipe"
DATA_ALIGNMENT = 64


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


@dataclass(frozen=True)
class Span:
    """Elements [start, stop) of one tensor, written to shard `shard`."""

    shard: int
    tensor: PlannedTensor
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


class ShardOutputs:
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

    def __enter__(self) -> ShardOutputs:
        return self

    def __exit__(self, *_: object) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def write(self, span: Span, raw: memoryview) -> None:
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


def write_index(directory: Path, shards: Sequence[ShardSpec], recipe: Mapping[str, Any]) -> int:
    index = {
        "metadata": {"total_size": sum(s.data_bytes for s in shards), RECIPE_KEY: recipe},
        "weight_map": {t.name: s.file for s in shards for t in s.tensors},
    }
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    (directory / INDEX_FILE).write_text(text)
    return len(text.encode())


def updated_config(config: dict[str, Any], dtype: str, untie_head: bool) -> dict[str, Any]:
    """The first checkpoint's config.json, saying the merged model's dtype and tying."""
    out = dict(config)
    keys = [k for k in ("dtype", "torch_dtype") if k in out] or ["torch_dtype"]
    for key in keys:
        out[key] = dtype
    if untie_head:
        out["tie_word_embeddings"] = False
    return out


def copy_side_files(plan: MergePlan, directory: Path, dtype: str) -> None:
    source = plan.checkpoints[0].path
    config = source / CONFIG_FILE
    if config.is_file():
        updated = updated_config(json.loads(config.read_text()), dtype, plan.unties_head)
        (directory / CONFIG_FILE).write_text(json.dumps(updated, indent=2) + "\n")
    for path in sorted(source.iterdir()):
        wanted = path.name in SIDE_FILES or path.name.startswith(SIDE_FILE_PREFIXES)
        if wanted and path.is_file():
            shutil.copyfile(path, directory / path.name)


def check_destination(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: exists and is not an empty directory")


def publish(staging: Path, out_dir: Path) -> None:
    if out_dir.is_dir():
        out_dir.rmdir()  # empty, checked before writing; rename cannot replace it otherwise
    staging.rename(out_dir)
