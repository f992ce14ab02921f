"""The pure reconcile: given status and observed Jobs, exactly which Jobs to create, which
results to tell, what status to write — driven against a small in-memory cluster."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from mergerunner.trial import FAILURE_POLICY, FailureKind, FailurePolicy, TrialResult, parse_trial
from mergesearch.operator import jobs as jobspec
from mergesearch.operator.jobs import JobSettings, Owner
from mergesearch.operator.observe import JobSummary, PodSummary
from mergesearch.operator.reconcile import Plan, SearchView, classify_failure, reconcile
from mergesearch.operator.status import MergeSearchStatus, decode_state
from support.statusdoc import condition

pytestmark = pytest.mark.unit

NOW = "2025-01-01T00:00:00Z"
OWNER = Owner(name="demo", namespace="team-a", uid="0000-uid-1")
SETTINGS = JobSettings(default_image="runner:test")


def make_spec(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "checkpoints": [
            {"name": "a", "uri": "s3://ckpt/a/"},
            {"name": "b", "uri": "s3://ckpt/b/"},
            {"name": "c", "uri": "s3://ckpt/c/"},
        ],
        "objective": {
            "heldIn": [{"task": "t1", "limit": 20}, {"task": "t2", "limit": 20}],
            "heldOut": [{"task": "t3"}],
        },
        "search": {"populationSize": 4, "maxGenerations": 2, "seed": 0},
        "execution": {"parallelism": 3, "maxFailedTrials": 3},
        "storage": {"endpoint": "http://s3:8333", "secretRef": {"name": "s3-creds"}},
        "output": {"uri": "s3://out/demo/"},
    }
    for path, value in changes.items():
        node = spec
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return spec


def scores_of(weights: dict[str, float]) -> dict[str, float]:
    """A smooth synthetic objective with an interior optimum."""
    return {
        "t1": 1 - (weights["a"] - 0.5) ** 2 - (weights["b"] - 0.3) ** 2,
        "t2": 1 - (weights["c"] - 0.2) ** 2,
        "t3": weights["a"],
    }


Runner = Callable[[dict[str, Any]], tuple[int, str]]


def good_runner(doc_json: dict[str, Any]) -> tuple[int, str]:
    doc = parse_trial(json.dumps(doc_json))
    scores = scores_of(doc.weights)
    held_in = {t.task: scores[t.task] for t in doc.held_in}
    result = TrialResult(
        id=doc.id,
        status="succeeded",
        held_in=held_in,
        held_out={t.task: scores[t.task] for t in doc.held_out},
        fitness=sum(held_in.values()) / len(held_in) if held_in else None,
        digest="sha256:" + "ab" * 32,
        output_uri=doc.output.uri if doc.output.save_model else None,
    )
    return 0, result.termination_message()


def failing_runner(step: str, error: str, kind: FailureKind | None = None) -> Runner:
    def run(doc_json: dict[str, Any]) -> tuple[int, str]:
        result = TrialResult(
            id=doc_json["id"], status="failed", failed_step=step, error_kind=kind, error=error
        )
        return 1, result.termination_message()

    return run


def preflight_passed() -> dict[str, Any]:
    """A status whose preflight passed: the searches below start with their trials (the
    preflight's own tests start from an empty status)."""
    passed = {"type": "Preflight", "status": "True", "reason": "Passed", "message": "passed"}
    return {"conditions": [{**passed, "lastTransitionTime": NOW, "observedGeneration": 1}]}


@dataclass
class Cluster:
    """Jobs as the indexes would show them; `finish` plays the Job controller and kubelet."""

    spec: dict[str, Any]
    status: dict[str, Any] = field(default_factory=preflight_passed)
    generation: int = 1
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    summaries: dict[str, JobSummary] = field(default_factory=dict)
    pods: dict[str, list[PodSummary]] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)
    max_unfinished: int = 0
    now: str = NOW
    annotations: dict[str, str] = field(default_factory=dict)
    settings: JobSettings = SETTINGS

    def view(self) -> SearchView:
        spec = copy.deepcopy(self.spec)
        status = MergeSearchStatus.read(self.status)
        return SearchView(OWNER, self.generation, spec, status, dict(self.annotations))

    def reconcile(self) -> Plan:
        jobs = list(self.summaries.values())
        return reconcile(self.view(), jobs, self.pods, self.settings, self.now)

    def step(self) -> Plan:
        plan = self.reconcile()
        self.apply(plan)
        return plan

    def apply(self, plan: Plan) -> None:
        if plan.changed:
            self.status = json.loads(json.dumps(plan.status.to_wire()))  # through the API server
        for manifest in plan.create:
            name = manifest["metadata"]["name"]
            if name in self.jobs:
                continue  # AlreadyExists
            self.jobs[name] = manifest
            self.created.append(name)
            self.summaries[name] = JobSummary(
                name=name,
                owner_uid=manifest["metadata"]["ownerReferences"][0]["uid"],
                candidate=manifest["metadata"]["annotations"][jobspec.ANNOTATION_CANDIDATE],
                role=manifest["metadata"]["labels"][jobspec.LABEL_ROLE],
                state="active",
                attempt=int(manifest["metadata"]["annotations"].get(jobspec.ANNOTATION_ATTEMPT, 0)),
            )
        for name in plan.delete:
            self.deleted.append(name)
            self.jobs.pop(name, None)
            self.summaries.pop(name, None)
            self.pods.pop(name, None)
        self.events.extend((e.type, e.reason) for e in plan.events)
        unfinished = [s for s in self.summaries.values() if s.state == "active"]
        self.max_unfinished = max(self.max_unfinished, len(unfinished))

    def document(self, name: str) -> dict[str, Any]:
        env = self.jobs[name]["spec"]["template"]["spec"]["containers"][0]["env"]
        return json.loads(next(e["value"] for e in env if e["name"] == jobspec.ENV_TRIAL))

    def finish(self, name: str, runner: Runner = good_runner) -> None:
        code, message = runner(self.document(name))
        state = "succeeded" if code == 0 else "failed"
        self.summaries[name] = replace(
            self.summaries[name], state=state, started=True, reason=None if code == 0 else "x"
        )
        self.pods[name] = [PodSummary(f"{name}-p", name, code, None, message, NOW)]

    def finish_all(self, runner: Runner = good_runner) -> None:
        for name, summary in list(self.summaries.items()):
            if summary.state == "active":
                self.finish(name, runner)

    def run_to_end(self, runner: Runner = good_runner, limit: int = 200) -> None:
        for _ in range(limit):
            self.step()
            if self.status.get("phase") in ("Succeeded", "Failed"):
                return
            self.finish_all(runner)
        raise AssertionError("the search did not end")


