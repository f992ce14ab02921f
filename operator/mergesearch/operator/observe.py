"""What the operator reads back from the cluster: Job and pod summaries, and trial outcomes.

Pure. The kopf indexes store these small summaries (not whole bodies), so memory stays
proportional to the trial Jobs that exist, each entry a few hundred bytes plus at most one
termination message (< 4 KiB). A trial's result is the runner's JSON in its pod's termination
message; it is parsed as data (json + pydantic), never evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from mergerunner.trial import RESULT_API_VERSION, FailureKind, TrialResult, unpack_result
from mergesearch.operator.jobs import (
    ANNOTATION_ATTEMPT,
    ANNOTATION_CANDIDATE,
    LABEL_ROLE,
    RUNNER_CONTAINER,
)
from mergesearch.operator.status import Reason, one_line

JobState = Literal["active", "succeeded", "failed"]
_RESULT_FIELDS = set(TrialResult.model_fields) | {
    f.alias for f in TrialResult.model_fields.values() if f.alias
}


@dataclass(frozen=True)
class JobSummary:
    """A trial Job as the reconcile needs it."""

    name: str
    owner_uid: str | None
    candidate: str
    role: str
    state: JobState
    started: bool = False
    reason: str | None = None
    deleting: bool = False
    attempt: int = 0
    created: str = ""
    pods: int = 0  # pods the Job controller counts (active, succeeded, failed)
    uid: str = ""
    # Warning events of the Job ((reason, message), e.g. FailedCreate when admission refuses
    # its pods): not indexed, read by the shell only for a Job that has no pod yet.
    warnings: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PodSummary:
    """A trial pod whose runner container has terminated (`exit_code` set), or one that is
    not running yet for a reason worth reporting (`waiting`: the kubelet's waiting reason,
    `Unschedulable`, or `ContainerCreating` while its volumes are set up)."""

    name: str
    job: str
    exit_code: int | None
    reason: str | None = None
    message: str | None = None
    finished_at: str = ""
    waiting: str | None = None
    created: str = ""
    # Warning events of the pod ((reason, message), e.g. FailedMount), read by the shell only
    # for a pod that has been waiting a while without a reason of its own.
    warnings: tuple[tuple[str, str], ...] = ()
    job_uid: str = ""  # the uid of the Job that made it: a Job of the same name made later
    # (a search resumed after a failure) must not inherit an earlier Job's pods

    @property
    def terminated(self) -> bool:
        return self.exit_code is not None

    def of(self, job: JobSummary) -> bool:
        return not (self.job_uid and job.uid) or self.job_uid == job.uid


@dataclass(frozen=True)
class TrialOutcome:
    """A finished trial: the runner's result, bound to the candidate and the Job (or warm
    lease) it answers. The result's own `id` is what the runner read ("?" when it could not
    read the document), so the binding is kept beside it, not inside it. Where no runner
    result exists (a pod killed for memory, a Job past its deadline) the result is made here
    from what Kubernetes reports, with no failed step."""

    candidate: str
    job: str
    result: TrialResult

    @property
    def succeeded(self) -> bool:
        return self.result.status == "succeeded"

    @property
    def reason(self) -> str:
        """One line for the engine's failure record, events and the status."""
        return one_line(self.result.summary)


# --------------------------------------------------------------------------- Jobs


def _controller_uid(meta: Mapping[str, Any]) -> str | None:
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def job_state(job_status: Mapping[str, Any]) -> tuple[JobState, str | None]:
    """From the Job's conditions: finished only when Complete or Failed is True (the Job
    controller sets them once its pods are accounted for)."""
    for cond in job_status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return "succeeded", None
        if cond.get("type") == "Failed":
            reason = cond.get("reason") or "Failed"
            message = cond.get("message")
            return "failed", one_line(f"{reason}: {message}" if message else reason)
    return "active", None


def job_summary(body: Mapping[str, Any]) -> JobSummary | None:
    """None for a Job that is not a trial Job (no candidate annotation)."""
    meta = body.get("metadata") or {}
    candidate = (meta.get("annotations") or {}).get(ANNOTATION_CANDIDATE)
    if not candidate:
        return None
    job_status = body.get("status") or {}
    state, reason = job_state(job_status)
    started = bool(
        job_status.get("ready")
        or job_status.get("succeeded")
        or job_status.get("failed")
        or state != "active"
    )
    attempt = (meta.get("annotations") or {}).get(ANNOTATION_ATTEMPT, "0")
    return JobSummary(
        name=meta["name"],
        owner_uid=_controller_uid(meta),
        candidate=candidate,
        role=(meta.get("labels") or {}).get(LABEL_ROLE, "trial"),
        state=state,
        started=started,
        reason=reason,
        deleting=bool(meta.get("deletionTimestamp")),
        attempt=int(attempt) if attempt.isdigit() else 0,
        created=str(meta.get("creationTimestamp") or ""),
        pods=sum(int(job_status.get(k) or 0) for k in ("active", "succeeded", "failed")),
        uid=str(meta.get("uid") or ""),
    )


