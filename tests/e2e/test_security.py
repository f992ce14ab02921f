"""The operator is not a confused deputy: the attacks of a MergeSearch creator, and of a
compromised operator, played on the real control plane with the chart installed by real Helm.

- A user bound only to MergeSearch create/get in a namespace (her own ServiceAccount token)
  tries to read a Secret of the namespace, a 0600 file on the node and a service-account token
  through the trial pod template and the spec's references. The API server refuses what names a
  Secret or ConfigMap she may not read (the chart's admission policy); the operator refuses the
  template in its first reconcile, naming each field, and creates no Job; a legitimate search of
  hers runs pods under the trial ServiceAccount without any token.
- The operator's own credentials (the chart's ServiceAccount, default least-privilege RBAC)
  cannot create a pod, a Job outside the namespaces it serves, or a Job whose pod runs under
  another ServiceAccount, with a token, a hostPath or privileges.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mergesearch.operator import jobs as jobspec
from support.cluster import ApiClient, ApiError, KubeCluster
from support.operator_proc import ANALYTIC_TRIALS, OperatorProcess
from support.polling import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
CHART = str(ROOT / "charts" / "mergesearch")
CRD_NAME = "mergesearches.mergesearch.io"
RELEASE = "sec"
FULLNAME = f"{RELEASE}-mergesearch"
TRIAL_SA = "mergesearch-trial"
MS = "/apis/mergesearch.io/v1alpha1/namespaces/{ns}/mergesearches"
SECRET_VALUE = "s3cr3t-" + uuid.uuid4().hex
NODE_SECRET = "node-" + uuid.uuid4().hex


@dataclass
class Setup:
    cluster: KubeCluster
    ops: str  # the release's namespace
    team: str  # the namespace the operator serves
    alice: ApiClient  # MergeSearch create/get/list in `team`, nothing else
    operator_api: ApiClient  # the chart's ServiceAccount
    operator: OperatorProcess
    node_file: Path


def search(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "checkpoints": [{"name": n, "uri": f"s3://unused/{n}/"} for n in ("a", "b", "c")],
        "objective": {"heldIn": [{"task": "t", "limit": 8}]},
        "search": {"populationSize": 4, "maxGenerations": 1},
        "execution": {"parallelism": 1},
    }
    body.update(spec)
    return {
        "apiVersion": "mergesearch.io/v1alpha1",
        "kind": "MergeSearch",
        "metadata": {"name": name},
        "spec": body,
    }


def adopt_existing_crd(cluster: KubeCluster, namespace: str) -> None:
    """Earlier tests may have applied the CRD with kubectl: Helm's documented adoption."""
    if not cluster.kubectl("get", "crd", CRD_NAME, "--ignore-not-found", "-o", "name").strip():
        return
    cluster.kubectl("label", "crd", CRD_NAME, "--overwrite", "app.kubernetes.io/managed-by=Helm")
    cluster.kubectl(
        "annotate", "crd", CRD_NAME, "--overwrite",
        f"meta.helm.sh/release-name={RELEASE}", f"meta.helm.sh/release-namespace={namespace}",
    )  # fmt: skip


def bind_user(cluster: KubeCluster, namespace: str, user: str) -> ApiClient:
    """A ServiceAccount allowed exactly to create, get and list MergeSearches in `namespace`."""
    api = cluster.api()
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}"
    api.create(
        f"{rbac}/roles",
        {
            "metadata": {"name": "mergesearch-creator"},
            "rules": [
                {
                    "apiGroups": ["mergesearch.io"],
                    "resources": ["mergesearches"],
                    "verbs": ["create", "get", "list"],
                }
            ],
        },
    )
    api.create(
        f"{rbac}/rolebindings",
        {
            "metadata": {"name": "mergesearch-creator"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "mergesearch-creator",
            },
            "subjects": [{"kind": "ServiceAccount", "name": user, "namespace": namespace}],
        },
    )
    return cluster.api(token=cluster.service_account_token(namespace, user))