# --------------------------------------------------------------------------- launching


def test_first_reconcile_starts_the_engine_and_launches_up_to_parallelism() -> None:
    cluster = Cluster(make_spec())
    plan = cluster.step()
    assert plan.changed and len(plan.create) == 3
    assert cluster.status["phase"] == "Pending"  # nothing has started yet
    assert decode_state(cluster.status["optimizer"]).format == "mergesearch.engine/v1"
    active = cluster.status["activeTrials"]
    assert active == ["b-each-a", "b-each-b", "b-each-c"]  # baselines first
    assert [m["metadata"]["name"] for m in plan.create] == [
        jobspec.job_name(OWNER, cid) for cid in active
    ]
    assert cluster.status["trials"]["running"] == 3
    assert ("Normal", "Started") in cluster.events


def test_a_repeat_with_the_same_inputs_creates_nothing_new() -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    again = cluster.reconcile()
    assert not again.changed and again.create == () and again.delete == ()
    assert again.events == ()


def test_an_active_trial_whose_job_is_missing_gets_the_same_job_again() -> None:
    cluster = Cluster(make_spec())
    first = cluster.step()
    lost = first.create[1]["metadata"]["name"]
    del cluster.summaries[lost]  # the index has not seen it yet, or a crash lost the create
    plan = cluster.reconcile()
    assert not plan.changed
    assert [m["metadata"]["name"] for m in plan.create] == [lost]
    assert plan.create[0] == first.create[1]  # identical manifest: AlreadyExists at worst


def test_finished_results_are_told_once_and_their_jobs_deleted() -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    name = jobspec.job_name(OWNER, "b-each-a")
    cluster.finish(name)
    plan = cluster.step()
    assert plan.applied == ("b-each-a",)
    assert name in plan.delete
    assert "b-each-a" not in cluster.status["activeTrials"]
    assert cluster.status["trials"]["succeeded"] == 1
    assert cluster.status["phase"] == "Running"
    # The freed slot went to the next pending candidate (uniform), still 3 active.
    assert len(cluster.status["activeTrials"]) == 3
    assert "b-uniform" in cluster.status["activeTrials"]
    # The same finished Job seen again (an index that lags the delete) tells nothing.
    cluster.summaries[name] = replace(
        JobSummary(name, OWNER.uid, "b-each-a", "trial", "succeeded"), started=True
    )
    again = cluster.reconcile()
    assert again.applied == () and again.create == ()
    assert again.status.to_wire()["trials"] == cluster.status["trials"]


def test_parallelism_is_never_exceeded_over_a_whole_search() -> None:
    cluster = Cluster(make_spec(**{"execution.parallelism": 2}))
    cluster.run_to_end()
    assert cluster.max_unfinished <= 2
    assert cluster.status["phase"] == "Succeeded"


def unseen_runner(doc_json: dict[str, Any]) -> tuple[int, str]:
    """On the confirmation examples the uniform merge scores best: a winner's-curse world."""
    code, message = good_runner(doc_json)
    if doc_json.get("subset") != "confirmation":
        return code, message
    result = json.loads(message)
    uniform = all(abs(w - 1 / 3) < 1e-9 for w in doc_json["weights"].values())
    result["heldIn"] = {t: v + (0.5 if uniform else -0.1) for t, v in result["heldIn"].items()}
    return code, json.dumps(result)


def test_a_whole_search_succeeds_with_a_final_evaluation_and_export() -> None:
    cluster = Cluster(make_spec())
    docs: list[dict[str, Any]] = []
    cluster.run_to_end(lambda doc: (docs.append(doc), unseen_runner(doc))[1])
    status = cluster.status
    final = jobspec.job_name(OWNER, jobspec.FINAL_CANDIDATE)
    winner = status["winner"]
    # chosen on the unseen examples: the uniform merge, not the search's best
    assert winner["trial"] == "b-uniform" != status["best"]["trial"]
    assert winner["fitness"] > winner["searchFitness"]
    assert status["final"] == {"job": final, "trial": winner["trial"], "state": "Succeeded"}
    doc = cluster.document(final)
    assert [t["task"] for t in doc["heldOut"]] == ["t3"] and not doc.get("heldIn")
    assert doc["output"] == {"uri": "s3://out/demo/", "saveModel": True}
    assert doc["weights"] == winner["weights"] and "subset" not in doc
    assert status["output"] == {"uri": "s3://out/demo/", "digest": "sha256:" + "ab" * 32}
    assert winner["heldOut"] == {"t3": pytest.approx(winner["weights"]["a"])}
    assert status["iteration"] == 2 and status["trials"]["running"] == 0
    # the 5 best search trials and every evaluated baseline, side by side
    confirmation = status["confirmation"]
    assert [c["kind"] for c in confirmation].count("search") == 5
    assert all(c["status"] == "succeeded" and "searchFitness" in c for c in confirmation)
    confirm_docs = [d for d in docs if d.get("subset") == "confirmation"]
    assert len(confirm_docs) == len(confirmation)
    assert all(d["subset"] == "confirmation" and not d.get("heldOut") for d in confirm_docs)
    # 3 'each', uniform, merge-best (unless it is one checkpoint's), 2 generations of 4,
    # then the confirmations
    searched = status["trials"]["total"] - len(confirmation)
    assert status["trials"]["finished"] == status["trials"]["total"] and searched in (12, 13)
    assert condition(status, "Ready")["status"] == "True"
    assert condition(status, "Progressing")["status"] == "False"
    assert condition(status, "Failed")["status"] == "False"
    assert status["completionTime"] == NOW
    reasons = [r for _, r in cluster.events]
    for milestone in ("Started", "BaselinesDone", "NewBest", "Finalizing", "Succeeded"):
        assert milestone in reasons
    # Finished: later reconciles change nothing and create nothing.
    after = cluster.reconcile()
    assert not after.changed and after.create == () and after.idle


