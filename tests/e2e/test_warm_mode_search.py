"""Warm mode on the real control plane: evaluator pods lease candidates from the operator.

The operator runs as its own process with the RBAC ServiceAccount's credentials and serves the
evaluator endpoint; the node agent runs the evaluator Job's pods as `mergerunner evaluator`
processes (slowed per trial by tests/support/slow_evaluator.py so that a kill catches one
holding a lease). Trials use the benchmarking objective (the operator started with
`ANALYTIC_TRIALS`), so a search's result is a pure function of its spec and seed: a warm search
must end exactly as a one-Job-per-trial search does, whatever is killed on the way.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_operator_lifecycle import (
    analytic_spec,
    assert_counts_exact,
    new_namespace,
    result_of,
    trials_run,
)

from support.cluster import KubeCluster
from support.nodeagent import NodeAgent
from support.operator_proc import (
    ANALYTIC_TRIALS,
    OperatorFactory,
    Searches,
    evaluator_endpoint_env,
    operator_factory,
)
from support.polling import wait_for
from support.search_inputs import create_search_inputs, portable_tasks, upload_checkpoints

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]
__all__ = ["operator_factory"]

SLOW_EVALUATOR = Path(__file__).resolve().parents[1] / "support" / "slow_evaluator.py"
PARALLELISM = 2  # evaluators; the session's node agent runs 4 pods at a time


@pytest.fixture
def warm_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The operator's environment for serving evaluators on a free loopback port (analytic
    trials)."""
    yield {
        **evaluator_endpoint_env(tmp_path / "evaluator-key"),
        **ANALYTIC_TRIALS,
        "MERGESEARCH_EVALUATOR_COMMAND": f"{sys.executable} {SLOW_EVALUATOR} 0.4",
    }


def warm_spec() -> dict[str, Any]:
    spec = analytic_spec(parallelism=PARALLELISM)
    spec["execution"]["mode"] = "warm"
    return spec


def holders(status: dict[str, Any]) -> set[str]:
    return {x["evaluator"] for x in status.get("leases") or [] if x.get("evaluator")}


def kill_a_holder(agent: NodeAgent, searches: Searches, name: str) -> str:
    """SIGKILL the process of an evaluator pod that holds a lease now; its pod's name."""

    def target() -> Any:
        leased = holders(searches.status(name))
        mine = [c for c in agent.running() if c.namespace == searches.namespace]
        return next((c for c in mine if c.name in leased and c.process), None)

    container = wait_for(target, 60, "an evaluator holding a lease", interval_s=0.05)
    os.killpg(container.process.pid, signal.SIGKILL)
    return container.name