@pytest.fixture(scope="module")
def setup(k8s_cluster: KubeCluster) -> Iterator[Setup]:
    suffix = uuid.uuid4().hex[:6]
    ops, team = f"sec-ops-{suffix}", f"sec-team-{suffix}"
    for name in (ops, team):
        k8s_cluster.create_namespace(name)
    api = k8s_cluster.api()
    api.create(
        f"/api/v1/namespaces/{team}/secrets",
        {"metadata": {"name": "db-password"}, "stringData": {"password": SECRET_VALUE}},
    )
    api.create(
        f"/api/v1/namespaces/{team}/configmaps",
        {"metadata": {"name": "private-tasks"}, "data": {"t.yaml": "task: t"}},
    )
    # A root-only file on the node (the node agent runs pods on this host).
    node_dir = Path(tempfile.mkdtemp(prefix="mergesearch-node-secret-", dir="/var/tmp"))
    node_file = node_dir / "credentials"
    node_file.write_text(NODE_SECRET)
    node_file.chmod(0o600)
    adopt_existing_crd(k8s_cluster, ops)
    k8s_cluster.helm(
        "install", RELEASE, CHART, "-n", ops, "--set", "replicaCount=0",
        "--set", f"watchNamespaces={{{team}}}", "--wait", "--timeout=60s",
    )  # fmt: skip
    k8s_cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    kubeconfig = k8s_cluster.service_account_kubeconfig(ops, FULLNAME, create=False)
    token = k8s_cluster.service_account_token(ops, FULLNAME, create=False)
    alice = bind_user(k8s_cluster, team, "alice")
    with tempfile.TemporaryDirectory(prefix="mergesearch-sec-") as tmp:
        operator = OperatorProcess(
            kubeconfig,
            [team],
            Path(tmp),
            {"MERGESEARCH_TRIAL_SERVICE_ACCOUNT": TRIAL_SA, **ANALYTIC_TRIALS},
        )
        operator.poll_seconds = 2.0
        operator.start()
        try:
            yield Setup(
                k8s_cluster, ops, team, alice, k8s_cluster.api(token=token), operator, node_file
            )
        except BaseException:
            print(operator.logs()[-8000:])
            raise
        finally:
            for item in api.get(MS.format(ns=team))["items"]:
                api.delete(f"{MS.format(ns=team)}/{item['metadata']['name']}")
            wait_for(lambda: not api.get(MS.format(ns=team))["items"], 60, what="searches deleted")
            operator.stop()
            k8s_cluster.helm("uninstall", RELEASE, "-n", ops, "--wait", "--timeout=60s")
            for name in (ops, team):
                api.delete(f"/api/v1/namespaces/{name}")
            node_file.unlink()
            node_dir.rmdir()


def refused(call: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()
    return info.value


def failed_condition(setup: Setup, name: str) -> dict[str, Any] | None:
    status = setup.alice.get(f"{MS.format(ns=setup.team)}/{name}").get("status") or {}
    for cond in status.get("conditions") or []:
        if cond["type"] == "Failed" and cond["status"] == "True":
            return cond
    return None


def team_jobs(setup: Setup, name: str) -> list[dict[str, Any]]:
    items = setup.cluster.api().get(f"/apis/batch/v1/namespaces/{setup.team}/jobs")["items"]
    return [
        j
        for j in items
        if (j["metadata"].get("annotations") or {}).get(jobspec.ANNOTATION_SEARCH) == name
    ]


def test_alice_has_no_right_but_creating_mergesearches(setup: Setup) -> None:
    team = setup.team
    for path in (
        f"/api/v1/namespaces/{team}/secrets/db-password",
        f"/api/v1/namespaces/{team}/configmaps/private-tasks",
        f"/api/v1/namespaces/{team}/pods",
    ):
        assert refused(lambda p=path: setup.alice.get(p)).status == 403
    pod = {"metadata": {"name": "x"}, "spec": {"containers": [{"name": "x", "image": "x"}]}}
    assert refused(lambda: setup.alice.create(f"/api/v1/namespaces/{team}/pods", pod)).status == 403
    job = {"metadata": {"name": "x"}, "spec": {"template": pod}}
    jobs = f"/apis/batch/v1/namespaces/{team}/jobs"
    assert refused(lambda: setup.alice.create(jobs, job)).status == 403


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"storage": {"secretRef": {"name": "db-password"}}}, "spec.storage.secretRef.name"),
        (
            {
                "objective": {
                    "heldIn": [{"task": "t"}],
                    "customTasks": {"configMapRef": {"name": "private-tasks"}},
                }
            },
            "spec.objective.customTasks.configMapRef.name",
        ),
        (
            {
                "execution": {
                    "template": {
                        "spec": {
                            "volumes": [{"name": "c", "persistentVolumeClaim": {"claimName": "x"}}]
                        }
                    }
                }
            },
            "spec.execution.template: volumes c mount a PersistentVolumeClaim",
        ),
    ],
)
def test_naming_what_she_may_not_read_is_refused_by_the_api_server(
    setup: Setup, spec: dict[str, Any], field: str
) -> None:
    """A custom image would read whatever is mounted: the Secret or ConfigMap she names must be
    one she may read, and a claim takes the right to create pods."""
    name = f"ref-{uuid.uuid4().hex[:6]}"
    error = refused(lambda: setup.alice.create(MS.format(ns=setup.team), search(name, **spec)))
    assert error.status in (403, 422) and field in error.body, error.body
    assert team_jobs(setup, name) == []
    # The admin, who may read them, may name them (the policy checks rights, not names).
    admin = search(name, suspend=True, **spec)
    setup.cluster.api().create(MS.format(ns=setup.team), admin)


