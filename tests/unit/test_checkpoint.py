"""Checkpoint layouts from safetensors headers, and validation of checkpoints against each other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergerunner.checkpoint import (
    HEAD_NAME,
    CheckpointError,
    CheckpointMismatch,
    read_layout,
    read_safetensors_header,
    validate_checkpoints,
)
from support.checkpoint_files import write_checkpoint

pytestmark = pytest.mark.unit

EMB = "model.embed_tokens.weight"


def _tensors(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {EMB: (16, 8), "model.layers.0.mlp.up_proj.weight": (12, 8), "model.norm.weight": (8,)}
    return {n: torch.randn(s, generator=gen).to(dtype) for n, s in shapes.items()}


def test_layout_offsets_locate_each_tensors_bytes(tmp_path: Path) -> None:
    tensors = _tensors(torch.float16)
    layout = read_layout(write_checkpoint(tmp_path / "a", tensors))
    data = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert set(layout.tensors) == set(tensors)
    for name, tensor in tensors.items():
        info = layout.tensors[name]
        assert info.dtype == "F16" and info.shape == tuple(tensor.shape)
        assert (
            data[info.start : info.end] == tensor.contiguous().view(torch.uint8).numpy().tobytes()
        )


def test_sharded_layout_maps_each_tensor_to_its_shard(tmp_path: Path) -> None:
    tensors = _tensors()
    layout = read_layout(write_checkpoint(tmp_path / "a", tensors, shards=2))
    files = {info.file.name for info in layout.tensors.values()}
    assert set(layout.tensors) == set(tensors)
    assert files == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


def test_missing_shard_is_reported_with_its_file(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "a", _tensors(), shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: file not found"):
        read_layout(path)


def test_index_and_shard_disagreeing_is_an_error(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "a", _tensors(), shards=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'ghost\.weight' is in the index but in none"):
        read_layout(path)


def test_pickle_checkpoints_are_refused_without_being_opened(tmp_path: Path) -> None:
    path = tmp_path / "a"
    path.mkdir()
    (path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(CheckpointError, match=r"pickle-based weights found \(pytorch_model.bin\)"):
        read_layout(path)


def test_index_pointing_at_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a"
    path.mkdir()
    index = {"weight_map": {EMB: "pytorch_model-00001-of-00001.bin"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="pickle-based file"):
        read_layout(path)


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a directory"):
        read_layout(tmp_path / "nowhere")


def test_truncated_file_fails_at_header_time(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "a", _tensors())
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_header(file)


def test_garbage_header_is_an_error(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes((5).to_bytes(8, "little") + b"nope!" + b"\0" * 8)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_safetensors_header(file)


def test_matching_checkpoints_plan_every_tensor_in_name_order(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", _tensors(seed=0))
    b = write_checkpoint(tmp_path / "b", _tensors(seed=1), shards=2)
    plan = validate_checkpoints([a, b])
    assert plan.names == tuple(sorted(_tensors()))
    assert all(len(t.sources) == 2 for t in plan.tensors)
    assert plan.tensors[0].sources[1].file.parent == b


def test_missing_tensor_names_tensor_and_checkpoint(tmp_path: Path) -> None:
    full = _tensors()
    a = write_checkpoint(tmp_path / "a", full)
    b = write_checkpoint(
        tmp_path / "b", {k: v for k, v in full.items() if k != "model.norm.weight"}
    )
    with pytest.raises(CheckpointMismatch, match=rf"'model.norm.weight' is missing from .*{b}"):
        validate_checkpoints([a, b])


def test_extra_tensor_names_tensor_and_checkpoint(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", _tensors())
    b = write_checkpoint(
        tmp_path / "b", {**_tensors(), "extra.bias": torch.zeros(3, dtype=torch.bfloat16)}
    )
    with pytest.raises(CheckpointMismatch, match=rf"'extra.bias' of checkpoint {b} is absent"):
        validate_checkpoints([a, b])


def test_shape_mismatch_names_tensor_and_checkpoints(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", _tensors())
    bad = {**_tensors(), "model.norm.weight": torch.zeros(9, dtype=torch.bfloat16)}
    b = write_checkpoint(tmp_path / "b", bad)
    with pytest.raises(CheckpointMismatch, match=rf"'model.norm.weight' has shape \[9\] in .*{b}"):
        validate_checkpoints([a, b])


def test_mixed_float_dtypes_are_planned_with_each_source_dtype(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", _tensors())
    b = write_checkpoint(tmp_path / "b", _tensors(torch.float32))
    plan = validate_checkpoints([a, b])
    assert {tuple(s.dtype for s in t.sources) for t in plan.tensors} == {("BF16", "F32")}


def test_integer_tensor_in_one_checkpoint_names_it_and_the_requirement(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", _tensors())
    ints = {**_tensors(), "model.norm.weight": torch.zeros(8, dtype=torch.int32)}
    b = write_checkpoint(tmp_path / "b", ints)
    with pytest.raises(
        CheckpointMismatch,
        match=rf"'model.norm.weight' has dtype I32 in checkpoint {b}; a linear merge needs "
        r"floating-point tensors \(F64, F32, F16, BF16\)",
    ):
        validate_checkpoints([a, b])


def test_integer_tensors_cannot_be_merged(tmp_path: Path) -> None:
    ints = {**_tensors(), "buffer.ids": torch.arange(4)}
    a = write_checkpoint(tmp_path / "a", ints)
    b = write_checkpoint(tmp_path / "b", ints)
    with pytest.raises(CheckpointMismatch, match=r"'buffer\.ids' has dtype I64"):
        validate_checkpoints([a, b])


def test_tied_and_untied_checkpoints_merge_into_an_untied_head(tmp_path: Path) -> None:
    tied = write_checkpoint(
        tmp_path / "tied", _tensors(seed=0), config={"tie_word_embeddings": True}
    )
    head = {**_tensors(seed=1), HEAD_NAME: torch.ones(16, 8, dtype=torch.bfloat16)}
    untied = write_checkpoint(tmp_path / "untied", head, config={"tie_word_embeddings": False})
    plan = validate_checkpoints([tied, untied])
    planned = {t.name: t for t in plan.tensors}
    assert plan.unties_head
    assert planned[HEAD_NAME].sources[0].name == EMB
    assert planned[HEAD_NAME].sources[1].name == HEAD_NAME


def test_all_tied_checkpoints_stay_tied(tmp_path: Path) -> None:
    stored_head = {**_tensors(seed=0), HEAD_NAME: torch.ones(16, 8, dtype=torch.bfloat16)}
    a = write_checkpoint(tmp_path / "a", stored_head, config={"tie_word_embeddings": True})
    b = write_checkpoint(tmp_path / "b", _tensors(seed=1))  # no config: no head means tied
    plan = validate_checkpoints([a, b])
    assert HEAD_NAME not in plan.names
    assert not plan.unties_head


def test_untied_config_without_head_is_a_mismatch(tmp_path: Path) -> None:
    head = {**_tensors(seed=1), HEAD_NAME: torch.ones(16, 8, dtype=torch.bfloat16)}
    a = write_checkpoint(tmp_path / "a", head)
    b = write_checkpoint(tmp_path / "b", _tensors(), config={"tie_word_embeddings": False})
    with pytest.raises(CheckpointMismatch, match=rf"'lm_head.weight' is missing from .*{b}"):
        validate_checkpoints([a, b])


def test_no_checkpoints_is_an_error() -> None:
    with pytest.raises(CheckpointError, match="no checkpoints"):
        validate_checkpoints([])
