"""Trials in-process, for local mode: load everything once, then merge-and-score per candidate.

A pod runs one trial and exits, so it merges to disk and loads the result. A local search runs
hundreds of trials in one process, where reloading would dominate: here the checkpoints are
held in memory, one model object stays resident, and each candidate's weights are written into
it in place before it is scored on task suites that were also loaded once.

What is scored is what is exported: every merge is rounded to `merge.dtype` exactly as
`merge_to_directory` rounds it, and its digest is the exported model's digest. Only the
arithmetic of the forward pass may be wider (`compute_dtype`), as in a pod on the same device.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergerunner.evaluate import EvaluationError, TaskSuite, compute_dtype, make_lm
from mergerunner.run import StepFailed, _Clock, failed_result
from mergerunner.trial import EvaluatorSpec, FailureKind, Subset, TaskSpec, TrialResult


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
        bundle: Path | None = None,
        allow_code_execution: bool = False,
    ) -> None:
        self.spec = evaluator or EvaluatorSpec()
        if self.spec.backend != "hf":
            # Before any checkpoint is read: a resident model is scored in-process only.
            raise EvaluationError(
                f"evaluator.backend {self.spec.backend!r}: local mode scores its resident model "
                "in-process; use backend hf (server backends run in trial pods on a cluster)",
                kind=FailureKind.CONFIG,
            )
        from transformers import AutoTokenizer

        from mergerunner.devices import load_placed, model_config, plan_for, visible_devices
        from mergerunner.placement import layout_of_merge
        from mergerunner.resident_merge import ResidentMerger

        common = {
            "include_path": custom_tasks_dir,
            "seed": self.spec.seed,
            "evaluator": self.spec,
            "bundle": bundle,
            "allow_code_execution": allow_code_execution,
        }
        # Tasks first: a task, data or code-execution error is found before the model loads.
        self.held_in = TaskSuite(held_in, **common)
        self.held_out = TaskSuite(held_out, **common) if held_out else None
        # The same held-in tasks on the examples the search never sees (None: not needed).
        confirmed = [t.task for t in held_in]
        self.confirmation = TaskSuite(held_in, **common, confirm=confirmed) if confirm else None
        trust = self.spec.trust_remote_code
        gpus, _ = visible_devices(self.spec)
        self.merge_dtype = dtype
        self.dtype = compute_dtype(dtype, "cuda" if gpus else "cpu")
        self.held_in_specs = list(held_in)
        self.held_out_specs = list(held_out)
        # Checkpoint rows in host memory (pinned for fast copies when GPUs hold the model),
        # the model placed over every GPU by the same plan as a trial's.
        self.merger = ResidentMerger(list(checkpoint_dirs), pin_memory=bool(gpus))
        first = checkpoint_dirs[0]
        layout = layout_of_merge(self.merger.plan, self.dtype)
        self.placement = plan_for(layout, model_config(first), self.spec, self.dtype)
        self.model: Any = load_placed(first, self.placement, self.dtype, trust=trust)
        tokenizer = AutoTokenizer.from_pretrained(first, trust_remote_code=trust)
        self.lm = make_lm(
            self.model, tokenizer, self.spec, progress=False, device=self.placement.devices[0]
        )

    def score(
        self,
        weights: Sequence[float],
        *,
        with_held_out: bool = False,
        subset: Subset = "search",
        trial_id: str = "resident",
    ) -> TrialResult:
        """Merge `weights` into the resident model and score it (held-in tasks on `subset`),
        as a succeeded trial's result; raises `StepFailed`."""
        import torch

        suite = self.held_in
        if subset == "confirmation":
            if self.confirmation is None:
                raise ValueError("this evaluator was built without confirm=True")
            suite = self.confirmation
        start = time.perf_counter()
        clock = _Clock()
        with clock.step("merge"), torch.no_grad():
            digest = self.merger.merge_into(self.model, weights, dtype=self.merge_dtype)
        with clock.step("evaluate"):
            inside = suite.score_detailed(self.lm)
            outside = (
                self.held_out.score_detailed(self.lm)
                if with_held_out and self.held_out is not None
                else None
            )
        subtasks = {**inside.subtasks, **(outside.subtasks if outside else {})}
        return TrialResult.scored(
            trial_id,
            {**inside.scores, **(outside.scores if outside else {})},
            held_in=self.held_in_specs,
            held_out=self.held_out_specs if outside else (),
            subtasks=subtasks or None,
            prompt=self.spec.prompt_settings(),
            digest=digest,
            timings=clock.timings(time.perf_counter() - start),
        )

    def trial(
        self,
        trial_id: str,
        weights: Sequence[float],
        *,
        with_held_out: bool = False,
        subset: Subset = "search",
    ) -> TrialResult:
        """One candidate as a trial result, the runner's type: a failed step is reported with
        its failure kind (never raised), so local mode decides from the same kinds as the
        operator."""
        try:
            return self.score(
                weights, with_held_out=with_held_out, subset=subset, trial_id=trial_id
            )
        except StepFailed as failure:
            return failed_result(trial_id, failure)
