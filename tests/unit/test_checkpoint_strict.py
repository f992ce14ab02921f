"""Checkpoint files are read as strictly as the safetensors reference reads them, by one layout
rule (transformers'), and every malformed file is a `CheckpointError` naming it."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mergerunner.checkpoint import (
    CheckpointError,
    read_layout,
    read_safetensors_header,
    validate_checkpoints,
    weights_files,
)
from mergerunner.trial import FailureKind, failure_kind_of

pytestmark = pytest.mark.unit


def _raw(header: dict[str, Any], data: bytes, *, text: str | None = None) -> bytes:
    body = (text if text is not None else json.dumps(header)).encode()
    return struct.pack("<Q", len(body)) + body + data


def _entry(dtype: str, shape: list, offsets: list) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


GOOD = {"a": _entry("F32", [2], [0, 8]), "b": _entry("F32", [1], [8, 12])}
DATA = b"\0" * 12

# (header, data, raw JSON text or None, what our message says)
MALFORMED = {
    "overlapping offsets": (
        {"a": _entry("F32", [2], [0, 8]), "b": _entry("F32", [2], [4, 12])},
        DATA,
        None,
        "overlaps the tensor before it",
    ),
    "gap between tensors": (
        {"a": _entry("F32", [1], [0, 4]), "b": _entry("F32", [1], [8, 12])},
        DATA,
        None,
        "leaves a gap",
    ),
    "trailing bytes": (GOOD, DATA + b"\0" * 4, None, "4 bytes follow the last tensor"),
    "float shape entry": (
        {"a": _entry("F32", [2.0], [0, 8]), "b": _entry("F32", [1], [8, 12])},
        DATA,
        None,
        "a shape is a list of non-negative integers",
    ),
    "string shape entry": (
        {"a": _entry("F32", ["2"], [0, 8]), "b": _entry("F32", [1], [8, 12])},
        DATA,
        None,
        "a shape is a list of non-negative integers",
    ),
    "boolean shape entry": (
        {"a": _entry("F32", [True, 2], [0, 8]), "b": _entry("F32", [1], [8, 12])},
        DATA,
        None,
        "a shape is a list of non-negative integers",
    ),
    "negative shape entry": (
        {"a": _entry("F32", [-2], [0, 8]), "b": _entry("F32", [1], [8, 12])},
        DATA,
        None,
        "a shape is a list of non-negative integers",
    ),
    "float offsets": (
        {"a": _entry("F32", [2], [0.0, 8]), "b": _entry("F32", [1], [8, 12])},
        DATA,
        None,
        "they are two non-negative integers",
    ),
    "three offsets": (
        {"a": _entry("F32", [2], [0, 8, 8]), "b": _entry("F32", [1], [8, 12])},
        DATA,
        None,
        "they are two non-negative integers",
    ),
    "entry not an object": ({"a": [1, 2]}, DATA, None, "is not a JSON object"),
    "dtype not a string": (
        {"a": _entry(["F32"], [3], [0, 12])},  # type: ignore[arg-type]
        DATA,
        None,
        "unknown dtype",
    ),
    "metadata a list": (
        {"__metadata__": ["x"], **GOOD},
        DATA,
        None,
        "__metadata__ must be a JSON object of strings",
    ),
    "metadata a string": (
        {"__metadata__": "x", **GOOD},
        DATA,
        None,
        "__metadata__ must be a JSON object of strings",
    ),
    "metadata value a number": (
        {"__metadata__": {"format": 1}, **GOOD},
        DATA,
        None,
        "__metadata__ must be a JSON object of strings",
    ),
    "tensor named twice": (
        {},
        DATA,
        '{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}, '
        '"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}',
        "appears more than once",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_header_is_refused_naming_the_file(tmp_path: Path, case: str) -> None:
    header, data, text, message = MALFORMED[case]
    file = tmp_path / "model.safetensors"
    file.write_bytes(_raw(header, data, text=text))
    with pytest.raises(CheckpointError, match=message) as caught:
        read_safetensors_header(file)
    assert str(file) in str(caught.value)
    assert failure_kind_of(caught.value) == FailureKind.CHECKPOINT_INVALID


@pytest.mark.parametrize(
    "case", sorted(set(MALFORMED) - {"tensor named twice", "boolean shape entry"})
)
def test_the_safetensors_reference_refuses_the_same_files(tmp_path: Path, case: str) -> None:
    """What we refuse, safetensors refuses too (duplicate names and `true` as a dimension are
    refused by us only: serde takes the last duplicate, and we refuse booleans as integers)."""
    header, data, text, _ = MALFORMED[case]
    file = tmp_path / "model.safetensors"
    file.write_bytes(_raw(header, data, text=text))
    with pytest.raises(SafetensorError), safe_open(str(file), "pt") as handle:
        handle.keys()


def test_a_well_formed_file_is_accepted_by_both(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(_raw({"__metadata__": {"format": "pt"}, **GOOD}, DATA))
    tensors, metadata = read_safetensors_header(file)
    assert set(tensors) == {"a", "b"} and metadata == {"format": "pt"}
    with safe_open(str(file), "pt") as handle:
        assert set(handle.keys()) == {"a", "b"}


def _model(path: Path, value: float, *, sharded: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"w": torch.full((4,), value), "v": torch.full((2,), value)}
    if not sharded:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    for i, name in enumerate(sorted(tensors), start=1):
        save_file({name: tensors[name]}, str(path / f"model-0000{i}-of-00002.safetensors"))
    weight_map = {
        n: f"model-0000{i}-of-00002.safetensors" for i, n in enumerate(sorted(tensors), 1)
    }
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def test_single_file_wins_over_an_index_as_in_transformers(tmp_path: Path) -> None:
    """A directory with both (e.g. a new single-file export over an old sharded one): the
    single file is the model, as transformers' `from_pretrained` reads it."""
    path = _model(tmp_path / "m", 2.0, sharded=True)
    _model(path, 1.0)
    assert weights_files(path) == ("model.safetensors",)
    layout = read_layout(path)
    assert {info.file.name for info in layout.tensors.values()} == {"model.safetensors"}


def _index(path: Path, weight_map: Any) -> Path:
    path.mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, str(path / "model-00001-of-00001.safetensors"))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        (["model-00001-of-00001.safetensors"], "weight_map must be a non-empty JSON object"),
        ({}, "weight_map must be a non-empty JSON object"),
        ({"w": 1}, "maps 'w' to 1, not a file name"),
        ({"w": None}, "maps 'w' to null, not a file name"),
        ({"w": ".."}, "names a file outside it: '..'"),
        ({"w": "."}, "names a file outside it: '.'"),
        ({"w": "../x.safetensors"}, "names a file outside it"),
    ],
)
def test_malformed_index_is_a_checkpoint_error_naming_the_index(
    tmp_path: Path, weight_map: Any, message: str
) -> None:
    path = _index(tmp_path / "m", weight_map)
    with pytest.raises(CheckpointError, match=message) as caught:
        validate_checkpoints([path])
    assert str(path / "model.safetensors.index.json") in str(caught.value)


def test_index_that_is_not_an_object_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = _index(tmp_path / "m", {"w": "model-00001-of-00001.safetensors"})
    (path / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="weight_map must be"):
        read_layout(path)


def test_a_shard_that_is_a_directory_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = _index(tmp_path / "m", {"w": "odd.safetensors"})
    (path / "odd.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: cannot be read"):
        read_layout(path)
