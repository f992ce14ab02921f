"""Trial Job manifests: deterministic names, owner references, labels, and the enforced pod.

Pure: a function of the search, the candidate and the operator's settings, so that two
reconciles asking for the same trial build the same Job (same name, same trial document) and a
repeated create is answered AlreadyExists, never a second trial.

The pod is built from the allowed fields of the user's template (spec.execution.template, see
`podpolicy`: nothing else is copied) plus what the operator enforces (docs/operator.md): the
runner's command, the operator's trial ServiceAccount with no token, non-root, read-only root
file system with writable emptyDirs for the cache and /tmp, no privilege escalation, all
capabilities dropped, the RuntimeDefault seccomp profile, restartPolicy Never, and storage
credentials only by reference to spec.storage.secretRef.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from mergerunner.contract import (
    ENV_CACHE,
    ENV_CREDENTIALS,
    ENV_CUSTOM_TASKS,
    ENV_TRIAL,
    TERMINATION_LOG,
    ExitCode,
)
from mergerunner.trial import (
    ANALYTIC_BACKEND,
    CheckpointRef,
    OutputSpec,
    Subset,
    TaskSpec,
    TrialDocument,
    TrialEvaluatorSpec,
)
from mergesearch.entrypoints import EVALUATOR_COMMAND, PREFLIGHT_COMMAND, RUNNER_COMMAND
from mergesearch.operator import podpolicy
from mergesearch.spec import API_GROUP, API_VERSION, KIND, MergeSearchSpec

LABEL_SEARCH = f"{API_GROUP}/search"
LABEL_ITERATION = f"{API_GROUP}/iteration"
LABEL_CANDIDATE = f"{API_GROUP}/candidate"
LABEL_ROLE = f"{API_GROUP}/role"
ANNOTATION_CANDIDATE = f"{API_GROUP}/candidate-id"
ANNOTATION_SEARCH = f"{API_GROUP}/search-name"
ANNOTATION_DIGEST = f"{API_GROUP}/trial-digest"
ANNOTATION_ATTEMPT = f"{API_GROUP}/attempt"
MANAGED_BY = {"app.kubernetes.io/managed-by": "mergesearch-operator"}

RUNNER_CONTAINER = "runner"
FINAL_CANDIDATE = "final"
PREFLIGHT_CANDIDATE = "preflight"
Role = Literal["trial", "final", "preflight"]
# Extended resources that are accelerators: a preflight pod requests none of them.
ACCELERATOR_MARKERS = ("gpu", "tpu", "neuron", "habana", "accelerator")

NAME_LIMIT = 63
_HASH = 6
_CANDIDATE_PART = 28
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")

# Operator-owned environment variables and volumes: the template cannot override them.
VOLUME_PREFIX = "mergesearch-"
DEFAULT_IMAGE_ENV = "MERGESEARCH_RUNNER_IMAGE"
SERVICE_ACCOUNT_ENV = "MERGESEARCH_TRIAL_SERVICE_ACCOUNT"
# Warm evaluators (operator/warm.py): where pods reach the operator's evaluator endpoint, the
# file holding the key their per-search tokens derive from, and an optional node-local cache.
EVALUATOR_URL_ENV = "MERGESEARCH_EVALUATOR_URL"
EVALUATOR_KEY_FILE_ENV = "MERGESEARCH_EVALUATOR_KEY_FILE"
NODE_CACHE_ENV = "MERGESEARCH_NODE_CACHE_DIR"
# Benchmarks and recovery tests only: `analytic` makes every trial document this operator writes
# use the benchmarking objective (mergerunner.analytic) instead of the search's evaluator.
BENCHMARK_OBJECTIVE_ENV = "MERGESEARCH_BENCHMARK_OBJECTIVE"
RUNNER_REPOSITORY = "ghcr.io/mergesearch/mergesearch-runner"


def operator_version() -> str:
    """This operator's release (the installed package's version)."""
    try:
        return importlib.metadata.version("mergesearch")
    except importlib.metadata.PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        return "0.1.0"


# The runner image of this operator's own release: an operator and a runner of different
# releases may disagree on the trial document (the search then fails with TrialRejected), and
# a moving tag such as `latest` would make a search's trials run different code.
FALLBACK_IMAGE = f"{RUNNER_REPOSITORY}:{operator_version()}"


@dataclass(frozen=True)
class JobSettings:
    """What the operator's deployment decides for every trial pod (not the user)."""

    default_image: str = FALLBACK_IMAGE
    # Trial pods run under this ServiceAccount (its token never mounted); the template cannot
    # choose another. The chart makes one without any permissions in each served namespace.
    service_account: str = podpolicy.DEFAULT_SERVICE_ACCOUNT
    command: tuple[str, ...] = RUNNER_COMMAND
    preflight_command: tuple[str, ...] = PREFLIGHT_COMMAND
    cache_dir: str = "/var/cache/mergerunner"
    tmp_dir: str = "/tmp"  # noqa: S108 - a path inside the trial container, an emptyDir
    credentials_dir: str = "/var/run/secrets/mergesearch/storage"
    custom_tasks_dir: str = "/etc/mergesearch/custom-tasks"
    extra_env: tuple[tuple[str, str], ...] = (("PYTHONUNBUFFERED", "1"),)
    evaluator_command: tuple[str, ...] = EVALUATOR_COMMAND
    # Warm mode needs both: the endpoint URL as the evaluator pods reach it, and the key.
    evaluator_url: str | None = None
    evaluator_key: bytes | None = field(default=None, repr=False)
    # A host directory for a node-local checkpoint cache shared by evaluators (opt-in).
    node_cache_dir: str | None = None
    # Benchmarks only: trials score the weights with mergerunner.analytic, no model at all.
    analytic_trials: bool = False

    @property
    def serves_evaluators(self) -> bool:
        return bool(self.evaluator_url and self.evaluator_key)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> JobSettings:
        env = os.environ if environ is None else environ
        image = env.get(DEFAULT_IMAGE_ENV) or FALLBACK_IMAGE
        command = tuple(env.get("MERGESEARCH_RUNNER_COMMAND", "").split()) or cls.command
        # A replaced runner command (a test double) answers the preflight too, unless told.
        preflight = tuple(env.get("MERGESEARCH_PREFLIGHT_COMMAND", "").split()) or (
            command if command != cls.command else cls.preflight_command
        )
        evaluator = (
            tuple(env.get("MERGESEARCH_EVALUATOR_COMMAND", "").split()) or cls.evaluator_command
        )
        account = env.get(SERVICE_ACCOUNT_ENV) or podpolicy.DEFAULT_SERVICE_ACCOUNT
        key_file = env.get(EVALUATOR_KEY_FILE_ENV)
        key = Path(key_file).read_bytes().strip() if key_file else None
        objective = env.get(BENCHMARK_OBJECTIVE_ENV) or None
        if objective not in (None, ANALYTIC_BACKEND):
            raise ValueError(
                f"{BENCHMARK_OBJECTIVE_ENV}={objective!r}: the only benchmarking objective is "
                f"{ANALYTIC_BACKEND!r} (unset it for real searches)"
            )
        return cls(
            default_image=image,
            command=command,
            preflight_command=preflight,
            service_account=account,
            evaluator_command=evaluator,
            evaluator_url=env.get(EVALUATOR_URL_ENV) or None,
            evaluator_key=key or None,
            node_cache_dir=env.get(NODE_CACHE_ENV) or None,
            analytic_trials=objective == ANALYTIC_BACKEND,
        )


