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
    (
        {"objective": {"heldIn": [{"task": "t"}], "evaluator": {"batchSize": -4}}},
        "spec.objective.evaluator.batchSize",
    ),
    (
        {"objective": {"heldIn": [{"task": "t"}], "evaluator": {"batchSize": "lots"}}},
        "spec.objective.evaluator.batchSize",
    ),
    (
        {"objective": {"heldIn": [{"task": "t"}], "evaluator": {"device": "gpu0"}}},
        "spec.objective.evaluator.device",
    ),
    ({"storage": {"secretRef": {"name": "Bad_Name"}}}, "spec.storage.secretRef.name"),
    (
        {"objective": {"heldIn": [{"task": "t"}], "customTasks": {"configMapRef": {"name": "A"}}}},
        "spec.objective.customTasks.configMapRef.name",
    ),
    (
        {"execution": {"template": {"spec": {"containers": {"name": "runner"}}}}},
        "spec.execution.template.spec.containers",
    ),
    ({"execution": {"template": {"containers": "runner"}}}, "spec.execution.template.containers"),
    (
        {
            "objective": {"heldIn": [{"task": "t"}], "evaluator": {"backend": "vllm"}},
            "execution": {"mode": "warm"},
        },
        "warm evaluators score in-process with evaluator.backend hf",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "field"), INVALID)
def test_invalid_manifests_are_rejected_naming_the_field(
    k8s_cluster: KubeCluster, crd_namespace: str, changes: dict[str, Any], field: str
) -> None:
    name = f"bad-{uuid.uuid4().hex[:6]}"
    proc = apply(k8s_cluster, crd_namespace, with_spec(name, **changes))
    assert proc.returncode != 0
    assert field in proc.stderr, proc.stderr


def test_valid_evaluator_options_and_a_bare_pod_spec_template_are_kept(
    k8s_cluster: KubeCluster, crd_namespace: str
) -> None:
    """What item by item is refused above is accepted in its valid forms; the template is not
    defaulted into another shape (a bare pod spec stays one)."""
    template = {"containers": [{"name": "runner", "resources": {"limits": {"cpu": "1"}}}]}
    doc = with_spec(
        "options-ok",
        objective={
            "heldIn": [{"task": "t"}],
            "evaluator": {"batchSize": 16, "device": "cuda:1"},
        },
        execution={"template": template},
    )
    proc = apply(k8s_cluster, crd_namespace, doc)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(
        k8s_cluster.kubectl("get", "msearch", "options-ok", "-n", crd_namespace, "-o", "json")
    )
    assert got["spec"]["execution"]["template"] == template
    assert got["spec"]["objective"]["evaluator"]["batchSize"] == 16
    auto = with_spec("options-auto", objective={"heldIn": [{"task": "t"}]})
    assert apply(k8s_cluster, crd_namespace, auto).returncode == 0


def test_the_best_column_shows_4_decimals(k8s_cluster: KubeCluster, crd_namespace: str) -> None:
    from mergesearch.operator.status import fitness_text

    assert apply(k8s_cluster, crd_namespace, with_spec("best-column")).returncode == 0
    path = f"/apis/mergesearch.io/v1alpha1/namespaces/{crd_namespace}/mergesearches/best-column"
    status = {"phase": "Running", "best": {"fitness": 0.757012345678}}
    status["bestFitness"] = fitness_text(status["best"]["fitness"])
    k8s_cluster.api().merge_patch(f"{path}/status", {"status": status})
    table = k8s_cluster.kubectl("get", "msearch", "best-column", "-n", crd_namespace)
    row = table.strip().splitlines()[1].split()
    assert row[:2] == ["best-column", "Running"] and row[-2] == "0.7570", table


def test_describe_keeps_the_optimizer_state_to_one_line(
    k8s_cluster: KubeCluster, crd_namespace: str
) -> None:
    """`kubectl describe msearch` printed ~150 lines of optimizer internals above the useful
    status; the state is now one string."""
    from mergesearch.engine import EngineConfig, Result, init, pending_candidates, tell
    from mergesearch.operator.status import MergeSearchStatus, Phase, Reason, build_status

    config = EngineConfig(checkpoints=tuple("abcdefghi"), tasks={"t": 1.0}, max_generations=5)
    state = init(config)
    for _ in range(3):
        batch = pending_candidates(state)
        state = tell(
            state, [Result(c.id, scores={"t": 0.3 + 0.01 * i}) for i, c in enumerate(batch)]
        )
    status = build_status(
        state=state, phase=Phase.RUNNING, reason=Reason.SEARCHING, message="generation 1",
        previous=MergeSearchStatus(), active=[], now="2025-01-01T00:00:00Z", spec_generation=1,
    ).to_wire()  # fmt: skip
    assert apply(k8s_cluster, crd_namespace, with_spec("described")).returncode == 0
    path = f"/apis/mergesearch.io/v1alpha1/namespaces/{crd_namespace}/mergesearches/described"
    k8s_cluster.api().merge_patch(f"{path}/status", {"status": status})
    text = k8s_cluster.kubectl("describe", "msearch", "described", "-n", crd_namespace)
    optimizer = [line for line in text.splitlines() if "Optimizer" in line]
    assert len(optimizer) == 1 and "engine-json+zlib+base64:" in optimizer[0]
    for internal in ("cma_version", "countiter", "cov_upper", "bit_generator", "has_uint32"):
        assert internal not in text.lower(), internal  # the nested state's keys (~180 lines)
    best = next(line for line in text.splitlines() if "Best Fitness" in line)
    assert best.split()[-1] == status["bestFitness"]


