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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mergerunner.analytic import run_analytic
from mergerunner.contract import ENV_CUSTOM_TASKS
from mergerunner.trial import (
    ANALYTIC_BACKEND,
    EvaluatorSpec,
    Step,
    StepTimings,
    TrialDocument,
    TrialResult,
    failure_kind_of,
)

if TYPE_CHECKING:
    from mergerunner.evaluate import SuiteScores, TaskSuite
    from mergerunner.placement import Placement

log = logging.getLogger(__name__)
T = TypeVar("T")
# The longest error text a failed step's result keeps (the termination message keeps less).
ERROR_CHARS = 2000


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


def failed_result(
    trial_id: str, failure: StepFailed, timings: StepTimings | None = None
) -> TrialResult:
    """A trial whose step failed, reported with the kind its exception carries
    (`failure_kind_of`): how a trial Job, a warm evaluator and local mode report a failure."""
    return TrialResult.failed(
        trial_id,
        failure.step,
        failure_kind_of(failure.cause),
        _describe(failure.cause)[:ERROR_CHARS],
        timings=timings or StepTimings(),
    )


def scored_result(doc: TrialDocument, scores: Mapping[str, float], **details: Any) -> TrialResult:
    """A scored trial document: its held-in and held-out scores, the fitness, the instruct
    settings the prompts were built with, and `details` (digest, timings, ...)."""
    return TrialResult.scored(
        doc.id,
        scores,
        held_in=doc.held_in,
        held_out=doc.held_out,
        prompt=doc.evaluator.prompt_settings(),
        **details,
    )


def custom_tasks_dir(doc: TrialDocument, environ: Mapping[str, str] | None = None) -> Path | None:
    """The document's customTasksDir, else $MERGERUNNER_CUSTOM_TASKS_DIR.

    On a cluster the operator mounts the custom-task ConfigMap and names the mount in the
    environment, like the cache directory: where a volume sits in the pod is the pod's layout,
    not part of what the trial evaluates.
    """
    env = os.environ if environ is None else environ
    where = doc.custom_tasks_dir or env.get(ENV_CUSTOM_TASKS)
    return Path(where) if where else None


def task_suite(doc: TrialDocument, bundle: Path | None) -> TaskSuite:
    """The trial's held-in and held-out tasks, loaded once (a trial Job's, a warm evaluator's):
    an unknown task, a metric its task does not report, missing data fail here."""
    from mergerunner.evaluate import TaskSuite, subset_options

    return TaskSuite(
        [*doc.held_in, *doc.held_out],
        include_path=custom_tasks_dir(doc),
        seed=doc.evaluator.seed,
        evaluator=doc.evaluator,
        bundle=bundle,
        allow_code_execution=doc.allow_code_execution,
        **subset_options(doc),
    )


def fetch_bundle(uri: str, cache_dir: Path) -> Path:
    """The data bundle at `uri`, in the verified cache beside the checkpoints."""
    from mergerunner.bundle import BUNDLE_MANIFEST
    from mergerunner.fetch import fetch_tree

    return fetch_tree(uri, cache_dir, required=BUNDLE_MANIFEST).path


def plan_merged(dirs: Sequence[Path], doc: TrialDocument) -> Placement:
    """Where the merged model will live, from the checkpoints' headers: a model that fits on
    no device fails here, before the merge, with the shortfall (`PlacementError`)."""
    from mergerunner.checkpoint import validate_checkpoints
    from mergerunner.devices import model_config, plan_for, visible_devices
    from mergerunner.evaluate import compute_dtype
    from mergerunner.placement import layout_of_merge

    gpus, _ = visible_devices(doc.evaluator)
    dtype = compute_dtype(doc.dtype, "cuda" if gpus else "cpu")
    layout = layout_of_merge(validate_checkpoints(dirs), dtype)
    placement = plan_for(layout, model_config(dirs[0]), doc.evaluator, dtype)
    log.info("placement of the merged model: %s", placement.bytes_per_device)
    return placement