def test_no_final_job_without_held_out_tasks_or_output() -> None:
    spec = make_spec(**{"objective.heldOut": [], "output": {}})
    cluster = Cluster(spec)
    cluster.run_to_end()
    assert cluster.status["phase"] == "Succeeded"
    assert "final" not in cluster.status
    assert all(not n.endswith("-final") for n in cluster.created)


def test_jobs_of_another_search_with_the_same_name_are_ignored() -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    stranger = replace(next(iter(cluster.summaries.values())), owner_uid="old-uid")
    cluster.summaries = {"x": replace(stranger, name="x", state="succeeded")}
    plan = cluster.reconcile()
    assert plan.applied == () and "x" not in plan.delete
    assert len(plan.create) == 3  # its own Jobs are missing: created again


# --------------------------------------------------------------------------- suspend


def test_suspend_launches_nothing_collects_running_and_resume_continues() -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    cluster.spec["suspend"] = True
    cluster.generation = 2
    cluster.finish(jobspec.job_name(OWNER, "b-each-a"))
    plan = cluster.step()
    assert plan.create == () and plan.applied == ("b-each-a",)
    assert cluster.status["phase"] == "Suspended"
    assert condition(cluster.status, "Progressing")["reason"] == "Suspended"
    assert len(cluster.status["activeTrials"]) == 2
    assert ("Normal", "Suspended") in cluster.events
    cluster.finish_all()
    cluster.step()
    assert cluster.status["activeTrials"] == [] and cluster.status["phase"] == "Suspended"
    before = cluster.status["trials"]
    cluster.spec["suspend"] = False
    cluster.generation = 3
    plan = cluster.step()
    assert len(plan.create) == 3 and cluster.status["phase"] == "Running"
    assert cluster.status["trials"]["finished"] == before["finished"] == 3
    assert ("Normal", "Resumed") in cluster.events
    cluster.run_to_end()
    assert cluster.status["phase"] == "Succeeded"


# --------------------------------------------------------------------------- failures


