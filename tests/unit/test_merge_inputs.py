"""What a merge does with unusual inputs: non-finite values, weights at the edge of float32,
checkpoints of different dtypes. Both outputs (a directory, a resident model) behave alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergerunner.arithmetic import NonFiniteMerge
from mergerunner.checkpoint import CheckpointError
from mergerunner.merge import MergeWeightsError, merge_to_directory, validate_weights
from mergerunner.resident_merge import ResidentMerger
from mergerunner.trial import FAILURE_POLICY, FailureKind, FailurePolicy, failure_kind_of

pytestmark = pytest.mark.unit

SHAPES = {"a.weight": (300, 7), "b.weight": (5,), "c.weight": (64, 3)}
TORCH_OF = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def _random(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen).to(dtype) for n, s in SHAPES.items()}


class _Holder(torch.nn.Module):
    """A model that is just named tensors, for merging into."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.tensors = {n: torch.zeros(s, dtype=dtype) for n, s in SHAPES.items()}

    def state_dict(self, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return dict(self.tensors)


def _merge_both(dirs: list[Path], weights: list[float], out: Path, dtype: str) -> list[Exception]:
    """Run the merges (to a directory, resident); return what each raised."""
    raised: list[Exception] = []
    try:
        merge_to_directory(dirs, weights, out, dtype=dtype)
    except Exception as exc:
        raised.append(exc)
    try:
        ResidentMerger(dirs).merge_into(_Holder(TORCH_OF[dtype]), weights)
    except Exception as exc:
        raised.append(exc)
    try:  # a model held in float32 (local mode on a CPU), rounded to the output dtype
        ResidentMerger(dirs).merge_into(_Holder(torch.float32), weights, dtype=dtype)
    except Exception as exc:
        raised.append(exc)
    return raised


def test_nan_in_an_input_is_a_broken_checkpoint_named_in_both_merges(tmp_path: Path) -> None:
    good = _write(tmp_path / "good", _random(0, torch.bfloat16))
    tensors = _random(1, torch.bfloat16)
    tensors["c.weight"][10, 1] = float("nan")
    bad = _write(tmp_path / "bad", tensors)
    raised = _merge_both([good, bad], [0.5, 0.5], tmp_path / "out", "bfloat16")
    assert len(raised) == 3
    for exc in raised:
        assert isinstance(exc, CheckpointError)
        assert "'c.weight'" in str(exc) and str(bad) in str(exc)
        assert FAILURE_POLICY[failure_kind_of(exc)] == FailurePolicy.FATAL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good"]  # nothing written


@pytest.mark.parametrize(
    ("dtype", "weights", "value", "cause"),
    [
        ("float16", [1.0, 1.0], 40000.0, "overflows the output dtype float16"),
        ("bfloat16", [3e38, 3e38], 1.0, "the float32 accumulation overflows"),
        ("float32", [-3e38, 2.0], 2.0, "the float32 accumulation overflows"),
    ],
)
def test_weights_that_overflow_fail_the_trial_naming_the_tensor(
    tmp_path: Path, dtype: str, weights: list[float], value: float, cause: str
) -> None:
    inputs = []
    for i in range(2):
        tensors = _random(i, torch.float32)
        tensors["b.weight"][3] = value
        inputs.append(_write(tmp_path / f"c{i}", tensors))
    raised = _merge_both(inputs, weights, tmp_path / "out", dtype)
    assert len(raised) == 3
    for exc in raised:
        assert isinstance(exc, NonFiniteMerge), exc
        assert failure_kind_of(exc) == FailureKind.NON_FINITE
        assert FAILURE_POLICY[FailureKind.NON_FINITE] == FailurePolicy.COUNTED
        assert "'b.weight'" in str(exc) or "'a.weight'" in str(exc) or "'c.weight'" in str(exc)
        assert cause in str(exc)
    assert not (tmp_path / "out").exists()


def test_finite_weights_that_are_infinite_in_float32_are_refused() -> None:
    with pytest.raises(MergeWeightsError, match="finite in float32"):
        validate_weights([0.5, 1e39], 2)
    assert validate_weights([3.4e38, -3.4e38], 2) == (3.4e38, -3.4e38)


def _load(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118


@pytest.mark.parametrize("out_dtype", ["bfloat16", "float16", "float32"])
def test_checkpoints_of_different_dtypes_merge_alike_in_both_outputs(
    tmp_path: Path, out_dtype: str
) -> None:
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float64]
    dirs = [_write(tmp_path / f"c{i}", _random(i, d)) for i, d in enumerate(dtypes)]
    weights = [0.4, -0.3, 0.5, 0.45]
    report = merge_to_directory(dirs, weights, tmp_path / "out", dtype=out_dtype)
    written = _load(tmp_path / "out")
    model = _Holder(TORCH_OF[out_dtype])
    digest = ResidentMerger(dirs).merge_into(model, weights)
    assert digest == report.digest
    inputs = [_random(i, d) for i, d in enumerate(dtypes)]
    for name in SHAPES:
        assert torch.equal(written[name], model.tensors[name])
        exact = sum(w * t[name].double() for w, t in zip(weights, inputs, strict=True))
        tolerance = {"bfloat16": 2.0**-7, "float16": 2.0**-10, "float32": 2.0**-20}[out_dtype]
        assert torch.allclose(written[name].double(), exact, rtol=tolerance, atol=1e-6)
