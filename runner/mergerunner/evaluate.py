"""Scoring a model already in memory with lm-evaluation-harness.

Tasks are loaded once (`TaskSuite`) and reused for every candidate: loading task configs and
data sets costs far more than scoring a tiny model, and reuse also guarantees that every
candidate sees exactly the same examples. Per-task `limit` becomes a fixed, seeded subset of
example indices rather than lm-eval's "first N", so a subset is a fair sample of the task and
the same seed always picks the same examples.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import random
import sys
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergerunner.bundle import TaskNeeds
from mergerunner.codeexec import ALLOW_FIELD
from mergerunner.trial import (
    EvaluatorSpec,
    FailureKind,
    Subset,
    TaskSpec,
    TrialDocument,
    TrialError,
)

log = logging.getLogger(__name__)

# Evaluation must never reach a hub: tasks and models are local by contract.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


class EvaluationError(TrialError):
    """A task, metric or model problem, with the task named; `failure_kind` says which."""


@dataclass(frozen=True)
class ResolvedTask:
    """A task as loaded: its spec, the result key its metric maps to, its example subset."""

    spec: TaskSpec
    indices: list[int] | None
    key: str


def subset_indices(
    task: str, n_docs: int, limit: int | None, seed: int, subset: Subset = "search"
) -> list[int] | None:
    """A fixed subset of `limit` example indices out of `n_docs`, seeded by (seed, task).

    Seeding by the task name too keeps a task's subset the same whatever other tasks run
    beside it. The "confirmation" subset is drawn, with its own seed, from the examples the
    search subset leaves out: `limit` of them, or all that remain when fewer do. None means
    every example.
    """
    if subset == "confirmation":
        return confirmation_indices(task, n_docs, limit, seed)
    if limit is None or limit >= n_docs:
        return None
    rng = random.Random(f"{seed}:{task}")
    return sorted(rng.sample(range(n_docs), limit))


def confirmation_indices(task: str, n_docs: int, limit: int | None, seed: int) -> list[int]:
    """Examples disjoint from the search subset; an error when the search uses them all."""
    search = subset_indices(task, n_docs, limit, seed)
    taken = set(range(n_docs) if search is None else search)
    rest = [i for i in range(n_docs) if i not in taken]
    if not rest:
        raise EvaluationError(
            f"task {task!r}: no examples left for confirmation: the search subset "
            f"(limit {limit}) uses all {n_docs}; lower the limit or disable search.confirm",
            kind=FailureKind.CONFIG,
        )
    rng = random.Random(f"{seed}:{task}:confirmation")
    return sorted(rng.sample(rest, min(limit or len(rest), len(rest))))


def subset_options(doc: TrialDocument) -> dict[str, list[str]]:
    """TaskSuite's `confirm` and `reserve` for a trial document's `subset`: a confirmation
    trial scores its held-in tasks on the confirmation subset; a search trial that says
    `subset: search` (the search will confirm) checks that one exists."""
    held_in = [t.task for t in doc.held_in]
    if doc.subset == "confirmation":
        return {"confirm": held_in, "reserve": []}
    return {"confirm": [], "reserve": held_in if doc.subset == "search" else []}


def resolve_metric(task: str, wanted: str, available: Iterable[str]) -> str:
    """Map a user's metric (`acc`, `exact_match,strict-match`) to lm-eval's result key."""
    keys = [k for k in available if "," in k and not k.split(",")[0].endswith("_stderr")]
    candidates = [wanted] if "," in wanted else [f"{wanted},none"]
    if "," not in wanted:
        candidates += sorted(k for k in keys if k.split(",")[0] == wanted)
    for key in candidates:
        if key in keys:
            return key
    raise EvaluationError(
        f"task {task!r}: metric {wanted!r} not among its results ({', '.join(sorted(keys))})",
        kind=FailureKind.UNKNOWN_METRIC,
    )


def metric_keys(task: Any) -> list[str]:
    """The result keys lm-eval will report for a loaded task, known before any model runs.

    lm-eval reports each metric of the task under each of its filters as `metric,filter`, and
    aggregates a per-document metric only through `task.aggregation()` (a metric missing there
    is a KeyError inside lm-eval), so the keys are exactly aggregation × filters.
    """
    filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
    return [f"{metric},{name}" for metric in task.aggregation() for name in filters]


def group_metric_keys(group: Any, leaf_keys: Mapping[str, Sequence[str]]) -> list[str]:
    """The keys a group's `aggregate_metric_list` reports: `metric,filter` for its listed
    filters, or for every filter its members report that metric under when it lists none."""
    keys: list[str] = []
    for agg in group.aggregate_metric_list or []:
        filters = agg.filter_list
        if filters is None:
            found = {k for ks in leaf_keys.values() for k in ks if k.split(",")[0] == agg.metric}
            keys += sorted(found)
        else:
            keys += [
                f"{agg.metric},{f}" for f in ([filters] if isinstance(filters, str) else filters)
            ]
    return keys


def resolve_tasks(
    loaded: Mapping[str, Any],
    specs: Sequence[TaskSpec],
    groups: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Each spec's task → the result key its metric names, checked against the loaded tasks.

    The one place a metric is resolved against its task: every mode calls it before the first
    trial (local mode when it loads its suites, the runner and the preflight when they load
    their tasks), so a metric the task does not report (`acc` on a generate_until task) fails
    at once, as `unknown-metric`, instead of after a model was merged and scored. An entry
    naming a group resolves against the group's aggregate metrics.
    """
    groups = groups or {}
    keys: dict[str, str] = {}
    for spec in specs:
        if spec.task in groups:
            leaves = {
                t.task_name: metric_keys(loaded[t.task_name])
                for t in groups[spec.task].get_all_tasks()
            }
            available = group_metric_keys(groups[spec.task], leaves)
            if not available:
                raise EvaluationError(
                    f"group {spec.task!r} has no aggregate metric (aggregate_metric_list); "
                    "list its tasks instead",
                    kind=FailureKind.UNKNOWN_METRIC,
                )
        elif spec.task in loaded:
            available = metric_keys(loaded[spec.task])
        else:
            raise EvaluationError(
                f"unknown lm-eval task: {spec.task}", kind=FailureKind.UNKNOWN_TASK
            )
        keys[spec.task] = resolve_metric(spec.task, spec.metric, available)
    return keys


