"""The streamed linear merge: correctness against float64, layout, provenance, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from blake3 import blake3
from safetensors import safe_open
from safetensors.torch import save_file

from mergerunner import digest, stream, writer
from mergerunner.checkpoint import CheckpointError, CheckpointMismatch
from mergerunner.merge import MergeWeightsError, merge_to_directory, validate_weights
from mergerunner.writer import RECIPE_KEY, encode_header
from support.checkpoint_files import write_checkpoint

pytestmark = pytest.mark.unit

SHAPES = {
    "model.embed_tokens.weight": (40, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.mlp.up_proj.weight": (24, 16),
    "model.norm.weight": (16,),
    "model.empty": (0, 4),
}
TORCH_OF = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Half an ulp of the output format, relative: the rounding of an exact result.
HALF_ULP = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}


def _checkpoint(
    path: Path, seed: int, dtype: torch.dtype = torch.bfloat16, *, shards: int = 1
) -> Path:
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=gen).to(dtype) for n, s in SHAPES.items()}
    config = {"architectures": ["LlamaForCausalLM"], "dtype": "float32", "hidden_size": 16}
    return write_checkpoint(path, tensors, shards=shards, config=config)


def _checkpoints(root: Path, n: int, dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    return [_checkpoint(root / f"ckpt{i}", seed=i, dtype=dtype) for i in range(n)]


def _load(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118
    return out


def _reference(
    dirs: list[Path], weights: list[float]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per tensor: the exact sum Σ wᵢxᵢ in float64, and Σ |wᵢxᵢ| (what rounding errors scale by)."""
    loaded = [_load(d) for d in dirs]
    return {
        name: (
            sum(w * sd[name].double() for w, sd in zip(weights, loaded, strict=True)),
            sum(abs(w) * sd[name].double().abs() for w, sd in zip(weights, loaded, strict=True)),
        )
        for name in loaded[0]
    }


def _max_excess(
    out: dict[str, torch.Tensor],
    ref: dict[str, tuple[torch.Tensor, torch.Tensor]],
    dtype: str,
    n: int,
) -> float:
    """Largest error beyond the textbook bound: half an output ulp of the exact value, plus
    (N+1)·2⁻²⁴·Σ|wᵢxᵢ| for N float32 multiply-adds (the accumulation error)."""
    worst = -1.0
    for name, (exact, magnitude) in ref.items():
        if not exact.numel():
            continue
        bound = HALF_ULP[dtype] * exact.abs() + (n + 1) * 2.0**-24 * magnitude
        worst = max(worst, ((out[name].double() - exact).abs() - bound).max().item())
    return worst


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("out_dtype", ["bfloat16", "float16", "float32"])
def test_merge_matches_float64_reference(
    tmp_path: Path, in_dtype: torch.dtype, out_dtype: str
) -> None:
    dirs = _checkpoints(tmp_path, 3, in_dtype)
    weights = [0.7, -0.25, 0.61]  # unconstrained: negative, sum != 1
    report = merge_to_directory(dirs, weights, tmp_path / "out", dtype=out_dtype)
    out = _load(tmp_path / "out")
    assert set(out) == set(SHAPES)
    assert all(t.dtype == TORCH_OF[out_dtype] for t in out.values())
    assert _max_excess(out, _reference(dirs, weights), out_dtype, len(dirs)) <= 0.0
    assert report.tensors == len(SHAPES)
    assert report.files == ("config.json", "model.safetensors")


@pytest.mark.parametrize("n", [2, 64])
def test_merge_of_many_checkpoints(tmp_path: Path, n: int) -> None:
    dirs = _checkpoints(tmp_path, n)
    gen = torch.Generator().manual_seed(n)
    weights = (torch.rand(n, generator=gen) * 2 - 0.5).tolist()
    merge_to_directory(dirs, weights, tmp_path / "out", dtype="float32")
    out = _load(tmp_path / "out")
    assert _max_excess(out, _reference(dirs, weights), "float32", n) <= 0.0


