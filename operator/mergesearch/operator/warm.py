"""Warm evaluators, the pure part: leases, the inbox of evaluator requests, manifests.

In `spec.execution.mode: warm` a search runs one evaluator Job (parallelism = completions =
spec.execution.parallelism) whose pods fetch the checkpoints once, keep them and one model
resident, and merge each candidate in place (`mergerunner evaluator`). They hold no Kubernetes
credentials: they lease candidates from, and post results to, the operator's evaluator endpoint
(`operator/server.py`) with a per-search bearer token from a Secret the operator creates.

Everything the search depends on lives in the status, written compare-and-set as in jobs mode:

- `activeTrials`: candidates issued and not yet told (bounded by parallelism, as before);
- `leases`: which active candidate is held by which evaluator pod, since when, until when, and
  how often it was issued. A lease ends when its result is told, when its holder pod is seen
  terminated or has been gone for `LEASE_GRACE_S`, or at its deadline (trialTimeoutSeconds);
  the candidate is then issued again, at most backoffLimit + 1 times in all, as a trial Job
  would be retried.

A result enters the search only through the reconcile that tells it and drops its candidate
from `activeTrials` in the same status write; a result for a candidate that is not active (a
duplicate, a lease that was re-issued and answered twice) is ignored. See docs/operator.md,
"Warm evaluators".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from mergerunner.contract import (
    ENV_EVALUATOR_NAME,
    ENV_EVALUATOR_TOKEN_FILE,
    ENV_EVALUATOR_URL,
    ExitCode,
)
from mergerunner.trial import FailureKind, TrialResult
from mergesearch.operator import jobs as jobspec
from mergesearch.operator.jobs import JobSettings, Owner
from mergesearch.operator.observe import TrialOutcome
from mergesearch.operator.status import EvaluatorCounts, LeaseEntry, MergeSearchStatus, one_line
from mergesearch.spec import MergeSearchSpec

EVALUATOR_CANDIDATE = "evaluators"  # the evaluator Job's candidate part and annotation
EVALUATOR_ROLE = "evaluator"
TOKEN_SECRET_CANDIDATE = "evaluator-token"  # noqa: S105 - a name, not a secret
TOKEN_KEY = "token"  # noqa: S105 - the key of the Secret
TOKEN_DIR = "/var/run/secrets/mergesearch/evaluator"  # noqa: S105 - a mount path
TOKEN_VOLUME = f"{jobspec.VOLUME_PREFIX}evaluator-token"
# A lease whose holder the operator cannot see (a deleted pod, a Kueue suspension) is released
# after this long; a pod that asked for work is alive, so index lag cannot release its lease.
LEASE_GRACE_S = 30
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# The evaluator exits 2 when its configuration is unusable (no token, the endpoint refuses
# it): a replacement pod would fail alike.
EXIT_CONFIG = int(ExitCode.BAD_INPUT)


# --------------------------------------------------------------------------- time


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)


def later(now: str, seconds: int) -> str:
    return (parse_time(now) + timedelta(seconds=seconds)).strftime(TIME_FORMAT)


# --------------------------------------------------------------------------- observed state


@dataclass(frozen=True)
class EvaluatorPod:
    """An evaluator pod as the operator's index sees it."""

    name: str
    terminated: bool = False
    reason: str | None = None
    exit_code: int | None = None
    ready: bool = False


def evaluator_pod(body: Mapping[str, Any]) -> EvaluatorPod | None:
    """The index entry of a pod of an evaluator Job; None for any other pod."""
    meta = body.get("metadata") or {}
    if (meta.get("labels") or {}).get(jobspec.LABEL_ROLE) != EVALUATOR_ROLE:
        return None
    pod_status = body.get("status") or {}
    for container in pod_status.get("containerStatuses") or []:
        if container.get("name") != jobspec.RUNNER_CONTAINER:
            continue
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            return EvaluatorPod(
                name=meta.get("name", ""),
                terminated=True,
                reason=terminated.get("reason"),
                exit_code=int(terminated.get("exitCode", -1)),
            )
        return EvaluatorPod(name=meta.get("name", ""), ready=bool(container.get("ready")))
    deleting = bool(meta.get("deletionTimestamp"))
    ended = pod_status.get("phase") in ("Failed", "Succeeded") or deleting
    name = meta.get("name", "")
    return EvaluatorPod(name=name, terminated=ended, reason=pod_status.get("reason"))


