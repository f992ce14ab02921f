"""The MergeSearch spec: defaults, and errors that name the field a user must fix."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from mergesearch.spec import SpecError, cluster_errors, load_manifest, parse_manifest, parse_spec

pytestmark = pytest.mark.unit

GOOD: dict[str, Any] = {
    "apiVersion": "mergesearch.io/v1alpha1",
    "kind": "MergeSearch",
    "metadata": {"name": "demo"},
    "spec": {
        "checkpoints": [{"name": "a", "uri": "s3://ckpt/a/"}, {"name": "b", "uri": "/data/b"}],
        "objective": {"heldIn": [{"task": "add", "metric": "exact_match", "limit": 100}]},
    },
}


def with_spec(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    doc["spec"].update(changes)
    return doc


def errors_of(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_manifest(doc)
    return info.value.errors


def test_defaults_follow_the_paper() -> None:
    spec = parse_manifest(GOOD).spec
    assert spec.merge.parameterization == "simplex"
    assert spec.merge.method == "linear"
    assert spec.search.baselines == ["each", "uniform", "merge-best"]
    assert spec.search.population_size is None  # engine picks 4 + 3 ln N
    assert spec.objective.evaluator.trust_remote_code is False
    assert spec.suspend is False
    assert spec.checkpoint_names == ["a", "b"]
    assert spec.search.confirm.enabled and spec.search.confirm.top_k == 5


def test_confirmation_needs_a_limit_on_every_held_in_task() -> None:
    """Without a limit the search sees every example: nothing unseen is left to confirm on."""
    doc = with_spec(objective={"heldIn": [{"task": "add", "limit": 50}, {"task": "rev"}]})
    assert errors_of(doc) == [
        "spec.search: confirm: needs unseen examples of every held-in task; set "
        "objective.heldIn[1].limit (the search's subset), or confirm.enabled: false"
    ]
    doc["spec"]["search"] = {"confirm": {"enabled": False}}
    assert parse_manifest(doc).spec.search.confirm.enabled is False


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"search": {"sigma0": 0}}, "spec.search.sigma0: must be > 0"),
        ({"search": {"populationSize": 2}}, "spec.search.populationSize: must be >= 3"),
        ({"search": {"popSize": 4}}, "spec.search.popSize: unknown field"),
        ({"execution": {"parallelism": 0}}, "spec.execution.parallelism: must be >= 1"),
        (
            {"checkpoints": [{"name": "a", "uri": "x"}]},
            "spec.checkpoints: must have at least 2 item(s)",
        ),
        (
            {"checkpoints": [{"name": "a", "uri": "x"}, {"name": "a", "uri": "y"}]},
            "spec.checkpoints: names must be unique: ['a']",
        ),
        (
            {"checkpoints": [{"name": "a", "uri": "x"}, {"name": "B!", "uri": "y"}]},
            "spec.checkpoints[1].name: must match",
        ),
        ({"objective": {"heldIn": []}}, "spec.objective.heldIn: must have at least 1 item(s)"),
        (
            {"objective": {"heldIn": [{"task": "t", "limit": 0}]}},
            "spec.objective.heldIn[0].limit: must be >= 1",
        ),
        (
            {"objective": {"heldIn": [{"task": "t"}], "heldOut": [{"task": "t"}]}},
            "spec.objective: each task may appear once",
        ),
        ({"merge": {"dtype": "int8"}}, "spec.merge.dtype: Input should be"),
        ({"search": {"baselines": ["each", "each"]}}, "spec.search: baselines: each baseline"),
    ],
)
def test_errors_name_the_field(changes: dict[str, Any], expected: str) -> None:
    errors = errors_of(with_spec(**changes))
    assert any(e.startswith(expected) for e in errors), errors


def test_every_problem_is_reported_at_once() -> None:
    errors = errors_of(with_spec(search={"sigma0": -1, "maxTrials": 0}))
    assert len(errors) == 2


def test_missing_spec_and_wrong_kind() -> None:
    doc = copy.deepcopy(GOOD)
    del doc["spec"]
    doc["kind"] = "Job"
    errors = errors_of(doc)
    assert any(e.startswith("spec: is required") for e in errors)
    assert any(e.startswith("kind:") for e in errors)


def test_parse_spec_prefixes_paths() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({"checkpoints": [], "objective": {"heldIn": [{"task": "t", "limit": 9}]}})
    assert info.value.errors == ["spec.checkpoints: must have at least 2 item(s)"]


def test_yaml_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("spec: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad\.yaml"):
        load_manifest(path)


def test_yaml_tags_are_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_manifest(path)


@pytest.mark.parametrize("name", ["../../x", "a/b", ".hidden", "UPPER", "a..b", "-a", "a_b", ""])
def test_metadata_name_must_be_a_kubernetes_name(name: str) -> None:
    doc = copy.deepcopy(GOOD)
    doc["metadata"]["name"] = name
    errors = errors_of(doc)
    assert len(errors) == 1 and errors[0].startswith("metadata.name: "), errors


@pytest.mark.parametrize("name", ["recycle-demo", "a", "v1.2-search", "x" * 253])
def test_kubernetes_names_are_accepted(name: str) -> None:
    doc = copy.deepcopy(GOOD)
    doc["metadata"]["name"] = name
    assert parse_manifest(doc).metadata.name == name


BAD_REF = {"name": "-x"}


def _objective(**evaluator: Any) -> dict[str, Any]:
    return {"heldIn": [{"task": "add", "limit": 50}], "evaluator": evaluator}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"objective": _objective(batchSize=-1)}, "spec.objective.evaluator.batchSize"),
        ({"objective": _objective(batchSize=0)}, "spec.objective.evaluator.batchSize"),
        ({"objective": _objective(batchSize="big")}, "spec.objective.evaluator.batchSize"),
        ({"objective": _objective(device="gpu")}, "spec.objective.evaluator.device"),
        ({"objective": _objective(device="cuda:x")}, "spec.objective.evaluator.device"),
        # The benchmarking objective is the operator's deployment's choice, never a spec's.
        ({"objective": _objective(backend="analytic")}, "spec.objective.evaluator.backend"),
        ({"storage": {"secretRef": {"name": "My_Secret"}}}, "spec.storage.secretRef.name"),
        (
            {"objective": {"heldIn": [{"task": "a"}], "customTasks": {"configMapRef": BAD_REF}}},
            "spec.objective.customTasks.configMapRef.name",
        ),
    ],
)  # fmt: skip
def test_bad_evaluator_options_and_object_names_are_refused_by_field(
    changes: dict[str, Any], field: str
) -> None:
    errors = errors_of(with_spec(**changes))
    assert any(e.startswith(field) for e in errors), errors


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:15"])
def test_devices_lm_eval_accepts(device: str) -> None:
    spec = parse_manifest(with_spec(objective=_objective(device=device, batchSize=8))).spec
    assert spec.objective.evaluator.device == device


def test_custom_tasks_from_a_path_are_local_only() -> None:
    local = with_spec(
        objective={"heldIn": [{"task": "a", "limit": 50}], "customTasks": {"path": "./t"}}
    )
    spec = parse_manifest(local).spec  # valid for `mergesearch run`
    (error,) = cluster_errors(spec)
    assert error.startswith("spec.objective.customTasks.path: ") and "configMapRef" in error
    cm = {
        "heldIn": [{"task": "a", "limit": 50}],
        "customTasks": {"configMapRef": {"name": "tasks.v1"}},
    }
    assert cluster_errors(parse_manifest(with_spec(objective=cm)).spec) == []


def test_warm_evaluators_refuse_a_server_backend() -> None:
    """A warm evaluator scores in-process: a server backend would fail its first lease after
    the whole fetch, so the spec is refused before any pod."""
    server = {"command": ["serve", "{model}"], "promptLogprobs": True}
    objective = _objective(backend="openai", server=server)
    warm = with_spec(objective=objective, execution={"mode": "warm"})
    (error,) = cluster_errors(parse_manifest(warm).spec)
    assert error.startswith("spec.execution.mode: ") and "backend openai" in error
    jobs = with_spec(objective=objective, execution={"mode": "jobs"})
    assert cluster_errors(parse_manifest(jobs).spec) == []
    hf = with_spec(objective=_objective(), execution={"mode": "warm"})
    assert cluster_errors(parse_manifest(hf).spec) == []
