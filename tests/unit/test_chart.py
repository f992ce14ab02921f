"""The Helm chart's copies of what the code defines (RBAC rules, the CRD, the operator's command,
the metric names) do not drift. Rendering with the real Helm is in tests/e2e/test_helm.py."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from mergesearch import admission, chartsync, entrypoints
from mergesearch.crd import crd_yaml
from mergesearch.operator import metrics
from mergesearch.rbac import rules

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "mergesearch"
EXPORTED = {*metrics.HELP} | {
    f"mergesearch_trial_duration_seconds_{suffix}" for suffix in ("bucket", "sum", "count")
}


def dashboard() -> dict:
    return json.loads((CHART / "dashboards" / "mergesearch.json").read_text())


def test_generated_files_match_their_sources(tmp_path: Path) -> None:
    assert chartsync.drift(CHART) == [], "run: python -m mergesearch.chartsync"
    copied = yaml.safe_load((CHART / chartsync.RULES_FILE).read_text())
    assert copied["rules"] == rules()
    assert (CHART / chartsync.CRD_FILE).read_text() == crd_yaml()
    assert (ROOT / "crds" / "mergesearch.yaml").read_text() == crd_yaml()
    assert (ROOT / "crds" / "mergesearch-admission.yaml").read_text() == admission.crds_yaml()
    references = yaml.safe_load((CHART / chartsync.REFERENCES_FILE).read_text())
    assert references == admission.reference_spec()
    # the drift check notices a change, and the sync repairs it
    (tmp_path / "files").mkdir()
    assert set(chartsync.drift(tmp_path)) == {
        chartsync.RULES_FILE,
        chartsync.CRD_FILE,
        chartsync.REFERENCES_FILE,
        chartsync.OPERATOR_JOBS_FILE,
    }
    assert chartsync.main([str(tmp_path), "--check"]) == 1
    assert chartsync.main([str(tmp_path)]) == 0
    assert chartsync.drift(tmp_path) == []


def test_deployment_command_is_the_operator_entrypoint() -> None:
    text = (CHART / "templates" / "deployment.yaml").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("command:")]
    assert len(lines) == 1
    assert yaml.safe_load(lines[0])["command"] == list(entrypoints.OPERATOR_COMMAND)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["liveness"]["port"] == entrypoints.LIVENESS_PORT
    assert values["metrics"]["port"] == entrypoints.METRICS_PORT


def test_chart_version_follows_the_distribution() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]


# Values documented as a whole (a Kubernetes object passed through), not key by key.
OPAQUE_VALUES = ("resources", "labels", "podSecurityContext", "securityContext")


def leaf_keys(values: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in OPAQUE_VALUES:
            out |= leaf_keys(value, path + ".")
        else:
            out.add(path)
    return out


def test_readme_documents_every_value_and_the_schema_knows_it() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.MULTILINE))
    missing = leaf_keys(values) - documented
    assert not missing, f"values missing from the README's table: {sorted(missing)}"
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(values) <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_dashboard_queries_only_exported_series() -> None:
    doc = dashboard()
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    assert exprs
    for expr in exprs:
        names = set(re.findall(r"\bmergesearch_[a-z_]+", expr))
        assert names, expr
        assert names <= EXPORTED, f"{expr}: not exported: {names - EXPORTED}"
        assert 'namespace=~"$namespace"' in expr and 'search=~"$search"' in expr, expr
    queried = {n for e in exprs for n in re.findall(r"\bmergesearch_[a-z_]+", e)}
    for required in (
        "mergesearch_best_fitness",
        "mergesearch_iteration",
        "mergesearch_sigma",
        "mergesearch_trials_total",
        "mergesearch_trials_running",
        "mergesearch_trial_duration_seconds_bucket",
        "mergesearch_task_score",
        "mergesearch_checkpoint_weight",
    ):
        assert required in queried, required


def test_dashboard_is_current_grafana_schema_with_variables() -> None:
    doc = dashboard()
    assert doc["schemaVersion"] >= 39 and doc["uid"] and doc["title"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["namespace"]["type"] == variables["search"]["type"] == "query"
    assert "$namespace" in variables["search"]["definition"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["type"] in ("timeseries", "stat", "bargauge")
    titles = " ".join(p["title"].lower() for p in doc["panels"])
    for words in ("fitness", "iteration", "σ", "outcome", "p50", "task", "weights"):
        assert words in titles, words