def test_the_template_attack_creates_no_job_and_names_each_field(setup: Setup) -> None:
    """The reported attack: a sidecar that reads a Secret volume, a hostPath of the node and a
    projected service-account token under an admin account, and writes them into its
    termination message (which would surface in the search's status)."""
    steal = "cat /s/password /node/credentials /t/token > /dev/termination-log"
    template = {
        "spec": {
            "serviceAccountName": "default",
            "containers": [
                {"name": "runner", "image": "attacker/runner:1"},
                {"name": "thief", "image": "busybox", "command": ["sh", "-c", steal]},
            ],
            "initContainers": [{"name": "early", "image": "busybox", "command": ["true"]}],
            "volumes": [
                {"name": "s", "secret": {"secretName": "db-password"}},
                {"name": "node", "hostPath": {"path": str(setup.node_file.parent)}},
                {
                    "name": "t",
                    "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]},
                },
            ],
        }
    }
    name = "steal"
    setup.alice.create(MS.format(ns=setup.team), search(name, execution={"template": template}))
    cond = wait_for(lambda: failed_condition(setup, name), 60, what="the refusal")
    assert cond["reason"] == "TemplateInvalid"
    t = "spec.execution.template.spec"
    for field in (
        f"{t}.containers[1]",
        f"{t}.initContainers",
        f"{t}.volumes[0].secret",
        f"{t}.volumes[1].hostPath",
        f"{t}.volumes[2].projected",
    ):
        assert field in cond["message"], cond["message"]
    assert team_jobs(setup, name) == []
    seen = json.dumps(setup.alice.get(f"{MS.format(ns=setup.team)}/{name}"))
    assert SECRET_VALUE not in seen and NODE_SECRET not in seen


def test_a_root_user_is_refused_at_once_not_after_the_trial_deadline(setup: Setup) -> None:
    """runAsNonRoot is enforced, so a kubelet would never start `runAsUser: 0` (the trial would
    wait in CreateContainerConfigError for its deadline): refused before any Job instead."""
    template = {"spec": {"securityContext": {"runAsUser": 0}}}
    name = "as-root"
    setup.alice.create(MS.format(ns=setup.team), search(name, execution={"template": template}))
    cond = wait_for(lambda: failed_condition(setup, name), 60, what="the refusal")
    assert cond["reason"] == "TemplateInvalid"
    assert "spec.execution.template.spec.securityContext.runAsUser" in cond["message"]
    assert team_jobs(setup, name) == []


def test_a_legitimate_search_runs_pods_without_any_token(setup: Setup) -> None:
    name = "legit"
    template = {"spec": {"containers": [{"name": "runner", "resources": {"limits": {"cpu": "1"}}}]}}
    setup.alice.create(MS.format(ns=setup.team), search(name, execution={"template": template}))
    pods_path = f"/api/v1/namespaces/{setup.team}/pods"

    def trial_pods() -> list[dict[str, Any]]:
        items = setup.cluster.api().get(pods_path)["items"]
        return [p for p in items if jobspec.LABEL_SEARCH in (p["metadata"].get("labels") or {})]

    (pod, *_) = wait_for(trial_pods, 90, what="a trial pod of the legitimate search")
    spec = pod["spec"]
    assert spec["serviceAccountName"] == TRIAL_SA
    assert spec["automountServiceAccountToken"] is False
    for volume in spec.get("volumes") or []:
        assert "projected" not in volume and "secret" not in volume, volume
    for container in spec["containers"]:
        assert not any(
            m["mountPath"].startswith("/var/run/secrets/kubernetes.io")
            for m in container.get("volumeMounts") or []
        )
    account = setup.cluster.api().get(f"/api/v1/namespaces/{setup.team}/serviceaccounts/{TRIAL_SA}")
    assert account.get("automountServiceAccountToken") is False
    bindings = setup.cluster.api().get(
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{setup.team}/rolebindings"
    )["items"]
    subjects = [s for b in bindings for s in b.get("subjects") or []]
    assert not any(s.get("name") == TRIAL_SA for s in subjects)  # no permission at all
    setup.cluster.api().delete(f"{MS.format(ns=setup.team)}/{name}")
    wait_for(lambda: not trial_pods(), 60, what="the search's pods to go with it")


# --------------------------------------------------------------------------- the operator's own


