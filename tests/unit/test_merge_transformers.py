"""Merges of real (tiny, randomly initialised) transformers models: on disk and resident."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from mergerunner.merge import MergeWeightsError, merge_to_directory  # noqa: E402
from mergerunner.resident_merge import ModelMismatch, ResidentMerger  # noqa: E402

# Importing transformers and building models takes seconds on a busy machine.
pytestmark = [pytest.mark.unit, pytest.mark.slow]

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _save_llama(path: Path, seed: int, *, tied: bool, hidden: int = 32) -> Path:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    return path


def _load(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)


def _effective(path: Path) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint's model computes with, head included even when tied."""
    model = _load(path)
    state = {k: v.double() for k, v in model.state_dict().items()}
    state[HEAD] = model.get_output_embeddings().weight.double()
    return state


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llamas")
    return {
        "tied0": _save_llama(root / "tied0", 0, tied=True),
        "tied1": _save_llama(root / "tied1", 1, tied=True),
        "untied2": _save_llama(root / "untied2", 2, tied=False),
        "untied3": _save_llama(root / "untied3", 3, tied=False),
    }


def test_mixed_tying_merges_into_an_untied_model(pool: dict[str, Path], tmp_path: Path) -> None:
    dirs = [pool["tied0"], pool["untied2"], pool["untied3"]]
    weights = [0.5, 0.3, 0.2]
    merge_to_directory(dirs, weights, tmp_path / "out")
    merged = _load(tmp_path / "out")
    assert merged.config.tie_word_embeddings is False
    assert merged.lm_head.weight.data_ptr() != merged.model.embed_tokens.weight.data_ptr()
    sources = [_effective(d) for d in dirs]
    expected = sum(w * s[HEAD] for w, s in zip(weights, sources, strict=True))
    # Within one bf16 ulp of the exact sum (float32 accumulation, then one rounding).
    error = (merged.lm_head.weight.double() - expected).abs()
    assert (error <= 2.0**-7 * expected.abs() + 1e-12).all()
    assert not torch.equal(merged.lm_head.weight, _load(dirs[1]).lm_head.weight)
    logits = merged(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 96) and torch.isfinite(logits).all()


def test_all_tied_merge_stays_tied(pool: dict[str, Path], tmp_path: Path) -> None:
    report = merge_to_directory([pool["tied0"], pool["tied1"]], [0.5, 0.5], tmp_path / "out")
    merged = _load(tmp_path / "out")
    assert merged.config.tie_word_embeddings is True
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    assert report.tensors == len(merged.state_dict()) - 1  # the head is not stored


@pytest.mark.parametrize(
    ("names", "base"),
    [
        (["tied0", "untied2", "untied3"], "untied2"),
        (["untied2", "untied3"], "untied3"),
        (["tied0", "tied1"], "tied1"),
        (["tied0", "tied1"], "untied2"),  # tied checkpoints into an untied model: head = embedding
    ],
)
def test_resident_merge_equals_merge_to_directory(
    pool: dict[str, Path], tmp_path: Path, names: list[str], base: str
) -> None:
    dirs = [pool[n] for n in names]
    weights = [0.7, -0.2, 0.5][: len(dirs)]
    report = merge_to_directory(dirs, weights, tmp_path / "out")
    on_disk = _load(tmp_path / "out")
    model = _load(pool[base])
    digest = ResidentMerger(dirs).merge_into(model, weights)
    assert digest == report.digest
    resident, written = model.state_dict(), on_disk.state_dict()
    assert all(torch.equal(resident[k], written[k]) for k in written)
    assert torch.equal(model.get_output_embeddings().weight, on_disk.get_output_embeddings().weight)


def test_resident_merges_are_repeatable_and_distinct(pool: dict[str, Path]) -> None:
    merger = ResidentMerger([pool["untied2"], pool["untied3"]])
    model = _load(pool["untied2"])
    first = merger.merge_into(model, [0.25, 0.75])
    other = merger.merge_into(model, [1.0, 0.0])
    again = merger.merge_into(model, [0.25, 0.75])
    assert first == again != other
    one_hot = merger.merge_into(model, [0.0, 1.0])
    reference = _load(pool["untied3"]).state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    assert one_hot != first
    recipe = merger.merge_into(model, [0.25, 0.75], digest="recipe")
    assert recipe.startswith("recipe-sha256:")
    assert recipe == merger.merge_into(model, [0.25, 0.75], digest="recipe")
    assert recipe != merger.merge_into(model, [0.25, 0.7500001], digest="recipe")
    with pytest.raises(ValueError, match="digest must be"):
        merger.merge_into(model, [0.25, 0.75], digest="md5")


def test_untied_merge_into_a_tied_model_is_refused(pool: dict[str, Path]) -> None:
    merger = ResidentMerger([pool["tied0"], pool["untied2"]])
    with pytest.raises(ModelMismatch, match="ties lm_head"):
        merger.merge_into(_load(pool["tied1"]), [0.5, 0.5])


def test_resident_merge_checks_weights_and_shapes(pool: dict[str, Path], tmp_path: Path) -> None:
    merger = ResidentMerger([pool["untied2"], pool["untied3"]])
    model = _load(pool["untied2"])
    with pytest.raises(MergeWeightsError, match="expected 2 weights"):
        merger.merge_into(model, [1.0])
    with pytest.raises(MergeWeightsError, match="weight 0 is nan"):
        merger.merge_into(model, [float("nan"), 1.0])
    wider = _load(_save_llama(tmp_path / "wide", 9, tied=False, hidden=64))
    with pytest.raises(ModelMismatch, match="has shape"):
        merger.merge_into(wider, [0.5, 0.5])


def test_a_directory_with_both_layouts_means_what_transformers_loads(
    pool: dict[str, Path], tmp_path: Path
) -> None:
    """A single file and a stale index with another model's shards: transformers loads the
    single file, and so does every reader of ours (the merge reads the same tensors)."""
    both = tmp_path / "both"
    _save_llama(both, 7, tied=False)  # model.safetensors
    stale = _load(pool["untied2"]).state_dict()
    stale_dir = tmp_path / "stale"
    _load(pool["untied2"]).save_pretrained(stale_dir, max_shard_size="20KB")
    for file in stale_dir.glob("model*.safetensors*"):
        file.rename(both / file.name)
    assert (both / "model.safetensors.index.json").is_file()
    loaded = _load(both).state_dict()
    merge_to_directory([both], [1.0], tmp_path / "out", dtype="bfloat16")
    merged = _load(tmp_path / "out").state_dict()
    assert any(not torch.equal(loaded[k], stale[k]) for k in loaded)
    assert all(torch.equal(merged[k], loaded[k]) for k in loaded)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_resident_merge_in_a_float32_model_is_rounded_to_the_output_dtype(
    pool: dict[str, Path], tmp_path: Path, dtype: str
) -> None:
    """A CPU holds the model in float32; its weights must still be the exported ones."""
    dirs = [pool["untied2"], pool["untied3"]]
    weights = [0.3, 0.7]
    report = merge_to_directory(dirs, weights, tmp_path / "out", dtype=dtype)
    on_disk = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=getattr(torch, dtype)
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(pool["untied2"], dtype=torch.float32)
    digest = ResidentMerger(dirs).merge_into(model, weights, dtype=dtype)
    assert digest == report.digest
    resident, written = model.state_dict(), on_disk.state_dict()
    assert all(resident[k].dtype == torch.float32 for k in written)
    assert all(torch.equal(resident[k], written[k].float()) for k in written)
    unrounded = ResidentMerger(dirs).merge_into(model, weights)
    assert unrounded != report.digest  # the float32 sum is another model
