"""`mergesearch status` / `kubectl mergesearch status` and `mergesearch report --name` against a
search that ran on the real control plane, read with the official `kubernetes` client: no kubectl
on the path, the kubeconfig's context, namespace and exec credential plugin honoured, and each
way a read can fail (no configuration, forbidden, not found, unreachable) a clear exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.cluster import KubeCluster, kubeconfig_document, write_kubeconfig
from support.net import free_ports
from support.nodeagent import NodeAgent
from support.operator_proc import ANALYTIC_TRIALS, Searches, running_operator

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

SPEC: dict[str, Any] = {
    "checkpoints": [{"name": n, "uri": f"s3://unused/{n}/"} for n in ("alpha", "beta", "gamma")],
    "objective": {
        "heldIn": [{"task": "task-one", "limit": 8}, {"task": "task-two", "limit": 8}],
    },
    "search": {"populationSize": 4, "maxGenerations": 2, "seed": 5},
}


@pytest.fixture(scope="module")
def finished(k8s_cluster: KubeCluster, k8s_node_agent: NodeAgent) -> dict[str, Any]:
    namespace = f"cli-{uuid.uuid4().hex[:6]}"
    k8s_cluster.create_namespace(namespace)
    searches = Searches(k8s_cluster, namespace)
    with running_operator(k8s_cluster, [namespace], env=ANALYTIC_TRIALS):
        searches.create("cli-demo", SPEC)
        status = searches.wait_phase("cli-demo", ["Succeeded", "Failed"], 180)
    assert status["phase"] == "Succeeded", status.get("conditions")
    return {"namespace": namespace, "status": status}


def run_cli(
    cluster: KubeCluster, program: str, *args: str, kubeconfig: Path | str | None = None
) -> subprocess.CompletedProcess:
    """The installed command, with the control-plane binaries (kubectl among them) off PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECTL", "KUBERNETES_SERVICE_HOST")}
    env["KUBECONFIG"] = str(kubeconfig or cluster.kubeconfig)
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p and p != str(cluster.bindir)
    )
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


def _grant_get(cluster: KubeCluster, namespace: str, account: str) -> None:
    """A Role that may only read MergeSearches, bound to one ServiceAccount."""
    api = cluster.api()
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}"
    api.create(
        f"{rbac}/roles",
        {
            "metadata": {"name": f"{account}-read"},
            "rules": [
                {"apiGroups": ["mergesearch.io"], "resources": ["mergesearches"], "verbs": ["get"]}
            ],
        },
    )
    api.create(
        f"{rbac}/rolebindings",
        {
            "metadata": {"name": f"{account}-read"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": f"{account}-read",
            },
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        },
    )


def test_status_through_an_exec_credential_plugin_and_the_contexts_namespace(
    k8s_cluster: KubeCluster, finished: dict[str, Any], tmp_path: Path
) -> None:
    """A kubeconfig as cloud CLIs write them: the user is an exec plugin that prints an
    ExecCredential (here a real ServiceAccount token from the TokenRequest API), and the
    context names the namespace, so `status NAME` needs no `-n`."""
    namespace = finished["namespace"]
    _grant_get(k8s_cluster, namespace, "cli-reader")
    token = k8s_cluster.service_account_token(namespace, "cli-reader")
    credential = tmp_path / "credential.json"
    credential.write_text(
        json.dumps(
            {
                "apiVersion": "client.authentication.k8s.io/v1",
                "kind": "ExecCredential",
                "status": {"token": token},
            }
        )
    )
    calls = tmp_path / "calls"
    plugin = tmp_path / "credential-plugin"
    plugin.write_text(f'#!/bin/sh\necho "$KUBERNETES_EXEC_INFO" >> {calls}\ncat {credential}\n')
    plugin.chmod(0o700)
    exec_user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": str(plugin),
            "interactiveMode": "Never",
        }
    }
    document = kubeconfig_document(k8s_cluster.server, k8s_cluster.ca_path, {})
    document["users"] = [{"name": "user", "user": exec_user}]
    document["contexts"][0]["context"]["namespace"] = namespace
    kubeconfig = tmp_path / "exec.kubeconfig"
    kubeconfig.write_text(json.dumps(document))

    proc = run_cli(k8s_cluster, "kubectl-mergesearch", "status", "cli-demo", kubeconfig=kubeconfig)

    assert proc.returncode == 0, proc.stderr
    assert f"{namespace}/cli-demo: Succeeded" in proc.stdout
    # The plugin ran once and was asked for a credential the way kubectl asks.
    (info,) = [json.loads(line) for line in calls.read_text().splitlines()]
    assert info["kind"] == "ExecCredential"
    assert info["apiVersion"] == "client.authentication.k8s.io/v1"


