"""The Helm chart with the real Helm and a real control plane: lint, render, server-side dry
run, then install → the operator running with the chart's ServiceAccount token (a local process:
images are ignored here, so the Deployment is installed with 0 replicas) runs a search to
Succeeded while a real Prometheus scrapes its metrics and every dashboard panel's query returns
data → upgrade → uninstall leaves nothing but the kept CRD."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mergesearch import entrypoints
from mergesearch.rbac import rules
from support.cluster import ClusterError, KubeCluster
from support.nodeagent import NodeAgent
from support.operator_proc import apply_crd
from support.polling import wait_for
from support.prometheus import Prometheus, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CHART = str(ROOT / "charts" / "mergesearch")
CRD_NAME = "mergesearches.mergesearch.io"
DASHBOARD = ROOT / "charts" / "mergesearch" / "dashboards" / "mergesearch.json"
RELEASE = "msr"
# Not under /tmp: the node agent maps a trial pod's /tmp mount onto a directory of its own and
# rewrites command arguments under it, which would hide the script.
RUNNER_PARENT = "/var/tmp"
FULLNAME = f"{RELEASE}-mergesearch"
TRIAL_SA = "mergesearch-trial"

# A runner that needs no model: the score of each task is a smooth function of the weights, and
# the result (with timings) goes where the real runner puts it (docs/trial-contract.md).
FAKE_RUNNER = textwrap.dedent(
    """
    import json, os, time
    trial = json.loads(os.environ["MERGERUNNER_TRIAL"])
    w = trial["weights"]
    start = time.monotonic(); time.sleep(0.05); merge_s = time.monotonic() - start
    def score(task):
        first = task.endswith("1")
        target = {"a": 0.2, "b": 0.5, "c": 0.3} if first else {"a": 0.6, "b": 0.2, "c": 0.2}
        return 1.0 - sum((w.get(k, 0.0) - v) ** 2 for k, v in target.items())
    held_in = {t["task"]: score(t["task"]) for t in trial.get("heldIn", [])}
    held_out = {t["task"]: score(t["task"]) for t in trial.get("heldOut", [])}
    result = {"apiVersion": "mergerunner.mergesearch.io/v2", "id": trial["id"],
              "status": "succeeded", "heldIn": held_in, "heldOut": held_out,
              "fitness": sum(held_in.values()) / len(held_in) if held_in else None,
              "digest": "sha256:" + "0" * 64,
              "timings": {"fetchS": 0.01, "mergeS": merge_s, "evaluateS": 0.2 + merge_s,
                          "uploadS": 0.0, "totalS": 0.3}}
    text = json.dumps(result)
    print(text)
    with open(os.environ.get("MERGERUNNER_TERMINATION_LOG", "/dev/termination-log"), "w") as f:
        f.write(text)
    """
)


def search_manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "mergesearch.io/v1alpha1",
        "kind": "MergeSearch",
        "metadata": {"name": name},
        "spec": {
            "checkpoints": [{"name": n, "uri": f"s3://ckpt/{n}/"} for n in ("a", "b", "c")],
            "objective": {
                "heldIn": [
                    {"task": "toy_t1", "metric": "acc", "limit": 10},
                    {"task": "toy_t2", "metric": "acc", "limit": 10},
                ],
                "heldOut": [{"task": "toy_out", "metric": "acc"}],
            },
            "search": {"populationSize": 4, "maxGenerations": 2, "seed": 1},
            "execution": {"parallelism": 4, "backoffLimit": 0},
        },
    }


# --------------------------------------------------------------------------- helpers


def render(cluster: KubeCluster, namespace: str, *sets: str) -> list[dict[str, Any]]:
    args = ["template", RELEASE, CHART, "-n", namespace]
    for value in sets:
        args += ["--set", value]
    return [d for d in yaml.safe_load_all(cluster.helm(*args)) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def adopt_existing_crd(cluster: KubeCluster, namespace: str) -> None:
    """Other tests of the session may have applied the CRD with kubectl; mark it as the
    release's (Helm's documented way to adopt an existing object) so the install takes it."""
    if not cluster.kubectl("get", "crd", CRD_NAME, "--ignore-not-found", "-o", "name").strip():
        return
    cluster.kubectl("label", "crd", CRD_NAME, "--overwrite", "app.kubernetes.io/managed-by=Helm")
    cluster.kubectl(
        "annotate",
        "crd",
        CRD_NAME,
        "--overwrite",
        f"meta.helm.sh/release-name={RELEASE}",
        f"meta.helm.sh/release-namespace={namespace}",
    )


@pytest.fixture
def namespaces(k8s_cluster: KubeCluster) -> Iterator[tuple[str, str]]:
    """(the release's namespace, the namespace the operator serves)."""
    suffix = uuid.uuid4().hex[:6]
    names = (f"helm-ops-{suffix}", f"helm-work-{suffix}")
    for name in names:
        k8s_cluster.create_namespace(name)
    yield names
    for name in names:
        try:
            k8s_cluster.api().delete(f"/api/v1/namespaces/{name}")
        except ClusterError as err:  # the test may have deleted it
            if getattr(err, "status", None) != 404:
                raise


def assert_exporter_matches_status(
    text: str, namespace: str, search: str, status: dict[str, Any]
) -> None:
    """The exporter's values for a search are its status's, read back from the endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    got: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if labels.pop("namespace", None) == namespace and labels.pop("search", None) == search:
                got[(sample.name, tuple(sorted(labels.items())))] = sample.value
    best = status["best"]
    assert got[("mergesearch_best_fitness", ())] == pytest.approx(best["fitness"])
    winner = status.get("winner")
    if winner is not None:  # scores and weights follow the confirmed winner once there is one
        for subset, key in (("search", "searchFitness"), ("confirmation", "fitness")):
            sample = ("mergesearch_winner_fitness", (("subset", subset),))
            assert got[sample] == pytest.approx(winner[key])
        best = winner
    assert got[("mergesearch_iteration", ())] == status["iteration"]
    for outcome in ("succeeded", "failed"):
        key = ("mergesearch_trials_total", (("outcome", outcome),))
        assert got[key] == status["trials"][outcome]
    for checkpoint, weight in best["weights"].items():
        key = ("mergesearch_checkpoint_weight", (("checkpoint", checkpoint),))
        assert got[key] == pytest.approx(weight)
    for task, score in best["scores"].items():
        key = ("mergesearch_task_score", (("split", "held_in"), ("task", task)))
        assert got[key] == pytest.approx(score)


def start_operator(
    tmp_path: Path,
    runner_dir: Path,
    kubeconfig: Path,
    namespace: str,
    metrics_port: int,
    liveness_port: int,
) -> subprocess.Popen[bytes]:
    runner = runner_dir / "fake_runner.py"
    runner.write_text(FAKE_RUNNER)
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "MERGESEARCH_RUNNER_COMMAND": f"python {runner}",
        "MERGESEARCH_TRIAL_SERVICE_ACCOUNT": TRIAL_SA,  # as the chart's Deployment sets it
        "MERGESEARCH_METRICS_ADDRESS": "127.0.0.1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    log = (tmp_path / "operator.log").open("wb")
    command = [
        sys.executable,
        *entrypoints.OPERATOR_COMMAND[1:],
        f"--namespace={namespace}",
        f"--metrics-port={metrics_port}",
        f"--liveness=http://127.0.0.1:{liveness_port}/healthz",
        "--poll-seconds=2",
    ]
    return subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 - loopback
            return answer.status, answer.read().decode()
    except OSError:
        return 0, ""


def panel_queries(namespace: str, search: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) with the dashboard's variables filled in as Grafana would."""
    doc = json.loads(DASHBOARD.read_text())
    out = []
    for panel in doc["panels"]:
        for target in panel["targets"]:
            # Kubernetes names hold no regex metacharacters but '-', which is literal here.
            expr = target["expr"].replace("$namespace", namespace)
            out.append((panel["title"], expr.replace("$search", search)))
    return out


def release_objects(cluster: KubeCluster, namespaces: tuple[str, ...]) -> list[str]:
    selector = f"app.kubernetes.io/instance={RELEASE}"
    found = []
    kinds = "deployments,serviceaccounts,services,configmaps,roles,rolebindings"
    for ns in namespaces:
        out = cluster.kubectl("get", kinds, "-n", ns, "-l", selector, "-o", "name")
        found += [f"{ns}/{line}" for line in out.split()]
    out = cluster.kubectl("get", "clusterroles,clusterrolebindings", "-l", selector, "-o", "name")
    return found + out.split()


# --------------------------------------------------------------------------- tests


def test_lint_is_clean(k8s_cluster: KubeCluster) -> None:
    for sets in ([], ["watchNamespaces={a,b}", "dashboard.enabled=true"]):
        args = [arg for s in sets for arg in ("--set", s)]
        out = k8s_cluster.helm("lint", "--strict", CHART, *args)
        assert "1 chart(s) linted, 0 chart(s) failed" in out
        assert "[WARNING]" not in out and "[ERROR]" not in out
    with pytest.raises(ClusterError, match="replicaCount"):
        k8s_cluster.helm("lint", "--strict", CHART, "--set", "replicaCount=2")


def test_rendered_rbac_is_rbac_rules(k8s_cluster: KubeCluster) -> None:
    cluster_wide = render(k8s_cluster, "ops", "clusterWide=true")
    (role,) = by_kind(cluster_wide, "ClusterRole")
    assert role["rules"] == rules()
    assert not by_kind(cluster_wide, "Role")
    (binding,) = by_kind(cluster_wide, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": "ops"}]
    args = by_kind(cluster_wide, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert "--all-namespaces" in args["args"]

    # Least privilege by default: the release's namespace only, as a Role.
    default = render(k8s_cluster, "ops")
    (cluster_role,) = by_kind(default, "ClusterRole")
    (role,) = by_kind(default, "Role")
    assert role["metadata"]["namespace"] == "ops"
    assert {r["apiGroups"][0] for r in cluster_role["rules"]} == {"apiextensions.k8s.io", ""}
    assert {r["resources"][0] for r in cluster_role["rules"]} == {
        "customresourcedefinitions",
        "namespaces",
    }
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in cluster_role["rules"])

    scoped = render(k8s_cluster, "ops", "watchNamespaces={team-a,team-b}")
    (cluster_role,) = by_kind(scoped, "ClusterRole")
    roles = by_kind(scoped, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert {r["apiGroups"][0] for r in cluster_role["rules"]} == {"apiextensions.k8s.io", ""}
    for each in roles:  # together, exactly the rules; no verb cluster-wide that a Role can hold
        assert sorted(map(json.dumps, cluster_role["rules"] + each["rules"])) == sorted(
            map(json.dumps, rules())
        )
    deployment = by_kind(scoped, "Deployment")[0]["spec"]["template"]["spec"]
    args = deployment["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--all-namespaces" not in args
    trial = [a for a in by_kind(scoped, "ServiceAccount") if a["metadata"]["name"] == TRIAL_SA]
    assert sorted(a["metadata"]["namespace"] for a in trial) == ["team-a", "team-b"]
    assert all(a["automountServiceAccountToken"] is False for a in trial)
    env = {e["name"]: e.get("value") for e in deployment["containers"][0]["env"]}
    assert env["MERGESEARCH_TRIAL_SERVICE_ACCOUNT"] == TRIAL_SA


def test_rendered_deployment_is_hardened_and_uses_the_entrypoint(k8s_cluster: KubeCluster) -> None:
    docs = render(k8s_cluster, "ops")
    (deployment,) = by_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == FULLNAME
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["command"] == list(entrypoints.OPERATOR_COMMAND)
    assert "--namespace=ops" in container["args"]  # the release's namespace by default
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": entrypoints.LIVENESS_PORT, "metrics": entrypoints.METRICS_PORT}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MERGESEARCH_METRICS_PORT"] == str(entrypoints.METRICS_PORT)
    assert env["MERGESEARCH_RUNNER_IMAGE"].endswith(":0.1.0")
    assert container["resources"]["limits"]["memory"]
    (crd,) = by_kind(docs, "CustomResourceDefinition")
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    expected = yaml.safe_load((ROOT / "crds" / "mergesearch.yaml").read_text())
    assert crd["spec"] == expected["spec"]
    assert not by_kind(render(k8s_cluster, "ops", "crds.install=false"), "CustomResourceDefinition")
    monitors = render(
        k8s_cluster,
        "ops",
        "metrics.serviceMonitor.enabled=true",
        "metrics.podMonitor.enabled=true",
        "dashboard.enabled=true",
    )
    (service_monitor,) = by_kind(monitors, "ServiceMonitor")
    assert service_monitor["spec"]["endpoints"][0]["port"] == "metrics"
    (pod_monitor,) = by_kind(monitors, "PodMonitor")
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    (dashboard,) = by_kind(monitors, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["mergesearch.json"]) == json.loads(DASHBOARD.read_text())


def test_rendered_evaluators_serve_warm_mode_behind_a_network_policy(
    k8s_cluster: KubeCluster,
) -> None:
    """evaluators.enabled: the operator serves the evaluator port with its key mounted, a
    Service reaches it, only evaluator pods may (NetworkPolicy), and the admission policy
    knows the node cache directory; off by default."""
    assert not [d for d in render(k8s_cluster, "ops") if d["kind"] == "NetworkPolicy"]
    docs = render(
        k8s_cluster,
        "ops",
        "evaluators.enabled=true",
        "evaluators.nodeCacheDir=/var/cache/mergesearch/",
    )
    (deployment,) = by_kind(docs, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MERGESEARCH_EVALUATOR_PORT"] == "8443"
    assert (
        env["MERGESEARCH_EVALUATOR_URL"] == f"http://{RELEASE}-mergesearch-evaluators.ops.svc:8443"
    )
    assert env["MERGESEARCH_NODE_CACHE_DIR"] == "/var/cache/mergesearch/"
    key_file = env["MERGESEARCH_EVALUATOR_KEY_FILE"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[key_file.rsplit("/", 1)[0]]["readOnly"] is True
    secrets = [d for d in by_kind(docs, "Secret") if d["metadata"]["name"].endswith("-key")]
    assert len(secrets) == 1 and secrets[0]["data"]["key"]
    (policy,) = by_kind(docs, "NetworkPolicy")
    evaluator_rule = policy["spec"]["ingress"][0]
    assert evaluator_rule["from"][0]["podSelector"]["matchLabels"] == {
        "mergesearch.io/role": "evaluator"
    }
    assert evaluator_rule["ports"] == [{"port": 8443, "protocol": "TCP"}]
    services = [
        d for d in by_kind(docs, "Service") if d["metadata"]["name"].endswith("-evaluators")
    ]
    assert services[0]["spec"]["ports"][0]["targetPort"] == "evaluators"
    admission = [
        d
        for d in by_kind(docs, "ValidatingAdmissionPolicy")
        if "operator-jobs" in d["metadata"]["name"]
    ]
    variables = {v["name"]: v["expression"] for v in admission[0]["spec"]["variables"]}
    assert variables["nodeCacheDir"] == "'/var/cache/mergesearch'"


def test_rendered_manifests_pass_the_api_servers_dry_run(
    k8s_cluster: KubeCluster, namespaces: tuple[str, str]
) -> None:
    ops, work = namespaces
    for sets in (
        [],
        [f"watchNamespaces={{{work}}}", "dashboard.enabled=true"],
        ["evaluators.enabled=true", "evaluators.nodeCacheDir=/var/cache/mergesearch"],
    ):
        args = [arg for s in sets for arg in ("--set", s)]
        manifest = k8s_cluster.helm("template", RELEASE, CHART, "-n", ops, *args)
        out = k8s_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest)
        assert "deployment.apps/" in out and "(server dry run)" in out


def test_install_run_a_search_upgrade_uninstall(
    k8s_cluster: KubeCluster,
    k8s_node_agent: NodeAgent,
    namespaces: tuple[str, str],
    prometheus_factory: Any,
    tmp_path: Path,
) -> None:
    ops, work = namespaces
    adopt_existing_crd(k8s_cluster, ops)
    k8s_cluster.helm(
        "install", RELEASE, CHART, "-n", ops,
        "--set", "replicaCount=0",
        "--set", f"watchNamespaces={{{work}}}",
        "--set", "dashboard.enabled=true",
        "--wait", "--timeout=60s",
    )  # fmt: skip
    crd = json.loads(k8s_cluster.kubectl("get", "crd", CRD_NAME, "-o", "json"))
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    k8s_cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")

    # The operator, as the chart's ServiceAccount (a token from the TokenRequest API).
    kubeconfig = k8s_cluster.service_account_kubeconfig(ops, FULLNAME, create=False)
    metrics_port, liveness_port = free_port(), free_port()
    prometheus: Prometheus = prometheus_factory([f"127.0.0.1:{metrics_port}"])
    runner_dir = Path(tempfile.mkdtemp(prefix="mergesearch-helm-", dir=RUNNER_PARENT))
    operator = start_operator(tmp_path, runner_dir, kubeconfig, work, metrics_port, liveness_port)
    try:
        search = "helm-demo"
        k8s_cluster.kubectl(
            "apply", "-n", work, "-f", "-", input=json.dumps(search_manifest(search))
        )

        def phase() -> str | None:
            assert operator.poll() is None, (tmp_path / "operator.log").read_text()[-3000:]
            got = json.loads(
                k8s_cluster.kubectl("get", "msearch", search, "-n", work, "-o", "json")
            )
            value = (got.get("status") or {}).get("phase")
            return value if value in ("Succeeded", "Failed") else None

        # Two more searches the operator takes on (suspended: nothing runs) and that are still
        # there when the release is uninstalled.
        for name in ("left-a", "left-b"):
            manifest = search_manifest(name)
            manifest["spec"]["suspend"] = True
            k8s_cluster.kubectl("apply", "-n", work, "-f", "-", input=json.dumps(manifest))

        if wait_for(phase, timeout_s=240, what="the search to finish") != "Succeeded":
            text = k8s_cluster.kubectl("get", "msearch", search, "-n", work, "-o", "json")
            status = json.loads(text)["status"]
            pytest.fail(f"search failed: {status.get('recentFailures')}")
        assert http_get(f"http://127.0.0.1:{liveness_port}/healthz")[0] == 200
        status = json.loads(
            k8s_cluster.kubectl("get", "msearch", search, "-n", work, "-o", "json")
        )["status"]
        assert_exporter_matches_status(
            http_get(f"http://127.0.0.1:{metrics_port}/metrics")[1], work, search, status
        )

        # Every dashboard panel's query returns data for this search.
        assert wait_for(prometheus.targets_up, timeout_s=30, what="the scrape target up")
        selector = f'{{namespace="{work}",search="{search}"}}'
        succeeded = f'mergesearch_phase{{namespace="{work}",search="{search}",phase="Succeeded"}}'
        wait_for(
            lambda: [r for r in prometheus.query(succeeded) if r["value"][1] == "1"],
            timeout_s=30,
            what="Prometheus to scrape the finished search",
        )
        for title, expr in panel_queries(work, search):
            assert prometheus.query(expr), f"panel {title!r}: no data for {expr}"
        splits = {
            r["metric"]["split"] for r in prometheus.query(f"mergesearch_task_score{selector}")
        }
        assert splits == {"held_in", "held_out"}
        weights = prometheus.query(f"mergesearch_checkpoint_weight{selector}")
        assert {r["metric"]["checkpoint"] for r in weights} == {"a", "b", "c"}
        assert sum(float(r["value"][1]) for r in weights) == pytest.approx(1.0, abs=1e-6)
        steps = prometheus.query(f"mergesearch_trial_duration_seconds_count{selector}")
        assert {r["metric"]["step"] for r in steps} == {"fetch", "merge", "evaluate"}

        # A deleted search's series disappear from the exporter.
        k8s_cluster.kubectl("delete", "msearch", search, "-n", work, "--wait=true")
        wait_for(
            lambda: (
                f'search="{search}"' not in http_get(f"http://127.0.0.1:{metrics_port}/metrics")[1]
            ),
            timeout_s=30,
            what="the deleted search's series to go",
        )
        for name in ("left-a", "left-b"):
            wait_for(
                lambda n=name: (
                    json.loads(k8s_cluster.kubectl("get", "msearch", n, "-n", work, "-o", "json"))
                    .get("status", {})
                    .get("phase")
                    == "Suspended"
                ),
                timeout_s=60,
                what=f"the operator to take on {name}",
            )
    finally:
        stop(operator)
        shutil.rmtree(runner_dir, ignore_errors=True)

    # Upgrade to cluster-wide (the opt-in): the per-namespace Role goes, a ClusterRoleBinding
    # with every rule stays.
    k8s_cluster.helm(
        "upgrade", RELEASE, CHART, "-n", ops, "--set", "replicaCount=0",
        "--set", "clusterWide=true", "--wait", "--timeout=60s",
    )  # fmt: skip
    assert not k8s_cluster.kubectl(
        "get", "roles", "-n", work, "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name"
    ).strip()
    role = json.loads(k8s_cluster.kubectl("get", "clusterrole", FULLNAME, "-o", "json"))
    assert role["rules"] == rules()
    assert not k8s_cluster.kubectl(
        "get", "configmaps", "-n", ops, "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name"
    ).strip()  # the dashboard was turned off by the upgrade (default values)

    k8s_cluster.helm("uninstall", RELEASE, "-n", ops, "--wait", "--timeout=60s")
    assert release_objects(k8s_cluster, namespaces) == []
    # the CRD is kept, and MergeSearches can still be created
    assert k8s_cluster.kubectl("get", "crd", CRD_NAME, "-o", "name").strip()

    # With no operator left, nothing hangs in Terminating: the operator puts no finalizer on
    # a search, so deleting a search, its namespace or the CRD (with searches in it) completes.
    left = json.loads(k8s_cluster.kubectl("get", "msearch", "-n", work, "-o", "json"))["items"]
    assert [m["metadata"].get("finalizers") for m in left] == [None, None]
    k8s_cluster.kubectl("delete", "msearch", "left-a", "-n", work, "--wait", "--timeout=30s")
    k8s_cluster.kubectl("delete", "namespace", work, "--wait", "--timeout=90s")
    stray = search_manifest("stray")
    k8s_cluster.kubectl("apply", "-n", ops, "-f", "-", input=json.dumps(stray))
    k8s_cluster.kubectl("delete", "crd", CRD_NAME, "--wait", "--timeout=60s")
    assert not k8s_cluster.kubectl("get", "crd", CRD_NAME, "--ignore-not-found", "-o", "name")
    # (the rest of the session's tests expect the CRD)
    apply_crd(k8s_cluster)