@dataclass(frozen=True)
class Owner:
    """The MergeSearch a Job belongs to (for names, labels and the owner reference)."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


# --------------------------------------------------------------------------- names and labels


def short_hash(text: str, n: int = _HASH) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _dns_part(text: str) -> str:
    """Lower-case letters, digits and '-' only; other characters become '-'."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


def label_value(text: str) -> str:
    """`text` when it is a valid label value, else a readable prefix plus a hash of it."""
    if _LABEL_VALUE.match(text) and len(text) <= NAME_LIMIT:
        return text
    head = _dns_part(text)[: NAME_LIMIT - _HASH - 1].strip("-")
    return f"{head}-{short_hash(text)}" if head else short_hash(text)


def candidate_part(candidate_id: str) -> str:
    """The candidate's part of a Job name: the id itself when it is short and DNS-safe
    (`g003-c07`, `b-uniform`), else a prefix and a hash of the full id, so that two ids that
    sanitise alike (`b-each-sft_a`, `b-each-sft-a`) never share a Job."""
    clean = _dns_part(candidate_id)
    if clean == candidate_id and len(clean) <= _CANDIDATE_PART:
        return clean
    head = clean[: _CANDIDATE_PART - _HASH - 1].strip("-")
    return f"{head}-{short_hash(candidate_id)}" if head else short_hash(candidate_id)


