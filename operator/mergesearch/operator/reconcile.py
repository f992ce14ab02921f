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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from mergesearch import engine
from mergesearch.operator import jobs as jobspec
from mergesearch.operator.events import Event, milestones
from mergesearch.operator.jobs import FINAL_CANDIDATE, JobSettings, Owner
from mergesearch.operator.observe import JobSummary, PodSummary, TrialOutcome, cut, outcome_of
from mergesearch.operator.status import Phase, build_status, condition
from mergesearch.searchconfig import engine_config
from mergesearch.spec import MergeSearchSpec, SpecError, parse_spec

# Failures a user can repair by editing the spec (the generation changes); others are final.
RECOVERABLE = frozenset({"SpecInvalid", "TemplateInvalid", "InternalError"})
_BUDGETS = (
    "max_trials",
    "max_generations",
    "target_fitness",
    "stagnation_generations",
    "max_failed_trials",
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


class StateInvalid(Exception):
    """status.optimizer cannot be used (corrupt, or written for another configuration)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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
) -> Plan:
    """One convergence step; see the module docstring."""
    previous = view.status
    mine = [j for j in jobs if j.owner_uid == view.owner.uid]
    if _finished(previous):
        return _settled(view, mine)
    if _blocked(view):
        return Plan(status=dict(previous), changed=False, idle=True)
    try:
        spec = parse_spec(dict(view.spec))
        config = engine_config(spec)
    except SpecError as exc:
        return blocked(view, "SpecInvalid", "; ".join(exc.errors), now)
    try:
        state = _load_state(previous, config)
    except StateInvalid as exc:
        return blocked(view, exc.reason, str(exc), now, final=True)
    draft = _Draft(
        state=state,
        active=list(previous.get("activeTrials") or []),
        final=dict(previous["final"]) if previous.get("final") else None,
        output=dict(previous["output"]) if previous.get("output") else None,
        held_out=dict(_chosen_entry(previous).get("heldOut") or {}) or None,
    )
    try:
        _collect(draft, mine, pods)
        phase, reason, message = _advance(draft, view, spec, mine, pods, settings)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        # A pod template Kubernetes would refuse anyway (a malformed structure), caught here
        # rather than as a crash: the template is the only free-form part of the spec.
        return blocked(view, "TemplateInvalid", f"spec.execution.template: {exc}", now)
    return _plan(view, draft, mine, phase, reason, message, now)


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


def _settled(view: SearchView, mine: Sequence[JobSummary]) -> Plan:
    """A finished search: only make sure no trial Job still runs (abandoned ones)."""
    delete = tuple(
        j.name for j in mine if j.role == "trial" and j.state == "active" and not j.deleting
    )
    return Plan(status=dict(view.status), changed=False, delete=delete, idle=True)


def _load_state(previous: Mapping[str, Any], config: engine.EngineConfig) -> engine.EngineState:
    data = previous.get("optimizer")
    if not data:
        return engine.init(config)
    try:
        state = engine.EngineState.from_dict(dict(data))
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


def _by_candidate(mine: Sequence[JobSummary], role: str) -> dict[str, JobSummary]:
    out: dict[str, JobSummary] = {}
    for job in mine:
        if job.role == role and not job.deleting:
            out[job.candidate] = job
    return out


def _collect(
    draft: _Draft, mine: Sequence[JobSummary], pods: Mapping[str, Sequence[PodSummary]]
) -> None:
    """Tell the engine every finished active trial; a configuration error found by a trial
    (a checkpoint that cannot be fetched, checkpoints that cannot be merged, an unknown task)
    makes the search fail at once instead of burning the failure budget."""
    by_id = _by_candidate(mine, "trial")
    first = draft.state.trials.succeeded == 0
    results: list[engine.Result] = []
    for cid in draft.active:
        job = by_id.get(cid)
        outcome = outcome_of(job, pods.get(job.name, ())) if job else None
        if outcome is None:
            continue
        results.append(_engine_result(outcome))
        if not outcome.succeeded:
            draft.events.append(Event("Warning", "TrialFailed", f"{cid}: {outcome.reason}"))
            draft.fatal = draft.fatal or classify_failure(outcome, first_trials=first)
    if not results:
        return
    draft.state, report = engine.tell_with_report(draft.state, results)
    done = {r.candidate_id for r in results}
    draft.told = list(report.applied)
    draft.active = [cid for cid in draft.active if cid not in done]


def _engine_result(outcome: TrialOutcome) -> engine.Result:
    if outcome.succeeded:
        return engine.Result(outcome.candidate, scores=dict(outcome.held_in))
    return engine.Result(outcome.candidate, failed=True, reason=outcome.reason)


_FETCH_USER_ERRORS = (": not found:", ": access denied:", ": invalid checkpoint:", ": config:")
_MERGE_USER_ERRORS = ("ModelMismatch", "CheckpointMismatch", "CheckpointError", "MergeWeights")


def classify_failure(outcome: TrialOutcome, *, first_trials: bool) -> tuple[str, str] | None:
    """(reason, message) when a failed trial reveals a configuration error, else None.

    Always fatal, because every later trial would fail the same way: a trial document the
    runner rejects, a checkpoint that does not exist or may not be read, checkpoints whose
    tensors do not match, an unknown task or metric. Fatal only among the first trials (none
    succeeded yet): storage that cannot be reached — later it is more likely an outage.
    """
    step, error = outcome.failed_step, outcome.error or ""
    message = f"trial {outcome.candidate}: {outcome.reason}"
    if step == "input":
        return "TrialRejected", message
    if step == "fetch":
        if any(marker in error for marker in _FETCH_USER_ERRORS):
            return "CheckpointUnavailable", message
        return ("StorageUnreachable", message) if first_trials else None
    if step == "merge" and any(error.startswith(kind) for kind in _MERGE_USER_ERRORS):
        return "CheckpointsIncompatible", message
    if step == "evaluate" and "unknown lm-eval task" in error:
        return "UnknownTask", message
    if step == "evaluate" and "not among its results" in error:
        return "UnknownMetric", message
    return None


# --------------------------------------------------------------------------- advancing


def _advance(
    draft: _Draft,
    view: SearchView,
    spec: MergeSearchSpec,
    mine: Sequence[JobSummary],
    pods: Mapping[str, Sequence[PodSummary]],
    settings: JobSettings,
) -> tuple[Phase, str, str]:
    """Decide the phase and the Jobs to launch; returns (phase, reason, message)."""
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
        return _finalize(draft, view, spec, mine, pods, settings, summary)
    if spec.suspend:
        return "Suspended", "Suspended", f"{len(draft.active)} trials still running; none started"
    _launch(draft, view.owner, spec, mine, settings)
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


def _launch(
    draft: _Draft,
    owner: Owner,
    spec: MergeSearchSpec,
    mine: Sequence[JobSummary],
    settings: JobSettings,
) -> None:
    """Create the Jobs the engine's pending candidates lack, within the parallelism cap, and
    re-create (harmlessly) those of active trials that have no Job."""
    pending = {c.id: c for c in engine.pending_candidates(draft.state)}
    draft.active = [cid for cid in draft.active if cid in pending]
    existing = _by_candidate(mine, "trial")
    room = spec.execution.parallelism - len(draft.active)
    fresh = [cid for cid in pending if cid not in draft.active][: max(room, 0)]
    missing = [cid for cid in draft.active if cid not in existing]
    draft.active.extend(fresh)
    for cid in [*missing, *fresh]:
        candidate = pending[cid]
        name = jobspec.job_name(owner, cid)
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
            )
        )


def _finalize(
    draft: _Draft,
    view: SearchView,
    spec: MergeSearchSpec,
    mine: Sequence[JobSummary],
    pods: Mapping[str, Sequence[PodSummary]],
    settings: JobSettings,
    summary: engine.EngineStatus,
) -> tuple[Phase, str, str]:
    """The search succeeded: evaluate the chosen merge (the confirmed winner, else the best) on
    held-out tasks and export it."""
    stop = summary.message or "search finished"
    best = engine.chosen(summary)
    if not (spec.objective.held_out or spec.output.uri) or best is None:
        return "Succeeded", "Succeeded", stop
    owner = view.owner
    name = jobspec.job_name(owner, FINAL_CANDIDATE)
    job = _by_candidate(mine, "final").get(FINAL_CANDIDATE)
    outcome = outcome_of(job, pods.get(job.name, ())) if job else None
    if outcome is not None:
        return _final_outcome(draft, outcome, stop)
    if spec.suspend and draft.final is None:
        return "Suspended", "Suspended", "search finished; the final evaluation waits"
    draft.final = {"job": name, "trial": best["id"], "state": "Running"}
    if job is None:
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
            )
        )
    return "Running", "Finalizing", f"{stop}; evaluating {best['id']} (Job {name})"


def _final_outcome(draft: _Draft, outcome: TrialOutcome, stop: str) -> tuple[Phase, str, str]:
    final = dict(draft.final or {"job": outcome.job})
    if not outcome.succeeded:
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
) -> Plan:
    previous = view.status
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
    )
    active = set(draft.active)
    delete = [
        j.name
        for j in mine
        if j.role == "trial"
        and j.candidate not in active
        and j.state != "failed"  # failed trial Jobs stay for `kubectl logs`
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
    )
