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
- `final` (`MergeSearchStatus.finalization`): the Job evaluating the chosen merge on held-out
  tasks and exporting it.
- `leases` (warm mode, `operator/warm.py`): which active candidate which evaluator pod holds.
  Warm mode differs only in how an active candidate reaches a pod and how its result comes
  back (a lease and a posted result instead of a Job and its termination message); the
  telling, the cap and the compare-and-set are the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
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
    outcome_of,
)
from mergesearch.operator.status import (
    ConditionType,
    Finalization,
    MergeSearchStatus,
    OutputEntry,
    Phase,
    Reason,
    RetryEntry,
    Wait,
    build_status,
    decode_state,
    one_line,
    wait_conditions,
)
from mergesearch.searchconfig import engine_config
from mergesearch.spec import MergeSearchSpec, SpecError, cluster_errors, parse_spec

# Which failures a user can repair (by editing the spec, or what it names) and which end the
# search is said by each `Reason` member (`Reason.finality`), in one place: status.py.
# `kubectl annotate msearch NAME mergesearch.io/retry-finalization=<any new value>` runs a
# failed final evaluation again (docs/operator.md).
ANNOTATION_RETRY_FINAL = "mergesearch.io/retry-finalization"
# The retry schedule of failed trials and of the final evaluation (RETRY_LIMIT, backoff_s,
# FINALIZATION_ATTEMPTS) is the trial contract's, shared with local mode (mergerunner.trial).
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
    "max_failed_trials": Reason.MAX_FAILED_TRIALS,
    "no_successful_trial": Reason.NO_SUCCESSFUL_TRIAL,
}
# What a phase is decided as: the phase, the reason of its conditions, and their message.
Verdict = tuple[Phase, Reason, str]


@dataclass(frozen=True)
class SearchView:
    """The MergeSearch as read from the API server. `spec_generation`: its
    metadata.generation (what a status's observedGeneration answers), not a CMA-ES
    generation."""

    owner: Owner
    spec_generation: int | None
    spec: Mapping[str, Any]
    status: MergeSearchStatus
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> SearchView:
        """From the resource's body as the API server returned it."""
        meta = body["metadata"]
        return cls(
            owner=Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"]),
            spec_generation=meta.get("generation"),
            spec=body.get("spec") or {},
            status=MergeSearchStatus.read(body.get("status")),
            annotations=dict(meta.get("annotations") or {}),
        )

    def with_status(self, status: MergeSearchStatus) -> SearchView:
        return replace(self, status=status)


@dataclass(frozen=True)
class Plan:
    """What to do: write `status` (when `changed`), then create and delete Jobs, then post
    events. `idle`: nothing will happen until something outside changes (a finished or blocked
    search), so the shell may wait long before looking again."""

    status: MergeSearchStatus
    changed: bool
    create: tuple[dict[str, Any], ...] = ()
    delete: tuple[str, ...] = ()
    events: tuple[Event, ...] = ()
    applied: tuple[str, ...] = ()  # the candidates whose results the engine was told
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


@dataclass(frozen=True)
class Creation:
    """What creating a plan's Jobs came to, as the shell reports it back: all created, or
    a ResourceQuota refused `quota_job` (and the `waiting` Jobs after it), or the API server
    refused a Job as invalid (`rejected`: its message)."""

    quota_job: str | None = None
    quota_detail: str = ""
    waiting: int = 0
    rejected: str | None = None


@dataclass(frozen=True)
class _Seen:
    """What one reconcile decides from, read once: the resource, its parsed spec, the Jobs it
    owns and their pods, the operator's settings, what warm evaluators posted, and the time."""

    view: SearchView
    spec: MergeSearchSpec
    owned: Sequence[JobSummary]
    pods: Mapping[str, Sequence[PodSummary]]
    settings: JobSettings
    inbox: warm.Inbox
    now: str