def test_failed_trials_are_told_as_failures_until_max_failed_trials_fails_the_search() -> None:
    cluster = Cluster(make_spec(**{"execution.maxFailedTrials": 1}))
    crash = failing_runner("evaluate", "RuntimeError: CUDA out of memory")
    cluster.step()
    cluster.finish(jobspec.job_name(OWNER, "b-each-a"), crash)
    cluster.step()
    assert cluster.status["trials"]["failed"] == 1 and cluster.status["phase"] == "Running"
    assert ("Warning", "TrialFailed") in cluster.events
    assert cluster.status["recentFailures"][0]["reason"].startswith("evaluate: RuntimeError")
    cluster.finish(jobspec.job_name(OWNER, "b-each-b"), crash)
    plan = cluster.step()
    assert cluster.status["phase"] == "Failed"
    failed = condition(cluster.status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "MaxFailedTrials"
    assert cluster.status["activeTrials"] == []
    still_running = [n for n, s in cluster.summaries.items() if s.state == "active"]
    assert still_running == []  # abandoned trial Jobs were deleted
    assert jobspec.job_name(OWNER, "b-each-c") in plan.delete
    assert ("Warning", "MaxFailedTrials") in cluster.events
    # failed Jobs are kept for `kubectl logs`
    assert jobspec.job_name(OWNER, "b-each-a") in cluster.jobs


def test_a_search_where_every_trial_fails_ends_as_no_successful_trial() -> None:
    # Whole generations without a success must survive the status round trip too.
    cluster = Cluster(make_spec(**{"execution.maxFailedTrials": 1000}))
    cluster.run_to_end(failing_runner("evaluate", "RuntimeError: CUDA out of memory"))
    failed = condition(cluster.status, "Failed")
    assert cluster.status["phase"] == "Failed" and failed["reason"] == "NoSuccessfulTrial"
    assert cluster.status["iteration"] == 2 and len(cluster.status["history"]) == 2
    assert "best" not in cluster.status


def test_a_job_that_failed_without_a_result_is_a_failed_trial_with_the_pod_reason() -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    name = jobspec.job_name(OWNER, "b-each-b")
    cluster.summaries[name] = replace(
        cluster.summaries[name], state="failed", reason="BackoffLimitExceeded"
    )
    cluster.pods[name] = [PodSummary(f"{name}-p", name, 137, "Error", "", NOW)]
    cluster.step()
    assert cluster.status["trials"]["failed"] == 1
    reason = cluster.status["recentFailures"][0]["reason"]
    assert "BackoffLimitExceeded" in reason and "Error" in reason and "137" in reason
    assert cluster.status["phase"] == "Running"  # a crash is not a configuration error


def test_a_pod_killed_for_memory_fails_the_search_at_once() -> None:
    # Every candidate merges a model of the same shape: the next pod is killed at the same limit.
    cluster = Cluster(make_spec())
    cluster.step()
    name = jobspec.job_name(OWNER, "b-each-b")
    cluster.summaries[name] = replace(
        cluster.summaries[name], state="failed", reason="BackoffLimitExceeded"
    )
    cluster.pods[name] = [PodSummary(f"{name}-p", name, 137, "OOMKilled", "", NOW)]
    cluster.step()
    failed = condition(cluster.status, "Failed")
    assert cluster.status["phase"] == "Failed" and failed["reason"] == "OutOfMemory"
    assert "OOMKilled" in failed["message"]


K = FailureKind


@pytest.mark.parametrize(
    ("step", "kind", "error", "reason"),
    [
        ("fetch", K.CHECKPOINT_UNAVAILABLE, "s3://ckpt/a/: not found", "CheckpointUnavailable"),
        ("fetch", K.STORAGE_UNAVAILABLE, "s3://ckpt/a/: unreachable", "StorageUnreachable"),
        ("fetch", K.CHECKPOINT_INVALID, "s3://ckpt/a/: invalid checkpoint", "CheckpointInvalid"),
        ("merge", K.CHECKPOINTS_INCOMPATIBLE, "tensor lm_head.weight", "CheckpointsIncompatible"),
        ("evaluate", K.UNKNOWN_TASK, "EvaluationError: unknown task t9", "UnknownTask"),
        ("evaluate", K.UNKNOWN_METRIC, "EvaluationError: metric acc", "UnknownMetric"),
        ("evaluate", K.DATA_MISSING, "EvaluationError: no examples", "DataMissing"),
        ("evaluate", K.CONFIG, "EvaluationError: backend", "ConfigInvalid"),
        ("evaluate", K.OUT_OF_MEMORY, "OutOfMemoryError: CUDA", "OutOfMemory"),
        ("input", K.INVALID_INPUT, "weights: missing checkpoint", "TrialRejected"),
    ],
)
def test_configuration_errors_from_the_first_trials_fail_the_search_in_one_reconcile(
    step: str, kind: FailureKind, error: str, reason: str
) -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    cluster.finish(jobspec.job_name(OWNER, "b-each-a"), failing_runner(step, error, kind))
    plan = cluster.step()
    failed = condition(cluster.status, "Failed")
    assert cluster.status["phase"] == "Failed" and failed["reason"] == reason
    assert "b-each-a" in failed["message"] and error.split(":")[0] in failed["message"]
    assert plan.create == () and cluster.status["activeTrials"] == []
    assert cluster.reconcile().changed is False  # final: nothing is retried


STORAGE_DOWN = failing_runner(
    "fetch", "FetchError: s3://ckpt/b/: unreachable: timed out", K.STORAGE_UNAVAILABLE
)


def later(now: str, seconds: float) -> str:
    from mergesearch.operator.reconcile import later as add

    return add(now, seconds)


def test_an_object_store_outage_is_retried_with_backoff_and_not_counted() -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    cluster.finish(jobspec.job_name(OWNER, "b-each-a"))
    cluster.step()
    first = jobspec.job_name(OWNER, "b-each-b")
    cluster.finish(first, STORAGE_DOWN)
    plan = cluster.step()
    status = cluster.status
    assert status["phase"] == "Running" and status["trials"]["failed"] == 0
    assert "b-each-b" in status["activeTrials"] and plan.applied == ()
    assert first in plan.delete and plan.wake_after == pytest.approx(15)
    assert status["retries"] == [
        {
            "trial": "b-each-b",
            "attempt": 1,
            "notBefore": later(NOW, 15),
            "reason": "fetch: FetchError: s3://ckpt/b/: unreachable: timed out",
        }
    ]
    waiting = condition(status, "StorageUnavailable")
    assert waiting["status"] == "True" and "b-each-b" in waiting["message"]
    assert ("Warning", "StorageUnavailable") in cluster.events
    # Before the backoff is over, nothing is re-created (even though the Job is gone) ...
    cluster.now = later(NOW, 10)
    assert cluster.reconcile().create == ()
    # ... after it, the trial runs again under a Job name of its own.
    cluster.now = later(NOW, 16)
    plan = cluster.step()
    retry = jobspec.job_name(OWNER, "b-each-b", 1)
    assert [m["metadata"]["name"] for m in plan.create] == [retry]
    assert cluster.document(retry)["id"] == retry
    # The old attempt's Job, seen again by a lagging index, is not the trial's result.
    cluster.summaries[first] = JobSummary(first, OWNER.uid, "b-each-b", "trial", "failed")
    cluster.pods[first] = [PodSummary("p", first, 1, None, STORAGE_DOWN({"id": first})[1], NOW)]
    assert cluster.reconcile().applied == ()
    del cluster.summaries[first], cluster.pods[first]
    cluster.finish(retry)
    plan = cluster.step()
    assert plan.applied == ("b-each-b",) and retry in plan.delete
    assert cluster.status["trials"]["failed"] == 0 and "retries" not in cluster.status
    assert condition(cluster.status, "StorageUnavailable")["status"] == "False"
    cluster.run_to_end()
    assert cluster.status["phase"] == "Succeeded" and cluster.status["trials"]["failed"] == 0


def test_a_trial_retried_too_often_counts_as_a_failure() -> None:
    from mergerunner.trial import RETRY_LIMIT, backoff_s

    cluster = Cluster(make_spec())
    cluster.step()
    cluster.finish(jobspec.job_name(OWNER, "b-each-a"))
    cluster.step()
    waits = []
    for attempt in range(RETRY_LIMIT + 1):
        cluster.finish(jobspec.job_name(OWNER, "b-each-b", attempt), STORAGE_DOWN)
        plan = cluster.step()
        waits.append(plan.wake_after)
        cluster.now = later(cluster.now, 400)
        cluster.step()
    assert waits[:6] == [15, 30, 60, 120, 240, 300] and backoff_s(RETRY_LIMIT) == 300
    assert cluster.status["trials"]["failed"] == 1 and "retries" not in cluster.status


def test_an_outage_before_any_success_is_a_misconfigured_endpoint() -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    cluster.finish(jobspec.job_name(OWNER, "b-each-b"), STORAGE_DOWN)
    cluster.step()
    assert condition(cluster.status, "Failed")["reason"] == "StorageUnreachable"


def test_classify_failure_decides_from_the_kind_never_from_the_message() -> None:
    from mergesearch.operator.observe import TrialOutcome

    def failed(step: str | None, kind: FailureKind | None, error: str) -> TrialOutcome:
        return TrialOutcome("g000-c01", "j", TrialResult.failed("j", step, kind, error))

    # A message that reads like a configuration error but carries no fatal kind is counted.
    untyped = failed("evaluate", None, "unknown task")
    disk = failed("merge", K.INTERNAL, "disk full")
    nan = failed("merge", K.NON_FINITE, "failed")
    assert classify_failure(untyped, first_trials=True) is None
    assert classify_failure(disk, first_trials=True) is None
    assert classify_failure(nan, first_trials=True) is None
    worded = failed(None, K.UNKNOWN_TASK, "reworded")
    assert classify_failure(worded, first_trials=False) is not None


def test_every_fatal_failure_kind_has_a_condition_reason() -> None:
    from mergesearch.operator.reconcile import FATAL_REASONS

    fatal = {k for k, p in FAILURE_POLICY.items() if p is FailurePolicy.FATAL}
    assert fatal == set(FATAL_REASONS)
    assert set(FAILURE_POLICY) == set(FailureKind)


def to_final(cluster: Cluster) -> None:
    for _ in range(100):
        cluster.step()
        if cluster.status.get("final"):
            return
        cluster.finish_all()
    raise AssertionError("no final evaluation")


DENIED = failing_runner("upload", "FetchError: s3://out/: access denied", K.CHECKPOINT_UNAVAILABLE)


def test_a_final_evaluation_that_fails_for_good_can_be_retried_by_annotation() -> None:
    cluster = Cluster(make_spec())
    to_final(cluster)
    best = copy.deepcopy(cluster.status["best"])
    final = jobspec.job_name(OWNER, jobspec.FINAL_CANDIDATE)
    cluster.finish(final, DENIED)
    cluster.step()
    failed = condition(cluster.status, "Failed")
    assert cluster.status["phase"] == "Failed" and failed["reason"] == "FinalizationFailed"
    assert "access denied" in failed["message"]
    assert cluster.status["final"]["state"] == "Failed"
    assert cluster.status["best"] == best  # the best weights and scores are kept
    chosen = cluster.status.get("winner") or cluster.status["best"]
    assert not cluster.reconcile().changed  # not retried by itself
    # Access fixed; the documented retry: a new value of the annotation.
    cluster.annotations["mergesearch.io/retry-finalization"] = "1"
    plan = cluster.step()
    retry = jobspec.job_name(OWNER, jobspec.FINAL_CANDIDATE, 1)
    assert [m["metadata"]["name"] for m in plan.create] == [retry]
    assert cluster.status["phase"] == "Running" and "completionTime" not in cluster.status
    assert condition(cluster.status, "Failed")["status"] == "False"
    cluster.finish(retry)
    cluster.step()
    assert cluster.status["phase"] == "Succeeded", cluster.status["conditions"]
    assert cluster.status["best"]["weights"] == best["weights"]
    assert cluster.status["final"]["state"] == "Succeeded"
    assert "heldOut" in (cluster.status.get("winner") or cluster.status["best"])
    assert (cluster.status.get("winner") or cluster.status["best"])["weights"] == chosen["weights"]
    # The same annotation value again does nothing.
    assert not cluster.reconcile().changed


def test_a_storage_blip_during_finalization_is_retried_with_backoff() -> None:
    cluster = Cluster(make_spec())
    to_final(cluster)
    final = jobspec.job_name(OWNER, jobspec.FINAL_CANDIDATE)
    cluster.finish(final, STORAGE_DOWN)
    plan = cluster.step()
    assert cluster.status["phase"] == "Running" and final in plan.delete
    assert cluster.status["final"]["state"] == "Retrying"
    assert condition(cluster.status, "StorageUnavailable")["status"] == "True"
    assert ("Warning", "FinalizationRetried") in cluster.events
    assert plan.wake_after == pytest.approx(15)
    assert cluster.reconcile().create == ()
    cluster.now = later(NOW, 15)
    plan = cluster.step()
    retry = jobspec.job_name(OWNER, jobspec.FINAL_CANDIDATE, 1)
    assert [m["metadata"]["name"] for m in plan.create] == [retry]
    cluster.finish(retry)
    cluster.step()
    assert cluster.status["phase"] == "Succeeded"
    assert condition(cluster.status, "StorageUnavailable")["status"] == "False"
    assert cluster.status["output"]["uri"] == "s3://out/demo/"


def test_a_crashing_final_evaluation_is_tried_three_times() -> None:
    cluster = Cluster(make_spec())
    to_final(cluster)
    crash = failing_runner("evaluate", "RuntimeError: boom")
    for attempt in range(3):
        cluster.finish(jobspec.job_name(OWNER, jobspec.FINAL_CANDIDATE, attempt), crash)
        cluster.step()
        cluster.now = later(cluster.now, 100)
        cluster.step()
    failed = condition(cluster.status, "Failed")
    assert failed["reason"] == "FinalizationFailed" and "boom" in failed["message"]


# --------------------------------------------------------------------------- spec problems


def test_an_invalid_spec_is_a_condition_and_is_not_retried_until_the_spec_changes() -> None:
    cluster = Cluster(make_spec(**{"search.sigma0": -1}))
    plan = cluster.step()
    failed = condition(cluster.status, "Failed")
    assert cluster.status["phase"] == "Failed" and failed["reason"] == "SpecInvalid"
    assert "spec.search.sigma0" in failed["message"] and failed["observedGeneration"] == 1
    assert plan.create == () and ("Warning", "SpecInvalid") in cluster.events
    again = cluster.reconcile()
    assert not again.changed and again.idle
    cluster.spec["search"]["sigma0"] = 0.3
    cluster.generation = 2
    plan = cluster.step()
    assert len(plan.create) == 3 and cluster.status["phase"] == "Pending"
    assert condition(cluster.status, "Failed")["status"] == "False"


def test_an_engine_configuration_error_names_the_spec_field() -> None:
    cluster = Cluster(make_spec(**{"search.maxTrials": 2}))
    cluster.step()
    failed = condition(cluster.status, "Failed")
    assert failed["reason"] == "SpecInvalid" and "spec.search.maxTrials" in failed["message"]


def test_a_malformed_pod_template_is_a_condition_not_a_crash() -> None:
    cluster = Cluster(make_spec(**{"execution.template": {"spec": {"containers": "oops"}}}))
    cluster.step()
    failed = condition(cluster.status, "Failed")
    assert failed["reason"] == "TemplateInvalid" and "template" in failed["message"]


def test_a_template_outside_the_allow_list_is_refused_before_any_job() -> None:
    """The confused-deputy attack: a sidecar reading a Secret and a hostPath. Refused in the
    first reconcile, naming each field; no Job, no engine state; fixing the spec resumes."""
    hostile = {
        "spec": {
            "containers": [
                {"name": "runner", "resources": {"requests": {"cpu": "1"}}},
                {"name": "thief", "image": "busybox", "command": ["cat", "/s/token"]},
            ],
            "volumes": [
                {"name": "s", "secret": {"secretName": "db-password"}},
                {"name": "h", "hostPath": {"path": "/etc/kubernetes"}},
            ],
        }
    }
    cluster = Cluster(make_spec(**{"execution.template": hostile}))
    plan = cluster.step()
    assert plan.create == () and cluster.created == []
    failed = condition(cluster.status, "Failed")
    assert cluster.status["phase"] == "Failed" and failed["reason"] == "TemplateInvalid"
    for field_path in (
        "spec.execution.template.spec.containers[1]",
        "spec.execution.template.spec.volumes[0].secret",
        "spec.execution.template.spec.volumes[1].hostPath",
    ):
        assert field_path in failed["message"]
    assert "optimizer" not in cluster.status
    assert cluster.reconcile().create == ()  # blocked until the spec changes
    cluster.spec["execution"]["template"] = {
        "spec": {"containers": [hostile["spec"]["containers"][0]]}
    }
    cluster.generation = 2
    plan = cluster.step()
    assert len(plan.create) == 3 and cluster.status["phase"] == "Pending"
    assert ("Warning", "NoResourceRequests") not in cluster.events  # it asks for a CPU


def test_custom_tasks_from_a_local_path_fail_the_first_reconcile_by_field() -> None:
    objective = {"heldIn": [{"task": "t1", "limit": 20}], "customTasks": {"path": "/home/me/tasks"}}
    cluster = Cluster(make_spec(objective=objective))
    cluster.step()
    failed = condition(cluster.status, "Failed")
    assert failed["reason"] == "SpecInvalid" and cluster.created == []
    assert failed["message"].startswith("spec.objective.customTasks.path: ")


def test_a_root_user_in_the_template_is_refused_up_front() -> None:
    """runAsNonRoot is enforced, so runAsUser 0 would never start on a kubelet: the trial would
    wait for its deadline. Refused instead, naming the field."""
    template = {"spec": {"containers": [{"securityContext": {"runAsUser": 0}}]}}
    cluster = Cluster(make_spec(**{"execution.template": template}))
    cluster.step()
    failed = condition(cluster.status, "Failed")
    assert failed["reason"] == "TemplateInvalid" and cluster.created == []
    assert (
        "spec.execution.template.spec.containers[0].securityContext.runAsUser"
        in (failed["message"])
    )


def test_a_template_without_resource_requests_is_warned_about_once() -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    cluster.finish_all()
    cluster.step()
    assert cluster.events.count(("Warning", "NoResourceRequests")) == 1
    assert cluster.status["phase"] == "Running"


def test_budgets_may_change_while_running_but_other_fields_may_not() -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    cluster.spec["search"]["maxGenerations"] = 5
    cluster.generation = 2
    cluster.step()
    assert decode_state(cluster.status["optimizer"]).config.max_generations == 5
    assert cluster.status["phase"] == "Pending"
    cluster.spec["search"]["seed"] = 7  # the CRD forbids this; the operator refuses it too
    cluster.generation = 3
    cluster.step()
    failed = condition(cluster.status, "Failed")
    assert cluster.status["phase"] == "Failed" and failed["reason"] == "SpecChanged"


def test_a_corrupt_optimizer_state_is_a_condition() -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    cluster.status["optimizer"] = {"format": "something-else"}
    cluster.step()
    assert condition(cluster.status, "Failed")["reason"] == "StateInvalid"


def test_a_spec_changed_back_to_what_the_search_started_with_recovers() -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    cluster.spec["search"].pop("populationSize")  # an old CRD let this through
    cluster.generation = 2
    cluster.step()
    assert condition(cluster.status, "Failed")["reason"] == "SpecChanged"
    assert not cluster.reconcile().changed  # waits for the next spec change
    cluster.spec["search"]["populationSize"] = 4
    cluster.generation = 3
    cluster.step()
    assert cluster.status["phase"] in ("Pending", "Running")
    assert condition(cluster.status, "Failed")["status"] == "False"
    cluster.run_to_end()
    assert cluster.status["phase"] == "Succeeded"


# --------------------------------------------------------------------------- kept Jobs, quota


def test_a_job_that_completed_without_a_result_is_kept_for_its_logs() -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    name = jobspec.job_name(OWNER, "b-each-a")
    cluster.summaries[name] = replace(cluster.summaries[name], state="succeeded", started=True)
    cluster.pods[name] = [PodSummary(f"{name}-p", name, 0, "Completed", "", NOW)]
    plan = cluster.step()
    assert cluster.status["trials"]["failed"] == 1
    assert "no result" in cluster.status["recentFailures"][0]["reason"]
    assert name not in plan.delete and name in cluster.jobs
    assert name not in cluster.reconcile().delete


def test_kept_failed_jobs_are_bounded_by_the_recent_failures() -> None:
    cluster = Cluster(make_spec(**{"execution.maxFailedTrials": 1000}))
    cluster.run_to_end(failing_runner("evaluate", "RuntimeError: boom"))
    failed = {f["id"] for f in cluster.status["recentFailures"]}
    kept = {s.candidate for s in cluster.summaries.values()}
    assert cluster.status["trials"]["failed"] > 10 and len(failed) == 10
    assert kept == failed


def test_while_a_quota_refuses_jobs_no_failed_job_is_kept() -> None:
    from mergesearch.operator.reconcile import quota_cleared, quota_refused

    cluster = Cluster(make_spec())
    cluster.step()
    name = jobspec.job_name(OWNER, "b-each-a")
    cluster.finish(name, failing_runner("evaluate", "RuntimeError: boom"))
    assert name not in cluster.step().delete  # kept for its logs
    refused = quota_refused(cluster.view(), "x-job", "exceeded quota: q", 2, NOW)
    assert refused.changed and [e.reason for e in refused.events] == ["QuotaExceeded"]
    cluster.apply(refused)
    cond = condition(cluster.status, "QuotaExceeded")
    assert cond["status"] == "True" and "x-job" in cond["message"]
    assert not quota_refused(cluster.view(), "x-job", "exceeded quota: q", 2, NOW).events
    plan = cluster.step()
    assert name in plan.delete  # the kept Job would hold the quota a trial needs
    assert condition(cluster.status, "QuotaExceeded")["status"] == "True"  # kept by reconcile
    cluster.apply(quota_cleared(cluster.view(), NOW))
    assert condition(cluster.status, "QuotaExceeded")["status"] == "False"


# --------------------------------------------------------------------------- pods that do not start


def waiting_pod(job: str, reason: str, message: str = "", created: str = NOW) -> PodSummary:
    return PodSummary(f"{job}-p", job, None, message=message, waiting=reason, created=created)


@pytest.mark.parametrize(
    ("reason", "message", "condition_reason"),
    [
        ("CreateContainerConfigError", 'secret "s3-creds" not found', "PodConfigInvalid"),
        ("InvalidImageName", 'invalid reference format: "Bad:Image"', "ImageInvalid"),
    ],
)
def test_a_pod_that_can_never_start_fails_the_search_at_once(
    reason: str, message: str, condition_reason: str
) -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    name = jobspec.job_name(OWNER, "b-each-a")
    cluster.pods[name] = [waiting_pod(name, reason, message)]
    plan = cluster.step()
    failed = condition(cluster.status, "Failed")
    assert failed["reason"] == condition_reason
    assert name in failed["message"] and message in failed["message"]
    assert plan.create == () and len(plan.delete) == 3  # no GPU minutes burnt waiting
    assert cluster.status["activeTrials"] == []
    assert not cluster.reconcile().changed
    # Fixed outside the spec (the Secret created); any spec edit resumes where it was.
    cluster.pods.clear()
    cluster.spec["suspend"] = False
    cluster.generation = 2
    plan = cluster.step()
    assert len(plan.create) == 3 and cluster.status["phase"] == "Pending"
    cluster.run_to_end()
    assert cluster.status["phase"] == "Succeeded"


@pytest.mark.parametrize(
    ("kind", "event", "message", "condition_reason"),
    [
        (
            "Pod",
            "FailedMount",
            'MountVolume.SetUp failed: secret "s3" not found',
            "VolumeUnavailable",
        ),
        ("Job", "FailedCreate", 'Error creating: pods "x" is forbidden: violates', "PodRefused"),
    ],
)
def test_warning_events_of_a_stuck_pod_or_job_name_the_cause(
    kind: str, event: str, message: str, condition_reason: str
) -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    name = jobspec.job_name(OWNER, "b-each-b")
    if kind == "Pod":
        pod = replace(waiting_pod(name, "ContainerCreating"), warnings=((event, message),))
        cluster.pods[name] = [pod]
    else:
        cluster.summaries[name] = replace(cluster.summaries[name], warnings=((event, message),))
    cluster.step()
    failed = condition(cluster.status, "Failed")
    assert failed["reason"] == condition_reason and message in failed["message"]
    assert cluster.status["trials"]["failed"] == 0


def test_an_unschedulable_or_unpullable_pod_waits_and_says_why() -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    name = jobspec.job_name(OWNER, "b-each-c")
    message = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    cluster.pods[name] = [waiting_pod(name, "Unschedulable", message)]
    plan = cluster.step()
    blocked = condition(cluster.status, "TrialsBlocked")
    assert blocked["status"] == "True" and blocked["reason"] == "Unschedulable"
    assert name in blocked["message"] and "nvidia.com/gpu" in blocked["message"]
    assert cluster.status["phase"] == "Pending" and plan.delete == ()
    cluster.pods[name] = [waiting_pod(name, "ImagePullBackOff", "Back-off pulling image")]
    cluster.step()
    assert condition(cluster.status, "TrialsBlocked")["reason"] == "ImagePullBackOff"
    del cluster.pods[name]
    cluster.step()
    assert condition(cluster.status, "TrialsBlocked")["status"] == "False"
    cluster.run_to_end()
    assert cluster.status["phase"] == "Succeeded"
    garbled = Cluster(make_spec())
    garbled.step()
    garbled.status["optimizer"] = garbled.status["optimizer"][:-40]  # an encoded state cut
    garbled.step()
    assert condition(garbled.status, "Failed")["reason"] == "StateInvalid"


# --------------------------------------------------------------------------- the preflight

GPU_TEMPLATE = {
    "spec": {
        "containers": [
            {
                "name": "runner",
                "resources": {
                    "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 1},
                    "limits": {"nvidia.com/gpu": 1},
                },
            }
        ]
    }
}


def role(cluster: Cluster, name: str) -> str:
    return cluster.summaries[name].role if name in cluster.summaries else "?"


def test_a_new_search_runs_one_cpu_only_preflight_job_before_any_trial() -> None:
    cluster = Cluster(make_spec(**{"execution.template": GPU_TEMPLATE}), status={})
    plan = cluster.step()
    assert [m["metadata"]["labels"][jobspec.LABEL_ROLE] for m in plan.create] == ["preflight"]
    assert cluster.status["phase"] == "Pending"
    assert {c["type"]: c for c in cluster.status["conditions"]}["Progressing"]["reason"] == (
        "Preflight"
    )
    job = plan.create[0]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["mergerunner", "preflight"]
    assert container["resources"] == {"requests": {"cpu": "4", "memory": "16Gi"}}
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert any(e["name"] == jobspec.ENV_CREDENTIALS for e in container["env"])
    doc = parse_trial(json.dumps(cluster.document(job["metadata"]["name"])))
    assert [t.task for t in doc.held_in] == ["t1", "t2"] and [t.task for t in doc.held_out] == [
        "t3"
    ]
    assert cluster.step().create == ()  # running: nothing more


def test_a_passed_preflight_is_recorded_and_never_repeated() -> None:
    cluster = Cluster(make_spec(), status={})
    cluster.step()
    cluster.finish_all()
    plan = cluster.step()
    assert condition(cluster.status, "Preflight")["status"] == "True"
    assert len(plan.create) == 3 and all(
        m["metadata"]["labels"][jobspec.LABEL_ROLE] == "trial" for m in plan.create
    )
    restarted = Cluster(make_spec(), status=copy.deepcopy(cluster.status))  # no Jobs seen
    assert all(
        m["metadata"]["labels"][jobspec.LABEL_ROLE] == "trial" for m in restarted.step().create
    )
    cluster.run_to_end()
    assert cluster.status["phase"] == "Succeeded"


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        (FailureKind.UNKNOWN_TASK, "UnknownTask"),
        (FailureKind.UNKNOWN_METRIC, "UnknownMetric"),
        (FailureKind.DATA_MISSING, "DataMissing"),
        (FailureKind.CONFIG, "ConfigInvalid"),
        (FailureKind.CHECKPOINTS_INCOMPATIBLE, "CheckpointsIncompatible"),
        (FailureKind.STORAGE_UNAVAILABLE, "StorageUnreachable"),
    ],
)
def test_a_failed_preflight_fails_the_search_with_zero_trial_jobs(
    kind: FailureKind, reason: str
) -> None:
    cluster = Cluster(make_spec(), status={})
    cluster.step()
    cluster.finish_all(failing_runner("preflight", "task 'gsm8k': not in the bundle", kind))
    for _ in range(3):
        cluster.step()
    assert cluster.status["phase"] == "Failed"
    failed = condition(cluster.status, "Failed")
    assert failed["reason"] == reason and "not in the bundle" in failed["message"]
    assert [role(cluster, n) for n in cluster.created] == ["preflight"]  # zero trial Jobs
    assert ("Warning", "PreflightFailed") in cluster.events