@dataclass(frozen=True)
class Posted:
    """A result an evaluator posted for the candidate it leased."""

    evaluator: str
    candidate: str
    result: TrialResult


@dataclass(frozen=True)
class Inbox:
    """What evaluators asked since the last status write: work (`requests`, evaluator pod
    names) and results. Held in the operator's memory only: a restart loses it, and the
    evaluators' retries (or, at worst, the leases' expiry) bring it back."""

    requests: tuple[str, ...] = ()
    results: tuple[Posted, ...] = ()
    fetched: Mapping[str, int] = field(default_factory=dict)  # evaluator → bytes it fetched


# --------------------------------------------------------------------------- leases


@dataclass(frozen=True)
class Lease:
    """An active candidate and who holds it; `evaluator` None: waiting to be (re-)issued."""

    trial: str
    evaluator: str | None = None
    since: str | None = None
    expires: str | None = None
    issued: int = 0

    def to_entry(self) -> LeaseEntry:
        if not self.evaluator:
            return LeaseEntry(trial=self.trial, issued=self.issued)
        return LeaseEntry(
            trial=self.trial,
            issued=self.issued,
            evaluator=self.evaluator,
            since=self.since,
            expires=self.expires,
        )

    @classmethod
    def of(cls, entry: LeaseEntry) -> Lease:
        return cls(
            trial=entry.trial,
            evaluator=entry.evaluator or None,
            since=entry.since,
            expires=entry.expires,
            issued=entry.issued,
        )


def read_leases(status: MergeSearchStatus) -> dict[str, Lease]:
    return {entry.trial: Lease.of(entry) for entry in status.leases or () if entry.trial}


@dataclass(frozen=True)
class Assignment:
    """The answer to an evaluator's request: its candidate and the trial document (the same
    document, hence digest, a trial Job of that candidate would run)."""

    candidate: str
    document: str


def collect_posted(
    active: Sequence[str], inbox: Inbox, job_of: Mapping[str, str]
) -> tuple[list[TrialOutcome], list[str]]:
    """(outcomes to tell, candidates ignored). A posted result counts only for an active
    candidate, once (the first in the inbox); any other is a duplicate. It need not come from
    the current holder: a lease re-issued after its holder looked lost may be answered by
    the first holder, and its answer is as good (the same document, a deterministic trial)."""
    accepted: dict[str, TrialOutcome] = {}
    ignored: list[str] = []
    for posted in inbox.results:
        cid = posted.candidate
        job = job_of.get(cid, "")
        # "?": a runner that could not read the document's id (as in a termination message)
        if cid not in active or cid in accepted or posted.result.id not in (job, "?"):
            ignored.append(cid)
            continue
        accepted[cid] = TrialOutcome(cid, job, posted.result)
    return list(accepted.values()), ignored


def release_lost(
    leases: dict[str, Lease],
    pods: Iterable[EvaluatorPod],
    inbox: Inbox,
    now: str,
    *,
    max_issues: int,
    job_of: Mapping[str, str],
) -> tuple[list[TrialOutcome], list[str]]:
    """Release leases whose holder is gone or whose deadline passed: (candidates that fail,
    one line per lease released to be issued again). A candidate issued `max_issues` times
    already fails instead (as a trial Job past its backoffLimit), and one whose holder was
    killed for memory fails with OUT_OF_MEMORY (the next would be too)."""
    seen = {p.name: p for p in pods}
    asking = set(inbox.requests) | {p.evaluator for p in inbox.results}
    failed: list[TrialOutcome] = []
    released: list[str] = []
    clock = parse_time(now)
    for cid, lease in list(leases.items()):
        if lease.evaluator is None:
            continue
        pod = seen.get(lease.evaluator)
        why: str | None = None
        kind: FailureKind | None = None
        if pod is not None and pod.terminated:
            why = f"evaluator {pod.name} ended ({pod.reason or 'Error'}, exit {pod.exit_code})"
            kind = FailureKind.OUT_OF_MEMORY if pod.reason == "OOMKilled" else None
        elif lease.expires and clock >= parse_time(lease.expires):
            why, kind = f"lease held by {lease.evaluator} expired", FailureKind.TIMEOUT
        elif (
            pod is None
            and lease.evaluator not in asking
            and lease.since
            and clock >= parse_time(lease.since) + timedelta(seconds=LEASE_GRACE_S)
        ):
            why = f"evaluator {lease.evaluator} is gone"
        if why is None:
            continue
        if kind is FailureKind.OUT_OF_MEMORY or lease.issued >= max_issues:
            del leases[cid]
            job = job_of.get(cid, "")
            failed.append(
                TrialOutcome(
                    cid,
                    job,
                    TrialResult.failed(
                        job, "evaluate", kind, one_line(f"{why}; issued {lease.issued} times")
                    ),
                )
            )
        else:
            leases[cid] = Lease(trial=cid, issued=lease.issued)
            released.append(f"{cid}: {why}; issued again")
    return failed, released