def _task_manager(include_path: Path | None, names: Sequence[str]) -> Any:
    """A TaskManager that knows every requested task or group.

    Indexing lm-eval's thousands of built-in task YAMLs takes seconds, so custom tasks alone are
    tried first and the built-ins are indexed only when a requested task needs them.
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in manager.task_index for name in names):
            return manager
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [name for name in names if name not in manager.task_index]
    if unknown:
        where = f" (custom tasks from {include_path})" if include_path else ""
        hints = [_hint(name, manager.task_index) for name in unknown]
        raise EvaluationError(
            f"unknown lm-eval task(s) or group(s): {', '.join(unknown)}{where}"
            + "".join(h for h in hints if h),
            kind=FailureKind.UNKNOWN_TASK,
        )
    return manager


def _hint(name: str, index: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(index), n=3, cutoff=0.8)
    return f"; did you mean {' or '.join(close)} (for {name})?" if close else ""


def check_task_needs(
    tasks: Sequence[TaskSpec],
    index: Mapping[str, Any],
    *,
    bundle: Path | None,
    allow_code_execution: bool,
) -> list[TaskNeeds]:
    """Before anything is loaded: every task's data is in the bundle and code tasks are allowed.

    Raises EvaluationError naming the task and what to change: `config` for a code task without
    spec.objective.allowCodeExecution, `data-missing` for data that is not in the bundle (or no
    bundle at all for a task that reads a hub dataset).
    """
    from mergerunner.bundle import missing_for, read_manifest, task_needs

    needs = []
    for spec in tasks:
        try:
            need = task_needs(index, spec.task)
        except KeyError as exc:
            raise EvaluationError(
                f"task {spec.task!r}: member {exc.args[0]!r} is not a known lm-eval task",
                kind=FailureKind.UNKNOWN_TASK,
            ) from None
        if need.unsafe_code and not allow_code_execution:
            members = (
                "" if need.unsafe_code == (spec.task,) else f" ({', '.join(need.unsafe_code)})"
            )
            raise EvaluationError(
                f"task {spec.task!r}{members} executes model-generated code; set {ALLOW_FIELD}: "
                "true to allow it (programs run sandboxed, docs/trial-contract.md)",
                kind=FailureKind.CONFIG,
            )
        needs.append(need)
    wanted = [n for n in needs if n.datasets or n.nltk]
    if not wanted:
        return needs
    if bundle is None:
        first = wanted[0]
        data = ", ".join(r.path for r in first.datasets) or ", ".join(first.nltk)
        raise EvaluationError(
            f"task {first.task!r} reads {data}, and trials never reach a hub: set "
            "spec.objective.datasets.uri to a data bundle (mergesearch datasets pack "
            f"{' '.join(n.task for n in wanted)} -o DIR)",
            kind=FailureKind.DATA_MISSING,
        )
    manifest = read_manifest(bundle)
    problems = [line for need in wanted for line in missing_for(need, manifest, bundle)]
    if problems:
        raise EvaluationError("; ".join(problems), kind=FailureKind.DATA_MISSING)
    return needs


@contextlib.contextmanager
def _in_directory(path: Path | None) -> Iterator[None]:
    """Run the data loading inside the custom-task directory, so that a task YAML's relative
    `data_files` (datasets resolves them against the working directory) name files beside it:
    task YAMLs and their JSONL files then travel together, in one ConfigMap, to any mount."""
    if path is None:
        yield
        return
    with contextlib.chdir(path):
        yield


@dataclass(frozen=True)
class SuiteScores:
    """Scores per requested task or group, and the members' scores of groups."""

    scores: dict[str, float]
    subtasks: dict[str, float]


