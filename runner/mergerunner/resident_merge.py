"""The resident merger: every checkpoint held in memory once, merged into a loaded model.

A search evaluates a candidate without touching the disk: `ResidentMerger.merge_into`
overwrites a live model's weights with Σ wᵢ θᵢ, with the arithmetic of the streaming merge
(`mergerunner.arithmetic`), so both give bit-identical tensors and the same content digest.
`mergerunner.resident` runs trials on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergerunner.arithmetic import (
    CHUNK_ELEMS,
    accumulate,
    finite_probe,
    non_finite_error,
    output_dtype,
    torch_threads,
)
from mergerunner.checkpoint import (
    HEAD_NAME,
    MergePlan,
    PlannedTensor,
    validate_checkpoints,
)
from mergerunner.digest import content_digest, inputs_identity, recipe_digest
from mergerunner.merge import validate_weights
from mergerunner.stream import InputFiles, MappedWindow
from mergerunner.trial import FailureKind
from mergerunner.writer import Span


class ModelMismatch(ValueError):
    """A loaded model does not have the checkpoints' tensors, so a merge cannot go into it."""

    failure_kind = FailureKind.CHECKPOINTS_INCOMPATIBLE


def _load_rows(plan: MergePlan, tensor: PlannedTensor, files: InputFiles) -> list[torch.Tensor]:
    """One tensor of every checkpoint, each a flat copy in its own checkpoint's dtype (dtypes
    may differ between checkpoints; each is widened in the accumulator, as when streaming)."""
    mapped = MappedWindow(files, Span(0, tensor, 0, tensor.numel), range(len(plan.checkpoints)))
    rows = [view.clone() for view in mapped.views]
    mapped.release()
    return rows


@dataclass(frozen=True)
class _Target:
    tensor: PlannedTensor
    destinations: tuple[torch.Tensor, ...]