def test_the_analytic_benchmark_backend_needs_no_preflight() -> None:
    analytic = replace(SETTINGS, analytic_trials=True)  # MERGESEARCH_BENCHMARK_OBJECTIVE
    cluster = Cluster(make_spec(), status={}, settings=analytic)
    plan = cluster.step()
    assert plan.create and all(
        m["metadata"]["labels"][jobspec.LABEL_ROLE] == "trial" for m in plan.create
    )
    runners = [m["spec"]["template"]["spec"]["containers"][0] for m in plan.create]
    documents = [
        json.loads(next(e["value"] for e in r["env"] if e["name"] == jobspec.ENV_TRIAL))
        for r in runners
    ]
    assert {d["evaluator"]["backend"] for d in documents} == {"analytic"}


# --------------------------------------------------------------------------- reasons, finality


@pytest.mark.parametrize(
    "template",
    [
        {"spec": {"containers": [{"securityContext": {"runAsUser": 0}}]}},  # refused by name
        {"spec": {"containers": "oops"}},  # malformed
    ],
)
def test_a_recoverable_failure_gets_no_completion_time(template: dict[str, Any]) -> None:
    """TemplateInvalid is repaired by editing the spec: the search is not complete. (It got a
    completion time while the reconcile and the status each kept their own list of reasons.)"""
    cluster = Cluster(make_spec(**{"execution.template": template}))
    cluster.step()
    assert condition(cluster.status, "Failed")["reason"] == "TemplateInvalid"
    assert cluster.status["phase"] == "Failed" and "completionTime" not in cluster.status
    assert cluster.reconcile().create == ()  # waits for the spec to change