def job_name(owner: Owner, candidate_id: str, attempt: int = 0) -> str:
    """`<search name, truncated>-<hash of namespace/name/uid>-<candidate>`, at most 63 chars.

    The hash includes the search's uid: a search deleted and re-created under the same name
    never adopts (or collides with) its predecessor's Jobs while they are garbage-collected.
    A retry after an outage (`attempt` > 0) gets a name of its own (`…-g003-c07-r1`), so the
    Job of the failed attempt, while it is being deleted, is never mistaken for the new one.
    """
    search_hash = short_hash(f"{owner.namespace}/{owner.name}/{owner.uid}")
    candidate = candidate_id if attempt == 0 else f"{candidate_id}-r{attempt}"
    tail = f"{search_hash}-{candidate_part(candidate)}"
    room = NAME_LIMIT - len(tail) - 1
    head = _dns_part(owner.name)[:room].strip("-") or "ms"
    return f"{head}-{tail}"


def iteration_label(cma_generation: int | None, role: Role) -> str:
    if role in ("final", "preflight"):
        return role
    return "baseline" if cma_generation is None else str(cma_generation)


# --------------------------------------------------------------------------- trial documents


def trial_document(
    spec: MergeSearchSpec,
    trial_id: str,
    weights: dict[str, float],
    settings: JobSettings,
    *,
    finalization: bool = False,
    subset: Subset = "search",
) -> TrialDocument:
    """The runner's input for a candidate; for the finalization trial: held-out tasks and the
    export.

    A search trial is scored on held-in tasks only (held-out tasks never feed the search). The
    final trial scores the held-out tasks (held-in too when there are none, since a trial needs
    a task) and writes the merged model to spec.output.uri when one is set.
    """
    objective = spec.objective
    held_in: list[TaskSpec] = list(objective.held_in)
    held_out: list[TaskSpec] = []
    output = OutputSpec()
    if finalization:
        held_out = list(objective.held_out)
        held_in = [] if held_out else held_in
        if spec.output.uri:
            output = OutputSpec(uri=spec.output.uri, save_model=True)
    return TrialDocument(
        id=trial_id,
        checkpoints=[CheckpointRef(name=c.name, uri=c.uri) for c in spec.checkpoints],
        weights={c.name: float(weights[c.name]) for c in spec.checkpoints},
        dtype=spec.merge.dtype,
        held_in=held_in,
        held_out=held_out,
        evaluator=(
            TrialEvaluatorSpec.analytic()
            if settings.analytic_trials
            else TrialEvaluatorSpec.of(objective.evaluator)
        ),
        datasets_uri=objective.datasets.uri if objective.datasets else None,
        allow_code_execution=objective.allow_code_execution,
        output=output,
        subset=None if finalization or not spec.search.confirm.enabled else subset,
    )


def document_json(doc: TrialDocument) -> str:
    """Canonical JSON (sorted keys, compact): equal documents give equal bytes and digests."""
    return json.dumps(doc.to_wire(), sort_keys=True, separators=(",", ":"))


def document_digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- the Job


def build_job(
    owner: Owner,
    spec: MergeSearchSpec,
    *,
    candidate_id: str,
    cma_generation: int | None,
    document: TrialDocument,
    settings: JobSettings,
    role: Role = "trial",
    attempt: int = 0,
) -> dict[str, Any]:
    """The Job for one trial. `document.id` must be `job_name(owner, candidate_id, attempt)`."""
    name = job_name(owner, candidate_id, attempt)
    if document.id != name:
        raise ValueError(f"trial document id {document.id!r} is not the Job name {name!r}")
    text = document_json(document)
    labels = {
        **MANAGED_BY,
        LABEL_SEARCH: label_value(owner.name),
        LABEL_ITERATION: iteration_label(cma_generation, role),
        LABEL_CANDIDATE: label_value(candidate_id),
        LABEL_ROLE: role,
    }
    annotations = {
        ANNOTATION_CANDIDATE: candidate_id,
        ANNOTATION_SEARCH: owner.name,
        ANNOTATION_DIGEST: document_digest(text),
    }
    if attempt:
        annotations[ANNOTATION_ATTEMPT] = str(attempt)
    execution = spec.execution
    job_spec = {
        "backoffLimit": execution.backoff_limit,
        "activeDeadlineSeconds": execution.trial_timeout_seconds,
        "completions": 1,
        "parallelism": 1,
        "podFailurePolicy": pod_failure_policy(FAILS_THE_SAME_WAY),
        "template": pod_template(spec, text, settings, labels, annotations),
    }
    return job_manifest(owner, name, labels, annotations, job_spec)