@dataclass
class _Draft:
    """The decisions of one reconcile while they are being made (local to `reconcile`)."""

    state: engine.EngineState
    active: list[str]
    finalization: Finalization | None
    output: OutputEntry | None
    held_out: dict[str, float] | None
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    fatal: tuple[Reason, str] | None = None
    retries: dict[str, RetryEntry] = field(default_factory=dict)  # by trial id
    waits: dict[str, Wait] = field(default_factory=dict)
    wake_after: float | None = None

    def attempt(self, cid: str) -> int:
        if cid == FINAL_CANDIDATE:
            return (self.finalization.attempt if self.finalization else None) or 0
        retry = self.retries.get(cid)
        return retry.attempt if retry else 0

    def due(self, cid: str, now: str) -> bool:
        """Whether the trial may run now (no retry pending, or its backoff is over)."""
        if cid == FINAL_CANDIDATE:
            not_before = self.finalization.not_before if self.finalization else None
        else:
            retry = self.retries.get(cid)
            not_before = retry.not_before if retry else None
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

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def later(now: str, seconds: float) -> str:
    return (parse_time(now) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- entry points


def owned_jobs(view: SearchView, jobs: Sequence[JobSummary]) -> list[JobSummary]:
    """The Jobs this search owns (a search re-created under the same name has a new uid: its
    predecessor's Jobs, still being collected, are not its own)."""
    return [j for j in jobs if j.owner_uid == view.owner.uid]


def pods_matter(status: MergeSearchStatus, job: JobSummary) -> bool:
    """Whether the reconcile reads this Job's pods (the shell then looks them up, and their
    events when they are stuck): an active trial's, the finalization's, the preflight's, and a
    running evaluator Job's. The pods of a collected trial's Job tell nothing any more."""
    running_evaluators = job.role == warm.EVALUATOR_ROLE and job.state == "active"
    return (
        job.candidate in (status.active_trials or ())
        or job.role in ("final", "preflight")
        or running_evaluators
    )


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
    view = _retry_finalization_if_asked(view, now)
    previous = view.status
    inbox = inbox or warm.Inbox()
    owned = owned_jobs(view, jobs)
    if _finished(previous):
        return _settled(view, owned, inbox)
    if _awaits_repair(view):
        return Plan(
            status=previous,
            changed=False,
            idle=True,
            consumed=_posted(inbox),
            evaluators_done=True,
        )
    try:
        spec = parse_spec(dict(view.spec))
        config = engine_config(spec)
    except SpecError as exc:
        return failed_plan(view, Reason.SPEC_INVALID, "; ".join(exc.errors), now)
    if cluster_errors(spec):
        return failed_plan(view, Reason.SPEC_INVALID, "; ".join(cluster_errors(spec)), now)
    if spec.execution.mode == "warm" and not settings.serves_evaluators:
        return failed_plan(view, Reason.SPEC_INVALID, WARM_UNAVAILABLE, now)
    refused = podpolicy.check_template(spec.execution.template, settings.service_account)
    if refused:  # before any Job: a refused template costs nothing
        return failed_plan(view, Reason.TEMPLATE_INVALID, "; ".join(refused), now)
    try:
        state = _load_state(previous, config)
    except StateInvalid as exc:
        return failed_plan(view, exc.reason, str(exc), now)
    chosen = previous.chosen()
    draft = _Draft(
        state=state,
        active=list(previous.active_trials or ()),
        finalization=previous.finalization,
        output=previous.output,
        held_out=dict(chosen.held_out or {}) or None if chosen else None,
        retries={r.trial: r for r in previous.retries or ()},
    )
    if spec.execution.mode == "warm":
        draft.leases = warm.read_leases(previous)
    if not previous.optimizer and podpolicy.missing_requests(spec.execution.template):
        draft.events.append(NO_REQUESTS)
    seen = _Seen(view, spec, owned, pods, settings, inbox, now)
    gate = _preflight(draft, seen)
    if gate is not None:  # no trial Job before the preflight passed
        return _plan(view, draft, owned, gate, now)
    try:
        _collect(draft, owned, pods, now)
        if draft.leases is not None:
            _collect_warm(draft, view.owner, spec, inbox, evaluators, now)
        _check_blockers(draft, owned, pods)
        verdict = _advance(draft, seen)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        # A pod template Kubernetes would refuse anyway (a malformed structure), caught here
        # rather than as a crash: the template is the only free-form part of the spec.
        message = f"spec.execution.template: {exc}"
        return failed_plan(view, Reason.TEMPLATE_INVALID, message, now)
    return _plan(view, draft, owned, verdict, now, evaluators, spec, inbox)


WARM_UNAVAILABLE = (
    "spec.execution.mode: warm needs the operator's evaluator endpoint, which this operator "
    "does not serve (set MERGESEARCH_EVALUATOR_URL and MERGESEARCH_EVALUATOR_KEY_FILE, or the "
    "chart's evaluators.enabled); use mode jobs"
)


def _posted(inbox: warm.Inbox) -> tuple[str, ...]:
    return tuple(p.candidate for p in inbox.results)


def failed_plan(view: SearchView, reason: Reason, message: str, now: str) -> Plan:
    """Phase Failed with `reason`; nothing launched, nothing collected. A recoverable reason
    resumes the search when the spec changes (its generation moves past the condition's); a
    terminal one ends it (`Reason.finality`)."""
    previous = view.status
    status = build_status(
        state=None,
        phase=Phase.FAILED,
        reason=reason,
        message=message,
        previous=previous,
        active=list(previous.active_trials or ()),
        now=now,
        spec_generation=view.spec_generation,
        finalization=previous.finalization,
        output=previous.output,
        retries=previous.retries or (),
    )
    return Plan(
        status=status,
        changed=status != previous,
        events=tuple(milestones(previous, status)),
        idle=True,
    )


def job_rejected(view: SearchView, message: str, now: str) -> Plan:
    """The API server refused a Job we built (422): the template is at fault."""
    return failed_plan(view, Reason.TEMPLATE_INVALID, f"a trial Job was rejected: {message}", now)


def after_creation(view: SearchView, plan: Plan, creation: Creation, now: str) -> Plan | None:
    """The status write the Jobs' creation calls for, on top of `plan`'s (whose status `view`
    holds): a Job the API server rejected fails the search (the template is at fault); a
    quota that refused one is the `QuotaExceeded` wait; once every Job of a plan could be
    created again, that wait is over. None: nothing to write."""
    if creation.rejected is not None:
        return job_rejected(view, creation.rejected, now)
    if creation.quota_job is not None:
        return quota_refused(view, creation.quota_job, creation.quota_detail, creation.waiting, now)
    if plan.create and view.status.holds(ConditionType.QUOTA_EXCEEDED):
        return quota_cleared(view, now)
    return None


def quota_refused(view: SearchView, job: str, detail: str, waiting: int, now: str) -> Plan:
    """A ResourceQuota refused a trial Job (403 exceeded quota): the search waits, says so
    in the `QuotaExceeded` condition (and an event when it starts waiting), and creates the
    Job in a later reconcile, once collected Jobs have been deleted and the quota freed."""
    message = f"{waiting} trial Job(s) wait for quota; creating {job}: {detail}"
    wait = Wait(True, Reason.JOB_QUOTA, message)
    return _wait_condition(view, ConditionType.QUOTA_EXCEEDED, wait, now)


def quota_cleared(view: SearchView, now: str) -> Plan:
    """Every Job of the last reconcile could be created: the quota wait is over."""
    wait = Wait(False, Reason.JOBS_CREATED, "no Job waits")
    return _wait_condition(view, ConditionType.QUOTA_EXCEEDED, wait, now)


def _wait_condition(view: SearchView, type: ConditionType, wait: Wait, now: str) -> Plan:
    previous = view.status
    conditions = wait_conditions(
        previous.conditions or [], {type: wait}, now=now, spec_generation=view.spec_generation
    )
    status = previous.model_copy(update={"conditions": conditions})
    flipped = previous.holds(type) != wait.holds
    events = (Event("Warning", type, wait.message),) if wait.holds and flipped else ()
    return Plan(status=status, changed=status != previous, events=events)


def internal_error(view: SearchView, message: str, now: str) -> Plan:
    """A bug met this resource: record it and leave the resource alone until its spec changes,
    rather than failing again on every reconcile."""
    return failed_plan(view, Reason.INTERNAL_ERROR, message, now)


# --------------------------------------------------------------------------- gates


def _finished(status: MergeSearchStatus) -> bool:
    """Succeeded, or failed for good (a terminal reason, or one this operator does not know)."""
    if status.phase is Phase.SUCCEEDED:
        return True
    reason = status.failed_reason()
    return status.phase is Phase.FAILED and not (isinstance(reason, Reason) and reason.recoverable)


def _awaits_repair(view: SearchView) -> bool:
    """Failed for a reason the user can repair, and the spec has not changed since."""
    status = view.status
    reason = status.failed_reason()
    cond = status.condition(ConditionType.FAILED)
    return (
        status.phase is Phase.FAILED
        and isinstance(reason, Reason)
        and reason.recoverable
        and cond is not None
        and cond.observed_generation == view.spec_generation
    )


def _retry_finalization_if_asked(view: SearchView, now: str) -> SearchView:
    """A search whose final evaluation failed, and whose retry annotation has a value not
    acted on yet: back to Running with a fresh final attempt (the engine state, the best
    trial and its scores were never lost)."""
    status = view.status
    finalization = status.finalization or Finalization()
    asked = view.annotations.get(ANNOTATION_RETRY_FINAL)
    if (
        not asked
        or status.failed_reason() is not Reason.FINALIZATION_FAILED
        or finalization.retry_request == asked
    ):
        return view
    retry = finalization.model_copy(
        update={
            "error": None,
            "not_before": None,
            "state": "Running",
            "attempt": (finalization.attempt or 0) + 1,
            "retry_request": asked,
        }
    )
    conditions = [c for c in status.conditions or () if c.type != ConditionType.FAILED]
    reopened = status.model_copy(
        update={
            "phase": Phase.RUNNING,
            "finalization": retry,
            "conditions": conditions,
            "completion_time": None,
        }
    )
    return view.with_status(reopened)


def _settled(view: SearchView, owned: Sequence[JobSummary], inbox: warm.Inbox) -> Plan:
    """A finished search: only make sure no trial Job or evaluator still runs."""
    delete = tuple(
        j.name
        for j in owned
        if j.role in ("trial", warm.EVALUATOR_ROLE) and j.state == "active" and not j.deleting
    )
    return Plan(
        status=view.status,
        changed=False,
        delete=delete,
        idle=True,
        consumed=_posted(inbox),
        evaluators_done=True,
    )


def _load_state(previous: MergeSearchStatus, config: engine.EngineConfig) -> engine.EngineState:
    data = previous.optimizer
    if not data:
        return engine.init(config)
    try:
        state = decode_state(data)
    except (ValidationError, ValueError, TypeError) as exc:
        message = f"status.optimizer is unusable: {one_line(str(exc))}"
        raise StateInvalid(Reason.STATE_INVALID, message) from None
    stored = state.config
    budgets = {k: getattr(config, k) for k in _BUDGETS}
    if stored.model_copy(update=budgets) != config:
        raise StateInvalid(
            Reason.SPEC_CHANGED,
            "the search state was made for another spec (only budgets may change while a "
            "search runs); delete and re-create the MergeSearch to start over",
        )
    return state if stored == config else state.model_copy(update={"config": config})


# --------------------------------------------------------------------------- collecting results


def _by_candidate(owned: Sequence[JobSummary], role: str, draft: _Draft) -> dict[str, JobSummary]:
    """Each candidate's Job of its current attempt (an earlier attempt's Job, still being
    deleted, is not it)."""
    out: dict[str, JobSummary] = {}
    for job in owned:
        if job.role == role and not job.deleting and job.attempt == draft.attempt(job.candidate):
            out[job.candidate] = job
    return out


def _collect(
    draft: _Draft, owned: Sequence[JobSummary], pods: Mapping[str, Sequence[PodSummary]], now: str
) -> None:
    """Tell the engine every finished active trial; a configuration error found by a trial
    (a checkpoint that cannot be fetched, checkpoints that cannot be merged, an unknown task)
    makes the search fail at once instead of burning the failure budget, and a transient
    one (the object store is down) runs the trial again after a backoff, untold."""
    by_id = _by_candidate(owned, "trial", draft)
    jobs = [by_id.get(cid) for cid in draft.active]
    outcomes = [outcome_of(job, pods.get(job.name, ())) for job in jobs if job is not None]
    finished = [outcome for outcome in outcomes if outcome is not None]
    _tell_outcomes(draft, finished, now, again=lambda outcome: draft.delete.append(outcome.job))


def _tell_outcomes(
    draft: _Draft,
    outcomes: Sequence[TrialOutcome],
    now: str,
    again: Callable[[TrialOutcome], None],
) -> None:
    """Tell the engine these finished trials, except those that failed for a transient reason:
    they are scheduled again (`again` undoes their current attempt: deletes its Job, or
    returns its lease) and not told. A failure that reveals a configuration error fails the
    search."""
    first = draft.state.trials.succeeded == 0
    results: list[engine.Result] = []
    for outcome in outcomes:
        cid = outcome.candidate
        if _retry_later(draft, outcome, first, now):
            again(outcome)
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
    draft.applied = [*draft.applied, *report.applied]
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
    accepted = {o.candidate for o in outcomes}
    for posted in inbox.results:  # the first posting of each accepted candidate
        if posted.candidate in accepted:
            accepted.discard(posted.candidate)
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
    accepted = {o.candidate for o in outcomes}
    outcomes += [o for o in lost if o.candidate not in accepted]
    leases = draft.leases

    def lease_again(outcome: TrialOutcome) -> None:  # an outage: lease it again later
        cid = outcome.candidate
        leases[cid] = warm.Lease(cid, issued=leases.get(cid, warm.Lease(cid)).issued)

    _tell_outcomes(draft, outcomes, now, again=lease_again)


def _retry_later(draft: _Draft, outcome: TrialOutcome, first: bool, now: str) -> bool:
    """Schedule another attempt of a trial that failed for a transient reason; False when
    the failure is to be told (or is fatal)."""
    if not retryable(outcome, first_trials=first):
        return False
    cid = outcome.candidate
    attempt = draft.attempt(cid) + 1
    if not runs_again(outcome.result.error_kind, attempt, first_trials=first):
        return False
    wait = backoff_s(attempt)
    draft.retries[cid] = RetryEntry(
        trial=cid, attempt=attempt, not_before=later(now, wait), reason=outcome.reason
    )
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
    policy = failure_policy(outcome.result.error_kind, first_trials=first_trials)
    return policy is FailurePolicy.RETRY


def _check_blockers(
    draft: _Draft, owned: Sequence[JobSummary], pods: Mapping[str, Sequence[PodSummary]]
) -> None:
    """Pods of active trials (and of the final Job, and in warm mode of the evaluator Job)
    that do not start: a configuration cause fails the search now; a transient one is the
    `TrialsBlocked` condition."""
    current = {**_by_candidate(owned, "trial", draft), **_by_candidate(owned, "final", draft)}
    wanted = [*draft.active, *([FINAL_CANDIDATE] if draft.finalization else [])]
    jobs = [current.get(cid) for cid in wanted]
    if draft.leases is not None:
        jobs += [j for j in owned if j.role == warm.EVALUATOR_ROLE and not j.deleting]
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
        first = waiting[0]
        draft.waits[ConditionType.TRIALS_BLOCKED] = Wait(True, first.reason, first.message + more)
    else:
        message = "no trial pod is blocked"
        draft.waits[ConditionType.TRIALS_BLOCKED] = Wait(False, Reason.PODS_RUNNING, message)


def _engine_result(outcome: TrialOutcome) -> engine.Result:
    if outcome.succeeded:
        return engine.Result(outcome.candidate, scores=dict(outcome.result.held_in))
    return engine.Result(outcome.candidate, failed=True, reason=outcome.reason)


# The condition reason of each failure kind that fails a search (FAILURE_POLICY says which).
FATAL_REASONS: dict[FailureKind, Reason] = {
    FailureKind.INVALID_INPUT: Reason.TRIAL_REJECTED,
    FailureKind.CHECKPOINT_UNAVAILABLE: Reason.CHECKPOINT_UNAVAILABLE,
    FailureKind.CHECKPOINT_INVALID: Reason.CHECKPOINT_INVALID,
    FailureKind.CHECKPOINTS_INCOMPATIBLE: Reason.CHECKPOINTS_INCOMPATIBLE,
    FailureKind.UNKNOWN_TASK: Reason.UNKNOWN_TASK,
    FailureKind.UNKNOWN_METRIC: Reason.UNKNOWN_METRIC,
    FailureKind.DATA_MISSING: Reason.DATA_MISSING,
    FailureKind.CONFIG: Reason.CONFIG_INVALID,
    FailureKind.OUT_OF_MEMORY: Reason.OUT_OF_MEMORY,
}


def classify_failure(outcome: TrialOutcome, *, first_trials: bool) -> tuple[Reason, str] | None:
    """(reason, message) when a failed trial reveals a configuration error, else None.

    Decided from the runner's failure kind, never from message text: a kind whose policy is
    fatal fails the search at once, because every later trial would fail the same way (a
    document the runner rejects, a checkpoint that is missing or malformed, checkpoints that do
    not match, an unknown task or metric, a model that does not fit). Storage that cannot be
    reached is fatal only among the first trials (none succeeded yet): later it is more likely
    an outage.
    """
    kind = outcome.result.error_kind
    if kind is None or failure_policy(kind, first_trials=first_trials) is not FailurePolicy.FATAL:
        return None
    unreachable = kind is FailureKind.STORAGE_UNAVAILABLE
    reason = Reason.STORAGE_UNREACHABLE if unreachable else FATAL_REASONS[kind]
    return reason, f"trial {outcome.candidate}: {outcome.reason}"


# --------------------------------------------------------------------------- the preflight


def _preflight(draft: _Draft, seen: _Seen) -> Verdict | None:
    """The search's preflight Job (mergerunner.preflight, CPU only) before any trial Job.

    Returns the phase to report while it runs or once it failed, None when trials may go: it
    passed (condition `Preflight=True`, kept in the status so a restart never repeats it), or
    the operator runs the benchmarking objective (no model to check), or trials of this
    search already exist (a search started before the operator had a preflight). A failure
    fails the search with the reason of its kind (`UnknownTask`, `DataMissing`, ...) and zero
    trial Jobs.
    """
    view, spec, owned, pods, settings = seen.view, seen.spec, seen.owned, seen.pods, seen.settings
    if view.status.holds(ConditionType.PREFLIGHT):
        return None
    if settings.analytic_trials:
        return None
    if draft.active or any(j.role in ("trial", "final") for j in owned):
        return None
    job = _by_candidate(owned, "preflight", draft).get(jobspec.PREFLIGHT_CANDIDATE)
    outcome = outcome_of(job, pods.get(job.name, ())) if job else None
    if outcome is None:
        if job is None:
            draft.create.append(jobspec.build_preflight_job(view.owner, spec, settings))
        name = jobspec.job_name(view.owner, jobspec.PREFLIGHT_CANDIDATE)
        return (
            Phase.PENDING,
            Reason.PREFLIGHT,
            (f"preflight Job {name}: checkpoint headers, tasks, data and metrics before any trial"),
        )
    if outcome.succeeded:
        message = f"preflight Job {outcome.job} passed"
        draft.waits[ConditionType.PREFLIGHT] = Wait(True, Reason.PASSED, message)
        return None
    kind = outcome.result.error_kind
    if kind is FailureKind.STORAGE_UNAVAILABLE:
        reason = Reason.STORAGE_UNREACHABLE
    else:
        reason = (
            FATAL_REASONS.get(kind, Reason.PREFLIGHT_FAILED) if kind else Reason.PREFLIGHT_FAILED
        )
    message = outcome.reason  # "preflight: <the cause>", the runner's failed step
    draft.waits[ConditionType.PREFLIGHT] = Wait(False, reason, message)
    draft.events.append(Event("Warning", "PreflightFailed", message))
    return Phase.FAILED, reason, message


# --------------------------------------------------------------------------- advancing


def _advance(draft: _Draft, seen: _Seen) -> Verdict:
    """Decide the phase and the Jobs to launch; returns (phase, reason, message)."""
    view, spec, owned, settings = seen.view, seen.spec, seen.owned, seen.settings
    inbox, now = seen.inbox, seen.now
    failed_evaluators = [
        j for j in owned if j.role == warm.EVALUATOR_ROLE and j.state == "failed" and not j.deleting
    ]
    if draft.leases is not None and failed_evaluators and draft.fatal is None:
        job = failed_evaluators[0]
        message = f"evaluator Job {job.name}: {job.reason or 'failed'}"
        draft.fatal = (Reason.EVALUATORS_FAILED, message)
    if draft.fatal is not None:
        _abandon(draft)
        return Phase.FAILED, draft.fatal[0], draft.fatal[1]
    finished, why = engine.done(draft.state)
    summary = engine.status(draft.state)
    if finished and summary.phase == "failed":
        _abandon(draft)
        reason = _ENGINE_REASONS.get(why or "", Reason.SEARCH_FAILED)
        return Phase.FAILED, reason, summary.message or reason
    if finished:
        _abandon(draft)
        return _finalize(draft, seen, summary)
    if spec.suspend:
        if draft.leases is not None:  # evaluators stop: their leases go back to the queue
            draft.leases = {
                cid: warm.Lease(cid, issued=lease.issued) for cid, lease in draft.leases.items()
            }
            return Phase.SUSPENDED, Reason.SUSPENDED, "evaluators stopped; nothing is leased"
        message = f"{len(draft.active)} trials still running; none started"
        return Phase.SUSPENDED, Reason.SUSPENDED, message
    if draft.leases is not None:
        _launch_warm(draft, view.owner, spec, owned, settings, inbox, now)
    else:
        _launch(draft, view.owner, spec, owned, settings, now)
    started = any(j.started for j in owned) or summary.trials_succeeded + summary.trials_failed > 0
    baselines = any(b["status"] in ("pending", "waiting") for b in summary.baselines)
    reason = Reason.BASELINES if baselines else Reason.SEARCHING
    message = (
        f"generation {summary.generation}: {len(draft.active)} trials running, "
        f"{summary.trials_succeeded + summary.trials_failed} of {summary.trials_issued} finished"
    )
    return (Phase.RUNNING if started else Phase.PENDING), reason, message


def _abandon(draft: _Draft) -> None:
    """Trials that no longer matter (the search ended): forget them; their Jobs get deleted."""
    draft.active = []
    draft.retries = {}


def _activate(
    draft: _Draft, spec: MergeSearchSpec
) -> tuple[dict[str, engine.Candidate], list[str]]:
    """(the engine's pending candidates by id, those to make active now): active trials the
    engine no longer waits for are dropped (with their retries), and new ones fill the room
    spec.execution.parallelism leaves."""
    pending = {c.id: c for c in engine.pending_candidates(draft.state)}
    draft.active = [cid for cid in draft.active if cid in pending]
    draft.retries = {cid: r for cid, r in draft.retries.items() if cid in draft.active}
    room = spec.execution.parallelism - len(draft.active)
    return pending, [cid for cid in pending if cid not in draft.active][: max(room, 0)]


def _launch(
    draft: _Draft,
    owner: Owner,
    spec: MergeSearchSpec,
    owned: Sequence[JobSummary],
    settings: JobSettings,
    now: str,
) -> None:
    """Create the Jobs the engine's pending candidates lack, within the parallelism cap, and
    re-create (harmlessly) those of active trials that have no Job — a retried trial once
    its backoff is over."""
    pending, fresh = _activate(draft, spec)
    existing = _by_candidate(owned, "trial", draft)
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
                cma_generation=candidate.generation,
                document=doc,
                settings=settings,
                attempt=attempt,
            )
        )


