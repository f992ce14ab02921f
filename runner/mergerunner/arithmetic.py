"""The one arithmetic both merges use, and what it means when a result is not finite.

For each element: `acc = 0; acc += wᵢ·xᵢ` (one fused multiply-add per input, in checkpoint
order, zero weights skipped) in a float32 accumulator, then one rounding to the output dtype.
torch evaluates that elementwise, so the result does not depend on how the work is split: the
streaming merge (`mergerunner.stream`) and the resident one (`mergerunner.resident_merge`)
produce bit-identical tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from mergerunner.checkpoint import CheckpointError, PlannedTensor
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
# Elements per accumulator pass: the float32 accumulator (1 MiB) stays in a core's L2 cache,
# which measured fastest (4 MiB in the shared L3 was a fifth slower).
CHUNK_ELEMS = 1 << 18


class NonFiniteMerge(TrialError):
    """These weights make a tensor of the merge NaN or infinite (float32 accumulation or the
    output dtype overflows): this candidate failed, the search goes on."""

    failure_kind = FailureKind.NON_FINITE


def output_dtype(dtype: str) -> tuple[torch.dtype, str]:
    """torch dtype and safetensors code of an output dtype name."""
    try:
        return OUTPUT_DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"unsupported output dtype {dtype!r}; choose one of {', '.join(OUTPUT_DTYPES)}"
        ) from None


def accumulate(acc: torch.Tensor, terms: Iterable[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """acc = Σ w·x in acc's dtype (float32): the one arithmetic both outputs use."""
    acc.zero_()
    for weight, values in terms:
        acc.add_(values, alpha=weight)
    return acc


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


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
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