def test_a_terminal_failure_gets_its_completion_time_once() -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    cluster.status["optimizer"] = cluster.status["optimizer"][:-40]  # an encoded state cut
    cluster.step()
    assert condition(cluster.status, "Failed")["reason"] == "StateInvalid"
    assert cluster.status["completionTime"] == NOW
    cluster.now = "2025-01-01T00:05:00Z"
    assert not cluster.reconcile().changed  # finished: kept as it was


def test_every_reason_the_reconcile_fails_with_says_whether_it_is_final() -> None:
    from mergesearch.operator.observe import _EVENTS, _WAITING
    from mergesearch.operator.reconcile import FATAL_REASONS
    from mergesearch.operator.status import Finality, Reason

    assert all(reason.terminal for reason in FATAL_REASONS.values())
    for fatal, reason in [*_WAITING.values(), *_EVENTS.values()]:
        # a pod that can never start is repaired outside the spec; a wait clears by itself
        assert reason.finality is (Finality.RECOVERABLE if fatal else Finality.PROGRESS)
    assert Reason.SPEC_INVALID.recoverable and Reason.TEMPLATE_INVALID.recoverable
    assert Reason.SUCCEEDED.terminal and not Reason.SEARCHING.terminal


# --------------------------------------------------------------------------- the shell's decisions