def assign(
    leases: dict[str, Lease],
    active: Sequence[str],
    requests: Iterable[str],
    now: str,
    deadline_s: int,
    due: Callable[[str], bool] = lambda _: True,
) -> dict[str, str]:
    """Evaluator → candidate for every request: the lease it already holds (a retried request
    gets the same answer), else the first active candidate nobody holds and that is `due` (not
    waiting out a retry's backoff after an outage), in `active` order."""
    for cid in active:
        leases.setdefault(cid, Lease(trial=cid))
    for cid in [c for c in leases if c not in active]:
        del leases[cid]
    holding = {lease.evaluator: cid for cid, lease in leases.items() if lease.evaluator}
    out: dict[str, str] = {}
    free = [cid for cid in active if leases[cid].evaluator is None and due(cid)]
    for evaluator in sorted(set(requests)):
        if evaluator in holding:
            out[evaluator] = holding[evaluator]
            continue
        if not free:
            continue
        cid = free.pop(0)
        leases[cid] = replace(
            leases[cid],
            evaluator=evaluator,
            since=now,
            expires=later(now, deadline_s),
            issued=leases[cid].issued + 1,
        )
        out[evaluator] = cid
    return out


def leases_status(leases: Mapping[str, Lease], active: Sequence[str]) -> list[LeaseEntry]:
    """In `activeTrials` order: equal decisions give equal documents (no spurious writes)."""
    return [leases[cid].to_entry() for cid in active if cid in leases]


def evaluators_status(
    leases: Mapping[str, Lease],
    pods: Sequence[EvaluatorPod],
    parallelism: int,
    fetched: Mapping[str, int] | None = None,
) -> EvaluatorCounts:
    """status.evaluators: wanted, running (pods not terminated), ready, busy (holding a
    lease), and bytesFetched: what the running evaluators report having fetched (all of them
    together; 0 for an evaluator that found the node cache filled)."""
    running = [p for p in pods if not p.terminated]
    names = {p.name for p in running}
    reported = [n for e, n in (fetched or {}).items() if e in names]
    return EvaluatorCounts(
        wanted=parallelism,
        running=len(running),
        ready=sum(1 for p in running if p.ready),
        busy=sum(1 for lease in leases.values() if lease.evaluator),
        bytes_fetched=sum(reported) if reported else None,
    )


# --------------------------------------------------------------------------- credentials


def search_token(key: bytes, owner: Owner) -> str:
    """The search's bearer token: HMAC-SHA256 of its identity under the operator's key.

    Derived, not stored: after a restart the operator recomputes it instead of reading the
    Secret back (so it needs `create` on Secrets, never `get`), and a search re-created under
    the same name (a new uid) gets a new token."""
    message = f"{owner.namespace}/{owner.name}/{owner.uid}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def token_matches(key: bytes, owner: Owner, presented: str) -> bool:
    return hmac.compare_digest(search_token(key, owner), presented)


def token_secret_name(owner: Owner) -> str:
    return jobspec.job_name(owner, TOKEN_SECRET_CANDIDATE)


