"""Warm mode's pure core: leases, posted results, the evaluator Job and its token Secret,
driven over whole searches against the in-memory cluster of test_operator_reconcile."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from test_operator_reconcile import OWNER, Cluster, good_runner, make_spec

from mergerunner.contract import ENV_EVALUATOR_NAME, ENV_EVALUATOR_URL
from mergerunner.trial import TrialResult, parse_trial
from mergesearch.operator import jobs as jobspec
from mergesearch.operator import warm
from mergesearch.operator.jobs import JobSettings, Owner
from mergesearch.operator.reconcile import Plan, reconcile
from mergesearch.operator.status import MergeSearchStatus
from mergesearch.operator.warm import EvaluatorPod, Inbox, Posted
from support.statusdoc import condition

pytestmark = pytest.mark.unit

KEY = b"operator-key-for-tests"
SETTINGS = JobSettings(
    default_image="runner:test", evaluator_url="http://operator.ms:8443", evaluator_key=KEY
)
T0 = "2025-01-01T00:00:00Z"


def warm_spec(**changes: Any) -> dict[str, Any]:
    return make_spec(**{"execution.mode": "warm", **changes})


def result_for(document: str) -> TrialResult:
    """What an evaluator reports for a leased document (the jobs-mode runner's scores)."""
    code, message = good_runner(json.loads(document))
    assert code == 0
    return TrialResult.model_validate_json(message)


@dataclass
class WarmCluster(Cluster):
    """Adds evaluator pods that ask for work, hold one lease each, and post results."""

    now: str = T0
    pods_: list[EvaluatorPod] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    results: list[Posted] = field(default_factory=list)
    holding: dict[str, warm.Assignment] = field(default_factory=dict)
    secrets: list[dict[str, Any]] = field(default_factory=list)
    last: Plan | None = None
    leases_max: int = 0

    def reconcile(self) -> Plan:
        return reconcile(
            self.view(),
            list(self.summaries.values()),
            self.pods,
            SETTINGS,
            self.now,
            inbox=Inbox(tuple(self.requests), tuple(self.results)),
            evaluators=tuple(self.pods_),
        )

    def apply(self, plan: Plan) -> None:
        super().apply(plan)
        self.last = plan
        self.secrets.extend(plan.secrets)
        consumed = list(plan.consumed)
        self.results = [p for p in self.results if not _take(consumed, p.candidate)]
        for evaluator, assignment in plan.assignments.items():
            self.holding[evaluator] = assignment
            self.requests.remove(evaluator)
        if plan.evaluators_done:
            self.requests.clear()
        held = [x for x in self.status.get("leases") or [] if x.get("evaluator")]
        self.leases_max = max(self.leases_max, len(held))

    def start_evaluators(self, n: int) -> None:
        for _ in range(n):
            name = f"ev-{len(self.pods_)}"
            self.pods_.append(EvaluatorPod(name, ready=True))
            self.requests.append(name)

    def work(self) -> None:
        """Every evaluator holding a lease scores it, posts the result and asks again."""
        for evaluator, assignment in sorted(self.holding.items()):
            result = result_for(assignment.document)
            self.results.append(Posted(evaluator, assignment.candidate, result))
            self.requests.append(evaluator)
        self.holding.clear()

    def finish_all(self, runner: Any = good_runner) -> None:
        for name, summary in list(self.summaries.items()):
            if summary.state == "active" and summary.role != warm.EVALUATOR_ROLE:
                self.finish(name, runner)

    def run_to_end(self, runner: Any = good_runner, limit: int = 300) -> None:
        for _ in range(limit):
            self.step()
            if self.status.get("phase") in ("Succeeded", "Failed"):
                return
            if not self.pods_ and any(
                s.role == warm.EVALUATOR_ROLE for s in self.summaries.values()
            ):
                self.start_evaluators(int(self.spec["execution"]["parallelism"]))
            self.work()
            self.finish_all(runner)
        raise AssertionError("the search did not end")


def _take(items: list[str], item: str) -> bool:
    if item in items:
        items.remove(item)
        return True
    return False


def started(spec: dict[str, Any] | None = None) -> WarmCluster:
    cluster = WarmCluster(spec or warm_spec())
    cluster.step()
    cluster.start_evaluators(int(cluster.spec["execution"]["parallelism"]))
    cluster.step()
    return cluster


# --------------------------------------------------------------------------- whole searches


def test_a_warm_search_ends_with_the_same_result_as_a_jobs_search() -> None:
    jobs = Cluster(make_spec())
    jobs.run_to_end()
    warmed = WarmCluster(warm_spec())
    warmed.run_to_end()
    assert warmed.status["phase"] == jobs.status["phase"] == "Succeeded"
    for key in ("best", "history", "trials", "search", "baselines", "output", "bestFitness"):
        assert warmed.status[key] == jobs.status[key], key
    # Only the evaluator Job and the final Job; never a Job per trial.
    roles = sorted(m["metadata"]["labels"][jobspec.LABEL_ROLE] for m in warmed.jobs.values())
    assert roles == ["final"]  # the evaluator Job was deleted when the search finished
    assert [jobspec.job_name(OWNER, "evaluators")] == [
        n for n in warmed.deleted if n.endswith("-evaluators")
    ]
    assert warmed.leases_max <= 3 and warmed.status["leases"] == []


def test_the_first_reconcile_creates_the_token_secret_and_one_evaluator_job() -> None:
    cluster = WarmCluster(warm_spec())
    plan = cluster.step()
    assert [m["metadata"]["name"] for m in plan.create] == [warm.evaluator_job_name(OWNER)]
    (secret,) = plan.secrets
    token = base64.b64decode(secret["data"][warm.TOKEN_KEY]).decode()
    assert warm.token_matches(KEY, OWNER, token)
    assert secret["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    assert cluster.status["activeTrials"] == ["b-each-a", "b-each-b", "b-each-c"]
    assert [x["trial"] for x in cluster.status["leases"]] == cluster.status["activeTrials"]
    assert all("evaluator" not in x for x in cluster.status["leases"])
    again = cluster.reconcile()
    assert not again.changed and again.create == () and again.secrets == ()


def test_an_assignment_is_the_document_a_trial_job_would_run() -> None:
    cluster = started()
    jobs = Cluster(make_spec())
    jobs.step()
    for evaluator, assignment in cluster.holding.items():
        name = jobspec.job_name(OWNER, assignment.candidate)
        assert json.loads(assignment.document) == jobs.document(name), evaluator
        assert parse_trial(assignment.document).id == name


def test_a_retried_request_gets_the_lease_it_already_holds() -> None:
    cluster = started()
    first = dict(cluster.holding)
    cluster.requests.append("ev-1")  # its answer was lost; it asks again
    plan = cluster.step()
    assert plan.assignments == {"ev-1": first["ev-1"]}
    assert not plan.changed  # nothing new was decided


def test_a_duplicate_result_is_ignored() -> None:
    cluster = started()
    assignment = cluster.holding["ev-0"]
    result = result_for(assignment.document)
    posted = Posted("ev-0", assignment.candidate, result)
    cluster.results = [posted, posted]
    plan = cluster.step()
    assert plan.applied == (assignment.candidate,)
    assert plan.consumed == (assignment.candidate, assignment.candidate)
    assert cluster.status["trials"]["succeeded"] == 1
    cluster.results = [posted]  # posted again later (a retry after a lost answer)
    again = cluster.step()
    assert again.applied == () and again.consumed == (assignment.candidate,)
    assert cluster.status["trials"]["succeeded"] == 1


def test_a_result_for_another_trial_id_is_ignored() -> None:
    cluster = started()
    assignment = cluster.holding["ev-0"]
    wrong = result_for(assignment.document).model_copy(update={"id": "someone-else"})
    cluster.results = [Posted("ev-0", assignment.candidate, wrong)]
    plan = cluster.step()
    assert plan.applied == () and plan.consumed == (assignment.candidate,)


def test_a_killed_evaluator_loses_only_its_candidate_which_is_issued_again() -> None:
    cluster = started()
    lost = cluster.holding.pop("ev-1")
    cluster.pods_[1] = EvaluatorPod("ev-1", terminated=True, reason="Error", exit_code=137)
    cluster.pods_.append(EvaluatorPod("ev-3", ready=True))  # the Job's replacement pod
    cluster.requests.append("ev-3")
    plan = cluster.step()
    assert plan.assignments["ev-3"] == lost
    (event,) = [e for e in plan.events if e.reason == "EvaluatorLost"]
    assert event.type == "Warning" and "ev-1" in event.message and lost.candidate in event.message
    leases = {x["trial"]: x for x in cluster.status["leases"]}
    assert leases[lost.candidate]["evaluator"] == "ev-3"
    assert leases[lost.candidate]["issued"] == 2
    assert cluster.status["trials"]["failed"] == 0
    assert {x["evaluator"] for x in leases.values()} == {"ev-0", "ev-2", "ev-3"}


def test_a_candidate_that_loses_its_evaluator_too_often_fails() -> None:
    cluster = started(warm_spec(**{"execution.backoffLimit": 0}))
    lost = cluster.holding.pop("ev-0")
    cluster.pods_[0] = EvaluatorPod("ev-0", terminated=True, reason="Error", exit_code=139)
    plan = cluster.step()
    assert lost.candidate not in cluster.status["activeTrials"]
    assert cluster.status["trials"]["failed"] == 1
    assert ("Warning", "TrialFailed") in {(e.type, e.reason) for e in plan.events}


def test_an_evaluator_killed_for_memory_fails_the_search() -> None:
    cluster = started()
    cluster.holding.pop("ev-2")
    cluster.pods_[2] = EvaluatorPod("ev-2", terminated=True, reason="OOMKilled", exit_code=137)
    cluster.step()
    assert cluster.status["phase"] == "Failed"
    assert condition(cluster.status, "Failed")["reason"] == "OutOfMemory"
    assert warm.evaluator_job_name(OWNER) in cluster.deleted
    assert cluster.last is not None and cluster.last.evaluators_done


def test_a_vanished_holder_is_released_only_after_the_grace_period() -> None:
    cluster = started()
    lost = cluster.holding.pop("ev-0")
    del cluster.pods_[0]  # deleted (drained, preempted): the index no longer shows it
    cluster.now = warm.later(T0, warm.LEASE_GRACE_S - 1)
    cluster.step()
    leases = {x["trial"]: x for x in cluster.status["leases"]}
    assert leases[lost.candidate]["evaluator"] == "ev-0"
    cluster.now = warm.later(T0, warm.LEASE_GRACE_S)
    cluster.step()
    leases = {x["trial"]: x for x in cluster.status["leases"]}
    assert "evaluator" not in leases[lost.candidate]
    assert leases[lost.candidate]["issued"] == 1


def test_an_unseen_holder_that_asks_keeps_its_lease() -> None:
    cluster = WarmCluster(warm_spec())
    cluster.step()
    cluster.requests.append("fresh-pod")  # the pod index has not seen it yet
    cluster.step()
    cluster.now = warm.later(T0, 3600)
    cluster.requests.append("fresh-pod")
    plan = cluster.step()
    assert plan.assignments["fresh-pod"].candidate == "b-each-a"


def test_a_lease_past_its_deadline_is_issued_again() -> None:
    cluster = started(warm_spec(**{"execution.trialTimeoutSeconds": 60}))
    stuck = cluster.holding.pop("ev-0")
    cluster.now = warm.later(T0, 61)
    cluster.pods_.append(EvaluatorPod("ev-9", ready=True))
    cluster.requests.append("ev-9")
    plan = cluster.step()
    assert plan.assignments["ev-9"] == stuck


def test_suspend_stops_the_evaluators_and_resume_starts_them_again() -> None:
    cluster = started()
    cluster.work()
    cluster.step()
    cluster.spec["suspend"] = True
    cluster.generation += 1
    cluster.requests.append("ev-0")
    plan = cluster.step()
    assert cluster.status["phase"] == "Suspended"
    assert warm.evaluator_job_name(OWNER) in plan.delete
    assert plan.evaluators_done and plan.assignments == {}
    assert all("evaluator" not in x for x in cluster.status["leases"])
    cluster.spec["suspend"] = False
    cluster.generation += 1
    cluster.pods_.clear()
    plan = cluster.step()
    assert [m["metadata"]["name"] for m in plan.create] == [warm.evaluator_job_name(OWNER)]
    cluster.pods_.clear()
    cluster.holding.clear()
    cluster.run_to_end()
    reference = WarmCluster(warm_spec())
    reference.run_to_end()
    for key in ("best", "history", "trials"):
        assert cluster.status[key] == reference.status[key], key


def test_a_failed_evaluator_job_fails_the_search() -> None:
    cluster = started()
    name = warm.evaluator_job_name(OWNER)
    from dataclasses import replace

    cluster.summaries[name] = replace(
        cluster.summaries[name], state="failed", reason="BackoffLimitExceeded"
    )
    cluster.step()
    assert condition(cluster.status, "Failed")["reason"] == "EvaluatorsFailed"
    assert "BackoffLimitExceeded" in condition(cluster.status, "Failed")["message"]


def test_warm_mode_without_an_evaluator_endpoint_is_a_spec_error() -> None:
    view = WarmCluster(warm_spec()).view()
    plan = reconcile(view, [], {}, JobSettings(default_image="runner:test"), T0)
    assert plan.create == () and plan.status.phase == "Failed"
    cond = condition(plan.status, "Failed")
    assert cond["reason"] == "SpecInvalid" and "spec.execution.mode" in cond["message"]


def test_a_finished_search_answers_done_and_ignores_late_results() -> None:
    cluster = started()
    assignment = cluster.holding["ev-0"]
    cluster.run_to_end()
    cluster.results = [Posted("ev-0", assignment.candidate, result_for(assignment.document))]
    cluster.requests = ["ev-0"]
    plan = cluster.reconcile()
    assert plan.evaluators_done and not plan.changed and plan.applied == ()
    assert plan.consumed == (assignment.candidate,) and plan.assignments == {}


# --------------------------------------------------------------------------- manifests


def _evaluator_job(spec: dict[str, Any], settings: JobSettings = SETTINGS) -> dict[str, Any]:
    from mergesearch.spec import parse_spec

    return warm.evaluator_job(OWNER, parse_spec(spec), settings)


def test_the_evaluator_pod_is_the_hardened_trial_pod_with_the_evaluator_command() -> None:
    job = _evaluator_job(warm_spec())
    assert job["spec"]["parallelism"] == job["spec"]["completions"] == 3
    assert job["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    pod = job["spec"]["template"]["spec"]
    (runner,) = pod["containers"]
    assert runner["command"] == ["mergerunner", "evaluator"] and runner["args"] == []
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = runner["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["allowPrivilegeEscalation"] is False
    env = {e["name"]: e for e in runner["env"]}
    assert jobspec.ENV_TRIAL not in env
    assert env[ENV_EVALUATOR_URL]["value"] == (
        "http://operator.ms:8443/v1/namespaces/team-a/mergesearches/demo/lease"
    )
    assert env[ENV_EVALUATOR_NAME]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[warm.TOKEN_VOLUME]["secret"] == {"secretName": warm.token_secret_name(OWNER)}
    assert volumes["mergesearch-storage-credentials"]["secret"] == {"secretName": "s3-creds"}
    assert volumes["mergesearch-cache"] == {"name": "mergesearch-cache", "emptyDir": {}}
    mounts = {m["name"]: m for m in runner["volumeMounts"]}
    assert mounts[warm.TOKEN_VOLUME]["readOnly"] is True
    # No token or credential value anywhere in the Job.
    token = warm.search_token(KEY, OWNER)
    assert token not in json.dumps(job) and KEY.decode() not in json.dumps(job)


def test_a_hostile_template_gets_nothing_more_in_warm_mode() -> None:
    template = {
        "metadata": {"labels": {"kueue.x-k8s.io/queue-name": "gpu-queue", "team": "x"}},
        "spec": {
            "containers": [
                {
                    "name": "runner",
                    "image": "my/runner:1",
                    "resources": {"limits": {"nvidia.com/gpu": 1}},
                }
            ],
        },
    }
    job = _evaluator_job(warm_spec(**{"execution.template": template}))
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert "team" not in job["metadata"]["labels"]  # only the queue labels go on the Job
    pod = job["spec"]["template"]
    assert pod["metadata"]["labels"]["team"] == "x"
    assert pod["spec"]["containers"][0]["image"] == "my/runner:1"
    assert pod["spec"]["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 1}}


def test_the_node_cache_is_a_per_namespace_host_directory_when_configured() -> None:
    settings = JobSettings(
        default_image="r",
        evaluator_url="http://op:1",
        evaluator_key=KEY,
        node_cache_dir="/var/cache/mergesearch/",
    )
    job = _evaluator_job(warm_spec(), settings)
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["mergesearch-cache"]["hostPath"] == {
        "path": "/var/cache/mergesearch/team-a",
        "type": "DirectoryOrCreate",
    }
    # A template volume mounted at the cache path (a PVC) still wins.
    template = {
        "containers": [
            {
                "name": "runner",
                "volumeMounts": [{"name": "pvc", "mountPath": "/var/cache/mergerunner"}],
            }
        ],
        "volumes": [{"name": "pvc", "persistentVolumeClaim": {"claimName": "ckpt"}}],
    }
    job = _evaluator_job(warm_spec(**{"execution.template": template}), settings)
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert "mergesearch-cache" not in volumes and "pvc" in volumes


def test_tokens_are_per_search_and_per_incarnation() -> None:
    again = Owner(OWNER.name, OWNER.namespace, "0000-uid-2")
    assert warm.search_token(KEY, OWNER) != warm.search_token(KEY, again)
    assert warm.search_token(KEY, OWNER) != warm.search_token(b"other", OWNER)
    assert warm.token_matches(KEY, OWNER, warm.search_token(KEY, OWNER))
    assert not warm.token_matches(KEY, again, warm.search_token(KEY, OWNER))


def test_evaluator_pods_are_read_from_their_status() -> None:
    def pod(state: dict[str, Any], **meta: Any) -> dict[str, Any]:
        return {
            "metadata": {"name": "p", "labels": {jobspec.LABEL_ROLE: "evaluator"}, **meta},
            "status": {"containerStatuses": [{"name": "runner", **state}]},
        }

    assert warm.evaluator_pod(pod({"state": {"running": {}}, "ready": True})) == EvaluatorPod(
        "p", ready=True
    )
    killed = warm.evaluator_pod(
        pod({"state": {"terminated": {"exitCode": 137, "reason": "Error"}}})
    )
    assert killed == EvaluatorPod("p", terminated=True, reason="Error", exit_code=137)
    assert warm.evaluator_pod({"metadata": {"name": "x", "labels": {}}}) is None
    pending = {"metadata": {"name": "p", "labels": {jobspec.LABEL_ROLE: "evaluator"}}}
    assert warm.evaluator_pod(pending) == EvaluatorPod("p")


def test_told_results_and_fetched_bytes_reach_the_plan_and_the_status() -> None:
    cluster = started()
    assignment = cluster.holding["ev-0"]
    posted = Posted("ev-0", assignment.candidate, result_for(assignment.document))
    plan = reconcile(
        cluster.view(),
        list(cluster.summaries.values()),
        {},
        SETTINGS,
        T0,
        inbox=Inbox((), (posted, posted), {"ev-0": 1234, "ev-1": 0, "gone": 99}),
        evaluators=tuple(cluster.pods_),
    )
    assert plan.posted == (posted,)  # told once, its timings go to the metrics once
    assert plan.status.to_wire()["evaluators"] == {
        "wanted": 3,
        "running": 3,
        "ready": 3,
        "busy": 2,
        "bytesFetched": 1234,
    }


def test_evaluator_gauges_come_from_the_status() -> None:
    from mergesearch.operator import metrics

    samples = metrics.status_samples(
        MergeSearchStatus.read(
            {"evaluators": {"wanted": 2, "running": 2, "ready": 1, "busy": 1, "bytesFetched": 7}}
        )
    )
    values = {(s.name, s.labels): s.value for s in samples}
    assert values[("mergesearch_evaluators", (("state", "ready"),))] == 1
    assert values[("mergesearch_evaluators", (("state", "wanted"),))] == 2
    assert values[("mergesearch_evaluator_fetched_bytes", ())] == 7


def test_evaluator_pods_that_cannot_start_are_reported_like_trial_pods() -> None:
    from mergesearch.operator.observe import PodSummary

    cluster = started()
    job = warm.evaluator_job_name(OWNER)
    cluster.pods[job] = [
        PodSummary(f"{job}-a", job, None, message="back-off", waiting="ImagePullBackOff")
    ]
    cluster.step()
    blocked = condition(cluster.status, "TrialsBlocked")
    assert blocked["status"] == "True" and blocked["reason"] == "ImagePullBackOff"
    assert job in blocked["message"]
    cluster.pods[job] = [
        PodSummary(f"{job}-a", job, None, message="bad ref", waiting="InvalidImageName")
    ]
    cluster.step()
    assert condition(cluster.status, "Failed")["reason"] == "ImageInvalid"
    assert job in cluster.deleted
