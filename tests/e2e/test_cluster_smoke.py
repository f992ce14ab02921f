"""The test control plane is a real one: RBAC holds, the Job controller and the garbage collector
work on pods that the node agent runs as local processes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.cluster import ApiError, KubeCluster
from support.nodeagent import NodeAgent
from support.polling import wait_for

# The fixtures k8s_cluster and k8s_node_agent (harmless if tests/conftest.py lists them too).

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JOB_TIMEOUT_S = 120.0


@pytest.fixture
def namespace(k8s_cluster: KubeCluster) -> Iterator[str]:
    name = f"smoke-{uuid.uuid4().hex[:8]}"
    k8s_cluster.create_namespace(name)
    yield name
    k8s_cluster.api().delete(f"/api/v1/namespaces/{name}")


def job_manifest(name: str, script: str, **pod_spec: Any) -> dict[str, Any]:
    container = {
        "name": "main",
        "image": "mergesearch/smoke:none",
        "command": ["python", "-c", script],
    }
    container.update(pod_spec.pop("container", {}))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [container], **pod_spec},
            },
        },
    }


def job_condition(cluster: KubeCluster, namespace: str, name: str, kind: str) -> dict | None:
    job = cluster.api().get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
    for condition in job.get("status", {}).get("conditions") or []:
        if condition["type"] == kind and condition["status"] == "True":
            return job
    return None


def job_pods(cluster: KubeCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    query = {"labelSelector": f"batch.kubernetes.io/job-name={name}"}
    return cluster.api().get(f"/api/v1/namespaces/{namespace}/pods", query)["items"]


def delete_job(cluster: KubeCluster, namespace: str, name: str, what: str) -> None:
    """Deletes the Job as kubectl does (its pods in the background) and waits until its pods
    are gone."""
    cluster.api().delete(
        f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}", {"propagationPolicy": "Background"}
    )
    wait_for(lambda: not job_pods(cluster, namespace, name), timeout_s=JOB_TIMEOUT_S, what=what)


def test_rbac_denies_a_service_account_until_a_role_grants(
    k8s_cluster: KubeCluster, namespace: str
) -> None:
    token = k8s_cluster.service_account_token(namespace, "reader")
    as_reader = k8s_cluster.api(token=token)
    with pytest.raises(ApiError) as denied:
        as_reader.get(f"/api/v1/namespaces/{namespace}/pods")
    assert denied.value.status == 403

    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "pod-reader", "namespace": namespace},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "reader-reads-pods", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
    }
    k8s_cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps({"kind": "List", "apiVersion": "v1", "items": [role, binding]}),
    )

    def allowed() -> bool:
        try:
            return as_reader.get(f"/api/v1/namespaces/{namespace}/pods")["kind"] == "PodList"
        except ApiError as err:
            if err.status == 403:
                return False
            raise

    assert wait_for(allowed, timeout_s=30, what="RBAC to grant the role")
    # kubectl with the service account's kubeconfig: the same rights, no more.
    kubeconfig = k8s_cluster.service_account_kubeconfig(namespace, "reader", create=False)
    assert (
        k8s_cluster.kubectl("get", "pods", "-n", namespace, "-o", "name", kubeconfig=kubeconfig)
        == ""
    )
    denied_text = k8s_cluster.kubectl(
        "auth", "can-i", "create", "jobs", "-n", namespace, kubeconfig=kubeconfig, check=False
    )
    assert denied_text.strip() == "no"


RESULT_SCRIPT = """
import json, os, pathlib
greeting = pathlib.Path(os.environ["GREETING_FILE"]).read_text()
result = {"greeting": greeting, "token_length": len(os.environ["API_TOKEN"]),
          "pod": os.environ["POD_NAME"]}