def token_secret(owner: Owner, key: bytes) -> dict[str, Any]:
    """The per-search Secret the evaluators mount; owned by the search (garbage-collected)."""
    token = search_token(key, owner).encode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": token_secret_name(owner),
            "namespace": owner.namespace,
            "labels": {
                **jobspec.MANAGED_BY,
                jobspec.LABEL_SEARCH: jobspec.label_value(owner.name),
            },
            "annotations": {jobspec.ANNOTATION_SEARCH: owner.name},
            "ownerReferences": [owner.reference()],
        },
        "data": {TOKEN_KEY: base64.b64encode(token).decode()},
    }


# --------------------------------------------------------------------------- the evaluator Job


def lease_path(owner: Owner) -> str:
    return f"/v1/namespaces/{owner.namespace}/mergesearches/{owner.name}/lease"


def evaluator_job_name(owner: Owner) -> str:
    return jobspec.job_name(owner, EVALUATOR_CANDIDATE)


KUEUE_LABELS = ("kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class")


def evaluator_job(owner: Owner, spec: MergeSearchSpec, settings: JobSettings) -> dict[str, Any]:
    """The evaluator Job: the trial pod of `jobs.pod_template` (the same allow-list and
    enforced security; nothing of the template is copied here that a trial Job would not
    get), with the evaluator command instead of a trial document, the token Secret mounted
    read-only, and, when the operator is configured with a node cache directory, that
    directory (a subdirectory per namespace) as the checkpoint cache.

    A Job rather than a StatefulSet or bare pods: it is owned by the search (garbage-collected
    with it), replaces a lost pod under a new name (so a lease never outlives its holder's
    identity), completes when its evaluators exit 0 at the search's end, and `spec.suspend` is
    what Kueue's batch/Job integration uses to admit and preempt; the user's Kueue labels are
    copied from the template's labels to the Job."""
    if not settings.evaluator_url:
        raise ValueError("the operator serves no evaluator endpoint")
    name = evaluator_job_name(owner)
    labels = {
        **jobspec.MANAGED_BY,
        jobspec.LABEL_SEARCH: jobspec.label_value(owner.name),
        jobspec.LABEL_CANDIDATE: EVALUATOR_CANDIDATE,
        jobspec.LABEL_ROLE: EVALUATOR_ROLE,
    }
    annotations = {
        jobspec.ANNOTATION_CANDIDATE: EVALUATOR_CANDIDATE,
        jobspec.ANNOTATION_SEARCH: owner.name,
    }
    template = jobspec.pod_template(spec, "", settings, labels, annotations)
    pod = template["spec"]
    runner = pod["containers"][0]
    runner["command"] = list(settings.evaluator_command)
    runner["env"] = [e for e in runner["env"] if e["name"] != jobspec.ENV_TRIAL] + _evaluator_env(
        owner, settings
    )
    runner["volumeMounts"].append({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True})
    pod["volumes"].append(
        {"name": TOKEN_VOLUME, "secret": {"secretName": token_secret_name(owner)}}
    )
    if settings.node_cache_dir:
        for volume in pod["volumes"]:
            if volume["name"] == f"{jobspec.VOLUME_PREFIX}cache":
                volume.pop("emptyDir", None)
                volume["hostPath"] = {
                    "path": f"{settings.node_cache_dir.rstrip('/')}/{owner.namespace}",
                    "type": "DirectoryOrCreate",
                }
    user_labels = (template["metadata"].get("labels") or {}).items()
    job_labels = {**{k: v for k, v in user_labels if k in KUEUE_LABELS}, **labels}
    parallelism = spec.execution.parallelism
    job_spec = {
        "parallelism": parallelism,
        "completions": parallelism,
        # Each evaluator may be lost as often as a trial pod may be retried.
        "backoffLimit": parallelism * (spec.execution.backoff_limit + 1),
        "podFailurePolicy": jobspec.pod_failure_policy([EXIT_CONFIG]),
        "template": template,
    }
    return jobspec.job_manifest(owner, name, job_labels, annotations, job_spec)


def _evaluator_env(owner: Owner, settings: JobSettings) -> list[dict[str, Any]]:
    assert settings.evaluator_url
    return [
        {
            "name": ENV_EVALUATOR_URL,
            "value": settings.evaluator_url.rstrip("/") + lease_path(owner),
        },
        {"name": ENV_EVALUATOR_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": ENV_EVALUATOR_TOKEN_FILE, "value": f"{TOKEN_DIR}/{TOKEN_KEY}"},
    ]
