"""The operator's RBAC rules: what it needs, and nothing it does not."""

from __future__ import annotations

import pytest

from mergesearch import rbac

pytestmark = pytest.mark.unit


def verbs(group: str, resource: str) -> set[str]:
    out: set[str] = set()
    for rule in rbac.rules():
        if group in rule["apiGroups"] and resource in rule["resources"]:
            out.update(rule["verbs"])
    return out


def test_rules_cover_what_the_operator_does() -> None:
    assert {"get", "list", "watch", "patch"} <= verbs("mergesearch.io", "mergesearches")
    assert {"get", "update"} <= verbs("mergesearch.io", "mergesearches/status")
    assert verbs("mergesearch.io", "mergesearches/finalizers") == {"update"}
    assert verbs("batch", "jobs") == {"get", "list", "watch", "create", "delete"}
    assert verbs("", "pods") == {"get", "list", "watch"}
    assert {"create"} <= verbs("", "events")
    assert verbs("apiextensions.k8s.io", "customresourcedefinitions") == {"get", "list", "watch"}
    assert {"list", "watch"} <= verbs("", "namespaces")


def test_least_privilege() -> None:
    every = [
        (g, r, v)
        for rule in rbac.rules()
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    ]
    assert all("*" not in (g, r, v) for g, r, v in every)
    resources = {r for _, r, _ in every}
    assert not resources & {"configmaps", "leases", "pods/exec", "pods/log"}
    # Secrets: create only (warm evaluators' per-search token, derived, never read back).
    assert verbs("", "secrets") == {"create"}
    assert not resources & {"clusterkopfpeerings", "kopfpeerings"}  # --standalone
    assert verbs("", "pods") & {"create", "delete", "update", "patch"} == set()
    assert "update" not in verbs("mergesearch.io", "mergesearches")  # spec is the user's
    assert verbs("apiextensions.k8s.io", "customresourcedefinitions").isdisjoint(
        {"create", "update", "patch", "delete"}
    )


def test_cluster_role_manifest() -> None:
    role = rbac.cluster_role(labels={"app": "x"})
    assert role["kind"] == "ClusterRole" and role["apiVersion"] == "rbac.authorization.k8s.io/v1"
    assert role["metadata"] == {"name": "mergesearch-operator", "labels": {"app": "x"}}
    assert role["rules"] == rbac.rules()
    binding = rbac.cluster_role_binding("ms-operator", "ms-system")
    assert binding["roleRef"]["name"] == "mergesearch-operator"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ms-operator", "namespace": "ms-system"}
    ]