def job_manifest(
    owner: Owner,
    name: str,
    labels: dict[str, str],
    annotations: dict[str, str],
    job_spec: dict[str, Any],
) -> dict[str, Any]:
    """A Job of the search's: in its namespace, owned by it (garbage-collected with it)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner.reference()],
        },
        "spec": job_spec,
    }


def build_preflight_job(owner: Owner, spec: MergeSearchSpec, settings: JobSettings) -> dict:
    """The search's preflight Job: `mergerunner preflight` on a document naming every
    checkpoint (uniform weights) and every task, held-in and held-out. The same pod as a trial
    (storage credentials by reference, no Kubernetes credentials, hardened) but CPU-only: the
    template's accelerator requests and limits are removed. Its output names spec.output.uri
    without saveModel: the preflight checks the destination and writes nothing."""
    name = job_name(owner, PREFLIGHT_CANDIDATE)
    weights = {c.name: 1.0 / len(spec.checkpoints) for c in spec.checkpoints}
    doc = trial_document(spec, name, weights, settings)
    doc = doc.model_copy(
        update={
            "held_in": list(spec.objective.held_in),
            "held_out": list(spec.objective.held_out),
            # The export's destination, checked (not written) before the first trial.
            "output": OutputSpec(uri=spec.output.uri) if spec.output.uri else OutputSpec(),
        }
    )
    job = build_job(
        owner,
        spec,
        candidate_id=PREFLIGHT_CANDIDATE,
        cma_generation=None,
        document=doc,
        settings=replace(settings, command=settings.preflight_command),
        role="preflight",
    )
    pod = job["spec"]["template"]["spec"]
    for container in pod.get("containers") or []:
        resources = container.get("resources") or {}
        for part in ("requests", "limits", "claims"):
            if part == "claims":
                resources.pop("claims", None)  # dynamic resource claims (accelerators)
                continue
            kept = {k: v for k, v in (resources.get(part) or {}).items() if not _accelerator(k)}
            if kept:
                resources[part] = kept
            else:
                resources.pop(part, None)
        if "resources" in container and not container["resources"]:
            container.pop("resources")
    pod.pop("resourceClaims", None)
    return job


def _accelerator(resource: str) -> bool:
    return "/" in resource and any(m in resource.lower() for m in ACCELERATOR_MARKERS)


# A runner that reports a failed step (exit 1) or a bad document (exit 2) would fail the same
# way again.
FAILS_THE_SAME_WAY = (int(ExitCode.FAILED), int(ExitCode.BAD_INPUT))


def pod_failure_policy(fail_on: Sequence[int]) -> dict[str, Any]:
    """A runner that exits with a code in `fail_on` fails the Job at once (another pod would
    fail the same way). Crashes (OOM kills, signals) use backoffLimit, and evictions and
    preemptions (DisruptionTarget) do not count at all."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": RUNNER_CONTAINER,
                    "operator": "In",
                    "values": list(fail_on),
                },
            },
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]
    }