def test_chunked_tensors_give_the_unchunked_result(tmp_path: Path, monkeypatch) -> None:
    dirs = _checkpoints(tmp_path, 3)
    weights = [0.2, 0.3, 0.5]
    monkeypatch.setattr(digest, "DIGEST_BLOCK", 7)  # tensors of several digest blocks
    whole = merge_to_directory(dirs, weights, tmp_path / "whole")
    monkeypatch.setattr(stream, "stream_geometry", lambda *_: (21, 7))  # windows of 3 chunks
    chunked = merge_to_directory(dirs, weights, tmp_path / "chunked")
    serial = merge_to_directory(dirs, weights, tmp_path / "serial", threads=1)
    wide = merge_to_directory(dirs, weights, tmp_path / "wide", threads=4)
    assert chunked.digest == whole.digest == serial.digest == wide.digest
    assert _load(tmp_path / "chunked").keys() == _load(tmp_path / "whole").keys()


@pytest.mark.parametrize("block", [7, 16, 1 << 16])
def test_digest_is_of_the_written_tensors_block_by_block(
    tmp_path: Path, monkeypatch, block: int
) -> None:
    """The streamed digest, hashed by several workers in any order, equals content_digest of
    the tensors read back, and is BLAKE3 of (prefix, BLAKE3 of each block) in name order."""
    monkeypatch.setattr(digest, "DIGEST_BLOCK", block)
    monkeypatch.setattr(stream, "stream_geometry", lambda *_: (2 * block, block))
    dirs = _checkpoints(tmp_path, 3)
    report = merge_to_directory(dirs, [0.2, 0.3, 0.5], tmp_path / "out", threads=3)
    tensors = sorted(_load(tmp_path / "out").items())
    assert report.digest == digest.content_digest(tensors)
    by_hand = blake3()
    for name, tensor in tensors:
        by_hand.update(json.dumps([name, "BF16", list(tensor.shape)]).encode() + b"\n")
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        for i in range(0, len(raw), 2 * block):
            by_hand.update(blake3(raw[i : i + 2 * block]).digest())
    assert report.digest == "blake3:" + by_hand.hexdigest()


def test_sharded_inputs_and_outputs(tmp_path: Path) -> None:
    dirs = [_checkpoint(tmp_path / f"s{i}", seed=i, shards=2 + i) for i in range(3)]
    weights = [0.5, 0.25, 0.25]
    single = merge_to_directory(dirs, weights, tmp_path / "single")
    sharded = merge_to_directory(dirs, weights, tmp_path / "sharded", max_shard_bytes=1500)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 1
    assert sorted(index["weight_map"]) == sorted(SHAPES)
    assert all((tmp_path / "sharded" / f).is_file() for f in shard_files)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * 2 for t in _load(tmp_path / "single").values()
    )
    assert sharded.digest == single.digest  # the digest is of the tensors, not of the files
    one, many = _load(tmp_path / "single"), _load(tmp_path / "sharded")
    assert all(torch.equal(one[k], many[k]) for k in SHAPES)


def test_recipe_is_in_every_file_and_config_is_updated(tmp_path: Path) -> None:
    dirs = _checkpoints(tmp_path, 2)
    (dirs[0] / "tokenizer_config.json").write_text("{}")
    (dirs[0] / "generation_config.json").write_text('{"do_sample": false}')
    (dirs[0] / "README.md").write_text("card of checkpoint 0")
    merge_to_directory(dirs, [0.4, 0.6], tmp_path / "out", max_shard_bytes=2000)
    out = tmp_path / "out"
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            recipe = json.loads(handle.metadata()[RECIPE_KEY])
        assert recipe["weights"] == [0.4, 0.6]
        assert recipe["dtype"] == "bfloat16"
        assert [c["path"] for c in recipe["checkpoints"]] == [str(d) for d in dirs]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer_config.json").is_file()
    assert (out / "generation_config.json").is_file()
    assert not (out / "README.md").exists()


def test_digest_tells_merges_apart(tmp_path: Path) -> None:
    dirs = _checkpoints(tmp_path, 2)
    a = merge_to_directory(dirs, [0.5, 0.5], tmp_path / "a")
    b = merge_to_directory(dirs, [0.5, 0.5], tmp_path / "b")
    c = merge_to_directory(dirs, [0.6, 0.4], tmp_path / "c")
    assert a.digest == b.digest != c.digest
    assert a.bytes_written == (tmp_path / "a" / "model.safetensors").stat().st_size