def _launch_warm(
    draft: _Draft,
    owner: Owner,
    spec: MergeSearchSpec,
    owned: Sequence[JobSummary],
    settings: JobSettings,
    inbox: warm.Inbox,
    now: str,
) -> None:
    """Make the engine's pending candidates active up to the parallelism cap (as `_launch`,
    without Jobs), keep the evaluator Job and its token Secret, and answer the evaluators
    that asked for work with a lease."""
    assert draft.leases is not None and settings.evaluator_key is not None
    pending, fresh = _activate(draft, spec)
    draft.active.extend(fresh)
    draft.want_evaluators = True
    running = [j for j in owned if j.role == warm.EVALUATOR_ROLE and not j.deleting]
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


def _finalize(draft: _Draft, seen: _Seen, summary: engine.EngineStatus) -> Verdict:
    """The search succeeded: evaluate the chosen merge (the confirmed winner, else the best) on
    held-out tasks and export it."""
    view, spec, owned, pods, settings = seen.view, seen.spec, seen.owned, seen.pods, seen.settings
    now = seen.now
    stop = summary.message or "search finished"
    best = engine.chosen(summary)
    if not (spec.objective.held_out or spec.output.uri) or best is None:
        return Phase.SUCCEEDED, Reason.SUCCEEDED, stop
    owner = view.owner
    attempt = draft.attempt(FINAL_CANDIDATE)
    name = jobspec.job_name(owner, FINAL_CANDIDATE, attempt)
    job = _by_candidate(owned, "final", draft).get(FINAL_CANDIDATE)
    outcome = outcome_of(job, pods.get(job.name, ())) if job else None
    if outcome is not None:
        return _finalization_outcome(draft, outcome, stop, now)
    if spec.suspend and draft.finalization is None:
        return Phase.SUSPENDED, Reason.SUSPENDED, "search finished; the final evaluation waits"
    previous = draft.finalization or Finalization()
    retrying = previous.state == "Retrying"
    draft.finalization = previous.model_copy(
        update={"job": name, "trial": best["id"], "state": "Retrying" if retrying else "Running"}
    )
    if job is None and draft.due(FINAL_CANDIDATE, now):
        draft.finalization = draft.finalization.model_copy(
            update={"state": "Running", "not_before": None}
        )
        doc = jobspec.trial_document(spec, name, best["weights"], settings, finalization=True)
        draft.create.append(
            jobspec.build_job(
                owner,
                spec,
                candidate_id=FINAL_CANDIDATE,
                cma_generation=None,
                document=doc,
                settings=settings,
                role="final",
                attempt=attempt,
            )
        )
    if draft.finalization.state == "Retrying":
        why = draft.finalization.error or ""
        return Phase.RUNNING, Reason.FINALIZING, f"{stop}; the final evaluation is retried ({why})"
    return Phase.RUNNING, Reason.FINALIZING, f"{stop}; evaluating {best['id']} (Job {name})"


