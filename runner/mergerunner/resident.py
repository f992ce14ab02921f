"""Trials in-process, for local mode: load everything once, then merge-and-score per candidate.

A pod runs one trial and exits, so it merges to disk and loads the result. A local search runs
hundreds of trials in one process, where reloading would dominate: here the checkpoints are
held in memory, one model object stays resident, and each candidate's weights are written into
it in place before it is scored on task suites that were also loaded once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergerunner.evaluate import TaskSuite, make_lm, pick_device
from mergerunner.trial import EvaluatorSpec, Subset, TaskSpec


@dataclass(frozen=True)
class ResidentScores:
    held_in: dict[str, float]
    held_out: dict[str, float]
    digest: str
    merge_s: float
    evaluate_s: float


def _eval_dtype(dtype: str, device: str) -> str:
    """bfloat16 matrix products are emulated and slow on most CPUs; score in float32 there.

    The merge itself always accumulates in float32, so this changes only the arithmetic of the
    forward pass, not which model is scored.
    """
    return "float32" if device == "cpu" else dtype


class ResidentEvaluator:
    """One resident model, many candidate merges."""

    def __init__(
        self,
        checkpoint_dirs: Sequence[Path],
        *,
        held_in: Sequence[TaskSpec],
        held_out: Sequence[TaskSpec] = (),
        evaluator: EvaluatorSpec | None = None,
        custom_tasks_dir: Path | None = None,
        dtype: str = "bfloat16",
        confirm: bool = False,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mergerunner.merge import ResidentMerger

        self.spec = evaluator or EvaluatorSpec()
        device = pick_device(self.spec)
        trust = self.spec.trust_remote_code
        self.dtype = _eval_dtype(dtype, device.split(":")[0])
        first = checkpoint_dirs[0]
        self.model: Any = AutoModelForCausalLM.from_pretrained(
            first, dtype=getattr(torch, self.dtype), trust_remote_code=trust
        )
        self.model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(first, trust_remote_code=trust)
        self.merger = ResidentMerger(list(checkpoint_dirs), device=device)
        self.lm = make_lm(self.model, tokenizer, self.spec, progress=False)
        seed = self.spec.seed
        self.held_in = TaskSuite(held_in, include_path=custom_tasks_dir, seed=seed)
        # The same held-in tasks on the examples the search never sees (None: not needed).
        self.confirmation = (
            TaskSuite(
                held_in,
                include_path=custom_tasks_dir,
                seed=seed,
                confirm=[t.task for t in held_in],
            )
            if confirm
            else None
        )
        self.held_out = (
            TaskSuite(held_out, include_path=custom_tasks_dir, seed=seed) if held_out else None
        )

    def score(
        self,
        weights: Sequence[float],
        *,
        with_held_out: bool = False,
        subset: Subset = "search",
    ) -> ResidentScores:
        """Merge `weights` into the resident model and score it (held-in tasks on `subset`)."""
        import torch

        start = time.perf_counter()
        with torch.no_grad():
            digest = self.merger.merge_into(self.model, weights)
        merged = time.perf_counter()
        suite = self.held_in
        if subset == "confirmation":
            if self.confirmation is None:
                raise ValueError("this evaluator was built without confirm=True")
            suite = self.confirmation
        held_in = suite.score(self.lm)
        held_out = (
            self.held_out.score(self.lm) if with_held_out and self.held_out is not None else {}
        )
        return ResidentScores(
            held_in=held_in,
            held_out=held_out,
            digest=digest,
            merge_s=merged - start,
            evaluate_s=time.perf_counter() - merged,
        )
