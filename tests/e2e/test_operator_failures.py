"""Failure modes that used to lose a search or hang it, on the real control plane.

The operator runs as its own process with the RBAC ServiceAccount's credentials; trials run
on the benchmarking objective (the operator started with `ANALYTIC_TRIALS`), so a search takes
seconds.
Each test plays one fault the way a cluster produces it: a ResourceQuota on Jobs, a Secret or
ConfigMap that does not exist (the node agent answers as a kubelet does: FailedMount, the pod
left ContainerCreating), a LimitRange that makes the Job controller's pod creation fail, a pod
no node can hold, a trial that completes without a result, a final evaluation that keeps
failing until someone asks for a retry.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from support.cluster import KubeCluster
from support.nodeagent import NodeAgent
from support.operator_proc import ANALYTIC_TRIALS, OperatorFactory, Searches, operator_factory
from support.polling import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]
__all__ = ["operator_factory"]  # the fixture, imported so that pytest finds it here

CHECKPOINTS = ("alpha", "beta", "gamma")
MISBEHAVING_RUNNER = Path(__file__).resolve().parents[1] / "support" / "crashing_runner.py"


def analytic_spec(**execution: Any) -> dict[str, Any]:
    """Three checkpoints that are never fetched (analytic trials), 13 trials or so."""
    return {
        "checkpoints": [{"name": n, "uri": f"s3://unused/{n}/"} for n in CHECKPOINTS],
        "objective": {"heldIn": [{"task": "task-one", "limit": 8}]},
        "search": {"populationSize": 4, "maxGenerations": 2, "seed": 5},
        "execution": {"parallelism": 4, "backoffLimit": 0, **execution},
    }


def new_namespace(cluster: KubeCluster, prefix: str, labels: dict[str, str] | None = None) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.api().create("/api/v1/namespaces", {"metadata": {"name": name, "labels": labels or {}}})
    return name


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions") or []}


def search_events(cluster: KubeCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    items = cluster.api().get(f"/api/v1/namespaces/{namespace}/events")["items"]
    return [
        e
        for e in items
        if e["involvedObject"].get("kind") == "MergeSearch" and e["involvedObject"]["name"] == name
    ]


def pods_started(agent: NodeAgent, namespace: str) -> int:
    """Trial processes the node agent ran in the namespace (a pod never started has none)."""
    return sum(1 for c in [*agent.running(), *agent._done.values()] if c.namespace == namespace)


# --------------------------------------------------------------------------- item: quota


def test_a_job_quota_smaller_than_parallelism_slows_the_search_but_never_stops_it(
    k8s_cluster: KubeCluster, k8s_node_agent: NodeAgent, operator_factory: OperatorFactory
) -> None:
    namespace = new_namespace(k8s_cluster, "quota")
    api = k8s_cluster.api()
    api.create(
        f"/api/v1/namespaces/{namespace}/resourcequotas",
        {"metadata": {"name": "jobs"}, "spec": {"hard": {"count/jobs.batch": "2"}}},
    )
    wait_for(
        lambda: (
            api.get(f"/api/v1/namespaces/{namespace}/resourcequotas/jobs")
            .get("status", {})
            .get("hard")
        ),
        60,
        "the quota controller to fill in the quota's status",
    )
    searches = Searches(k8s_cluster, namespace)
    operator_factory([namespace], env=ANALYTIC_TRIALS)
    searches.create("squeezed", analytic_spec(parallelism=4))
    waiting = wait_for(
        lambda: (
            (c := conditions(searches.status("squeezed")).get("QuotaExceeded"))
            and c["status"] == "True"
            and c
        ),
        120,
        "the QuotaExceeded condition",
    )
    assert "exceeded quota" in waiting["message"] and "count/jobs.batch" in waiting["message"]
    status = searches.wait_phase("squeezed", ["Succeeded", "Failed"], 300)
    assert status["phase"] == "Succeeded", status.get("conditions")
    assert status["trials"]["failed"] == 0 and status["trials"]["running"] == 0
    assert conditions(status)["QuotaExceeded"]["status"] == "False"
    reasons = [e["reason"] for e in search_events(k8s_cluster, namespace, "squeezed")]
    assert "QuotaExceeded" in reasons


# --------------------------------------------------------------------------- item: kept Jobs


def test_a_trial_job_that_completes_without_a_result_is_kept(
    k8s_cluster: KubeCluster, k8s_node_agent: NodeAgent, operator_factory: OperatorFactory
) -> None:
    namespace = new_namespace(k8s_cluster, "empty")
    searches = Searches(k8s_cluster, namespace)
    command = f"python {MISBEHAVING_RUNNER} empty:g000-c02"
    operator_factory([namespace], env={"MERGESEARCH_RUNNER_COMMAND": command, **ANALYTIC_TRIALS})
    searches.create("silent", analytic_spec())
    status = searches.wait_phase("silent", ["Succeeded", "Failed"], 300)
    assert status["phase"] == "Succeeded", status.get("conditions")
    assert [f["id"] for f in status["recentFailures"]] == ["g000-c02"]
    assert "no result" in status["recentFailures"][0]["reason"]

    def candidates() -> list[str]:
        jobs = searches.jobs("silent")
        return [j["metadata"]["annotations"]["mergesearch.io/candidate-id"] for j in jobs]

    # (the last collected Jobs are deleted just after the status that records them)
    wait_for(lambda: len(candidates()) == 1, 30, "the collected Jobs to be deleted")
    assert candidates() == ["g000-c02"]
    kept = searches.jobs("silent")
    assert kept[0]["status"].get("succeeded") == 1  # it completed; its logs are still there


# --------------------------------------------------------------------------- item: pods stuck


@pytest.mark.parametrize(
    ("field", "name"), [("storage", "no-such-secret"), ("customTasks", "no-such-tasks")]
)
def test_a_missing_secret_or_configmap_fails_the_search_at_once_naming_it(
    k8s_cluster: KubeCluster,
    k8s_node_agent: NodeAgent,
    operator_factory: OperatorFactory,
    field: str,
    name: str,
) -> None:
    namespace = new_namespace(k8s_cluster, "missing")
    searches = Searches(k8s_cluster, namespace)
    operator_factory([namespace], env=ANALYTIC_TRIALS)
    spec = analytic_spec()
    if field == "storage":
        spec["storage"] = {"secretRef": {"name": name}}
    else:
        spec["objective"]["customTasks"] = {"configMapRef": {"name": name}}
    searches.create("orphan", spec)
    status = searches.wait_phase("orphan", ["Failed", "Succeeded"], 120)
    failed = conditions(status)["Failed"]
    assert failed["reason"] == "VolumeUnavailable", failed
    assert "FailedMount" in failed["message"] and f'"{name}" not found' in failed["message"]
    assert status["trials"]["finished"] == 0 and pods_started(k8s_node_agent, namespace) == 0
    wait_for(lambda: not searches.jobs("orphan"), 60, "the stuck trial Jobs to be deleted")
    # Created afterwards, and any edit of the spec resumes the search.
    kind, body = (
        ("secrets", {"stringData": {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}})
        if field == "storage"
        else ("configmaps", {"data": {"empty.txt": ""}})
    )
    k8s_cluster.api().create(
        f"/api/v1/namespaces/{namespace}/{kind}", {"metadata": {"name": name}, **body}
    )
    searches.patch_spec("orphan", {"suspend": True})
    searches.patch_spec("orphan", {"suspend": False})
    try:
        status = searches.wait_phase("orphan", ["Succeeded"], 300)
    except TimeoutError as exc:
        now = {k: v for k, v in searches.status("orphan").items() if k != "optimizer"}
        jobs = [(j["metadata"]["name"], j.get("status")) for j in searches.jobs()]
        raise AssertionError(f"not resumed: {now}; Jobs {jobs}") from exc
    assert status["trials"]["failed"] == 0


def test_pods_refused_by_admission_fail_the_search_before_any_trial_runs(
    k8s_cluster: KubeCluster, k8s_node_agent: NodeAgent, operator_factory: OperatorFactory
) -> None:
    """A LimitRange refuses the trial pods: the Job controller's FailedCreate names why."""
    namespace = new_namespace(k8s_cluster, "limits")
    k8s_cluster.api().create(
        f"/api/v1/namespaces/{namespace}/limitranges",
        {
            "metadata": {"name": "small"},
            "spec": {"limits": [{"type": "Container", "max": {"cpu": "500m"}}]},
        },
    )
    searches = Searches(k8s_cluster, namespace)
    operator_factory([namespace], env=ANALYTIC_TRIALS)
    resources = {"requests": {"cpu": "2"}, "limits": {"cpu": "2"}}
    spec = analytic_spec(
        template={"spec": {"containers": [{"name": "runner", "resources": resources}]}}
    )
    searches.create("big", spec)
    status = searches.wait_phase("big", ["Failed", "Succeeded"], 120)
    failed = conditions(status)["Failed"]
    assert failed["reason"] == "PodRefused", failed
    assert "FailedCreate" in failed["message"] and "cpu" in failed["message"]
    assert status["trials"]["finished"] == 0 and pods_started(k8s_node_agent, namespace) == 0


