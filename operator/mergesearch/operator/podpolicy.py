"""What a MergeSearch's pod template may ask for: an allow-list, checked before any Job exists.

Creating a MergeSearch makes the operator create pods, under the operator's credentials, whose
image the search's creator chooses. Whatever the template could put in such a pod (a hostPath,
a Secret volume, a sidecar, a service-account token, root) would be the creator's to read
through that image's code, although the creator may not create pods nor read Secrets: the
operator would be a confused deputy. So the template is an allow-list of what cannot reach
beyond the pod's own compute (docs/operator.md, "Security"):

- pod metadata: `labels`, `annotations`;
- scheduling: `nodeSelector`, `affinity`, `tolerations`, `topologySpreadConstraints`,
  `priorityClassName`, `preemptionPolicy`, `runtimeClassName`, pod-level `resources`,
  `terminationGracePeriodSeconds`, `enableServiceLinks`;
- at most one container (the runner): `name`, `image`, `imagePullPolicy`, `resources`, `env`
  with literal values or the pod's own fields (`fieldRef`, `resourceFieldRef`), `volumeMounts`;
- volumes of kinds that hold no cluster data: `emptyDir`, and `persistentVolumeClaim` (a shared
  checkpoint cache; the admission policy shipped with the CRD asks that whoever names one may
  create pods in the namespace, since mounting a claim is a pod's right);
- security settings only towards more restriction: `runAsUser`/`runAsGroup`/`fsGroup` other
  than 0, and the values the operator enforces anyway (`runAsNonRoot: true`, ...).

Everything else is refused, naming the field (`spec.execution.template.spec.volumes[0].hostPath:
...`), in the first reconcile, so that a refused template costs no Job and no GPU minute. The
functions here are pure; `jobs.pod_template` builds the pod from the allowed fields only, so a
field this module forgot to refuse is still not copied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

ROOT = "spec.execution.template"
RUNNER_CONTAINER = "runner"
DEFAULT_SERVICE_ACCOUNT = "default"

# Pod-spec fields copied from the template as they are (scheduling and accounting only).
POD_KEEP = (
    "nodeSelector",
    "affinity",
    "tolerations",
    "topologySpreadConstraints",
    "priorityClassName",
    "preemptionPolicy",
    "runtimeClassName",
    "resources",
    "terminationGracePeriodSeconds",
    "enableServiceLinks",
)
# Pod-spec fields the operator sets itself: the template may state the same value, no other.
POD_ENFORCED: dict[str, Any] = {
    "restartPolicy": "Never",
    "automountServiceAccountToken": False,
    "hostNetwork": False,
    "hostPID": False,
    "hostIPC": False,
}
CONTAINER_KEEP = ("name", "image", "imagePullPolicy", "resources")
VOLUME_KINDS = ("emptyDir", "persistentVolumeClaim")
MOUNT_KEEP = ("name", "mountPath", "readOnly", "subPath")
ENV_SOURCES = ("fieldRef", "resourceFieldRef")
# Security fields the template may set to these values only (they are what is enforced).
SECURITY_ENFORCED: dict[str, Any] = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "seccompProfile": {"type": "RuntimeDefault"},
    "capabilities": {"drop": ["ALL"]},
}
POD_SECURITY_IDS = ("runAsUser", "runAsGroup", "fsGroup")
CONTAINER_SECURITY_IDS = ("runAsUser", "runAsGroup")
POD_SECURITY_KEEP = ("fsGroupChangePolicy",)

_WHY = {
    "containers": "only one container, the runner, may run: another would run code of the "
    "search creator's choosing with the pod's access",
    "volume": "only emptyDir and persistentVolumeClaim volumes are allowed (no Secret, "
    "ConfigMap, hostPath, projected token or other cluster data; storage credentials come "
    "from spec.storage.secretRef)",
    "id": "must be an integer other than 0 (trial pods never run as root or the root group)",
    "enforced": "may only be {value!r}, which the operator enforces",
    "command": "the operator runs the runner's command; choose the image instead",
    "serviceAccount": "trial pods run under the operator's trial ServiceAccount "
    "({account!r}) with no token",
}


class Problems:
    """Collects "field.path: why" lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, path: str, why: str) -> None:
        self.lines.append(f"{path}: {why}")


def template_parts(template: Mapping[str, Any] | None) -> tuple[str, Mapping, Mapping]:
    """(path prefix of the pod spec, metadata, pod spec) of spec.execution.template: a
    PodTemplateSpec ({metadata, spec}), or, for convenience, a bare pod spec ({containers})."""
    template = template or {}
    if "spec" in template or "metadata" in template:
        return f"{ROOT}.spec", template.get("metadata") or {}, template.get("spec") or {}
    return ROOT, {}, template