class TaskSuite:
    """The tasks of a search, loaded once and scored many times.

    An entry may name a group (leaderboard_musr, mmlu_pro): its members are loaded, each
    scored on its own seeded subset of `limit` examples, and the group's aggregate metric (its
    `aggregate_metric_list`) is the entry's score; members' scores are reported apart.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        *,
        include_path: Path | None = None,
        seed: int = 1234,
        evaluator: EvaluatorSpec | None = None,
        bundle: Path | None = None,
        allow_code_execution: bool = False,
        confirm: Collection[str] = (),
        reserve: Collection[str] = (),
    ) -> None:
        """`confirm`: the tasks scored on their confirmation subset instead of the search's;
        `reserve`: tasks whose confirmation subset must exist (a search trial of a search that
        will confirm checks it, so that a limit leaving nothing unseen fails the first trial,
        not the confirmation after the whole search)."""
        from mergerunner.codeexec import code_metrics

        self.seed = seed
        self.evaluator = evaluator or EvaluatorSpec(seed=seed)
        self.allow_code_execution = allow_code_execution
        names = [t.task for t in tasks]
        if bundle is not None:
            from mergerunner.bundle import activate, check_compatible, read_manifest

            check_compatible(read_manifest(bundle), bundle)
            activate(bundle)
        manager = _task_manager(include_path, names)
        check_task_needs(
            tasks,
            manager.task_index,
            bundle=bundle,
            allow_code_execution=allow_code_execution,
        )
        with _in_directory(include_path), code_metrics(allow_code_execution):
            loaded = _load_each(manager, names)
        self._task_dict = loaded
        self._tasks: dict[str, Any] = loaded["tasks"]
        self._groups: dict[str, Any] = loaded["groups"]
        keys = resolve_tasks(self._tasks, tasks, self._groups)
        self.resolved: list[ResolvedTask] = []
        self._leaves: dict[str, list[int] | None] = {}
        gen_kwargs = dict(self.evaluator.gen_kwargs or {})
        for spec in tasks:
            for leaf in self.leaves_of(spec.task):
                task = self._tasks[leaf]
                if spec.num_fewshot is not None:
                    task.set_config(key="num_fewshot", value=spec.num_fewshot)
                elif task.get_config("num_fewshot") is None:
                    task.set_config(key="num_fewshot", value=0)
                if gen_kwargs and task.get_config("output_type") == "generate_until":
                    task.set_config(key="generation_kwargs", value=gen_kwargs, update=True)
                task.set_fewshot_seed(seed=seed)
                n_docs = len(task.eval_docs)
                if n_docs == 0:
                    raise EvaluationError(
                        f"task {leaf!r} has no evaluation examples", kind=FailureKind.DATA_MISSING
                    )
                subset: Subset = "confirmation" if spec.task in confirm else "search"
                self._leaves[leaf] = subset_indices(leaf, n_docs, spec.limit, seed, subset)
                if spec.task in reserve:
                    confirmation_indices(leaf, n_docs, spec.limit, seed)
            indices = self._leaves.get(spec.task)
            self.resolved.append(ResolvedTask(spec, indices=indices, key=keys[spec.task]))

    def leaves_of(self, name: str) -> list[str]:
        """The leaf tasks an entry scores: itself, or every task under a group."""
        if name in self._groups:
            return [t.task_name for t in self._groups[name].get_all_tasks()]
        return [name]

    @property
    def task_names(self) -> list[str]:
        return [r.spec.task for r in self.resolved]

    @property
    def output_types(self) -> dict[str, str]:
        """Task → lm-eval output type (generate_until, loglikelihood, multiple_choice, ...),
        for every leaf task (a group's members each have theirs)."""
        return {
            leaf: str(self._tasks[leaf].OUTPUT_TYPE)
            for r in self.resolved
            for leaf in self.leaves_of(r.spec.task)
        }

    def score(self, lm: Any) -> dict[str, float]:
        """Score `lm` (an lm-eval LM) on every task; returns task → score as plain floats."""
        return self.score_detailed(lm).scores

    def score_detailed(self, lm: Any) -> SuiteScores:
        """`score`, with the members' scores of group entries."""
        from lm_eval.evaluator import evaluate

        from mergerunner.codeexec import code_metrics

        samples = {
            leaf: indices if indices is not None else list(range(len(self._tasks[leaf].eval_docs)))
            for leaf, indices in self._leaves.items()
        }
        spec = self.evaluator
        with code_metrics(self.allow_code_execution):
            out = evaluate(
                lm=lm,
                task_dict=self._task_dict,
                samples=samples,
                bootstrap_iters=0,
                log_samples=False,
                verbosity="WARNING",
                system_instruction=spec.system_instruction,
                apply_chat_template=spec.apply_chat_template,
                fewshot_as_multiturn=spec.multiturn,
                confirm_run_unsafe_code=self.allow_code_execution,
            )
        if out is None:  # only non-zero ranks of a distributed run get None
            raise EvaluationError("lm-eval returned no results")
        results = out["results"]
        scores: dict[str, float] = {}
        subtasks: dict[str, float] = {}
        for r in self.resolved:
            scores[r.spec.task] = _value(r.spec.task, r.key, results)
            if r.spec.task in self._groups:
                for leaf in self.leaves_of(r.spec.task):
                    with contextlib.suppress(EvaluationError):
                        subtasks[leaf] = _value(leaf, r.key, results)
        return SuiteScores(scores, subtasks)


def _value(task: str, key: str, results: Mapping[str, Any]) -> float:
    task_results = results.get(task)
    if task_results is None:
        raise EvaluationError(f"task {task!r}: lm-eval returned no results")
    value = task_results.get(key)
    if value is None:
        raise EvaluationError(
            f"task {task!r}: lm-eval reported no {key!r}", kind=FailureKind.UNKNOWN_METRIC
        )
    if not isinstance(value, int | float):
        raise EvaluationError(f"task {task!r}: metric {key!r} is not a number")
    return float(value)


def _load_each(manager: Any, names: Sequence[str]) -> dict[str, Any]:
    """Load the tasks one entry at a time, so that a failure names the entry; an error that
    knows its failure kind (a refused code metric) keeps it."""
    merged: dict[str, Any] = {"tasks": {}, "groups": {}, "group_map": {}}
    for name in names:
        try:
            part = manager.load([name])
        except TrialError as exc:
            raise EvaluationError(f"task {name!r}: {exc}", kind=exc.failure_kind) from exc
        except (FileNotFoundError, ConnectionError) as exc:
            raise EvaluationError(
                f"task {name!r}: its data could not be loaded offline: {exc}",
                kind=FailureKind.DATA_MISSING,
            ) from exc
        for key in merged:
            merged[key].update(part.get(key) or {})
    return merged


def pick_device(spec: EvaluatorSpec) -> str:
    """`auto` means the first GPU when torch sees one, else the CPU."""
    if spec.device != "auto":
        return spec.device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def compute_dtype(dtype: str, device: str) -> str:
    """The dtype a model computes in on `device`, given the merge's output dtype.

    bfloat16 and float16 matrix products are emulated and slow on most CPUs (and float16 lacks
    some CPU kernels), so on a CPU the model is held in float32; its weights are still exactly
    the output dtype's values (widening is exact), so the model scored is the one exported.
    Every mode loads models through this rule, so the same weights on the same device give the
    same scores in a pod and in local mode.
    """
    return "float32" if device.split(":")[0] == "cpu" else dtype


def _quiet(base: type) -> type:
    """lm-eval draws a progress bar per request type per call; a search makes thousands of
    calls, so in-process searches use this subclass, which always passes disable_tqdm."""

    class QuietHFLM(base):  # type: ignore[misc, valid-type]
        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


def make_lm(
    model: Any,
    tokenizer: Any,
    spec: EvaluatorSpec,
    *,
    progress: bool = True,
    device: str | None = None,
) -> Any:
    """Wrap an in-memory transformers model for lm-eval, so candidates never reload it.

    `device` is where inputs go: the device of the first placed module when the model spans
    several (accelerate's hooks move activations between the others).
    """
    if spec.backend != "hf":
        raise EvaluationError(
            f"evaluator.backend {spec.backend!r} cannot score an in-memory model; use 'hf'",
            kind=FailureKind.CONFIG,
        )
    from lm_eval.models.huggingface import HFLM

    kwargs: dict[str, Any] = {"batch_size": spec.batch_size, "device": device or pick_device(spec)}
    if spec.max_length is not None:
        kwargs["max_length"] = spec.max_length
    cls = HFLM if progress else _quiet(HFLM)
    lm = cls(pretrained=model, tokenizer=tokenizer, **kwargs)
    if spec.apply_chat_template and not _has_chat_template(lm, spec.apply_chat_template):
        which = "" if spec.apply_chat_template is True else f" named {spec.apply_chat_template!r}"
        raise EvaluationError(
            f"evaluator.applyChatTemplate: the checkpoint's tokenizer has no chat template{which}",
            kind=FailureKind.CONFIG,
        )
    if spec.batch_size == "auto":
        lm.batch_size_per_gpu = probe_batch_size(lm)
    return lm


def _has_chat_template(lm: Any, wanted: bool | str) -> bool:
    """Whether lm-eval's own template selection finds one (a name must exist among several)."""
    try:
        return bool(lm.chat_template(wanted))
    except (KeyError, ValueError):
        return False


# The longest sequence `batchSize: auto` probes with when `maxLength` is unset. lm-eval probes
# at the model's whole context (128k tokens for current models: a probe that takes minutes
# and picks batch size 1); 4096 tokens covers the prompts of the paper's tasks (GSM8K 5-shot
# ≈ 1k tokens, MMLU-Pro 5-shot ≈ 2-3k). Longer prompts: set evaluator.maxLength.
PROBE_MAX_LENGTH = 4096


def probe_batch_size(lm: Any) -> int:
    """Resolve `batchSize: auto` once, for the life of this lm-eval model.

    lm-eval resolves "auto" again in every call that scores requests (each loglikelihood and
    generate_until call, so several times per trial, printing to stdout each time); the
    largest batch that fits depends on the model's shape and the device, not on the weights,
    so one probe serves every candidate of a search. The probe runs lm-eval's own detection
    (forward passes at halving sizes until one fits) at min(context, PROBE_MAX_LENGTH).
    """
    saved = lm._max_length
    lm._max_length = min(lm.max_length, PROBE_MAX_LENGTH)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            size = int(lm._detect_batch_size())
    finally:
        lm._max_length = saved
    log.info("batchSize auto: %d (probed at %d tokens)", size, min(lm.max_length, PROBE_MAX_LENGTH))
    return size
