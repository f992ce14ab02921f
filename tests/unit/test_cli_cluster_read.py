"""How `mergesearch status` finds its cluster: kubeconfig paths, contexts and namespaces, and
the one-line messages of a refused read (no API server needed: the read itself is e2e, in
tests/e2e/test_cli_status.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from mergesearch.cli.cluster import (
    ClusterReadError,
    _kubeconfig_paths,
    _server_said,
    api_client,
)

pytestmark = pytest.mark.unit


def kubeconfig(path: Path, namespace: str | None = None) -> Path:
    context: dict[str, str] = {"cluster": "c", "user": "u"}
    if namespace:
        context["namespace"] = namespace
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [
            {"name": "main", "context": context},
            {"name": "other", "context": {"cluster": "c", "user": "u", "namespace": "team-b"}},
        ],
        "current-context": "main",
    }
    path.write_text(yaml.safe_dump(document))
    return path


def test_kubeconfig_is_a_list_as_kubectl_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", "/a/one:/b/two:")
    assert _kubeconfig_paths() == [Path("/a/one"), Path("/b/two")]
    monkeypatch.delenv("KUBECONFIG")
    assert _kubeconfig_paths() == [Path("~/.kube/config").expanduser()]


def test_namespace_comes_from_the_context_then_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "a", namespace="team-a")))
    api, namespace = api_client()
    assert (namespace, api.configuration.host) == ("team-a", "https://127.0.0.1:6443")
    assert api_client("other")[1] == "team-b"
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "b")))
    assert api_client()[1] == "default"


def test_unknown_context_and_missing_file_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = kubeconfig(tmp_path / "a")
    monkeypatch.setenv("KUBECONFIG", str(path))
    with pytest.raises(ClusterReadError, match="context 'nope' not found"):
        api_client("nope")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ClusterReadError, match="no usable Kubernetes configuration") as err:
        api_client()
    assert str(tmp_path / "missing") in str(err.value)


def test_server_errors_read_as_kubectl_prints_them() -> None:
    body = {"reason": "NotFound", "message": 'mergesearches.mergesearch.io "x" not found'}
    found = ApiException(status=404, reason="Not Found")
    found.body = json.dumps(body)
    assert _server_said(found) == (
        'Error from server (NotFound): mergesearches.mergesearch.io "x" not found'
    )
    bare = ApiException(status=503, reason="Service Unavailable")
    bare.body = "upstream down"
    assert _server_said(bare) == "Error from server (Service Unavailable): upstream down"


def test_without_the_kubernetes_package_the_extra_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The operator image leaves the package out (docs/operator.md, "API client")."""
    monkeypatch.setitem(sys.modules, "kubernetes", None)
    with pytest.raises(ClusterReadError, match=r"mergesearch\[cluster\]"):
        api_client()