def _finalization_outcome(draft: _Draft, outcome: TrialOutcome, stop: str, now: str) -> Verdict:
    finalization = draft.finalization or Finalization(job=outcome.job)
    if not outcome.succeeded:
        attempt = (finalization.attempt or 0) + 1
        kind = outcome.result.error_kind
        if runs_again(kind, attempt, finalization=True):
            wait = backoff_s(attempt)
            draft.finalization = finalization.model_copy(
                update={
                    "state": "Retrying",
                    "attempt": attempt,
                    "not_before": later(now, wait),
                    "error": outcome.reason,
                    **({"kind": str(kind)} if kind is not None else {}),
                }
            )
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
            return Phase.RUNNING, Reason.FINALIZING, f"{stop}; the final evaluation is retried"
        draft.finalization = finalization.model_copy(
            update={"state": "Failed", "error": outcome.reason}
        )
        message = f"final evaluation failed: {outcome.reason}"
        return Phase.FAILED, Reason.FINALIZATION_FAILED, message
    draft.finalization = finalization.model_copy(update={"state": "Succeeded"})
    result = outcome.result
    draft.held_out = dict(result.held_out) or None
    if result.output_uri or result.digest:
        draft.output = OutputEntry(uri=result.output_uri or None, digest=result.digest or None)
    where = f"; merged model written to {result.output_uri}" if result.output_uri else ""
    return Phase.SUCCEEDED, Reason.SUCCEEDED, f"{stop}{where}"