def test_header_is_padded_so_that_data_is_aligned() -> None:
    header = encode_header([("x", "BF16", (3,), 6)], {"format": "pt"})
    length = int.from_bytes(header[:8], "little")
    assert length % 8 == 0 and len(header) == 8 + length
    assert len(header) % 64 == 0
    assert header.endswith(b" ") or header.endswith(b"}")
    assert json.loads(header[8:])["x"] == {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([0.5], "expected 2 weights"),
        ([0.5, 0.2, 0.3], "expected 2 weights"),
        ([0.5, float("nan")], "weight 1 is nan"),
        ([float("inf"), 0.5], "weight 0 is inf"),
        ([0.5, "0.5"], "not a real number"),
    ],
)
def test_bad_weights_write_nothing(tmp_path: Path, weights: list, message: str) -> None:
    dirs = _checkpoints(tmp_path, 2)
    with pytest.raises(MergeWeightsError, match=message):
        merge_to_directory(dirs, weights, tmp_path / "out" / "merged")
    assert not (tmp_path / "out").exists()


def test_weights_accept_any_finite_real() -> None:
    assert validate_weights([1, -2.5, 0.0], 3) == (1.0, -2.5, 0.0)


def _assert_nothing_written(root: Path, names: set[str]) -> None:
    assert {p.name for p in root.iterdir()} == names


def test_mismatch_fails_before_writing(tmp_path: Path) -> None:
    dirs = _checkpoints(tmp_path, 2)
    bad = _checkpoint(tmp_path / "bad", seed=5)
    tensors = _load(bad)
    tensors["model.norm.weight"] = torch.zeros(17, dtype=torch.bfloat16)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointMismatch, match=rf"shape \[17\] in checkpoint {bad}"):
        merge_to_directory([*dirs, bad], [0.3, 0.3, 0.4], tmp_path / "out")
    _assert_nothing_written(tmp_path, {"ckpt0", "ckpt1", "bad"})


def test_missing_file_fails_before_writing(tmp_path: Path) -> None:
    dirs = _checkpoints(tmp_path, 2)
    (dirs[1] / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=rf"checkpoint {dirs[1]}: no model.safetensors"):
        merge_to_directory(dirs, [0.5, 0.5], tmp_path / "out")
    _assert_nothing_written(tmp_path, {"ckpt0", "ckpt1"})


def test_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    dirs = _checkpoints(tmp_path, 1)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 whatever")
    with pytest.raises(CheckpointError, match="pickle-based"):
        merge_to_directory([*dirs, pickled], [0.5, 0.5], tmp_path / "out")
    _assert_nothing_written(tmp_path, {"ckpt0", "pickled"})


@pytest.mark.parametrize("threads", [1, 3])
def test_failure_while_writing_leaves_no_output(tmp_path: Path, monkeypatch, threads: int) -> None:
    dirs = _checkpoints(tmp_path, 2)
    calls = []
    write = writer.ShardOutputs.write

    def fails_on_the_fifth(self, span, raw) -> None:
        calls.append(span)
        if len(calls) == 5:
            raise OSError("disk full")
        write(self, span, raw)

    monkeypatch.setattr(digest, "DIGEST_BLOCK", 8)
    monkeypatch.setattr(stream, "stream_geometry", lambda *_: (16, 8))  # many windows
    monkeypatch.setattr(writer.ShardOutputs, "write", fails_on_the_fifth)
    with pytest.raises(OSError, match="disk full"):
        merge_to_directory(dirs, [0.5, 0.5], tmp_path / "out", threads=threads)
    _assert_nothing_written(tmp_path, {"ckpt0", "ckpt1"})
    assert len(calls) < 5 + 2 * threads  # the other workers stopped at their next window


def test_existing_output_is_not_overwritten(tmp_path: Path) -> None:
    dirs = _checkpoints(tmp_path, 2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        merge_to_directory(dirs, [0.5, 0.5], tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_unknown_dtype_is_refused(tmp_path: Path) -> None:
    dirs = _checkpoints(tmp_path, 2)
    with pytest.raises(ValueError, match="unsupported output dtype 'int8'"):
        merge_to_directory(dirs, [0.5, 0.5], tmp_path / "out", dtype="int8")