def test_the_pods_that_matter_are_those_of_active_trials_and_of_the_operators_own_jobs() -> None:
    from mergesearch.operator.reconcile import pods_matter

    status = MergeSearchStatus.read({"activeTrials": ["b-each-a"]})

    def job(candidate: str, role: str = "trial", state: str = "active") -> JobSummary:
        return JobSummary(f"j-{candidate}", OWNER.uid, candidate, role, state)  # type: ignore[arg-type]

    assert pods_matter(status, job("b-each-a"))
    assert not pods_matter(status, job("b-each-b", state="succeeded"))  # collected already
    assert pods_matter(status, job("final", "final", "failed"))
    assert pods_matter(status, job("preflight", "preflight"))
    assert pods_matter(status, job("evaluators", "evaluator"))
    assert not pods_matter(status, job("evaluators", "evaluator", "failed"))


def test_what_the_creation_of_jobs_came_to_is_decided_by_the_core() -> None:
    from mergesearch.operator.reconcile import Creation, after_creation

    cluster = Cluster(make_spec())
    plan = cluster.step()
    view = cluster.view()
    assert after_creation(view, plan, Creation(), NOW) is None  # all created, no wait to end
    refused = after_creation(view, plan, Creation("j-2", "exceeded quota", waiting=2), NOW)
    assert refused is not None and refused.changed
    quota = condition(refused.status, "QuotaExceeded")
    assert quota["status"] == "True" and quota["reason"] == "JobQuota"
    assert "2 trial Job(s) wait for quota; creating j-2" in quota["message"]
    assert [e.reason for e in refused.events] == ["QuotaExceeded"]
    waiting = view.with_status(refused.status)
    cleared = after_creation(waiting, plan, Creation(), NOW)
    assert cleared is not None and condition(cleared.status, "QuotaExceeded")["status"] == "False"
    rejected = after_creation(view, plan, Creation(rejected="spec.template: bad"), NOW)
    assert rejected is not None and rejected.idle and rejected.status.phase == "Failed"
    failed = condition(rejected.status, "Failed")
    assert failed["reason"] == "TemplateInvalid" and "spec.template: bad" in failed["message"]