def pod_template(
    spec: MergeSearchSpec,
    document_text: str,
    settings: JobSettings,
    labels: dict[str, str],
    annotations: dict[str, str],
) -> dict[str, Any]:
    """The trial pod: the template's allowed fields (`podpolicy.allowed_pod`; a template with
    anything else never gets this far, `podpolicy.check_template`) plus what is enforced."""
    meta, pod, source = podpolicy.allowed_pod(spec.execution.template)
    runner = _runner_container(source, spec, document_text, settings)
    pod["containers"] = [runner]
    pod["volumes"] = _volumes(pod["volumes"], runner, spec, settings)
    pod["restartPolicy"] = "Never"
    pod["serviceAccountName"] = settings.service_account
    pod["automountServiceAccountToken"] = False
    pod["securityContext"] = {
        **pod["securityContext"],
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return {
        "metadata": {
            "labels": {**(meta.get("labels") or {}), **labels},
            "annotations": {**(meta.get("annotations") or {}), **annotations},
        },
        "spec": pod,
    }


def _harden_container(container: dict[str, Any]) -> dict[str, Any]:
    """The enforced container security context; the template keeps runAsUser/runAsGroup
    (neither 0: podpolicy refuses that)."""
    security = {
        k: v
        for k, v in (container.get("securityContext") or {}).items()
        if k in ("runAsUser", "runAsGroup")
    }
    security.update(
        runAsNonRoot=True,
        readOnlyRootFilesystem=True,
        allowPrivilegeEscalation=False,
        privileged=False,
        capabilities={"drop": ["ALL"]},
        seccompProfile={"type": "RuntimeDefault"},
    )
    return {**container, "securityContext": security}


def _reserved_env(spec: MergeSearchSpec, document_text: str, settings: JobSettings) -> list[dict]:
    env = [
        {"name": ENV_TRIAL, "value": document_text},
        {"name": ENV_CACHE, "value": settings.cache_dir},
        {"name": "TMPDIR", "value": settings.tmp_dir},
        {"name": "HOME", "value": settings.tmp_dir},
        *({"name": k, "value": v} for k, v in settings.extra_env),
    ]
    storage = spec.storage
    if storage is not None:
        if storage.endpoint:
            env.append({"name": "AWS_ENDPOINT_URL", "value": storage.endpoint})
        if storage.region:
            env.append({"name": "AWS_REGION", "value": storage.region})
        if storage.secret_ref is not None:
            env.append({"name": ENV_CREDENTIALS, "value": settings.credentials_dir})
    custom = spec.objective.custom_tasks
    if custom is not None and custom.config_map_ref is not None:
        # The mount's path is the pod's layout, so it is env (like the cache), not document.
        env.append({"name": ENV_CUSTOM_TASKS, "value": settings.custom_tasks_dir})
    return env


def _runner_container(
    container: dict[str, Any], spec: MergeSearchSpec, document_text: str, settings: JobSettings
) -> dict[str, Any]:
    reserved = _reserved_env(spec, document_text, settings)
    names = {e["name"] for e in reserved}
    kept_env = [e for e in container.get("env") or [] if e.get("name") not in names]
    mounts = [
        m
        for m in container.get("volumeMounts") or []
        if not str(m.get("name", "")).startswith(VOLUME_PREFIX)
    ]
    mounted = {m.get("mountPath") for m in mounts}
    for volume, path in _operator_mounts(spec, settings):
        if path not in mounted:  # a template volume at the cache path (a shared cache) wins
            mounts.append({"name": volume, "mountPath": path, "readOnly": _read_only(volume)})
    runner = {k: v for k, v in container.items() if k not in ("command", "args", "env")}
    runner.update(
        name=RUNNER_CONTAINER,
        image=container.get("image") or settings.default_image,
        command=list(settings.command),
        args=[],
        env=[*reserved, *kept_env],
        volumeMounts=mounts,
        terminationMessagePath=TERMINATION_LOG,
        terminationMessagePolicy="File",
    )
    return _harden_container(runner)


def _read_only(volume: str) -> bool:
    return volume in (f"{VOLUME_PREFIX}storage-credentials", f"{VOLUME_PREFIX}custom-tasks")


def _operator_mounts(spec: MergeSearchSpec, settings: JobSettings) -> list[tuple[str, str]]:
    mounts = [
        (f"{VOLUME_PREFIX}cache", settings.cache_dir),
        (f"{VOLUME_PREFIX}tmp", settings.tmp_dir),
    ]
    if spec.storage is not None and spec.storage.secret_ref is not None:
        mounts.append((f"{VOLUME_PREFIX}storage-credentials", settings.credentials_dir))
    custom = spec.objective.custom_tasks
    if custom is not None and custom.config_map_ref is not None:
        mounts.append((f"{VOLUME_PREFIX}custom-tasks", settings.custom_tasks_dir))
    return mounts


def _volumes(
    template_volumes: list[dict[str, Any]],
    runner: dict[str, Any],
    spec: MergeSearchSpec,
    settings: JobSettings,
) -> list[dict[str, Any]]:
    kept = [v for v in template_volumes if not str(v.get("name", "")).startswith(VOLUME_PREFIX)]
    used = {m["name"] for m in runner["volumeMounts"]}
    ours: list[dict[str, Any]] = []
    for volume, _ in _operator_mounts(spec, settings):
        if volume not in used:
            continue
        if volume.endswith("storage-credentials"):
            assert spec.storage is not None and spec.storage.secret_ref is not None
            source: dict[str, Any] = {"secret": {"secretName": spec.storage.secret_ref.name}}
        elif volume.endswith("custom-tasks"):
            custom = spec.objective.custom_tasks
            assert custom is not None and custom.config_map_ref is not None
            source = {"configMap": {"name": custom.config_map_ref.name}}
        else:
            source = {"emptyDir": {}}
        ours.append({"name": volume, **source})
    return [*kept, *ours]