def post(url: str, token: str, body: dict[str, Any]) -> int:
    request = urllib.request.Request(  # noqa: S310 - the test's own loopback endpoint
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_warm_search_equals_a_jobs_search_through_evaluator_and_operator_kills(
    k8s_cluster: KubeCluster,
    k8s_node_agent: NodeAgent,
    operator_factory: OperatorFactory,
    warm_env: dict[str, str],
) -> None:
    """One operator, two namespaces: the same spec run as one Job per trial and warm. During
    the warm run an evaluator holding a lease is SIGKILLed (its candidate is issued again to
    the Job's replacement pod) and then the operator itself (the new process re-attaches to
    the running evaluators). Both end with the same best, history and mean, with every trial
    counted once and none failed; the warm run created no trial Job."""
    jobs_ns = new_namespace(k8s_cluster, "wjobs")
    warm_ns = new_namespace(k8s_cluster, "warm")
    by_jobs, warmed = Searches(k8s_cluster, jobs_ns), Searches(k8s_cluster, warm_ns)
    operator = operator_factory([jobs_ns, warm_ns], env=warm_env)
    by_jobs.create("ref", analytic_spec(parallelism=PARALLELISM))
    warmed.create("hot", warm_spec())

    wait_for(
        lambda: (warmed.status("hot").get("trials") or {}).get("finished", 0) >= 2,
        180,
        "2 finished warm trials",
        interval_s=0.1,
    )
    killed = kill_a_holder(k8s_node_agent, warmed, "hot")
    wait_for(  # the operator saw the pod end and issued its candidate again
        lambda: any(
            e.get("reason") == "EvaluatorLost" and killed in e.get("message", "")
            for e in warmed.events()
        ),
        60,
        f"an EvaluatorLost event for {killed}",
    )
    url = warm_env["MERGESEARCH_EVALUATOR_URL"] + "/v1/namespaces/" + warm_ns
    assert post(f"{url}/mergesearches/hot/lease", "forged", {"evaluator": "x"}) == 401

    wait_for(
        lambda: (warmed.status("hot").get("trials") or {}).get("finished", 0) >= 8,
        180,
        "8 finished warm trials",
        interval_s=0.1,
    )
    operator.kill()
    assert warmed.status("hot")["phase"] == "Running", "killed too late to test anything"
    operator.start()

    reference = by_jobs.wait_phase("ref", ["Succeeded", "Failed"], 240)
    status = warmed.wait_phase("hot", ["Succeeded", "Failed"], 240)
    assert reference["phase"] == status["phase"] == "Succeeded", status.get("conditions")
    assert result_of(status) == result_of(reference)
    assert_counts_exact(status, trials_run(reference))
    assert status["leases"] == [] and status["activeTrials"] == []

    # Only the evaluator Job ever existed in the warm namespace; it made a replacement pod
    # for the one killed, and is deleted now that the search is over.
    created = [e["involvedObject"]["name"] for e in warmed.job_events()]
    assert set(created) == {f for f in created if f.endswith("-evaluators")}
    assert len(created) >= PARALLELISM + 1, created
    assert killed not in {p["metadata"]["name"] for p in warmed.pods() if _running(p)}
    wait_for(lambda: not warmed.jobs("hot"), 60, "the evaluator Job deleted")


def _running(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") == "Running"


def test_suspending_a_warm_search_stops_its_evaluators_and_resume_ends_the_same(
    k8s_cluster: KubeCluster,
    k8s_node_agent: NodeAgent,
    operator_factory: OperatorFactory,
    warm_env: dict[str, str],
) -> None:
    ref_ns, warm_ns = new_namespace(k8s_cluster, "wref"), new_namespace(k8s_cluster, "wsusp")
    reference_runs, searches = Searches(k8s_cluster, ref_ns), Searches(k8s_cluster, warm_ns)
    operator_factory([ref_ns, warm_ns], env=warm_env)
    reference_runs.create("ref", warm_spec())
    searches.create("pause", warm_spec())
    wait_for(
        lambda: (searches.status("pause").get("trials") or {}).get("finished", 0) >= 4,
        180,
        "4 finished trials",
        interval_s=0.1,
    )
    searches.patch_spec("pause", {"suspend": True})
    suspended = searches.wait_phase("pause", ["Suspended"], 60)
    assert not holders(suspended)
    wait_for(lambda: not searches.jobs("pause"), 60, "the evaluator Job deleted")
    wait_for(
        lambda: not [c for c in k8s_node_agent.running() if c.namespace == warm_ns],
        60,
        "no evaluator process left",
    )
    searches.patch_spec("pause", {"suspend": False})
    status = searches.wait_phase("pause", ["Succeeded", "Failed"], 240)
    reference = reference_runs.wait_phase("ref", ["Succeeded", "Failed"], 240)
    assert status["phase"] == reference["phase"] == "Succeeded", status.get("conditions")
    assert result_of(status) == result_of(reference)
    assert_counts_exact(status, trials_run(reference))


def test_a_real_warm_search_over_s3_equals_the_one_job_search(
    k8s_cluster: KubeCluster,
    k8s_node_agent: NodeAgent,
    operator_factory: OperatorFactory,
    s3_server: Any,
    toy_pool: Any,
    tmp_path: Path,
) -> None:
    """The real runner: toy checkpoints fetched from the S3 server with the Secret's
    credentials, tasks from a ConfigMap, lm-eval scoring. The same spec and seed as one Job per
    trial and on warm evaluators (with a node cache): the same trials, scores and best."""
    (tmp_path / "node-cache").mkdir()
    env = {
        **evaluator_endpoint_env(tmp_path / "key"),
        "MERGESEARCH_NODE_CACHE_DIR": str(tmp_path / "node-cache"),
    }
    bucket = s3_server.create_bucket()
    names = list(toy_pool.checkpoints)[:3]
    uris = upload_checkpoints(s3_server, bucket, {n: toy_pool.checkpoints[n] for n in names})
    task, metric = next(iter(toy_pool.heldin.items()))
    tasks = portable_tasks(toy_pool.tasks_dir, [task])
    runs: dict[str, Searches] = {}
    for mode in ("jobs", "warm"):
        namespace = new_namespace(k8s_cluster, f"real{mode}")
        create_search_inputs(k8s_cluster.api(), namespace, s3_server, tasks)
        runs[mode] = Searches(k8s_cluster, namespace)
    operator_factory([runs["jobs"].namespace, runs["warm"].namespace], env=env)
    for mode, searches in runs.items():
        searches.create(
            "real",
            {
                "checkpoints": [{"name": n, "uri": u} for n, u in uris.items()],
                "merge": {"dtype": "float32"},
                "objective": {
                    "heldIn": [{"task": task, "metric": metric, "limit": 4}],
                    "customTasks": {"configMapRef": {"name": "toy-tasks"}},
                    "evaluator": {"device": "cpu", "batchSize": 8, "seed": 7},
                },
                "search": {"populationSize": 3, "maxGenerations": 1, "seed": 2, "baselines": []},
                "execution": {"mode": mode, "parallelism": 1, "backoffLimit": 0},
                "storage": {
                    "endpoint": s3_server.endpoint,
                    "region": s3_server.region,
                    "secretRef": {"name": "toy-store"},
                },
            },
        )
    done = {mode: s.wait_phase("real", ["Succeeded", "Failed"], 420) for mode, s in runs.items()}
    assert done["jobs"]["phase"] == done["warm"]["phase"] == "Succeeded", done["warm"].get(
        "conditions"
    )
    for key_ in ("best", "history", "trials", "paretoFront"):
        assert done["warm"][key_] == done["jobs"][key_], key_
    # Every Job that ever made a pod in the warm namespace: the evaluators and the preflight,
    # never a Job per trial.
    made = {e["involvedObject"]["name"] for e in runs["warm"].job_events()}
    assert made and all(n.endswith(("-evaluators", "-preflight")) for n in made), made
