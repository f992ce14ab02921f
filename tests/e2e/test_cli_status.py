"""`mergesearch status` / `kubectl mergesearch status` and `mergesearch report --name` against a
search that ran on the real control plane."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from support.cluster import KubeCluster
from support.nodeagent import NodeAgent
from support.operator_proc import Searches, running_operator

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

SPEC: dict[str, Any] = {
    "checkpoints": [{"name": n, "uri": f"s3://unused/{n}/"} for n in ("alpha", "beta", "gamma")],
    "objective": {
        "heldIn": [{"task": "task-one"}, {"task": "task-two"}],
        "evaluator": {"backend": "analytic"},
    },
    "search": {"populationSize": 4, "maxGenerations": 2, "seed": 5},
}


@pytest.fixture(scope="module")
def finished(k8s_cluster: KubeCluster, k8s_node_agent: NodeAgent) -> dict[str, Any]:
    namespace = f"cli-{uuid.uuid4().hex[:6]}"
    k8s_cluster.create_namespace(namespace)
    searches = Searches(k8s_cluster, namespace)
    with running_operator(k8s_cluster, [namespace]):
        searches.create("cli-demo", SPEC)
        status = searches.wait_phase("cli-demo", ["Succeeded", "Failed"], 180)
    assert status["phase"] == "Succeeded", status.get("conditions")
    return {"namespace": namespace, "status": status}


def run_cli(cluster: KubeCluster, program: str, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "KUBECTL": str(Path(cluster.bindir) / "kubectl"),
    }
    exe = Path(sys.executable).parent / program
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, check=False)


@pytest.mark.parametrize("program", ["mergesearch", "kubectl-mergesearch"])
def test_status_shows_phase_best_and_baselines(
    k8s_cluster: KubeCluster, finished: dict[str, Any], program: str
) -> None:
    proc = run_cli(k8s_cluster, program, "status", "cli-demo", "-n", finished["namespace"])
    assert proc.returncode == 0, proc.stderr
    best = finished["status"]["best"]
    assert f"{finished['namespace']}/cli-demo: Succeeded" in proc.stdout
    assert f"best: {best['trial']} fitness {best['fitness']:.4f}" in proc.stdout
    for name in ("alpha", "beta", "gamma", "uniform", "task-one", "task-two"):
        assert name in proc.stdout
    assert "best weights:" in proc.stdout


def test_status_of_a_missing_search_is_a_clear_error(
    k8s_cluster: KubeCluster, finished: dict[str, Any]
) -> None:
    proc = run_cli(k8s_cluster, "mergesearch", "status", "nope", "-n", finished["namespace"])
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "not found" in proc.stderr


def test_report_from_the_cluster_draws_pictures(
    k8s_cluster: KubeCluster, finished: dict[str, Any], tmp_path: Path
) -> None:
    proc = run_cli(
        k8s_cluster,
        "mergesearch",
        *("report", "--name", "cli-demo", "-n", finished["namespace"], "-o", str(tmp_path)),
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("fitness.png", "weights.png", "scores.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