# --------------------------------------------------------------------------- the plan


def _plan(
    view: SearchView,
    draft: _Draft,
    owned: Sequence[JobSummary],
    verdict: Verdict,
    now: str,
    evaluators: Sequence[warm.EvaluatorPod] = (),
    spec: MergeSearchSpec | None = None,
    inbox: warm.Inbox | None = None,
) -> Plan:
    previous = view.status
    phase, reason, message = verdict
    _storage_wait(draft)
    status = build_status(
        state=draft.state,
        phase=phase,
        reason=reason,
        message=message,
        previous=previous,
        active=draft.active,
        now=now,
        spec_generation=view.spec_generation,
        finalization=draft.finalization,
        output=draft.output,
        held_out=draft.held_out,
        retries=list(draft.retries.values()),
        waits=draft.waits,
    )
    delete = [*dict.fromkeys([*draft.delete, *_collected(draft, owned, status)])]
    if draft.leases is not None and spec is not None:
        fetched = (inbox or warm.Inbox()).fetched
        status = status.model_copy(
            update={
                "leases": warm.leases_status(draft.leases, draft.active),
                "evaluators": warm.evaluators_status(
                    draft.leases, evaluators, spec.execution.parallelism, fetched
                ),
            }
        )
        delete += [
            j.name
            for j in owned
            if j.role == warm.EVALUATOR_ROLE
            and not draft.want_evaluators
            and j.state == "active"
            and not j.deleting
        ]
    events = [*draft.events, *milestones(previous, status)]
    return Plan(
        status=status,
        changed=status != previous,
        create=tuple(draft.create),
        delete=tuple(delete),
        events=tuple(events),
        applied=tuple(draft.applied),
        idle=phase.ended,
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
    finalization = draft.finalization or Finalization()
    finalization_waits = finalization.state == "Retrying" and finalization.kind == str(
        FailureKind.STORAGE_UNAVAILABLE
    )
    if draft.retries or finalization_waits:
        ids = [*draft.retries, *([FINAL_CANDIDATE] if finalization_waits else [])]
        if draft.retries:
            first = draft.retries[ids[0]]
            error, not_before = first.reason, first.not_before
        else:
            error, not_before = finalization.error, finalization.not_before
        draft.waits[ConditionType.STORAGE_UNAVAILABLE] = Wait(
            True,
            Reason.RETRYING_TRIALS,
            f"{len(ids)} trial(s) wait for the object store ({', '.join(ids[:5])}); "
            f"last error: {error}; next attempt not before {not_before}",
        )
    else:
        message = "no trial waits for storage"
        draft.waits[ConditionType.STORAGE_UNAVAILABLE] = Wait(False, Reason.REACHABLE, message)


def _collected(draft: _Draft, owned: Sequence[JobSummary], status: MergeSearchStatus) -> list[str]:
    """Trial Jobs no longer needed: every Job of a trial that is not active, except the Jobs
    of the most recent failures (`status.recentFailures`, at most 10), kept for `kubectl
    logs` whether the Job failed or completed without a usable result. While a quota refuses
    new Jobs, none are kept: a kept Job must never hold the quota a trial needs."""
    active = set(draft.active)
    quota = status.holds(ConditionType.QUOTA_EXCEEDED)
    keep = set() if quota else {f.id for f in status.recent_failures or ()}
    return [
        j.name
        for j in owned
        if j.role == "trial"
        and not j.deleting
        and j.candidate not in active
        and not (j.candidate in keep and j.state != "active")
    ]