def test_unknown_fields_are_refused(k8s_cluster: KubeCluster, crd_namespace: str) -> None:
    proc = apply(k8s_cluster, crd_namespace, with_spec("typo", search={"popSize": 4}))
    assert proc.returncode != 0
    assert "popSize" in proc.stderr


FULL: dict[str, Any] = {
    **GOOD["spec"],
    "merge": {"method": "linear", "parameterization": "unconstrained", "dtype": "float16"},
    "objective": {
        "heldIn": [{"task": "toy_add", "metric": "exact_match"}],
        "heldOut": [{"task": "toy_sub"}],
    },
    "search": {
        "seed": 3,
        "sigma0": 0.5,
        "start": "best-baseline",
        "populationSize": 5,
        "baselines": ["each"],
        "failurePolicy": "resample",
        "maxTrials": 50,
    },
}


def _without(path: str) -> Any:
    def edit(spec: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = spec
        for part in parents:
            node = node[part]
        del node[leaf]

    return edit


def _set(path: str, value: Any) -> Any:
    def edit(spec: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = spec
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    return edit


# (what, start from FULL or the minimal GOOD spec, the edit, the message it must be refused with)
IMMUTABLE = [
    (
        "checkpoint uri changed",
        FULL,
        _set("checkpoints", [{"name": "a", "uri": "s3://c/a/"}, {"name": "b", "uri": "s3://x/"}]),
        "checkpoints are immutable",
    ),
    (
        "checkpoint added",
        FULL,
        _set("checkpoints", [*GOOD["spec"]["checkpoints"], {"name": "c", "uri": "s3://c/c/"}]),
        "checkpoints are immutable",
    ),
    ("merge changed", FULL, _set("merge.dtype", "bfloat16"), "merge is immutable"),
    ("merge removed", FULL, _without("merge"), "merge is immutable"),
    (
        "merge added",
        GOOD["spec"],
        _set("merge", {"parameterization": "unconstrained"}),
        "merge is immutable",
    ),
    (
        "heldIn changed",
        FULL,
        _set("objective.heldIn", [{"task": "toy_mul"}]),
        "objective is immutable",
    ),
    ("heldOut removed", FULL, _without("objective.heldOut"), "objective is immutable"),
    (
        "heldOut added",
        GOOD["spec"],
        _set("objective.heldOut", [{"task": "toy_sub"}]),
        "objective is immutable",
    ),
    (
        "evaluator added",
        GOOD["spec"],
        _set("objective.evaluator", {"seed": 9}),
        "objective is immutable",
    ),
]
for field, changed, added in [
    ("seed", 4, 4),
    ("sigma0", 0.25, 0.25),
    ("start", "uniform", "best-baseline"),  # (added: a value other than the default)
    ("populationSize", 6, 6),
    ("baselines", ["uniform"], ["uniform"]),
    ("failurePolicy", "penalize", "resample"),
]:
    message = f"search.{field} is immutable"
    IMMUTABLE += [
        (f"search.{field} changed", FULL, _set(f"search.{field}", changed), message),
        (f"search.{field} removed", FULL, _without(f"search.{field}"), message),
        (f"search.{field} added", GOOD["spec"], _set(f"search.{field}", added), message),
    ]
IMMUTABLE.append(("search removed", FULL, _without("search"), "is immutable"))


@pytest.mark.parametrize(
    ("start", "edit", "message"),
    [pytest.param(start, edit, message, id=what) for what, start, edit, message in IMMUTABLE],
)
def test_immutable_fields_cannot_be_changed_added_or_removed(
    k8s_cluster: KubeCluster, crd_namespace: str, start: dict[str, Any], edit: Any, message: str
) -> None:
    doc = with_spec(f"imm-{uuid.uuid4().hex[:6]}")
    doc["spec"] = copy.deepcopy(start)
    created = apply(k8s_cluster, crd_namespace, doc)
    assert created.returncode == 0, created.stderr
    changed = copy.deepcopy(doc)
    edit(changed["spec"])
    proc = replace(k8s_cluster, crd_namespace, changed)
    assert proc.returncode != 0, f"accepted: {changed['spec']}"
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(_set("search.maxTrials", 999), id="maxTrials changed"),
        pytest.param(_without("search.maxTrials"), id="maxTrials removed"),
        pytest.param(_set("search.targetFitness", 0.9), id="targetFitness added"),
        pytest.param(_set("search.stagnationGenerations", 3), id="stagnation added"),
        pytest.param(_set("execution.maxFailedTrials", 2), id="maxFailedTrials"),
        pytest.param(_set("suspend", False), id="suspend"),
    ],
)
def test_budgets_may_change(k8s_cluster: KubeCluster, crd_namespace: str, edit: Any) -> None:
    doc = with_spec(f"budget-{uuid.uuid4().hex[:6]}")
    doc["spec"] = copy.deepcopy(FULL)
    assert apply(k8s_cluster, crd_namespace, doc).returncode == 0
    edit(doc["spec"])
    proc = replace(k8s_cluster, crd_namespace, doc)
    assert proc.returncode == 0, proc.stderr


def replace(
    cluster: KubeCluster, namespace: str, doc: dict[str, Any]
) -> subprocess.CompletedProcess:
    """`kubectl replace`: the whole object as written (an `apply` would merge the edit with
    the last applied configuration and could leave a removed field in place)."""
    return subprocess.run(
        [
            *(str(Path(cluster.bindir) / "kubectl"), "--kubeconfig", str(cluster.kubeconfig)),
            *("replace", "-n", namespace, "-f", "-"),
        ],
        input=json.dumps(doc),
        capture_output=True,
        text=True,
        check=False,
    )
