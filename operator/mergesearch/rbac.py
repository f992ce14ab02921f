"""The operator's RBAC rules, as plain data: the one source for the Helm chart and the e2e tests.

Least privilege for what the operator really does (docs/operator.md, "RBAC"):

- mergesearches: watch them (kopf), read one fresh per reconcile, patch metadata (kopf removes
  the finalizer earlier versions added; none is added any more); the status subresource is
  replaced under a resourceVersion precondition; `mergesearches/finalizers: update` is what the
  OwnerReferencesPermissionEnforcement admission plugin asks of whoever creates a Job with
  `blockOwnerDeletion: true` pointing at a MergeSearch.
- jobs: the trial Jobs (index, create, delete); pods: read the termination messages;
  events: milestones (kopf posts them, and creates or patches aggregated ones), and reading
  the Warning events of a trial pod or Job that does not start (FailedMount, FailedCreate).
- kopf itself: list/watch CustomResourceDefinitions and namespaces (its dynamic scanning of
  the cluster; without them it serves only what it saw at start and logs warnings).
- No coordination leases or kopf peering resources: the operator runs `--standalone`.
- Secrets: `create` only, for the warm evaluators' per-search token Secret (`operator/warm.py`):
  the token is derived from the operator's key, so the operator never reads a Secret back. No
  configmaps: trial pods reference the storage Secret and the custom-task ConfigMap by name;
  the kubelet reads them, the operator never does.
"""

from __future__ import annotations

from typing import Any

from mergesearch.spec import API_GROUP

NAME = "mergesearch-operator"
PLURAL = "mergesearches"


def _rule(groups: list[str], resources: list[str], verbs: list[str]) -> dict[str, Any]:
    return {"apiGroups": groups, "resources": resources, "verbs": verbs}


def rules() -> list[dict[str, Any]]:
    """The PolicyRules the operator needs."""
    return [
        _rule([API_GROUP], [PLURAL], ["get", "list", "watch", "patch"]),
        _rule([API_GROUP], [f"{PLURAL}/status"], ["get", "update", "patch"]),
        _rule([API_GROUP], [f"{PLURAL}/finalizers"], ["update"]),
        _rule(["batch"], ["jobs"], ["get", "list", "watch", "create", "delete"]),
        _rule([""], ["pods"], ["get", "list", "watch"]),
        _rule([""], ["secrets"], ["create"]),
        _rule(["", "events.k8s.io"], ["events"], ["create", "patch"]),
        _rule([""], ["events"], ["list"]),
        _rule(["apiextensions.k8s.io"], ["customresourcedefinitions"], ["get", "list", "watch"]),
        _rule([""], ["namespaces"], ["get", "list", "watch"]),
    ]


def cluster_role(name: str = NAME, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The ClusterRole manifest (bind it with a ClusterRoleBinding for --all-namespaces, or
    with RoleBindings in each served namespace; see `cluster_role_binding`)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, **({"labels": dict(labels)} if labels else {})},
        "rules": rules(),
    }


def cluster_role_binding(
    service_account: str, namespace: str, name: str = NAME, role: str = NAME
) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
    }