print("trial finished", flush=True)
pathlib.Path(os.environ["MERGERUNNER_TERMINATION_LOG"]).write_text(json.dumps(result))
"""


def test_job_completes_reports_its_message_and_is_garbage_collected(
    k8s_cluster: KubeCluster, k8s_node_agent: NodeAgent, namespace: str
) -> None:
    api = k8s_cluster.api()
    api.create(
        f"/api/v1/namespaces/{namespace}/configmaps",
        {"metadata": {"name": "greeting"}, "data": {"greeting.txt": "hello from a configMap"}},
    )
    api.create(
        f"/api/v1/namespaces/{namespace}/secrets",
        {"metadata": {"name": "api"}, "stringData": {"token": "s3cr3t-token"}},
    )
    container = {
        "env": [
            {"name": "GREETING_FILE", "value": "/etc/greeting/greeting.txt"},
            {"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "api", "key": "token"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "volumeMounts": [{"name": "greeting", "mountPath": "/etc/greeting"}],
    }
    volumes = [{"name": "greeting", "configMap": {"name": "greeting"}}]
    manifest = job_manifest("ok", RESULT_SCRIPT, container=container, volumes=volumes)
    api.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", manifest)

    job = wait_for(
        lambda: job_condition(k8s_cluster, namespace, "ok", "Complete"),
        timeout_s=JOB_TIMEOUT_S,
        what="Job ok to complete",
    )
    assert job["status"]["succeeded"] == 1
    [pod] = job_pods(k8s_cluster, namespace, "ok")
    assert pod["status"]["phase"] == "Succeeded"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0
    assert json.loads(terminated["message"]) == {
        "greeting": "hello from a configMap",
        "token_length": len("s3cr3t-token"),
        "pod": pod["metadata"]["name"],
    }
    assert "trial finished" in k8s_node_agent.logs(namespace, pod["metadata"]["name"])

    delete_job(k8s_cluster, namespace, "ok", "the garbage collector to delete the Job's pod")


def test_job_whose_pod_exits_nonzero_fails(
    k8s_cluster: KubeCluster, k8s_node_agent: NodeAgent, namespace: str
) -> None:
    script = "import sys; print('about to fail'); sys.exit(3)"
    manifest = job_manifest("broken", script)
    manifest["spec"]["template"]["spec"]["containers"][0]["terminationMessagePolicy"] = (
        "FallbackToLogsOnError"
    )
    k8s_cluster.api().create(f"/apis/batch/v1/namespaces/{namespace}/jobs", manifest)

    job = wait_for(
        lambda: job_condition(k8s_cluster, namespace, "broken", "Failed"),
        timeout_s=JOB_TIMEOUT_S,
        what="Job broken to fail",
    )
    assert job["status"].get("succeeded", 0) == 0
    assert job["status"]["failed"] == 1
    [pod] = job_pods(k8s_cluster, namespace, "broken")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert pod["status"]["phase"] == "Failed"
    assert terminated["exitCode"] == 3
    assert "about to fail" in terminated["message"]


def test_deleting_a_running_job_kills_its_process(
    k8s_cluster: KubeCluster, k8s_node_agent: NodeAgent, namespace: str
) -> None:
    api = k8s_cluster.api()
    manifest = job_manifest("sleeper", "import time; time.sleep(600)")
    api.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", manifest)

    def running_pod() -> dict[str, Any] | None:
        pods = job_pods(k8s_cluster, namespace, "sleeper")
        return pods[0] if pods and pods[0]["status"].get("phase") == "Running" else None

    pod = wait_for(running_pod, timeout_s=JOB_TIMEOUT_S, what="the sleeper pod to run")
    assert pod["spec"]["nodeName"] == k8s_node_agent.node_name
    assert pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
    [process] = [
        c.process
        for c in k8s_node_agent.running()
        if (c.namespace, c.name) == (namespace, pod["metadata"]["name"])
    ]
    assert process is not None and process.poll() is None

    delete_job(k8s_cluster, namespace, "sleeper", "the sleeper pod to be deleted")
    assert process.poll() is not None


def test_job_deadline_fails_the_job_and_kills_its_process(
    k8s_cluster: KubeCluster, k8s_node_agent: NodeAgent, namespace: str
) -> None:
    manifest = job_manifest("slow", "import time; time.sleep(600)")
    manifest["spec"]["activeDeadlineSeconds"] = 3
    k8s_cluster.api().create(f"/apis/batch/v1/namespaces/{namespace}/jobs", manifest)

    job = wait_for(
        lambda: job_condition(k8s_cluster, namespace, "slow", "Failed"),
        timeout_s=JOB_TIMEOUT_S,
        what="Job slow to fail on its deadline",
    )
    [failed] = [c for c in job["status"]["conditions"] if c["type"] == "Failed"]
    assert failed["reason"] == "DeadlineExceeded"
    wait_for(
        lambda: not job_pods(k8s_cluster, namespace, "slow"),
        timeout_s=JOB_TIMEOUT_S,
        what="the Job controller to delete the pod past its deadline",
    )
    assert not [c for c in k8s_node_agent.running() if c.namespace == namespace]


def test_pod_waits_for_its_secret_and_pods_run_at_most_max_running_at_once(
    k8s_cluster: KubeCluster, k8s_node_agent: NodeAgent, namespace: str
) -> None:
    api = k8s_cluster.api()
    env = [{"name": "LATE", "valueFrom": {"secretKeyRef": {"name": "late", "key": "value"}}}]
    waiting = job_manifest(
        "waits", "import os; assert os.environ['LATE'] == 'here'", container={"env": env}
    )
    api.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", waiting)

    def config_error() -> dict[str, Any] | None:
        pods = job_pods(k8s_cluster, namespace, "waits")
        statuses = pods[0]["status"].get("containerStatuses") if pods else None
        return statuses[0]["state"].get("waiting") if statuses else None

    state = wait_for(config_error, timeout_s=JOB_TIMEOUT_S, what="the pod to wait for its secret")
    assert state["reason"] == "CreateContainerConfigError"
    assert "late" in state["message"]

    names = [f"burst-{i}" for i in range(k8s_node_agent.max_running + 2)]
    for name in names:
        manifest = job_manifest(name, "import time; time.sleep(2)")
        api.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", manifest)
    api.create(
        f"/api/v1/namespaces/{namespace}/secrets",
        {"metadata": {"name": "late"}, "stringData": {"value": "here"}},
    )
    peak = 0

    def all_complete() -> bool:
        nonlocal peak
        peak = max(peak, len(k8s_node_agent.running()))
        return all(job_condition(k8s_cluster, namespace, n, "Complete") for n in [*names, "waits"])

    assert wait_for(all_complete, timeout_s=JOB_TIMEOUT_S, interval_s=0.1, what="the burst")
    assert 1 <= peak <= k8s_node_agent.max_running


@pytest.mark.parametrize(
    ("image", "pod_context", "message"),
    [
        (
            "mergesearch/smoke:none",
            {"runAsNonRoot": True, "runAsUser": 0},
            "container's runAsUser breaks non-root policy",
        ),
        ("root/image:1", {"runAsNonRoot": True}, "image will run as root"),
        ("named/user:1", {"runAsNonRoot": True}, "image has non-numeric user (app)"),
    ],
)
def test_the_node_refuses_root_under_run_as_non_root_as_a_kubelet_does(
    k8s_cluster: KubeCluster,
    k8s_node_agent: NodeAgent,
    namespace: str,
    image: str,
    pod_context: dict[str, Any],
    message: str,
) -> None:
    """A kubelet never starts such a container: the pod waits in CreateContainerConfigError
    (and a trial would wait for its deadline; the operator refuses such templates up front)."""
    k8s_node_agent.image_users.update({"root/image:1": 0, "named/user:1": "app"})
    name = f"nonroot-{uuid.uuid4().hex[:6]}"
    manifest = job_manifest(
        name, "print('ran')", securityContext=pod_context, container={"image": image}
    )
    k8s_cluster.api().create(f"/apis/batch/v1/namespaces/{namespace}/jobs", manifest)

    def waiting() -> dict[str, Any] | None:
        pods = job_pods(k8s_cluster, namespace, name)
        statuses = pods[0]["status"].get("containerStatuses") if pods else None
        return statuses[0]["state"].get("waiting") if statuses else None

    state = wait_for(waiting, timeout_s=JOB_TIMEOUT_S, what="the container config error")
    assert state["reason"] == "CreateContainerConfigError"
    assert message in state["message"]
    time.sleep(1.0)  # still not started a second later: retried, never run
    (pod,) = job_pods(k8s_cluster, namespace, name)
    assert pod["status"]["phase"] == "Pending"
    k8s_cluster.api().delete(
        f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}", {"propagationPolicy": "Background"}
    )


def test_helm_installs_and_uninstalls_a_chart(
    k8s_cluster: KubeCluster, namespace: str, tmp_path: Path
) -> None:
    chart = tmp_path / "smoke"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: smoke\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-greeting\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n"
    )
    assert "1 chart(s) linted, 0 chart(s) failed" in k8s_cluster.helm("lint", str(chart))

    k8s_cluster.helm("install", "demo", str(chart), "-n", namespace, "--set", "greeting=hi")
    data = k8s_cluster.kubectl(
        "get", "configmap", "demo-greeting", "-n", namespace, "-o", "jsonpath={.data.greeting}"
    )
    assert data == "hi"
    assert "demo" in k8s_cluster.helm("list", "-n", namespace, "-q")

    k8s_cluster.helm("uninstall", "demo", "-n", namespace)
    missing = k8s_cluster.kubectl(
        "get", "configmap", "demo-greeting", "-n", namespace, "--ignore-not-found", "-o", "name"
    )
    assert missing == ""