def test_trial_pods_are_admitted_under_pod_security_restricted(
    k8s_cluster: KubeCluster, k8s_node_agent: NodeAgent, operator_factory: OperatorFactory
) -> None:
    namespace = new_namespace(
        k8s_cluster, "restricted", {"pod-security.kubernetes.io/enforce": "restricted"}
    )
    searches = Searches(k8s_cluster, namespace)
    operator_factory([namespace], env=ANALYTIC_TRIALS)
    searches.create("strict", analytic_spec())
    status = searches.wait_phase("strict", ["Failed", "Succeeded"], 300)
    assert status["phase"] == "Succeeded", status.get("conditions")


def test_an_unschedulable_trial_waits_and_says_why(
    k8s_cluster: KubeCluster, k8s_node_agent: NodeAgent, operator_factory: OperatorFactory
) -> None:
    namespace = new_namespace(k8s_cluster, "nofit")
    searches = Searches(k8s_cluster, namespace)
    operator_factory([namespace], env=ANALYTIC_TRIALS)
    gpus = {"limits": {"nvidia.com/gpu": "64"}}
    spec = analytic_spec(template={"spec": {"containers": [{"name": "runner", "resources": gpus}]}})
    searches.create("huge", spec)
    blocked = wait_for(
        lambda: (
            (c := conditions(searches.status("huge")).get("TrialsBlocked"))
            and c["status"] == "True"
            and c
        ),
        120,
        "the TrialsBlocked condition",
    )
    assert (
        blocked["reason"] == "Unschedulable" and "Insufficient nvidia.com/gpu" in blocked["message"]
    )
    status = searches.status("huge")
    assert status["phase"] == "Pending" and conditions(status)["Failed"]["status"] == "False"
    assert len(searches.jobs("huge")) == 4  # still waiting (a node may come), nothing lost