# --------------------------------------------------------------------------- pods


def pod_summary(body: Mapping[str, Any]) -> PodSummary | None:
    """The runner container's terminated state; or, for a pod that is not running yet, why
    (`waiting`); None for a running pod (nothing to decide from it)."""
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    job = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
    if not job:
        return None
    pod_status = body.get("status") or {}
    job_uid = labels.get("batch.kubernetes.io/controller-uid") or labels.get("controller-uid")
    base = {
        "name": meta.get("name", ""),
        "job": job,
        "created": str(meta.get("creationTimestamp") or ""),
        "job_uid": str(job_uid or ""),
    }
    for container in pod_status.get("containerStatuses") or []:
        if container.get("name") != RUNNER_CONTAINER:
            continue
        state = container.get("state") or {}
        terminated = state.get("terminated")
        if terminated:
            return PodSummary(
                **base,
                exit_code=int(terminated.get("exitCode", -1)),
                reason=terminated.get("reason"),
                message=terminated.get("message"),
                finished_at=str(terminated.get("finishedAt") or ""),
            )
        waiting = state.get("waiting")
        if waiting and pod_status.get("phase") == "Pending" and not meta.get("deletionTimestamp"):
            reason = str(waiting.get("reason") or "ContainerCreating")
            return PodSummary(
                **base, exit_code=None, waiting=reason, message=waiting.get("message")
            )
        return None
    if pod_status.get("phase") not in (None, "Pending") or meta.get("deletionTimestamp"):
        return None
    for cond in pod_status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            why = str(cond.get("reason") or "Unschedulable")
            return PodSummary(**base, exit_code=None, waiting=why, message=cond.get("message"))
    return PodSummary(**base, exit_code=None, waiting="ContainerCreating")


# --------------------------------------------------------------------------- results


def parse_result(message: str | None, job: str) -> tuple[TrialResult | None, str | None]:
    """(result, None) or (None, why not). Unknown fields of a newer runner are ignored; a
    result for another trial id is refused."""
    if not message or not message.strip():
        return None, "no result in the termination message"
    try:
        data = json.loads(message)
    except json.JSONDecodeError as exc:
        return None, f"termination message is not JSON ({exc.msg})"
    if not isinstance(data, dict):
        return None, "termination message is not a JSON object"
    try:
        data = unpack_result(data)  # many scores come packed (TrialResult.termination_message)
    except ValueError as exc:
        return None, one_line(f"invalid result: {exc}")
    if data.get("apiVersion") != RESULT_API_VERSION:
        return None, f"unknown result apiVersion {str(data.get('apiVersion'))[:60]!r}"
    try:
        result = TrialResult.model_validate({k: v for k, v in data.items() if k in _RESULT_FIELDS})
    except ValidationError as exc:
        return None, one_line(f"invalid result: {exc.errors()[0]['msg']}")
    if result.id not in (job, "?"):
        return None, f"result is for trial {result.id[:80]!r}, not {job!r}"
    return result, None


def _latest(pods: Iterable[PodSummary]) -> list[PodSummary]:
    return sorted(pods, key=lambda p: (p.finished_at, p.name), reverse=True)


def outcome_of(job: JobSummary, pods: Iterable[PodSummary]) -> TrialOutcome | None:
    """The outcome of a finished Job from its pods' termination messages; None while active.

    A Complete Job's result comes from its pod that exited 0; a Failed Job's from its latest
    pod that left a result (the runner's failedStep and error), else from the pod's or the
    Job's reason (OOMKilled, DeadlineExceeded, BackoffLimitExceeded …).
    """
    if job.state == "active":
        return None
    pods = _latest(p for p in pods if p.terminated)
    if job.state == "succeeded":
        problems = []
        for pod in (p for p in pods if p.exit_code == 0):
            result, problem = parse_result(pod.message, job.name)
            if result is not None and result.status == "succeeded":
                return TrialOutcome(job.candidate, job.name, result)
            problems.append(problem or "the runner reported a failure but exited 0")
        error = problems[0] if problems else "no terminated pod found for the Job"
        return _without_result(job, None, error)
    for pod in pods:
        result, _ = parse_result(pod.message, job.name)
        if result is not None and result.status == "failed":
            return TrialOutcome(job.candidate, job.name, result)
    detail = [job.reason or "Job failed"]
    kind = _JOB_FAILURE_KINDS.get(job.reason or "")
    if pods:
        pod = pods[0]
        detail.append(f"pod {pod.name}: {pod.reason or 'Error'} (exit code {pod.exit_code})")
        kind = _POD_FAILURE_KINDS.get(pod.reason or "", kind)
    return _without_result(job, kind, one_line("; ".join(detail)))


