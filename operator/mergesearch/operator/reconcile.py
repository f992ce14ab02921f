"""Convergence, as a pure function: (spec, status, observed Jobs) → (status, Jobs to create, Jobs
to delete, events).

The kopf shell calls `reconcile` with the resource as just read from the API server and the
trial Jobs and pods from its indexes, writes the returned status with a resourceVersion
precondition (compare-and-set), and only then creates and deletes Jobs. Nothing here depends on
having seen an event: every call starts from the stored status and the Jobs that exist, so a
repeat with the same inputs returns the same status and creates nothing new, and a crash at any
point is repaired by the next call. See docs/operator.md for the argument in full.

Bookkeeping kept in the status besides the engine's state:
- `activeTrials`: candidate ids whose Job was launched and whose result is not yet told. It is
  written (compare-and-set) *before* their Jobs are created, so at most
  spec.execution.parallelism trial Jobs ever exist unfinished, and a Job that is missing for an
  active id (a crash between the write and the create, or an index that has not seen the Job
  yet) is simply created again under its deterministic name (AlreadyExists is fine).
- `final`: the Job evaluating the best merge on held-out tasks and exporting it.
- `leases` (warm mode, `operator/warm.py`): which active candidate which evaluator pod holds.
  Warm mode differs only in how an active candidate reaches a pod and how its result comes
  back (a lease and a posted result instead of a Job and its termination message); the
  telling, the cap and the compare-and-set are the same code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from mergerunner.trial import (
    FailureKind,
    FailurePolicy,
    backoff_s,
    failure_policy,
    runs_again,
)
from mergesearch import engine
from mergesearch.operator import jobs as jobspec
from mergesearch.operator import podpolicy, warm
from mergesearch.operator.events import Event, milestones
from mergesearch.operator.jobs import FINAL_CANDIDATE, JobSettings, Owner
from mergesearch.operator.observe import (
    JobSummary,
    PodSummary,
    TrialOutcome,
    blocker_of,
    cut,
    outcome_of,
)
from mergesearch.operator.status import (
    Phase,
    build_status,
    condition,
    decode_state,
    wait_conditions,
)
from mergesearch.searchconfig import engine_config
from mergesearch.spec import MergeSearchSpec, SpecError, cluster_errors, parse_spec

# Failures a user can repair by editing the spec (the generation changes); others are final.
# `SpecChanged` too: a spec edited back to what the search started with carries on. The pod
# configuration reasons (a missing Secret or ConfigMap, an image that cannot be used, pods
# that admission refuses) are repaired outside the spec; any edit (e.g. toggling `suspend`)
# then resumes the search where it was.
POD_CONFIG_REASONS = frozenset(
    {"PodConfigInvalid", "ImageInvalid", "VolumeUnavailable", "PodRefused"}
)
RECOVERABLE = frozenset(
    {"SpecInvalid", "TemplateInvalid", "InternalError", "SpecChanged", *POD_CONFIG_REASONS}
)
# `kubectl annotate msearch NAME mergesearch.io/retry-finalization=<any new value>` runs a
# failed final evaluation again (docs/operator.md).
ANNOTATION_RETRY_FINAL = "mergesearch.io/retry-finalization"
# The retry schedule of failed trials and of the final evaluation (RETRY_LIMIT, backoff_s,
# FINAL_ATTEMPTS) is the trial contract's, shared with local mode (mergerunner.trial).
# A pod or a Job that shows no progress for this long has its Warning events read (the shell
# does it: FailedMount, FailedCreate have no other trace).
STUCK_S = 15.0
_BUDGETS = (
    "max_trials",
    "max_generations",
    "target_fitness",
    "stagnation_generations",
    "max_failed_trials",
)
# Posted once, with the search's first status: without requests the scheduler may put a trial
# where a merge does not fit (or several on one GPU node's memory).
NO_REQUESTS = Event(
    "Warning",
    "NoResourceRequests",
    "spec.execution.template sets no resources for the runner: trials get no CPU, memory or GPU "
    "reservation (set resources.requests/limits, e.g. nvidia.com/gpu: 1)",
)
_ENGINE_REASONS = {
    "max_failed_trials": "MaxFailedTrials",
    "no_successful_trial": "NoSuccessfulTrial",
}


@dataclass(frozen=True)
class SearchView:
    """The MergeSearch as read from the API server."""

    owner: Owner
    generation: int | None
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """What to do: write `status` (when `changed`), then create and delete Jobs, then post
    events. `idle`: nothing will happen until something outside changes (a finished or blocked
    search), so the shell may wait long before looking again."""

    status: dict[str, Any]
    changed: bool
    create: tuple[dict[str, Any], ...] = ()
    delete: tuple[str, ...] = ()
    events: tuple[Event, ...] = ()
    told: tuple[str, ...] = ()
    idle: bool = False
    wake_after: float | None = None  # seconds until a retry is due, when one waits
    # Warm mode: Secrets to create (before the Jobs), the answer to each evaluator's request
    # (evaluators without one wait), the posted results this plan handled (told or ignored as
    # duplicates), and whether evaluators should stop (the search is not running).
    secrets: tuple[dict[str, Any], ...] = ()
    assignments: Mapping[str, warm.Assignment] = field(default_factory=dict)
    consumed: tuple[str, ...] = ()
    evaluators_done: bool = False
    posted: tuple[warm.Posted, ...] = ()  # the posted results told (their timings: metrics)


@dataclass
class _Draft:
    """The decisions of one reconcile while they are being made (local to `reconcile`)."""

    state: engine.EngineState
    active: list[str]
    final: dict[str, Any] | None
    output: dict[str, Any] | None
    held_out: dict[str, float] | None
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    told: list[str] = field(default_factory=list)
    fatal: tuple[str, str] | None = None
    retries: dict[str, dict[str, Any]] = field(default_factory=dict)  # id → attempt, notBefore
    waits: dict[str, tuple[bool, str, str]] = field(default_factory=dict)
    wake_after: float | None = None

    def attempt(self, cid: str) -> int:
        if cid == FINAL_CANDIDATE:
            return int((self.final or {}).get("attempt") or 0)
        return int(self.retries.get(cid, {}).get("attempt") or 0)

    def due(self, cid: str, now: str) -> bool:
        """Whether the trial may run now (no retry pending, or its backoff is over)."""
        not_before = (
            (self.final or {}).get("notBefore")
            if cid == FINAL_CANDIDATE
            else self.retries.get(cid, {}).get("notBefore")
        )
        if not not_before:
            return True
        left = (parse_time(not_before) - parse_time(now)).total_seconds()
        if left > 0:
            self.wake_after = left if self.wake_after is None else min(self.wake_after, left)
        return left <= 0

    # warm mode only
    leases: dict[str, warm.Lease] | None = None
    assignments: dict[str, warm.Assignment] = field(default_factory=dict)
    consumed: list[str] = field(default_factory=list)
    secrets: list[dict[str, Any]] = field(default_factory=list)
    want_evaluators: bool = False
    posted: list[warm.Posted] = field(default_factory=list)


class StateInvalid(Exception):
    """status.optimizer cannot be used (corrupt, or written for another configuration)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def later(now: str, seconds: float) -> str:
    return (parse_time(now) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- entry points


def _chosen_entry(status: Mapping[str, Any]) -> Mapping[str, Any]:
    """The status entry of the merge a finished search hands over (see status.build_status)."""
    return status.get("winner") or status.get("best") or {}


def reconcile(
    view: SearchView,
    jobs: Sequence[JobSummary],
    pods: Mapping[str, Sequence[PodSummary]],
    settings: JobSettings,
    now: str,
    *,
    inbox: warm.Inbox | None = None,
    evaluators: Sequence[warm.EvaluatorPod] = (),
) -> Plan:
    """One convergence step; see the module docstring. `inbox` and `evaluators`: what warm
    evaluators asked and posted, and their pods (warm mode only)."""
    view = _retry_final_if_asked(view, now)
    previous = view.status
    inbox = inbox or warm.Inbox()
    mine = [j for j in jobs if j.owner_uid == view.owner.uid]
    if _finished(previous):
        return _settled(view, mine, inbox)
    if _blocked(view):
        return Plan(
            status=dict(previous),
            changed=False,
            idle=True,
            consumed=_posted(inbox),
            evaluators_done=True,
        )
    try:
        spec = parse_spec(dict(view.spec))
        config = engine_config(spec)
    except SpecError as exc:
        return blocked(view, "SpecInvalid", "; ".join(exc.errors), now)
    if cluster_errors(spec):
        return blocked(view, "SpecInvalid", "; ".join(cluster_errors(spec)), now)
    if spec.execution.mode == "warm" and not settings.serves_evaluators:
        return blocked(view, "SpecInvalid", WARM_UNAVAILABLE, now)
    refused = podpolicy.check_template(spec.execution.template, settings.service_account)
    if refused:  # before any Job: a refused template costs nothing
        return blocked(view, "TemplateInvalid", "; ".join(refused), now)
    try:
        state = _load_state(previous, config)
    except StateInvalid as exc:
        return blocked(view, exc.reason, str(exc), now, final=exc.reason not in RECOVERABLE)
    draft = _Draft(
        state=state,
        active=list(previous.get("activeTrials") or []),
        final=dict(previous["final"]) if previous.get("final") else None,
        output=dict(previous["output"]) if previous.get("output") else None,
        held_out=dict(_chosen_entry(previous).get("heldOut") or {}) or None,
        retries={r["trial"]: dict(r) for r in previous.get("retries") or [] if "trial" in r},
    )
    if spec.execution.mode == "warm":
        draft.leases = warm.read_leases(previous)
    if not previous.get("optimizer") and podpolicy.missing_requests(spec.execution.template):
        draft.events.append(NO_REQUESTS)
    gate = _preflight(draft, view, spec, mine, pods, settings)
    if gate is not None:  # no trial Job before the preflight passed
        return _plan(view, draft, mine, *gate, now)
    try:
        _collect(draft, mine, pods, now)
        if draft.leases is not None:
            _collect_warm(draft, view.owner, spec, inbox, evaluators, now)
        _check_blockers(draft, mine, pods)
        phase, reason, message = _advance(draft, view, spec, mine, pods, settings, inbox, now)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        # A pod template Kubernetes would refuse anyway (a malformed structure), caught here
        # rather than as a crash: the template is the only free-form part of the spec.
        return blocked(view, "TemplateInvalid", f"spec.execution.template: {exc}", now)
    return _plan(view, draft, mine, phase, reason, message, now, evaluators, spec, inbox)


WARM_UNAVAILABLE = (
    "spec.execution.mode: warm needs the operator's evaluator endpoint, which this operator "
    "does not serve (set MERGESEARCH_EVALUATOR_URL and MERGESEARCH_EVALUATOR_KEY_FILE, or the "
    "chart's evaluators.enabled); use mode jobs"
)


def _posted(inbox: warm.Inbox) -> tuple[str, ...]:
    return tuple(p.candidate for p in inbox.results)


def blocked(view: SearchView, reason: str, message: str, now: str, *, final: bool = False) -> Plan:
    """Phase Failed with `reason`; nothing launched, nothing collected. Unless `final`, the
    search resumes when the spec changes (its generation moves past the condition's)."""
    previous = view.status
    status = build_status(
        state=None,
        phase="Failed",
        reason=reason,
        message=message,
        previous=previous,
        active=list(previous.get("activeTrials") or []),
        now=now,
        generation=view.generation,
        final=previous.get("final"),
        output=previous.get("output"),
        retries=previous.get("retries") or (),
    )
    if final:
        status["completionTime"] = previous.get("completionTime") or now
    return Plan(
        status=status,
        changed=status != dict(previous),
        events=tuple(milestones(previous, status)),
        idle=True,
    )


def job_rejected(view: SearchView, message: str, now: str) -> Plan:
    """The API server refused a Job we built (422): the template is at fault."""
    return blocked(view, "TemplateInvalid", f"a trial Job was rejected: {message}", now)


def quota_refused(view: SearchView, job: str, detail: str, waiting: int, now: str) -> Plan:
    """A ResourceQuota refused a trial Job (403 exceeded quota): the search waits, says so
    in the `QuotaExceeded` condition (and an event when it starts waiting), and creates the
    Job in a later reconcile, once collected Jobs have been deleted and the quota freed."""
    message = f"{waiting} trial Job(s) wait for quota; creating {job}: {detail}"
    return _wait_condition(view, "QuotaExceeded", True, "JobQuota", message, now)


def quota_cleared(view: SearchView, now: str) -> Plan:
    """Every Job of the last reconcile could be created: the quota wait is over."""
    return _wait_condition(view, "QuotaExceeded", False, "JobsCreated", "no Job waits", now)


def _wait_condition(
    view: SearchView, type: str, value: bool, reason: str, message: str, now: str
) -> Plan:
    previous = view.status
    conditions = wait_conditions(
        previous.get("conditions") or [],
        {type: (value, reason, message)},
        now=now,
        generation=view.generation,
    )
    status = {**previous, "conditions": conditions}
    flipped = (condition(previous, type) or {}).get("status") != ("True" if value else "False")
    events = (Event("Warning", type, message),) if value and flipped else ()
    return Plan(status=status, changed=status != dict(previous), events=events)


def internal_error(view: SearchView, message: str, now: str) -> Plan:
    """A bug met this resource: record it and leave the resource alone until its spec changes,
    rather than failing again on every reconcile."""
    return blocked(view, "InternalError", message, now)


# --------------------------------------------------------------------------- gates


def _failed_reason(status: Mapping[str, Any]) -> str | None:
    cond = condition(status, "Failed")
    return cond.get("reason") if cond and cond.get("status") == "True" else None


def _finished(status: Mapping[str, Any]) -> bool:
    phase = status.get("phase")
    if phase == "Succeeded":
        return True
    return phase == "Failed" and _failed_reason(status) not in RECOVERABLE


def _blocked(view: SearchView) -> bool:
    """Failed for a reason the spec can fix, and the spec has not changed since."""
    cond = condition(view.status, "Failed")
    return (
        view.status.get("phase") == "Failed"
        and _failed_reason(view.status) in RECOVERABLE
        and cond is not None
        and cond.get("observedGeneration") == view.generation
    )


def _retry_final_if_asked(view: SearchView, now: str) -> SearchView:
    """A search whose final evaluation failed, and whose retry annotation has a value not
    acted on yet: back to Running with a fresh final attempt (the engine state, the best
    trial and its scores were never lost)."""
    status = view.status
    final = status.get("final") or {}
    asked = view.annotations.get(ANNOTATION_RETRY_FINAL)
    if (
        not asked
        or _failed_reason(status) != "FinalizationFailed"
        or final.get("retryRequest") == asked
    ):
        return view
    retry = {
        **{k: v for k, v in final.items() if k not in ("error", "notBefore")},
        "state": "Running",
        "attempt": int(final.get("attempt") or 0) + 1,
        "retryRequest": asked,
    }
    conditions = [c for c in status.get("conditions") or [] if c.get("type") != "Failed"]
    reopened = {**status, "phase": "Running", "final": retry, "conditions": conditions}
    reopened.pop("completionTime", None)
    return SearchView(view.owner, view.generation, view.spec, reopened, view.annotations)


def _settled(view: SearchView, mine: Sequence[JobSummary], inbox: warm.Inbox) -> Plan:
    """A finished search: only make sure no trial Job or evaluator still runs."""
    delete = tuple(
        j.name
        for j in mine
        if j.role in ("trial", warm.EVALUATOR_ROLE) and j.state == "active" and not j.deleting
    )
    return Plan(
        status=dict(view.status),
        changed=False,
        delete=delete,
        idle=True,
        consumed=_posted(inbox),
        evaluators_done=True,
    )


def _load_state(previous: Mapping[str, Any], config: engine.EngineConfig) -> engine.EngineState:
    data = previous.get("optimizer")
    if not data:
        return engine.init(config)
    try:
        state = decode_state(data)
    except (ValidationError, ValueError, TypeError) as exc:
        message = f"status.optimizer is unusable: {cut(str(exc))}"
        raise StateInvalid("StateInvalid", message) from None
    stored = state.config
    budgets = {k: getattr(config, k) for k in _BUDGETS}
    if stored.model_copy(update=budgets) != config:
        raise StateInvalid(
            "SpecChanged",
            "the search state was made for another spec (only budgets may change while a "
            "search runs); delete and re-create the MergeSearch to start over",
        )
    return state if stored == config else state.model_copy(update={"config": config})


# --------------------------------------------------------------------------- collecting results


def _by_candidate(mine: Sequence[JobSummary], role: str, draft: _Draft) -> dict[str, JobSummary]:
    """Each candidate's Job of its current attempt (an earlier attempt's Job, still being
    deleted, is not it)."""
    out: dict[str, JobSummary] = {}
    for job in mine:
        if job.role == role and not job.deleting and job.attempt == draft.attempt(job.candidate):
            out[job.candidate] = job
    return out


def _collect(
    draft: _Draft, mine: Sequence[JobSummary], pods: Mapping[str, Sequence[PodSummary]], now: str
) -> None:
    """Tell the engine every finished active trial; a configuration error found by a trial
    (a checkpoint that cannot be fetched, checkpoints that cannot be merged, an unknown task)
    makes the search fail at once instead of burning the failure budget, and a transient
    one (the object store is down) runs the trial again after a backoff, untold."""
    by_id = _by_candidate(mine, "trial", draft)
    first = draft.state.trials.succeeded == 0
    results: list[engine.Result] = []
    for cid in draft.active:
        job = by_id.get(cid)
        outcome = outcome_of(job, pods.get(job.name, ())) if job else None
        if outcome is None:
            continue
        if _retry_later(draft, outcome, first, now):
            draft.delete.append(outcome.job)
            continue
        draft.retries.pop(cid, None)
        results.append(_engine_result(outcome))
        if not outcome.succeeded:
            draft.events.append(Event("Warning", "TrialFailed", f"{cid}: {outcome.reason}"))
            draft.fatal = draft.fatal or classify_failure(outcome, first_trials=first)
    _tell(draft, results)


def _tell(draft: _Draft, results: Sequence[engine.Result]) -> None:
    if not results:
        return
    draft.state, report = engine.tell_with_report(draft.state, results)
    done = {r.candidate_id for r in results}
    draft.told = [*draft.told, *report.applied]
    draft.active = [cid for cid in draft.active if cid not in done]
    if draft.leases is not None:
        for cid in done:
            draft.leases.pop(cid, None)


def _collect_warm(
    draft: _Draft,
    owner: Owner,
    spec: MergeSearchSpec,
    inbox: warm.Inbox,
    evaluators: Sequence[warm.EvaluatorPod],
    now: str,
) -> None:
    """Tell the results evaluators posted for active candidates (a duplicate is ignored), and
    release the leases of evaluators that are gone (their candidates are issued again, or
    fail once issued backoffLimit + 1 times)."""
    assert draft.leases is not None
    job_of = {cid: jobspec.job_name(owner, cid, draft.attempt(cid)) for cid in draft.active}
    outcomes, _ = warm.collect_posted(draft.active, inbox, job_of)
    draft.consumed = list(_posted(inbox))
    told_ids = {o.candidate for o in outcomes}
    for posted in inbox.results:  # the first posting of each told candidate
        if posted.candidate in told_ids:
            told_ids.discard(posted.candidate)
            draft.posted.append(posted)
    lost, released = warm.release_lost(
        draft.leases,
        evaluators,
        inbox,
        now,
        max_issues=spec.execution.backoff_limit + 1,
        job_of=job_of,
    )
    draft.events.extend(Event("Warning", "EvaluatorLost", line) for line in released)
    told = {o.candidate for o in outcomes}
    outcomes += [o for o in lost if o.candidate not in told]
    first = draft.state.trials.succeeded == 0
    results: list[engine.Result] = []
    for outcome in outcomes:
        cid = outcome.candidate
        if _retry_later(draft, outcome, first, now):  # an outage: lease it again later
            draft.leases[cid] = warm.Lease(
                cid, issued=draft.leases.get(cid, warm.Lease(cid)).issued
            )
            continue
        draft.retries.pop(cid, None)
        results.append(_engine_result(outcome))
        if not outcome.succeeded:
            draft.events.append(Event("Warning", "TrialFailed", f"{cid}: {outcome.reason}"))
            draft.fatal = draft.fatal or classify_failure(outcome, first_trials=first)
    _tell(draft, results)


def _retry_later(draft: _Draft, outcome: TrialOutcome, first: bool, now: str) -> bool:
    """Schedule another attempt of a trial that failed for a transient reason; False when
    the failure is to be told (or is fatal)."""
    if not retryable(outcome, first_trials=first):
        return False
    cid = outcome.candidate
    attempt = draft.attempt(cid) + 1
    if not runs_again(outcome.error_kind, attempt, first_trials=first):
        return False
    wait = backoff_s(attempt)
    draft.retries[cid] = {
        "trial": cid,
        "attempt": attempt,
        "notBefore": later(now, wait),
        "reason": outcome.reason,
    }
    draft.events.append(
        Event(
            "Warning",
            "StorageUnavailable",
            f"{cid}: {outcome.reason}; retry {attempt} in {wait:.0f} s (not counted as a failure)",
        )
    )
    return True


def retryable(outcome: TrialOutcome, *, first_trials: bool) -> bool:
    """A failure whose kind's policy is RETRY (an outage), except storage that was never
    reached at all (no trial has succeeded yet): that is a misconfigured endpoint, fatal."""
    if outcome.succeeded:
        return False
    return failure_policy(outcome.error_kind, first_trials=first_trials) is FailurePolicy.RETRY


def _check_blockers(
    draft: _Draft, mine: Sequence[JobSummary], pods: Mapping[str, Sequence[PodSummary]]
) -> None:
    """Pods of active trials (and of the final Job, and in warm mode of the evaluator Job)
    that do not start: a configuration cause fails the search now; a transient one is the
    `TrialsBlocked` condition."""
    current = {**_by_candidate(mine, "trial", draft), **_by_candidate(mine, "final", draft)}
    wanted = [*draft.active, *([FINAL_CANDIDATE] if draft.final else [])]
    jobs = [current.get(cid) for cid in wanted]
    if draft.leases is not None:
        jobs += [j for j in mine if j.role == warm.EVALUATOR_ROLE and not j.deleting]
    waiting = []
    for job in jobs:
        if job is None or job.state != "active":
            continue
        blocker = blocker_of(job, pods.get(job.name, ()))
        if blocker is None:
            continue
        if blocker.fatal:
            draft.fatal = draft.fatal or (blocker.reason, blocker.message)
        else:
            waiting.append(blocker)
    if waiting:
        more = f" (and {len(waiting) - 1} more)" if len(waiting) > 1 else ""
        draft.waits["TrialsBlocked"] = (True, waiting[0].reason, waiting[0].message + more)
    else:
        draft.waits["TrialsBlocked"] = (False, "Running", "no trial pod is blocked")


def _engine_result(outcome: TrialOutcome) -> engine.Result:
    if outcome.succeeded:
        return engine.Result(outcome.candidate, scores=dict(outcome.held_in))
    return engine.Result(outcome.candidate, failed=True, reason=outcome.reason)


# The condition reason of each failure kind that fails a search (FAILURE_POLICY says which).
FATAL_REASONS: dict[FailureKind, str] = {
    FailureKind.INVALID_INPUT: "TrialRejected",
    FailureKind.CHECKPOINT_UNAVAILABLE: "CheckpointUnavailable",
    FailureKind.CHECKPOINT_INVALID: "CheckpointInvalid",
    FailureKind.CHECKPOINTS_INCOMPATIBLE: "CheckpointsIncompatible",
    FailureKind.UNKNOWN_TASK: "UnknownTask",
    FailureKind.UNKNOWN_METRIC: "UnknownMetric",
    FailureKind.DATA_MISSING: "DataMissing",
    FailureKind.CONFIG: "ConfigInvalid",
    FailureKind.OUT_OF_MEMORY: "OutOfMemory",
}


def classify_failure(outcome: TrialOutcome, *, first_trials: bool) -> tuple[str, str] | None:
    """(reason, message) when a failed trial reveals a configuration error, else None.

    Decided from the runner's failure kind, never from message text: a kind whose policy is
    fatal fails the search at once, because every later trial would fail the same way (a
    document the runner rejects, a checkpoint that is missing or malformed, checkpoints that do
    not match, an unknown task or metric, a model that does not fit). Storage that cannot be
    reached is fatal only among the first trials (none succeeded yet): later it is more likely
    an outage.
    """
    kind = outcome.error_kind
    if kind is None or failure_policy(kind, first_trials=first_trials) is not FailurePolicy.FATAL:
        return None
    unreachable = kind is FailureKind.STORAGE_UNAVAILABLE
    reason = "StorageUnreachable" if unreachable else FATAL_REASONS[kind]
    return reason, f"trial {outcome.candidate}: {outcome.reason}"


# --------------------------------------------------------------------------- the preflight

PREFLIGHT = "Preflight"


def _preflight(
    draft: _Draft,
    view: SearchView,
    spec: MergeSearchSpec,
    mine: Sequence[JobSummary],
    pods: Mapping[str, Sequence[PodSummary]],
    settings: JobSettings,
) -> tuple[Phase, str, str] | None:
    """The search's preflight Job (mergerunner.preflight, CPU only) before any trial Job.

    Returns the phase to report while it runs or once it failed, None when trials may go: it
    passed (condition `Preflight=True`, kept in the status so a restart never repeats it), or
    the search has no model to check (the analytic benchmark backend), or trials of this
    search already exist (a search started before the operator had a preflight). A failure
    fails the search with the reason of its kind (`UnknownTask`, `DataMissing`, ...) and zero
    trial Jobs.
    """
    passed = condition(view.status, PREFLIGHT)
    if passed is not None and passed.get("status") == "True":
        return None
    if spec.objective.evaluator.backend == "analytic":
        return None
    if draft.active or any(j.role in ("trial", "final") for j in mine):
        return None
    job = _by_candidate(mine, "preflight", draft).get(jobspec.PREFLIGHT_CANDIDATE)
    outcome = outcome_of(job, pods.get(job.name, ())) if job else None
    if outcome is None:
        if job is None:
            draft.create.append(jobspec.build_preflight_job(view.owner, spec, settings))
        name = jobspec.job_name(view.owner, jobspec.PREFLIGHT_CANDIDATE)
        return (
            "Pending",
            PREFLIGHT,
            (f"preflight Job {name}: checkpoint headers, tasks, data and metrics before any trial"),
        )
    if outcome.succeeded:
        draft.waits[PREFLIGHT] = (True, "Passed", f"preflight Job {outcome.job} passed")
        return None
    kind = outcome.error_kind
    if kind is FailureKind.STORAGE_UNAVAILABLE:
        reason = "StorageUnreachable"
    else:
        reason = FATAL_REASONS.get(kind, "PreflightFailed") if kind else "PreflightFailed"
    message = outcome.reason  # "preflight: <the cause>", the runner's failed step
    draft.waits[PREFLIGHT] = (False, reason, message)
    draft.events.append(Event("Warning", "PreflightFailed", message))
    return "Failed", reason, message


# --------------------------------------------------------------------------- advancing


def _advance(
    draft: _Draft,
    view: SearchView,
    spec: MergeSearchSpec,
    mine: Sequence[JobSummary],
    pods: Mapping[str, Sequence[PodSummary]],
    settings: JobSettings,
    inbox: warm.Inbox,
    now: str,
) -> tuple[Phase, str, str]:
    """Decide the phase and the Jobs to launch; returns (phase, reason, message)."""
    failed_evaluators = [
        j for j in mine if j.role == warm.EVALUATOR_ROLE and j.state == "failed" and not j.deleting
    ]
    if draft.leases is not None and failed_evaluators and draft.fatal is None:
        job = failed_evaluators[0]
        draft.fatal = ("EvaluatorsFailed", f"evaluator Job {job.name}: {job.reason or 'failed'}")
    if draft.fatal is not None:
        _abandon(draft)
        return "Failed", draft.fatal[0], draft.fatal[1]
    finished, why = engine.done(draft.state)
    summary = engine.status(draft.state)
    if finished and summary.phase == "failed":
        _abandon(draft)
        reason = _ENGINE_REASONS.get(why or "", "SearchFailed")
        return "Failed", reason, summary.message or reason
    if finished:
        _abandon(draft)
        return _finalize(draft, view, spec, mine, pods, settings, summary, now)
    if spec.suspend:
        if draft.leases is not None:  # evaluators stop: their leases go back to the queue
            draft.leases = {
                cid: warm.Lease(cid, issued=lease.issued) for cid, lease in draft.leases.items()
            }
            return "Suspended", "Suspended", "evaluators stopped; nothing is leased"
        return "Suspended", "Suspended", f"{len(draft.active)} trials still running; none started"
    if draft.leases is not None:
        _launch_warm(draft, view.owner, spec, mine, settings, inbox, now)
    else:
        _launch(draft, view.owner, spec, mine, settings, now)
    started = any(j.started for j in mine) or summary.trials_succeeded + summary.trials_failed > 0
    baselines = any(b["status"] in ("pending", "waiting") for b in summary.baselines)
    reason = "Baselines" if baselines else "Searching"
    message = (
        f"generation {summary.generation}: {len(draft.active)} trials running, "
        f"{summary.trials_succeeded + summary.trials_failed} of {summary.trials_issued} finished"
    )
    return ("Running" if started else "Pending"), reason, message


def _abandon(draft: _Draft) -> None:
    """Trials that no longer matter (the search ended): forget them; their Jobs get deleted."""
    draft.active = []
    draft.retries = {}


def _launch(
    draft: _Draft,
    owner: Owner,
    spec: MergeSearchSpec,
    mine: Sequence[JobSummary],
    settings: JobSettings,
    now: str,
) -> None:
    """Create the Jobs the engine's pending candidates lack, within the parallelism cap, and
    re-create (harmlessly) those of active trials that have no Job — a retried trial once
    its backoff is over."""
    pending = {c.id: c for c in engine.pending_candidates(draft.state)}
    draft.active = [cid for cid in draft.active if cid in pending]
    draft.retries = {cid: r for cid, r in draft.retries.items() if cid in draft.active}
    existing = _by_candidate(mine, "trial", draft)
    room = spec.execution.parallelism - len(draft.active)
    fresh = [cid for cid in pending if cid not in draft.active][: max(room, 0)]
    missing = [cid for cid in draft.active if cid not in existing and draft.due(cid, now)]
    draft.active.extend(fresh)
    for cid in [*missing, *fresh]:
        candidate = pending[cid]
        attempt = draft.attempt(cid)
        name = jobspec.job_name(owner, cid, attempt)
        doc = jobspec.trial_document(
            spec, name, candidate.weights, settings, subset=candidate.subset
        )
        draft.create.append(
            jobspec.build_job(
                owner,
                spec,
                candidate_id=cid,
                generation=candidate.generation,
                document=doc,
                settings=settings,
                attempt=attempt,
            )
        )


def _launch_warm(
    draft: _Draft,
    owner: Owner,
    spec: MergeSearchSpec,
    mine: Sequence[JobSummary],
    settings: JobSettings,
    inbox: warm.Inbox,
    now: str,
) -> None:
    """Make the engine's pending candidates active up to the parallelism cap (as `_launch`,
    without Jobs), keep the evaluator Job and its token Secret, and answer the evaluators
    that asked for work with a lease."""
    assert draft.leases is not None and settings.evaluator_key is not None
    pending = {c.id: c for c in engine.pending_candidates(draft.state)}
    draft.active = [cid for cid in draft.active if cid in pending]
    draft.retries = {cid: r for cid, r in draft.retries.items() if cid in draft.active}
    room = spec.execution.parallelism - len(draft.active)
    draft.active.extend([cid for cid in pending if cid not in draft.active][: max(room, 0)])
    draft.want_evaluators = True
    running = [j for j in mine if j.role == warm.EVALUATOR_ROLE and not j.deleting]
    if not running:
        draft.secrets.append(warm.token_secret(owner, settings.evaluator_key))
        draft.create.append(warm.evaluator_job(owner, spec, settings))
    given = warm.assign(
        draft.leases,
        draft.active,
        inbox.requests,
        now,
        spec.execution.trial_timeout_seconds,
        due=lambda cid: draft.due(cid, now),
    )
    for evaluator, cid in given.items():
        name = jobspec.job_name(owner, cid, draft.attempt(cid))
        doc = jobspec.trial_document(
            spec, name, pending[cid].weights, settings, subset=pending[cid].subset
        )
        draft.assignments[evaluator] = warm.Assignment(cid, jobspec.document_json(doc))


def _finalize(
    draft: _Draft,
    view: SearchView,
    spec: MergeSearchSpec,
    mine: Sequence[JobSummary],
    pods: Mapping[str, Sequence[PodSummary]],
    settings: JobSettings,
    summary: engine.EngineStatus,
    now: str,
) -> tuple[Phase, str, str]:
    """The search succeeded: evaluate the chosen merge (the confirmed winner, else the best) on
    held-out tasks and export it."""
    stop = summary.message or "search finished"
    best = engine.chosen(summary)
    if not (spec.objective.held_out or spec.output.uri) or best is None:
        return "Succeeded", "Succeeded", stop
    owner = view.owner
    attempt = draft.attempt(FINAL_CANDIDATE)
    name = jobspec.job_name(owner, FINAL_CANDIDATE, attempt)
    job = _by_candidate(mine, "final", draft).get(FINAL_CANDIDATE)
    outcome = outcome_of(job, pods.get(job.name, ())) if job else None
    if outcome is not None:
        return _final_outcome(draft, outcome, stop, now)
    if spec.suspend and draft.final is None:
        return "Suspended", "Suspended", "search finished; the final evaluation waits"
    previous = draft.final or {}
    draft.final = {
        **previous,
        "job": name,
        "trial": best["id"],
        "state": previous.get("state") if previous.get("state") == "Retrying" else "Running",
    }
    if job is None and draft.due(FINAL_CANDIDATE, now):
        draft.final["state"] = "Running"
        draft.final.pop("notBefore", None)
        doc = jobspec.trial_document(spec, name, best["weights"], settings, final=True)
        draft.create.append(
            jobspec.build_job(
                owner,
                spec,
                candidate_id=FINAL_CANDIDATE,
                generation=None,
                document=doc,
                settings=settings,
                role="final",
                attempt=attempt,
            )
        )
    if draft.final["state"] == "Retrying":
        why = draft.final.get("error", "")
        return "Running", "Finalizing", f"{stop}; the final evaluation is retried ({why})"
    return "Running", "Finalizing", f"{stop}; evaluating {best['id']} (Job {name})"


def _final_outcome(
    draft: _Draft, outcome: TrialOutcome, stop: str, now: str
) -> tuple[Phase, str, str]:
    final = dict(draft.final or {"job": outcome.job})
    if not outcome.succeeded:
        attempt = int(final.get("attempt") or 0) + 1
        kind = outcome.error_kind
        if runs_again(kind, attempt, final=True):
            wait = backoff_s(attempt)
            draft.final = {
                **final,
                "state": "Retrying",
                "attempt": attempt,
                "notBefore": later(now, wait),
                "error": outcome.reason,
            }
            if kind is not None:
                draft.final["kind"] = str(kind)
            draft.delete.append(outcome.job)
            draft.due(FINAL_CANDIDATE, now)  # sets the wake-up
            draft.events.append(
                Event(
                    "Warning",
                    "FinalizationRetried",
                    f"final evaluation failed: {outcome.reason}; attempt {attempt + 1} in "
                    f"{wait:.0f} s",
                )
            )
            return "Running", "Finalizing", f"{stop}; the final evaluation is retried"
        draft.final = {**final, "state": "Failed", "error": outcome.reason}
        return "Failed", "FinalizationFailed", f"final evaluation failed: {outcome.reason}"
    draft.final = {**final, "state": "Succeeded"}
    draft.held_out = dict(outcome.held_out) or None
    if outcome.output_uri or outcome.digest:
        draft.output = {
            k: v for k, v in (("uri", outcome.output_uri), ("digest", outcome.digest)) if v
        }
    where = f"; merged model written to {outcome.output_uri}" if outcome.output_uri else ""
    return "Succeeded", "Succeeded", f"{stop}{where}"


# --------------------------------------------------------------------------- the plan


def _plan(
    view: SearchView,
    draft: _Draft,
    mine: Sequence[JobSummary],
    phase: Phase,
    reason: str,
    message: str,
    now: str,
    evaluators: Sequence[warm.EvaluatorPod] = (),
    spec: MergeSearchSpec | None = None,
    inbox: warm.Inbox | None = None,
) -> Plan:
    previous = view.status
    _storage_wait(draft)
    status = build_status(
        state=draft.state,
        phase=phase,
        reason=reason,
        message=message,
        previous=previous,
        active=draft.active,
        now=now,
        generation=view.generation,
        final=draft.final,
        output=draft.output,
        held_out=draft.held_out,
        retries=list(draft.retries.values()),
        waits=draft.waits,
    )
    delete = [*dict.fromkeys([*draft.delete, *_collected(draft, mine, status)])]
    if draft.leases is not None and spec is not None:
        status["leases"] = warm.leases_status(draft.leases, draft.active)
        status["evaluators"] = warm.evaluators_status(
            draft.leases, evaluators, spec.execution.parallelism, (inbox or warm.Inbox()).fetched
        )
        delete += [
            j.name
            for j in mine
            if j.role == warm.EVALUATOR_ROLE
            and not draft.want_evaluators
            and j.state == "active"
            and not j.deleting
        ]
    events = [*draft.events, *milestones(previous, status)]
    return Plan(
        status=status,
        changed=status != dict(previous),
        create=tuple(draft.create),
        delete=tuple(delete),
        events=tuple(events),
        told=tuple(draft.told),
        idle=phase in ("Succeeded", "Failed"),
        wake_after=draft.wake_after,
        secrets=tuple(draft.secrets),
        assignments=dict(draft.assignments),
        consumed=tuple(draft.consumed),
        evaluators_done=not draft.want_evaluators,
        posted=tuple(draft.posted),
    )


def _storage_wait(draft: _Draft) -> None:
    """The `StorageUnavailable` condition: True while a trial (or the final evaluation)
    waits to be retried after an object-store outage."""
    final = draft.final or {}
    final_waits = final.get("state") == "Retrying" and final.get("kind") == str(
        FailureKind.STORAGE_UNAVAILABLE
    )
    if draft.retries or final_waits:
        ids = [*draft.retries, *([FINAL_CANDIDATE] if final_waits else [])]
        first = draft.retries[ids[0]] if draft.retries else final
        draft.waits["StorageUnavailable"] = (
            True,
            "RetryingTrials",
            f"{len(ids)} trial(s) wait for the object store ({', '.join(ids[:5])}); "
            f"last error: {first.get('reason') or first.get('error')}; next attempt not "
            f"before {first.get('notBefore')}",
        )
    else:
        draft.waits["StorageUnavailable"] = (False, "Reachable", "no trial waits for storage")


def _collected(draft: _Draft, mine: Sequence[JobSummary], status: Mapping[str, Any]) -> list[str]:
    """Trial Jobs no longer needed: every Job of a trial that is not active, except the Jobs
    of the most recent failures (`status.recentFailures`, at most 10), kept for `kubectl
    logs` whether the Job failed or completed without a usable result. While a quota refuses
    new Jobs, none are kept: a kept Job must never hold the quota a trial needs."""
    active = set(draft.active)
    quota = (condition(status, "QuotaExceeded") or {}).get("status") == "True"
    keep = set() if quota else {f.get("id") for f in status.get("recentFailures") or []}
    return [
        j.name
        for j in mine
        if j.role == "trial"
        and not j.deleting
        and j.candidate not in active
        and not (j.candidate in keep and j.state != "active")
    ]