class ResidentMerger:
    """Every checkpoint's tensors held in memory once, merged into a live model on demand.

    Inputs stay in their own dtype: half the memory of float32 for bf16 checkpoints, for about
    10% more time per merge on CPU (where a merge is bound by reading N·params elements), and
    the same mixed-precision add as the streaming merge, hence identical results. Memory is N
    times one checkpoint, in host memory: 8 × 8B bf16 checkpoints are 128 GB, which no GPU
    holds beside the model. With `pin_memory` (when the model is on GPUs) the rows are
    page-locked, so each tensor's rows are copied to the device of its module asynchronously
    and merged there, chunk by chunk: the model may span several GPUs (its placement), and GPU
    memory holds the model plus one chunk of rows.
    """

    def __init__(self, checkpoint_dirs: Sequence[Path], *, pin_memory: bool = False):
        self.plan = validate_checkpoints([Path(p) for p in checkpoint_dirs])
        with InputFiles() as files:
            self._rows = {t.name: _load_rows(self.plan, t, files) for t in self.plan.tensors}
        if pin_memory:
            self._rows = {n: [row.pin_memory() for row in rows] for n, rows in self._rows.items()}
        self._largest = max((t.numel for t in self.plan.tensors), default=0)
        self._accs: dict[torch.device, torch.Tensor] = {}
        self._identity = inputs_identity(self.plan)

    def _acc(self, device: torch.device) -> tuple[torch.Tensor, int]:
        """The float32 accumulator of a device and its chunk length (bounded by L2 on a CPU;
        16M elements on a GPU, so N rows of a chunk in transit stay N × 32 MiB in bf16)."""
        chunk = min(self._largest, CHUNK_ELEMS if device.type == "cpu" else 1 << 24)
        if device not in self._accs:
            self._accs[device] = torch.empty(chunk, dtype=torch.float32, device=device)
        return self._accs[device], chunk

    def _rows_on(
        self, rows: Sequence[torch.Tensor], index: int, start: int, stop: int, device: torch.device
    ) -> torch.Tensor:
        row = rows[index][start:stop]
        return row if device.type == "cpu" else row.to(device, non_blocking=True)

    @property
    def checkpoints(self) -> int:
        return len(self.plan.checkpoints)

    def merge_into(
        self,
        model: torch.nn.Module,
        weights: Sequence[float],
        *,
        digest: str = "content",
        dtype: str | None = None,
    ) -> str:
        """Overwrite the model's weights with Σ wᵢ θᵢ in place; return a digest of the merge.

        `dtype` is the merge's output dtype (`merge.dtype`): the float32 sum is rounded to it,
        exactly as `merge_to_directory` rounds it, before it is stored in the model, so a model
        held in a wider dtype (float32 on a CPU, where bfloat16 matrix products are slow)
        computes with exactly the weights that would be exported. None: the model's own dtype.
        `digest="content"` hashes the merged tensors in the output dtype as
        `merge_to_directory` does, so the two are equal for the same weights and dtype; it
        costs about a third of a CPU merge. `digest="recipe"` hashes only what determines the
        result (the inputs' identity, the weights, the dtype): free, and equal exactly when
        the same merger merges the same weights. Tied weights are written once.
        """
        if digest not in ("content", "recipe"):
            raise ValueError(f"digest must be 'content' or 'recipe', not {digest!r}")
        out = None if dtype is None else output_dtype(dtype)[0]
        values = validate_weights(weights, self.checkpoints)
        active = [(w, i) for i, w in enumerate(values) if w != 0.0]
        targets = self._bind(model)
        # One intra-op thread: a merge is a few hundred short memory-bound ops, and with a
        # thread pool each op waits for its slowest thread; on a busy machine that made merges
        # ten times slower (measured), for at best a 2x gain on an idle one.
        with torch.no_grad(), torch_threads(1):
            totals: dict[torch.device, torch.Tensor] = {}
            for target in targets:
                device = target.destinations[0].device
                if device not in totals:
                    totals[device] = torch.zeros((), dtype=torch.float32, device=device)
                self._merge_one(target, active, out, totals[device])
            # One check (one sync) per device and merge.
            if not all(bool(torch.isfinite(total)) for total in totals.values()):
                self._raise_non_finite(targets, active, out)
        if digest == "recipe":
            dtypes = sorted({str(out or t.destinations[0].dtype) for t in targets})
            return recipe_digest(self._identity, values, dtypes)
        return content_digest(
            # Widening back from the output dtype is exact: the values were rounded to it.
            (t.tensor.name, t.destinations[0] if out is None else t.destinations[0].to(out))
            for t in targets
        )

    def _merge_one(
        self,
        target: _Target,
        active: Sequence[tuple[float, int]],
        out: torch.dtype | None,
        total: torch.Tensor,
    ) -> None:
        """Merge one tensor chunk by chunk, rounded to `out` when the model is held wider; add
        each chunk's stored values to `total`, which NaN or Inf anywhere (an overflow of the
        rounding included) makes non-finite (see `is_finite`)."""
        rows = self._rows[target.tensor.name]
        first, *aliases = target.destinations
        device = first.device
        acc_all, chunk = self._acc(device)
        flat = (
            first.view(-1)
            if first.is_contiguous()
            else torch.empty(first.numel(), dtype=first.dtype, device=device)
        )
        rounds = out is not None and out != first.dtype
        for start in range(0, target.tensor.numel, chunk):
            stop = min(target.tensor.numel, start + chunk)
            acc = acc_all[: stop - start]
            terms = ((w, self._rows_on(rows, i, start, stop, device)) for w, i in active)
            merged = accumulate(acc, terms)
            piece = flat[start:stop]
            piece.copy_(merged.to(out) if rounds else merged)
            total.add_(finite_probe(piece))
        if not first.is_contiguous():
            first.copy_(flat.view(first.shape))
        for alias in aliases:
            alias.copy_(first)

    def _raise_non_finite(
        self,
        targets: Sequence[_Target],
        active: Sequence[tuple[float, int]],
        out: torch.dtype | None,
    ) -> None:
        """Find the first tensor of the merge that is not finite and raise why; return when
        every value is finite (the sum of finite values overflowed)."""
        for target in targets:
            merged = target.destinations[0].reshape(-1)
            bad = torch.nonzero(~torch.isfinite(merged))
            if not bad.numel():
                continue
            acc_all, chunk = self._acc(merged.device)
            start = int(bad[0, 0]) // chunk * chunk
            stop = min(merged.numel(), start + chunk)
            rows = self._rows[target.tensor.name]
            terms = [(w, self._rows_on(rows, i, start, stop, merged.device)) for w, i in active]
            acc = accumulate(acc_all[: stop - start], terms)
            sources = [i for _, i in active]
            stored = merged[start:stop] if out is None else merged[start:stop].to(out)
            raise non_finite_error(target.tensor, start, stored, acc, terms, sources)

    def _bind(self, model: torch.nn.Module) -> list[_Target]:
        return bind_model(self.plan, model.state_dict(keep_vars=True))


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