def load_merged_model(model_dir: Path, doc: TrialDocument, placement: Placement) -> Any:
    """Load the merged model over the devices its placement names (see mergerunner.devices),
    computing in `compute_dtype` (float32 on a CPU: the same arithmetic as local mode's
    resident model)."""
    from mergerunner.devices import load_placed
    from mergerunner.evaluate import compute_dtype

    dtype = compute_dtype(doc.dtype, placement.devices[0])
    return load_placed(model_dir, placement, dtype, trust=doc.evaluator.trust_remote_code)


def score_merged(
    model_dir: Path, doc: TrialDocument, suite: TaskSuite, placement: Placement | None
) -> SuiteScores:
    """Score the merged model in-process (hf) or through a server started on it."""
    from transformers import AutoTokenizer

    from mergerunner.evaluate import make_lm

    spec = doc.evaluator
    if placement is not None:
        model = load_merged_model(model_dir, doc, placement)
        tokenizer = AutoTokenizer.from_pretrained(
            model_dir, trust_remote_code=spec.trust_remote_code
        )
        return suite.score_detailed(make_lm(model, tokenizer, spec, device=placement.devices[0]))
    from mergerunner.server import LOGPROB_OUTPUT_TYPES, make_server_lm, serving

    gpus = visible_gpu_count(spec)
    needs = any(kind in LOGPROB_OUTPUT_TYPES for kind in suite.output_types.values())
    with serving(spec, model_dir, gpus=gpus, dtype=doc.dtype, needs_logprobs=needs) as base:
        return suite.score_detailed(make_server_lm(spec, base, model_dir, gpus=gpus))


def visible_gpu_count(spec: EvaluatorSpec) -> int:
    """GPUs a server may use: every visible one for `auto`, one for `cuda:N`, none for `cpu`."""
    if spec.device == "cpu":
        return 0
    import torch

    if not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count() if spec.device == "auto" else 1


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
    from mergerunner.fetch import check_destination, fetch_checkpoints, upload_directory
    from mergerunner.merge import merge_to_directory
    from mergerunner.server import check_server_tasks

    clock = _Clock()
    start = now()
    try:
        with tempfile.TemporaryDirectory(prefix="merge-", dir=work_dir) as tmp:
            if doc.output.save_model and doc.output.uri:
                with clock.step("upload"):  # the destination first: a bad one costs no merge
                    check_destination(doc.output.uri)
            bundle = None
            if doc.datasets_uri:
                with clock.step("fetch"):  # the tasks' data first: the tasks load from it
                    bundle = fetch_bundle(doc.datasets_uri, cache_dir)
            with clock.step("evaluate"):
                # Everything that can refuse the trial does so before the fetch and the merge:
                # unknown tasks, metrics the tasks do not report, tasks the server cannot
                # score; a model the devices cannot hold right after the fetch.
                suite = task_suite(doc, bundle)
                check_server_tasks(suite.output_types, doc.evaluator)
            with clock.step("fetch"):
                dirs = fetch_checkpoints([c.uri for c in doc.checkpoints], cache_dir)
            merged_dir = Path(tmp) / "merged"
            with clock.step("evaluate"):
                placement = plan_merged(dirs, doc) if doc.evaluator.backend == "hf" else None
            with clock.step("merge"):
                report = merge_to_directory(dirs, doc.weight_vector(), merged_dir, dtype=doc.dtype)
            with clock.step("evaluate"):
                detailed = score_merged(merged_dir, doc, suite, placement)
                scores = detailed.scores
            output_uri = None
            if doc.output.save_model and doc.output.uri:
                with clock.step("upload"):
                    upload_directory(merged_dir, doc.output.uri)
                    output_uri = doc.output.uri
    except StepFailed as failure:
        log.error("trial %s failed in step %s: %s", doc.id, failure.step, failure.cause)
        return failed_result(doc.id, failure, clock.timings(now() - start))
    return scored_result(
        doc,
        scores,
        subtasks=detailed.subtasks or None,
        digest=report.digest,
        timings=clock.timings(now() - start),
        output_uri=output_uri,
    )