def test_status_picks_the_context_asked_for(
    k8s_cluster: KubeCluster, finished: dict[str, Any], tmp_path: Path
) -> None:
    """`--context`: the current context points nowhere, the named one at the cluster."""
    (closed_port,) = free_ports(1)
    document = yaml.safe_load(k8s_cluster.kubeconfig.read_text())
    document["clusters"].append(
        {"name": "nowhere", "cluster": {"server": f"https://127.0.0.1:{closed_port}"}}
    )
    document["contexts"].append(
        {"name": "nowhere", "context": {"cluster": "nowhere", "user": "user"}}
    )
    document["current-context"] = "nowhere"
    kubeconfig = tmp_path / "two.kubeconfig"
    kubeconfig.write_text(json.dumps(document))
    namespace = finished["namespace"]

    asked = run_cli(
        k8s_cluster,
        "mergesearch",
        *("status", "cli-demo", "-n", namespace, "--context", "mergesearch-test"),
        kubeconfig=kubeconfig,
    )
    current = run_cli(
        k8s_cluster, "mergesearch", "status", "cli-demo", "-n", namespace, kubeconfig=kubeconfig
    )

    assert asked.returncode == 0, asked.stderr
    assert f"{namespace}/cli-demo: Succeeded" in asked.stdout
    assert current.returncode == 2
    assert f"cannot reach the Kubernetes API at https://127.0.0.1:{closed_port}" in current.stderr


def test_status_without_rights_is_a_clear_error(
    k8s_cluster: KubeCluster, finished: dict[str, Any]
) -> None:
    namespace = finished["namespace"]
    kubeconfig = k8s_cluster.service_account_kubeconfig(namespace, "cli-nobody")
    proc = run_cli(
        k8s_cluster, "mergesearch", "status", "cli-demo", "-n", namespace, kubeconfig=kubeconfig
    )
    assert proc.returncode == 2
    assert "Forbidden" in proc.stderr and "cli-nobody" in proc.stderr, proc.stderr


def test_status_without_a_kubeconfig_is_a_clear_error(
    k8s_cluster: KubeCluster, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such.kubeconfig"
    proc = run_cli(k8s_cluster, "mergesearch", "status", "cli-demo", kubeconfig=missing)
    assert proc.returncode == 2
    assert "no usable Kubernetes configuration" in proc.stderr and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_report_from_an_unreachable_cluster_is_a_clear_error(
    k8s_cluster: KubeCluster, tmp_path: Path
) -> None:
    (closed_port,) = free_ports(1)
    kubeconfig = write_kubeconfig(
        tmp_path / "closed.kubeconfig",
        f"https://127.0.0.1:{closed_port}",
        k8s_cluster.ca_path,
        {"token": "unused"},
    )
    proc = run_cli(
        k8s_cluster,
        "mergesearch",
        *("report", "--name", "cli-demo", "-o", str(tmp_path)),
        kubeconfig=kubeconfig,
    )
    assert proc.returncode == 2
    assert f"cannot reach the Kubernetes API at https://127.0.0.1:{closed_port}" in proc.stderr
    assert "Traceback" not in proc.stderr