def trial_job(setup: Setup, namespace: str, **pod_changes: Any) -> dict[str, Any]:
    """A Job exactly as the operator builds it for `namespace`, with `pod_changes` on top."""
    from mergesearch.spec import parse_spec

    owner = jobspec.Owner(name="probe", namespace=namespace, uid=str(uuid.uuid4()))
    spec = parse_spec(search("probe")["spec"])
    settings = jobspec.JobSettings(service_account=TRIAL_SA)
    name = jobspec.job_name(owner, "g000-c00")
    doc = jobspec.trial_document(spec, name, {"a": 0.2, "b": 0.3, "c": 0.5}, settings)
    job = jobspec.build_job(
        owner, spec, candidate_id="g000-c00", cma_generation=0, document=doc, settings=settings
    )
    pod = job["spec"]["template"]["spec"]
    for key, value in pod_changes.items():
        pod[key] = [*pod[key], *value] if key == "volumes" else value
    return job


def dry_run_create(api: ApiClient, namespace: str, job: dict[str, Any]) -> Any:
    path = f"/apis/batch/v1/namespaces/{namespace}/jobs?dryRun=All"
    return api.request("POST", path, job)


def test_the_operator_may_create_only_hardened_trial_jobs_where_it_serves(setup: Setup) -> None:
    api, team = setup.operator_api, setup.team
    assert dry_run_create(api, team, trial_job(setup, team))  # what it needs still works
    for namespace in ("default", setup.ops):  # not served: RBAC refuses
        error = refused(lambda ns=namespace: dry_run_create(api, ns, trial_job(setup, ns)))
        assert error.status == 403, error.body
    pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
    path = f"/api/v1/namespaces/{team}/pods?dryRun=All"
    assert refused(lambda: api.request("POST", path, pod)).status == 403
    hostile = [
        ({"serviceAccountName": "default"}, "serviceAccountName"),
        ({"automountServiceAccountToken": True}, "automountServiceAccountToken"),
        ({"hostPID": True}, "host namespaces"),
        ({"nodeName": "any"}, "nodeName"),
        ({"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}, "volumes"),
        (
            {"volumes": [{"name": "t", "projected": {"sources": [{"serviceAccountToken": {}}]}}]},
            "volumes",
        ),
    ]
    for change, words in hostile:
        error = refused(lambda c=change: dry_run_create(api, team, trial_job(setup, team, **c)))
        assert error.status in (403, 422) and words in error.body, (change, error.body)
    sidecar = trial_job(setup, team)
    containers = sidecar["spec"]["template"]["spec"]["containers"]
    containers.append({**containers[0], "name": "second"})
    error = refused(lambda: dry_run_create(api, team, sidecar))
    assert "one container" in error.body
    root = trial_job(setup, team)
    root["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUser"] = 0
    assert "never user 0" in refused(lambda: dry_run_create(api, team, root)).body
    # (`privileged: true` itself this API server refuses: --allow-privileged is off.)
    capable = trial_job(setup, team)
    context = capable["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    context["capabilities"] = {"add": ["SYS_ADMIN"], "drop": ["ALL"]}
    assert "no capabilities added" in refused(lambda: dry_run_create(api, team, capable)).body


def test_the_operator_reads_no_secret(setup: Setup) -> None:
    path = f"/api/v1/namespaces/{setup.team}/secrets/db-password"
    assert refused(lambda: setup.operator_api.get(path)).status == 403


def test_the_warm_evaluator_job_passes_the_policy_and_no_host_path_does(setup: Setup) -> None:
    """Warm mode's evaluator Job and token Secret are what the operator's account may create;
    a hostPath cache is refused while the chart configures no node cache directory."""
    from mergesearch.operator import warm
    from mergesearch.spec import parse_spec

    api, team = setup.operator_api, setup.team
    owner = jobspec.Owner(name="warm", namespace=team, uid=str(uuid.uuid4()))
    spec = parse_spec({**search("warm")["spec"], "execution": {"mode": "warm"}})
    settings = jobspec.JobSettings(
        service_account=TRIAL_SA, evaluator_url="http://op:8443", evaluator_key=b"k"
    )
    assert dry_run_create(api, team, warm.evaluator_job(owner, spec, settings))
    secret = warm.token_secret(owner, b"k")
    assert api.request("POST", f"/api/v1/namespaces/{team}/secrets?dryRun=All", secret)
    cached = dataclasses.replace(settings, node_cache_dir="/var/cache/mergesearch")
    job = warm.evaluator_job(owner, spec, cached)
    error = refused(lambda: dry_run_create(api, team, job))
    assert error.status in (403, 422) and "volumes" in error.body, error.body