def check_template(
    template: Mapping[str, Any] | None, service_account: str = DEFAULT_SERVICE_ACCOUNT
) -> list[str]:
    """Every field of the template outside the allow-list, one line each; [] when it is fine."""
    problems = Problems()
    if template is None:
        return []
    if not isinstance(template, Mapping):
        return [f"{ROOT}: must be a pod template (an object)"]
    if "spec" in template or "metadata" in template:
        for key in template:
            if key not in ("spec", "metadata"):
                problems.add(f"{ROOT}.{key}", "unknown field of a pod template")
    prefix, meta, pod = template_parts(template)
    _check_metadata(meta, problems)
    if not isinstance(pod, Mapping):
        problems.add(prefix, "must be a pod spec (an object)")
        return problems.lines
    _check_pod(pod, prefix, service_account, problems)
    return problems.lines


def _check_metadata(meta: Any, problems: Problems) -> None:
    path = f"{ROOT}.metadata"
    if not isinstance(meta, Mapping):
        problems.add(path, "must be an object")
        return
    for key, value in meta.items():
        if key not in ("labels", "annotations"):
            problems.add(f"{path}.{key}", "only labels and annotations may be set")
        elif not _string_map(value):
            problems.add(f"{path}.{key}", "must map strings to strings")


def _string_map(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def _check_pod(pod: Mapping, prefix: str, service_account: str, problems: Problems) -> None:
    checks: dict[str, Callable[[Any, str], None]] = {
        "containers": lambda v, p: _check_containers(v, p, problems),
        "volumes": lambda v, p: _check_volumes(v, p, problems),
        "securityContext": lambda v, p: _check_security(
            v, p, POD_SECURITY_IDS, POD_SECURITY_KEEP, problems
        ),
    }
    for key, value in pod.items():
        path = f"{prefix}.{key}"
        if key in POD_KEEP:
            continue
        if key in checks:
            checks[key](value, path)
        elif key in POD_ENFORCED:
            if value != POD_ENFORCED[key]:
                problems.add(path, _WHY["enforced"].format(value=POD_ENFORCED[key]))
        elif key in ("serviceAccountName", "serviceAccount"):
            if value != service_account:
                problems.add(path, _WHY["serviceAccount"].format(account=service_account))
        else:
            problems.add(path, "not allowed in a trial pod template")


def _check_containers(value: Any, path: str, problems: Problems) -> None:
    if not isinstance(value, list):
        problems.add(path, "must be a list of containers")
        return
    if len(value) > 1:
        problems.add(f"{path}[1]", _WHY["containers"])
    if value:
        _check_container(value[0], f"{path}[0]", problems)


def _check_container(container: Any, path: str, problems: Problems) -> None:
    if not isinstance(container, Mapping):
        problems.add(path, "must be a container (an object)")
        return
    for key, value in container.items():
        where = f"{path}.{key}"
        if key in CONTAINER_KEEP:
            if key in ("name", "image", "imagePullPolicy") and not isinstance(value, str):
                problems.add(where, "must be a string")
        elif key == "env":
            _check_env(value, where, problems)
        elif key == "volumeMounts":
            _check_mounts(value, where, problems)
        elif key == "securityContext":
            _check_security(value, where, CONTAINER_SECURITY_IDS, (), problems)
        elif key in ("command", "args"):
            problems.add(where, _WHY["command"])
        elif key in ("envFrom",):
            problems.add(where, "not allowed: env takes literal values only (no Secret or "
                         "ConfigMap the search's creator may not read)")  # fmt: skip
        else:
            problems.add(where, "not allowed in the runner container")


def _objects(
    value: Any, path: str, problems: Problems, *, named: bool, what: str = "a list"
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(path, item) for each item of a list that is an object (with a string `name` when
    `named`); the list itself, or an item, of another shape is refused by its path."""
    if not isinstance(value, list):
        problems.add(path, f"must be {what}")
        return
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(item, Mapping) or (named and not isinstance(item.get("name"), str)):
            problems.add(where, "must be an object with a name" if named else "must be an object")
            continue
        yield where, item


def _check_env(value: Any, path: str, problems: Problems) -> None:
    for where, var in _objects(value, path, problems, named=True):
        for key in var:
            if key not in ("name", "value", "valueFrom"):
                problems.add(f"{where}.{key}", "unknown field")
        if "value" in var and not isinstance(var["value"], str):
            problems.add(f"{where}.value", "must be a string")
        source = var.get("valueFrom")
        if source is None:
            continue
        if not isinstance(source, Mapping) or len(source) != 1:
            problems.add(f"{where}.valueFrom", "must name exactly one source")
            continue
        (kind,) = source
        if kind not in ENV_SOURCES:
            problems.add(
                f"{where}.valueFrom.{kind}",
                "not allowed: only the pod's own fields (fieldRef, resourceFieldRef); "
                "storage credentials come from spec.storage.secretRef",
            )


def _check_mounts(value: Any, path: str, problems: Problems) -> None:
    for where, mount in _objects(value, path, problems, named=False):
        for key in mount:
            if key not in MOUNT_KEEP:
                problems.add(f"{where}.{key}", "not allowed in a volume mount")
        for key in ("name", "mountPath"):
            if not isinstance(mount.get(key), str):
                problems.add(f"{where}.{key}", "must be a string")


def _check_volumes(value: Any, path: str, problems: Problems) -> None:
    for where, volume in _objects(value, path, problems, named=True, what="a list of volumes"):
        kinds = [k for k in volume if k != "name"]
        for kind in kinds:
            if kind not in VOLUME_KINDS:
                problems.add(f"{where}.{kind}", _WHY["volume"])
        if not kinds:
            problems.add(where, "must say its kind (emptyDir or persistentVolumeClaim)")


def _check_security(
    value: Any,
    path: str,
    ids: tuple[str, ...],
    keep: tuple[str, ...],
    problems: Problems,
) -> None:
    if not isinstance(value, Mapping):
        problems.add(path, "must be an object")
        return
    for key, setting in value.items():
        where = f"{path}.{key}"
        if key in ids:
            if isinstance(setting, bool) or not isinstance(setting, int) or setting <= 0:
                problems.add(where, _WHY["id"])
        elif key in keep:
            continue
        elif key in SECURITY_ENFORCED:
            if not _as_strict(key, setting):
                problems.add(where, _WHY["enforced"].format(value=SECURITY_ENFORCED[key]))
        else:
            problems.add(where, "not allowed: trial pods run with the operator's security "
                         "settings")  # fmt: skip


def _as_strict(key: str, setting: Any) -> bool:
    """The template's value is the enforced one (capabilities: dropping ALL, adding none)."""
    if key == "capabilities":
        return (
            isinstance(setting, Mapping)
            and not setting.get("add")
            and set(setting) <= {"add", "drop"}
            and "ALL" in (setting.get("drop") or [])
        )
    return bool(setting == SECURITY_ENFORCED[key])


# --------------------------------------------------------------------------- the builder


def allowed_pod(
    template: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(pod metadata, pod spec, runner container) holding only the allowed fields of a template
    that `check_template` accepted; the operator adds its own fields on top."""
    _, meta, pod = template_parts(template)
    metadata = {k: dict(meta[k]) for k in ("labels", "annotations") if meta.get(k)}
    spec: dict[str, Any] = {k: _copy(pod[k]) for k in POD_KEEP if k in pod}
    security = pod.get("securityContext") or {}
    spec["securityContext"] = {
        k: security[k] for k in (*POD_SECURITY_IDS, *POD_SECURITY_KEEP) if k in security
    }
    spec["volumes"] = [
        {"name": v["name"], **{k: _copy(v[k]) for k in VOLUME_KINDS if k in v}}
        for v in pod.get("volumes") or []
    ]
    containers = pod.get("containers") or [{}]
    source = containers[0]
    runner: dict[str, Any] = {k: _copy(source[k]) for k in CONTAINER_KEEP if k in source}
    runner["env"] = [_copy(e) for e in source.get("env") or []]
    runner["volumeMounts"] = [
        {k: m[k] for k in MOUNT_KEEP if k in m} for m in source.get("volumeMounts") or []
    ]
    container_security = source.get("securityContext") or {}
    runner["securityContext"] = {
        k: container_security[k] for k in CONTAINER_SECURITY_IDS if k in container_security
    }
    return metadata, spec, runner


def _copy(value: Any) -> Any:
    """A deep copy of plain JSON data (the template is never shared with the result)."""
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def missing_requests(template: Mapping[str, Any] | None) -> bool:
    """True when the runner asks for no resources: the scheduler may then pack trials onto a
    node that cannot hold a merge (an event warns; it is not an error)."""
    _, _, runner = allowed_pod(template)
    resources = runner.get("resources") or {}
    return not (resources.get("requests") or resources.get("limits"))
