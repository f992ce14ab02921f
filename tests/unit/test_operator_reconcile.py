"""The pure reconcile: given status and observed Jobs, exactly which Jobs to create, which
results to tell, what status to write — driven against a small in-memory cluster."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from mergerunner.trial import TrialResult, parse_trial
from mergesearch.operator import jobs as jobspec
from mergesearch.operator.jobs import JobSettings, Owner
from mergesearch.operator.observe import JobSummary, PodSummary
from mergesearch.operator.reconcile import Plan, SearchView, classify_failure, reconcile
from mergesearch.operator.status import condition

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


def failing_runner(step: str, error: str) -> Runner:
    def run(doc_json: dict[str, Any]) -> tuple[int, str]:
        result = TrialResult(id=doc_json["id"], status="failed", failed_step=step, error=error)
        return 1, result.termination_message()

    return run


@dataclass
class Cluster:
    """Jobs as the indexes would show them; `finish` plays the Job controller and kubelet."""

    spec: dict[str, Any]
    status: dict[str, Any] = field(default_factory=dict)
    generation: int = 1
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    summaries: dict[str, JobSummary] = field(default_factory=dict)
    pods: dict[str, list[PodSummary]] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)
    max_unfinished: int = 0

    def view(self) -> SearchView:
        return SearchView(OWNER, self.generation, copy.deepcopy(self.spec), self.status)

    def reconcile(self) -> Plan:
        return reconcile(self.view(), list(self.summaries.values()), self.pods, SETTINGS, NOW)

    def step(self) -> Plan:
        plan = self.reconcile()
        self.apply(plan)
        return plan

    def apply(self, plan: Plan) -> None:
        if plan.changed:
            self.status = json.loads(json.dumps(plan.status))  # through the API server
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
    assert cluster.status["optimizer"]["format"] == "mergesearch.engine/v1"
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
    assert plan.told == ("b-each-a",)
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
    assert again.told == () and again.create == ()
    assert again.status["trials"] == cluster.status["trials"]


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
    confirm_docs = [d for d in docs if d.get("subset")]
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
    assert plan.told == () and "x" not in plan.delete
    assert len(plan.create) == 3  # its own Jobs are missing: created again


# --------------------------------------------------------------------------- suspend


def test_suspend_launches_nothing_collects_running_and_resume_continues() -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    cluster.spec["suspend"] = True
    cluster.generation = 2
    cluster.finish(jobspec.job_name(OWNER, "b-each-a"))
    plan = cluster.step()
    assert plan.create == () and plan.told == ("b-each-a",)
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
    cluster.pods[name] = [PodSummary(f"{name}-p", name, 137, "OOMKilled", "", NOW)]
    cluster.step()
    assert cluster.status["trials"]["failed"] == 1
    reason = cluster.status["recentFailures"][0]["reason"]
    assert "BackoffLimitExceeded" in reason and "OOMKilled" in reason and "137" in reason
    assert cluster.status["phase"] == "Running"  # an OOM kill is not a configuration error


@pytest.mark.parametrize(
    ("step", "error", "reason"),
    [
        ("fetch", "FetchError: s3://ckpt/a/: not found: no such prefix", "CheckpointUnavailable"),
        ("fetch", "FetchError: s3://ckpt/a/: unreachable: connect refused", "StorageUnreachable"),
        (
            "merge",
            "ModelMismatch: tensor lm_head.weight: shape (8, 4) in b",
            "CheckpointsIncompatible",
        ),
        ("evaluate", "EvaluationError: unknown lm-eval task(s): t9", "UnknownTask"),
        ("input", "weights: missing checkpoint", "TrialRejected"),
    ],
)
def test_configuration_errors_from_the_first_trials_fail_the_search_in_one_reconcile(
    step: str, error: str, reason: str
) -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    cluster.finish(jobspec.job_name(OWNER, "b-each-a"), failing_runner(step, error))
    plan = cluster.step()
    failed = condition(cluster.status, "Failed")
    assert cluster.status["phase"] == "Failed" and failed["reason"] == reason
    assert "b-each-a" in failed["message"] and error.split(":")[0] in failed["message"]
    assert plan.create == () and cluster.status["activeTrials"] == []
    assert cluster.reconcile().changed is False  # final: nothing is retried


def test_unreachable_storage_after_a_success_is_an_ordinary_failure() -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    cluster.finish(jobspec.job_name(OWNER, "b-each-a"))
    cluster.step()
    cluster.finish(
        jobspec.job_name(OWNER, "b-each-b"),
        failing_runner("fetch", "FetchError: s3://ckpt/b/: unreachable: timed out"),
    )
    cluster.step()
    assert cluster.status["phase"] == "Running" and cluster.status["trials"]["failed"] == 1


def test_classify_failure_leaves_ordinary_errors_to_the_failure_policy() -> None:
    from mergesearch.operator.observe import TrialOutcome

    oom = TrialOutcome("g000-c01", "j", False, failed_step="evaluate", error="CUDA OOM")
    disk = TrialOutcome("g000-c01", "j", False, failed_step="merge", error="OSError: disk full")
    assert classify_failure(oom, first_trials=True) is None
    assert classify_failure(disk, first_trials=True) is None


def test_a_failed_final_evaluation_fails_the_search() -> None:
    cluster = Cluster(make_spec())
    for _ in range(100):
        cluster.step()
        if cluster.status.get("final"):
            break
        cluster.finish_all()
    final = jobspec.job_name(OWNER, jobspec.FINAL_CANDIDATE)
    cluster.finish(final, failing_runner("upload", "FetchError: s3://out/: access denied: no"))
    cluster.step()
    failed = condition(cluster.status, "Failed")
    assert cluster.status["phase"] == "Failed" and failed["reason"] == "FinalizationFailed"
    assert "access denied" in failed["message"]
    assert cluster.status["final"]["state"] == "Failed"


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


def test_budgets_may_change_while_running_but_other_fields_may_not() -> None:
    cluster = Cluster(make_spec())
    cluster.step()
    cluster.spec["search"]["maxGenerations"] = 5
    cluster.generation = 2
    cluster.step()
    assert cluster.status["optimizer"]["config"]["max_generations"] == 5
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
