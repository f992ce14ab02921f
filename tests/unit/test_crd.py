"""The CRD is generated from the spec model; the committed copy must not drift from it."""

from __future__ import annotations

import json
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from mergesearch.crd import crd, crd_yaml
from mergesearch.spec import MergeSearchSpec

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    typed = "type" in node or "x-kubernetes-int-or-string" in node
    if typed or "x-kubernetes-preserve-unknown-fields" in node:  # any scalar: applyChatTemplate
        out.append((path, node))
    for key, child in node.get("properties", {}).items():
        out += _walk(child, f"{path}.{key}")
    if "items" in node:
        out += _walk(node["items"], f"{path}[]")
    return out


def _keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node).union(*(_keys(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_keys(v) for v in node))
    return set()


def spec_schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def test_committed_crd_is_generated() -> None:
    committed = (ROOT / "crds" / "mergesearch.yaml").read_text()
    assert committed == crd_yaml(), "run `mergesearch crd -o crds/mergesearch.yaml`"


def test_schema_is_structural() -> None:
    assert not _keys(spec_schema()) & {"$ref", "anyOf", "oneOf", "const", "$defs", "title"}
    for path, node in _walk(spec_schema()):
        assert (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")  # a scalar of several types
        ), path
        if node.get("type") == "object":
            assert "properties" in node or node.get("x-kubernetes-preserve-unknown-fields"), path


def _model_fields(model: type[BaseModel], path: str = "") -> set[str]:
    """Every field path of the pydantic model, by wire name ("[]" marks list items)."""
    out = set()
    for name, field in model.model_fields.items():
        wire = f"{path}.{field.alias or name}"
        out |= {wire} | _annotation_fields(field.annotation, wire)
    return out


def _annotation_fields(annotation: Any, path: str) -> set[str]:
    origin = get_origin(annotation)
    if origin is list:
        return _annotation_fields(get_args(annotation)[0], f"{path}[]")
    if origin in (Union, UnionType):
        return set().union(*(_annotation_fields(a, path) for a in get_args(annotation)))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _model_fields(annotation, path)
    return set()


def test_crd_and_model_agree_field_by_field() -> None:
    crd_fields = {path for path, _ in _walk(spec_schema()) if path}
    model_fields = _model_fields(MergeSearchSpec)
    # List item nodes appear in the CRD as "x[]"; compare the named fields only.
    crd_named = {p for p in crd_fields if not p.endswith("[]")}
    # The pod template is free-form in the model; the CRD types its shape (containers a list).
    template = {p for p in crd_named if p.startswith(".execution.template.")}
    assert template == {
        ".execution.template.metadata",
        ".execution.template.spec",
        ".execution.template.spec.containers",
        ".execution.template.containers",
    }
    assert crd_named - template == model_fields
    assert ".checkpoints[].uri" in crd_named


def test_cel_rules_and_columns() -> None:
    schema = spec_schema()
    rules = schema["properties"]["checkpoints"]["x-kubernetes-validations"]
    assert any("exists_one" in r["rule"] for r in rules)
    assert any(r["rule"] == "self == oldSelf" for r in rules)
    version = crd()["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Iteration",
        "Trials",
        "Best",
        "Confirmed",
        "Age",
    ]
    assert version["subresources"] == {"status": {}}
    assert "msearch" in crd()["spec"]["names"]["shortNames"]


def test_the_best_column_is_the_operators_4_decimal_string() -> None:
    columns = crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    best = next(c for c in columns if c["name"] == "Best")
    assert best == {"name": "Best", "type": "string", "jsonPath": ".status.bestFitness"}


def test_the_backends_offered_are_those_a_search_runs_on() -> None:
    """Not the benchmarking objective (`analytic`): an operator started for benchmarks writes
    it into trial documents (MERGESEARCH_BENCHMARK_OBJECTIVE); a user cannot ask for it."""
    evaluator = spec_schema()["properties"]["objective"]["properties"]["evaluator"]
    backend = evaluator["properties"]["backend"]
    assert backend["enum"] == ["hf", "vllm", "openai"]
    assert "analytic" not in backend["description"]


def test_the_pod_template_is_never_defaulted() -> None:
    """A default `spec: {}` would turn a bare pod spec ({containers}) into a PodTemplateSpec
    whose containers are ignored."""
    template = spec_schema()["properties"]["execution"]["properties"]["template"]
    assert "default" not in json.dumps(template)
    assert template["properties"]["spec"]["properties"]["containers"]["type"] == "array"


def test_exclusive_bounds_use_openapi_v3_form() -> None:
    sigma0 = spec_schema()["properties"]["search"]["properties"]["sigma0"]
    assert sigma0["minimum"] == 0 and sigma0["exclusiveMinimum"] is True


def status_schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def test_the_status_schema_is_generated_from_the_status_model_field_by_field() -> None:
    from mergesearch.operator.status import MergeSearchStatus, Phase

    schema = status_schema()
    assert not _keys(schema) & {"$ref", "anyOf", "oneOf", "const", "$defs", "title"}
    crd_named = {path for path, _ in _walk(schema) if path and not path.endswith("[]")}
    assert crd_named == _model_fields(MergeSearchStatus)
    assert schema["properties"]["phase"]["enum"] == [p.value for p in Phase]
    # The one open part is the engine's opaque state; everything else is typed.
    open_parts = [
        p for p, node in _walk(schema) if node.get("x-kubernetes-preserve-unknown-fields")
    ]
    assert open_parts == [".optimizer"] and "x-kubernetes-preserve-unknown-fields" not in schema
    scores = schema["properties"]["best"]["properties"]["scores"]
    assert scores == {"additionalProperties": {"type": "number"}, "type": "object"}
    conditions = schema["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert conditions["items"]["required"] == ["type", "status"]
    assert not [p for p, node in _walk(schema) if node.get("required") and p != ".conditions[]"]
    # What the operator writes, to the last field, has a place in the schema.
    assert schema["properties"]["final"]["properties"]["retryRequest"] == {"type": "string"}
    assert schema["properties"]["evaluators"]["properties"]["bytesFetched"] == {"type": "integer"}
