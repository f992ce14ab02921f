"""One trial, start to finish: fetch, merge, evaluate, upload.

Each step's failure is caught and reported as the step that failed, because the operator
decides what to do with a failed trial (retry, penalise, fail the search with a condition) from
that report; a traceback in a pod log helps nobody who only reads the resource's status.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mergerunner.analytic import ANALYTIC_BACKEND, run_analytic
from mergerunner.trial import (
    Step,
    StepTimings,
    TrialDocument,
    TrialResult,
    failure_kind_of,
    fitness_of,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
CUSTOM_TASKS_ENV = "MERGERUNNER_CUSTOM_TASKS_DIR"


class StepFailed(Exception):
    """A trial step failed; carries the step's name for the report."""

    def __init__(self, step: Step, cause: BaseException) -> None:
        super().__init__(f"{step}: {cause}")
        self.step = step
        self.cause = cause


@dataclass
class _Clock:
    times: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def step(self, name: Step) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except StepFailed:
            raise
        except Exception as exc:
            raise StepFailed(name, exc) from exc
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start

    def timings(self, total: float) -> StepTimings:
        return StepTimings(
            fetch_s=round(self.times.get("fetch", 0.0), 4),
            merge_s=round(self.times.get("merge", 0.0), 4),
            evaluate_s=round(self.times.get("evaluate", 0.0), 4),
            upload_s=round(self.times.get("upload", 0.0), 4),
            total_s=round(total, 4),
        )


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, StepFailed) else f"{type(exc).__name__}: {text}"


def custom_tasks_dir(doc: TrialDocument, environ: Mapping[str, str] | None = None) -> Path | None:
    """The document's customTasksDir, else $MERGERUNNER_CUSTOM_TASKS_DIR.

    On a cluster the operator mounts the custom-task ConfigMap and names the mount in the
    environment, like the cache directory: where a volume sits in the pod is the pod's layout,
    not part of what the trial evaluates.
    """
    env = os.environ if environ is None else environ
    where = doc.custom_tasks_dir or env.get(CUSTOM_TASKS_ENV)
    return Path(where) if where else None


def load_merged_model(model_dir: Path, doc: TrialDocument) -> tuple[Any, Any]:
    """Load the merged model and its tokenizer onto the evaluation device, computing in
    `compute_dtype` (float32 on a CPU: the same arithmetic as local mode's resident model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergerunner.evaluate import compute_dtype, pick_device

    trust = doc.evaluator.trust_remote_code
    device = pick_device(doc.evaluator)
    dtype = getattr(torch, compute_dtype(doc.dtype, device))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
    return model, tokenizer


def run_trial(
    doc: TrialDocument,
    *,
    cache_dir: Path,
    work_dir: Path | None = None,
    now: Callable[[], float] = time.perf_counter,
) -> TrialResult:
    """Run one trial and report it; never raises for a failure of a step."""
    if doc.evaluator.backend == ANALYTIC_BACKEND:
        return run_analytic(doc)  # benchmarking mode: no model at all (mergerunner.analytic)
    from mergerunner.evaluate import TaskSuite, make_lm, subset_options
    from mergerunner.fetch import check_destination, fetch_checkpoints, upload_directory
    from mergerunner.merge import merge_to_directory

    clock = _Clock()
    start = now()
    try:
        with tempfile.TemporaryDirectory(prefix="merge-", dir=work_dir) as tmp:
            if doc.output.save_model and doc.output.uri:
                with clock.step("upload"):  # the destination first: a bad one costs no merge
                    check_destination(doc.output.uri)
            with clock.step("fetch"):
                dirs = fetch_checkpoints([c.uri for c in doc.checkpoints], cache_dir)
            merged_dir = Path(tmp) / "merged"
            with clock.step("merge"):
                report = merge_to_directory(dirs, doc.weight_vector(), merged_dir, dtype=doc.dtype)
            with clock.step("evaluate"):
                custom = custom_tasks_dir(doc)
                suite = TaskSuite(
                    [*doc.held_in, *doc.held_out],
                    include_path=custom,
                    seed=doc.evaluator.seed,
                    **subset_options(doc),
                )
                model, tokenizer = load_merged_model(merged_dir, doc)
                scores = suite.score(make_lm(model, tokenizer, doc.evaluator))
            output_uri = None
            if doc.output.save_model and doc.output.uri:
                with clock.step("upload"):
                    upload_directory(merged_dir, doc.output.uri)
                    output_uri = doc.output.uri
    except StepFailed as failure:
        log.error("trial %s failed in step %s: %s", doc.id, failure.step, failure.cause)
        return TrialResult(
            id=doc.id,
            status="failed",
            failed_step=failure.step,
            error_kind=failure_kind_of(failure.cause),
            error=_describe(failure.cause),
            timings=clock.timings(now() - start),
        )
    held_in = {t.task: scores[t.task] for t in doc.held_in}
    return TrialResult(
        id=doc.id,
        status="succeeded",
        held_in=held_in,
        held_out={t.task: scores[t.task] for t in doc.held_out},
        fitness=fitness_of(held_in, doc.held_in) if doc.held_in else None,
        digest=report.digest,
        timings=clock.timings(now() - start),
        output_uri=output_uri,
    )