# --------------------------------------------------------------------------- item: finalization


def test_a_failed_final_evaluation_is_retried_then_retried_on_request(
    k8s_cluster: KubeCluster, k8s_node_agent: NodeAgent, operator_factory: OperatorFactory
) -> None:
    """The final Job crashes on every attempt: tried 3 times with backoff, then
    FinalizationFailed with the best kept; fixed (here: a runner that works), the documented
    annotation runs it again and the search succeeds with the same best."""
    namespace = new_namespace(k8s_cluster, "final")
    searches = Searches(k8s_cluster, namespace)
    command = f"python {MISBEHAVING_RUNNER} final"
    broken = operator_factory(
        [namespace], env={"MERGESEARCH_RUNNER_COMMAND": command, **ANALYTIC_TRIALS}
    )
    spec = analytic_spec()
    spec["objective"]["heldOut"] = [{"task": "task-two"}]
    searches.create("export", spec)
    status = searches.wait_phase("export", ["Failed", "Succeeded"], 300)
    failed = conditions(status)["Failed"]
    assert failed["reason"] == "FinalizationFailed", failed
    assert status["final"]["state"] == "Failed" and status["final"]["attempt"] == 2
    best = status["best"]
    reasons = [e["reason"] for e in search_events(k8s_cluster, namespace, "export")]
    assert reasons.count("FinalizationRetried") == 2
    broken.stop()

    operator_factory([namespace], env=ANALYTIC_TRIALS)
    k8s_cluster.kubectl(
        "annotate", "-n", namespace, "msearch", "export", "mergesearch.io/retry-finalization=1"
    )
    status = searches.wait_phase("export", ["Succeeded"], 120)
    assert (
        status["best"]["weights"] == best["weights"]
        and status["best"]["fitness"] == best["fitness"]
    )
    handed_over = status.get("winner") or status["best"]  # the confirmed winner, when confirmed
    assert set(handed_over["heldOut"]) == {"task-two"}
    assert status["final"]["attempt"] == 3 and status["final"]["state"] == "Succeeded"


# --------------------------------------------------------------------------- item: finalizer


def test_the_finalizer_of_an_earlier_version_is_removed(
    k8s_cluster: KubeCluster, k8s_node_agent: NodeAgent, operator_factory: OperatorFactory
) -> None:
    """Searches an earlier operator marked with `mergesearch.io/finalizer` lose it as soon as
    this one sees them, so that deleting them later never waits for an operator."""
    namespace = new_namespace(k8s_cluster, "legacy")
    searches = Searches(k8s_cluster, namespace)
    spec = analytic_spec()
    spec["suspend"] = True
    body = {
        "apiVersion": "mergesearch.io/v1alpha1",
        "kind": "MergeSearch",
        "metadata": {"name": "old", "finalizers": ["mergesearch.io/finalizer"]},
        "spec": spec,
    }
    k8s_cluster.api().create(searches.path, body)
    operator_factory([namespace], env=ANALYTIC_TRIALS)
    wait_for(
        lambda: not searches.get("old")["metadata"].get("finalizers"),
        60,
        "the old finalizer to be removed",
    )
    searches.delete("old")
    wait_for(
        lambda: not k8s_cluster.api().get(searches.path)["items"],
        30,
        "the search to be deleted",
    )
