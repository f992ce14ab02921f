"""The API server itself rejects malformed MergeSearch manifests, naming the field.

The CRD is generated from the spec model; these tests apply it to a real kube-apiserver and
check that its schema and CEL rules catch what the model catches, before any operator runs.
"""

from __future__ import annotations

import copy
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.cluster import KubeCluster

pytestmark = [pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]

GOOD: dict[str, Any] = {
    "apiVersion": "mergesearch.io/v1alpha1",
    "kind": "MergeSearch",
    "metadata": {"name": "valid"},
    "spec": {
        "checkpoints": [{"name": "a", "uri": "s3://c/a/"}, {"name": "b", "uri": "s3://c/b/"}],
        "objective": {"heldIn": [{"task": "toy_add", "metric": "exact_match"}]},
        "suspend": True,
    },
}


@pytest.fixture(scope="module")
def crd_namespace(k8s_cluster: KubeCluster) -> Iterator[str]:
    k8s_cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "mergesearch.yaml"))
    k8s_cluster.kubectl(
        "wait", "--for=condition=Established", "crd/mergesearches.mergesearch.io", "--timeout=60s"
    )
    name = f"crd-{uuid.uuid4().hex[:8]}"
    k8s_cluster.create_namespace(name)
    yield name
    k8s_cluster.api().delete(f"/api/v1/namespaces/{name}")


def apply(cluster: KubeCluster, namespace: str, doc: dict[str, Any]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *(str(Path(cluster.bindir) / "kubectl"), "--kubeconfig", str(cluster.kubeconfig)),
            *("apply", "-n", namespace, "-f", "-"),
        ],
        input=json.dumps(doc),
        capture_output=True,
        text=True,
        check=False,
    )


def with_spec(name: str, **changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    doc["metadata"]["name"] = name
    doc["spec"].update(changes)
    return doc


def test_valid_manifest_is_accepted_with_defaults(k8s_cluster: KubeCluster, crd_namespace: str):
    proc = apply(k8s_cluster, crd_namespace, GOOD)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(
        k8s_cluster.kubectl("get", "msearch", "valid", "-n", crd_namespace, "-o", "json")
    )
    assert got["spec"]["merge"] == {
        "method": "linear",
        "parameterization": "simplex",
        "dtype": "bfloat16",
    }
    assert got["spec"]["search"]["start"] == "uniform"
    assert "sigma0" not in got["spec"]["search"]  # its default depends on the parameterization
    assert got["spec"]["objective"]["heldIn"][0]["weight"] == 1.0
    table = k8s_cluster.kubectl("get", "msearch", "-n", crd_namespace)
    assert table.split()[:7] == ["NAME", "PHASE", "ITERATION", "TRIALS", "BEST", "CONFIRMED", "AGE"]


INVALID = [
    ({"checkpoints": [{"name": "a", "uri": "x"}]}, "spec.checkpoints"),
    (
        {"checkpoints": [{"name": "a", "uri": "x"}, {"name": "a", "uri": "y"}]},
        "checkpoint names must be unique",
    ),
    (
        {"checkpoints": [{"name": "a", "uri": "x"}, {"name": "B_", "uri": "y"}]},
        "spec.checkpoints[1].name",
    ),
    ({"checkpoints": [{"name": "a", "uri": "x"}, {"name": "b"}]}, "spec.checkpoints[1].uri"),
    ({"objective": {"heldIn": []}}, "spec.objective.heldIn"),
    ({"objective": {"heldIn": [{"task": "t", "limit": 0}]}}, "spec.objective.heldIn[0].limit"),
    (
        {"objective": {"heldIn": [{"task": "t"}], "heldOut": [{"task": "t"}]}},
        "both held-in and held-out",
    ),
    (
        {"objective": {"heldIn": [{"task": "t"}], "customTasks": {}}},
        "exactly one of configMapRef and path",
    ),
    ({"merge": {"dtype": "int8"}}, "spec.merge.dtype"),
    ({"merge": {"parameterization": "abs"}}, "spec.merge.parameterization"),
    ({"search": {"sigma0": 0}}, "spec.search.sigma0"),
    ({"search": {"populationSize": 2}}, "spec.search.populationSize"),
    ({"search": {"baselines": ["each", "each"]}}, "each baseline may be listed once"),
    ({"search": {"baselines": ["best"]}}, "spec.search.baselines[0]"),
    (
        {"search": {"baselines": [], "start": "best-baseline"}},
        "start: best-baseline needs at least one baseline",
    ),
    ({"search": {"start": "median"}}, "spec.search.start"),
    ({"execution": {"parallelism": 0}}, "spec.execution.parallelism"),
    ({"search": {"maxTrials": "many"}}, "spec.search.maxTrials"),
]


@pytest.mark.parametrize(("changes", "field"), INVALID)
def test_invalid_manifests_are_rejected_naming_the_field(
    k8s_cluster: KubeCluster, crd_namespace: str, changes: dict[str, Any], field: str
) -> None:
    name = f"bad-{uuid.uuid4().hex[:6]}"
    proc = apply(k8s_cluster, crd_namespace, with_spec(name, **changes))
    assert proc.returncode != 0
    assert field in proc.stderr, proc.stderr


def test_unknown_fields_are_refused(k8s_cluster: KubeCluster, crd_namespace: str) -> None:
    proc = apply(k8s_cluster, crd_namespace, with_spec("typo", search={"popSize": 4}))
    assert proc.returncode != 0
    assert "popSize" in proc.stderr


def test_immutable_fields(k8s_cluster: KubeCluster, crd_namespace: str) -> None:
    doc = with_spec("immutable")
    assert apply(k8s_cluster, crd_namespace, doc).returncode == 0
    changed = copy.deepcopy(doc)
    changed["spec"]["checkpoints"][1]["uri"] = "s3://c/other/"
    proc = apply(k8s_cluster, crd_namespace, changed)
    assert proc.returncode != 0 and "checkpoints are immutable" in proc.stderr
    reseeded = copy.deepcopy(doc)
    reseeded["spec"]["search"] = {"seed": 5}
    proc = apply(k8s_cluster, crd_namespace, reseeded)
    assert proc.returncode != 0 and "search.seed is immutable" in proc.stderr
    restarted = copy.deepcopy(doc)
    restarted["spec"]["search"] = {"start": "best-baseline"}  # from the default uniform
    proc = apply(k8s_cluster, crd_namespace, restarted)
    assert proc.returncode != 0 and "search.start is immutable" in proc.stderr
    budget = copy.deepcopy(doc)
    budget["spec"]["search"] = {"maxTrials": 999}
    proc = apply(k8s_cluster, crd_namespace, budget)
    assert proc.returncode == 0, proc.stderr