def _without_result(job: JobSummary, kind: FailureKind | None, error: str) -> TrialOutcome:
    """A failed Job that left no runner result: what Kubernetes says, as a failed result."""
    return TrialOutcome(job.candidate, job.name, TrialResult.failed(job.name, None, kind, error))


# Failures that leave no runner result, by the reason Kubernetes gives: a container killed for
# memory will be killed again at the same limit; a trial past its deadline counts as failed.
_POD_FAILURE_KINDS = {"OOMKilled": FailureKind.OUT_OF_MEMORY}
_JOB_FAILURE_KINDS = {"DeadlineExceeded": FailureKind.TIMEOUT}


# --------------------------------------------------------------------------- pods that do not start


@dataclass(frozen=True)
class Blocker:
    """Why a trial's pod does not run: `fatal` for a configuration the pod will never get
    past (fail the search before any GPU time is spent), else a state that may clear by
    itself (wait, and say so in a condition). `reason` is the condition reason."""

    fatal: bool
    reason: Reason
    message: str


# The kubelet's waiting reasons and the scheduler's PodScheduled reason (reason codes, never
# message text). A missing Secret or ConfigMap key in env is CreateContainerConfigError; an
# image name that cannot be parsed, or one that must not be pulled, never starts. A failing
# pull may be a registry outage, and an unschedulable pod may fit once the cluster scales:
# both wait.
_WAITING: dict[str, tuple[bool, Reason]] = {
    "CreateContainerConfigError": (True, Reason.POD_CONFIG_INVALID),
    "InvalidImageName": (True, Reason.IMAGE_INVALID),
    "ErrImageNeverPull": (True, Reason.IMAGE_INVALID),
    "ErrImagePull": (False, Reason.IMAGE_PULL_BACK_OFF),
    "ImagePullBackOff": (False, Reason.IMAGE_PULL_BACK_OFF),
    "Unschedulable": (False, Reason.UNSCHEDULABLE),
}
# Warning events (their reason codes) of a pod that waits without a reason of its own, and of
# a Job that has no pod: a volume that cannot be set up (a missing Secret or ConfigMap is
# `FailedMount`, the pod stays ContainerCreating) and a pod that admission refused (Pod
# Security, a LimitRange: the Job controller's `FailedCreate`) are configuration.
_EVENTS: dict[str, tuple[bool, Reason]] = {
    "FailedMount": (True, Reason.VOLUME_UNAVAILABLE),
    "FailedCreate": (True, Reason.POD_REFUSED),
    "FailedScheduling": (False, Reason.UNSCHEDULABLE),
}
# Reasons that ask for a look at the object's events when the wait lasts.
SILENT_WAITING = frozenset({"ContainerCreating", "PodInitializing"})


def blocker_of(job: JobSummary, pods: Iterable[PodSummary]) -> Blocker | None:
    """The first reason, in the pods' states or their events or the Job's events, why an
    active trial Job does not run; None when nothing is known to be wrong."""
    waiting = [p for p in pods if not p.terminated and p.waiting]
    for pod in waiting:
        if pod.waiting in _WAITING:
            fatal, reason = _WAITING[pod.waiting]
            return Blocker(fatal, reason, _where(job, pod, pod.waiting, pod.message))
    for pod in waiting:
        for event, message in pod.warnings:
            if event in _EVENTS:
                fatal, reason = _EVENTS[event]
                return Blocker(fatal, reason, _where(job, pod, event, message))
    for event, message in job.warnings:
        if event in _EVENTS:
            fatal, reason = _EVENTS[event]
            return Blocker(fatal, reason, _where(job, None, event, message))
    return None


def _where(job: JobSummary, pod: PodSummary | None, what: str, message: str | None) -> str:
    place = f"trial Job {job.name}" + (f", pod {pod.name}" if pod else "")
    return one_line(f"{place}: {what}: {message or 'no detail'}", 600)
