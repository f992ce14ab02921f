"""What a kubelet does before it starts a container, for a pod run as a local process: its
environment (plain values, `valueFrom` secret/configMap/field references, `envFrom`, `$(VAR)`
expansion), its volumes made into host directories (emptyDir, hostPath, secret, configMap,
downwardAPI, projected), container paths rewritten to those directories, the command line, and
the kubelet's `runAsNonRoot` check.

A refusal the kubelet retries (a missing Secret) is a `PodSetupError`, one it cannot honour here
a `PodRejected`; the messages are the kubelet's. Secrets and ConfigMaps are read through the API
by an `ObjectReader`; everything else here is pure or writes only below the pod's directory.
"""

from __future__ import annotations

import base64
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.cluster import ApiClient, ApiError


class PodSetupError(Exception):
    """The container cannot start yet (a missing secret, say): the pod stays Pending, retried.
    Messages are the kubelet's (`secret "x" not found`); the pod waits in
    CreateContainerConfigError, as the kubelet's does for env references."""


class VolumeSetupError(PodSetupError):
    """A volume cannot be set up (its Secret or ConfigMap is missing): as on a real kubelet,
    the pod stays ContainerCreating and a `FailedMount` Warning event says why."""


class PodRejected(Exception):
    """The pod asks for something the agent cannot do: the pod fails with this message."""


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand_refs(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known names are replaced, unknown ones kept, `$$` is `$`."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _REF.sub(replace, text)


def rewrite_paths(text: str, mounts: Sequence[tuple[str, str]]) -> str:
    """Replaces container paths by host paths where a path starts: at the start of the text or
    after '=', ':', ',' or whitespace, and ending at '/', the end, or one of those separators.
    One pass, longest container path first: /data/cache wins over /data, and a host path put in
    (under /tmp, say) is never rewritten again by a mount at /tmp.

    A path below a mount point that already exists on this host is left alone: pods run here
    as local processes, so a command may name a file of the checkout, which may itself live
    under /tmp (a CI clone, say) while the pod mounts an emptyDir at /tmp."""
    if not mounts:
        return text
    table = {container.rstrip("/") or "/": host for container, host in mounts}
    alternatives = "|".join(re.escape(p) for p in sorted(table, key=len, reverse=True))
    pattern = re.compile(
        r"(?:^|(?<=[=:,\s]))(" + alternatives + r")(?=$|[/=:,\s])((?:/[^=:,\s]*)?)"
    )

    def replace(match: re.Match[str]) -> str:
        mount, rest = match.group(1), match.group(2)
        if rest.strip("/") and Path(mount + rest).exists():
            return match.group(0)
        return table[mount] + rest

    return pattern.sub(replace, text)


def field_ref_value(pod: Mapping[str, Any], field_path: str, node_name: str) -> str:
    """The downward API fields a process can ask for through env or a downwardAPI volume."""
    meta = pod["metadata"]
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": node_name,
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.hostIP": "127.0.0.1",
        "status.podIP": "127.0.0.1",
    }
    if field_path in simple:
        return str(simple[field_path])
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", field_path)
    if match:
        return str(meta.get(match.group(1), {}).get(match.group(2), ""))
    raise PodRejected(f"fieldRef {field_path!r} is not supported by the node agent")


# Preparing a container: env, volumes (reads objects through the API)


@dataclass
class ObjectReader:
    """Reads Secrets and ConfigMaps of one namespace, each once per pod start."""

    api: ApiClient
    namespace: str
    cache: dict[tuple[str, str], dict[str, bytes] | None] = field(default_factory=dict)

    def data(self, kind: str, name: str, optional: bool) -> dict[str, bytes] | None:
        if (kind, name) not in self.cache:
            self.cache[(kind, name)] = self._fetch(kind, name)
        found = self.cache[(kind, name)]
        if found is None and not optional:
            raise PodSetupError(f'{kind.lower()} "{name}" not found')
        return found

    def _fetch(self, kind: str, name: str) -> dict[str, bytes] | None:
        plural = "secrets" if kind == "secret" else "configmaps"
        try:
            obj = self.api.get(f"/api/v1/namespaces/{self.namespace}/{plural}/{name}")
        except ApiError as err:
            if err.status == 404:
                return None
            raise
        if kind == "secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        text = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        binary = {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
        return {**text, **binary}

    def key(self, kind: str, ref: Mapping[str, Any]) -> bytes | None:
        data = self.data(kind, ref["name"], bool(ref.get("optional")))
        if data is None:
            return None
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            what = "Secret" if kind == "secret" else "ConfigMap"
            raise PodSetupError(
                f"couldn't find key {ref['key']} in {what} {self.namespace}/{ref['name']}"
            )
        return data[ref["key"]]


def resolve_env(
    container: Mapping[str, Any], pod: Mapping[str, Any], reader: ObjectReader, node_name: str
) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom first, then env in order,
    each value expanded against the variables defined before it."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind in ("secret", "configMap"):
            ref = source.get(f"{kind}Ref")
            if ref:
                data = reader.data(kind, ref["name"], bool(ref.get("optional"))) or {}
                env.update({prefix + k: v.decode() for k, v in data.items()})
    for var in container.get("env") or []:
        value = _env_value(var, pod, reader, node_name, env)
        if value is not None:
            env[var["name"]] = value
    return env


def _env_value(
    var: Mapping[str, Any],
    pod: Mapping[str, Any],
    reader: ObjectReader,
    node_name: str,
    env: Mapping[str, str],
) -> str | None:
    source = var.get("valueFrom")
    if not source:
        return expand_refs(var.get("value", ""), env)
    if "secretKeyRef" in source:
        raw = reader.key("secret", source["secretKeyRef"])
        return None if raw is None else raw.decode()
    if "configMapKeyRef" in source:
        raw = reader.key("configMap", source["configMapKeyRef"])
        return None if raw is None else raw.decode()
    if "fieldRef" in source:
        return field_ref_value(pod, source["fieldRef"]["fieldPath"], node_name)
    raise PodRejected(f"env {var['name']}: unsupported valueFrom {sorted(source)}")


def _write_items(
    directory: Path,
    data: Mapping[str, bytes],
    items: Sequence[Mapping[str, Any]] | None,
    mode: int | None,
) -> None:
    """Writes a secret/configMap's keys (or only `items`, renamed to their `path`) as files."""
    chosen = [(i["key"], i["path"], i.get("mode")) for i in items] if items else None
    for key, rel, item_mode in chosen or [(k, k, None) for k in data]:
        if key not in data:
            raise PodSetupError(f"volume item key {key!r} not found")
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data[key])
        if item_mode is not None or mode is not None:
            target.chmod(item_mode if item_mode is not None else mode)


def materialise_volume(
    volume: Mapping[str, Any],
    directory: Path,
    pod: Mapping[str, Any],
    reader: ObjectReader,
    node_name: str,
) -> Path:
    """Makes one pod volume a host directory and returns it (hostPath: the host path itself)."""
    if "hostPath" in volume:
        return Path(volume["hostPath"]["path"])
    directory.mkdir(parents=True, exist_ok=True)
    if "emptyDir" in volume:
        return directory
    sources: list[tuple[str, Mapping[str, Any]]] = []
    if "secret" in volume:
        sources.append(("secret", volume["secret"]))
    elif "configMap" in volume:
        sources.append(("configMap", volume["configMap"]))
    elif "downwardAPI" in volume:
        sources.append(("downwardAPI", volume["downwardAPI"]))
    elif "projected" in volume:
        for source in volume["projected"].get("sources") or []:
            sources.extend((kind, spec) for kind, spec in source.items())
    else:
        raise PodRejected(f"volume {volume.get('name')}: type not supported by the node agent")
    default_mode = next(
        (volume[k].get("defaultMode") for k in ("secret", "configMap", "projected") if k in volume),
        None,
    )
    for kind, spec in sources:
        try:
            _write_source(kind, spec, directory, pod, reader, node_name, default_mode)
        except PodSetupError as err:
            raise VolumeSetupError(
                f'MountVolume.SetUp failed for volume "{volume.get("name")}" : {err}'
            ) from None
    return directory


def _write_source(
    kind: str,
    spec: Mapping[str, Any],
    directory: Path,
    pod: Mapping[str, Any],
    reader: ObjectReader,
    node_name: str,
    mode: int | None,
) -> None:
    if kind in ("secret", "configMap"):
        name = spec.get("secretName") or spec.get("name")
        data = reader.data(kind, str(name), bool(spec.get("optional")))
        if data is not None:
            _write_items(directory, data, spec.get("items"), mode)
    elif kind == "downwardAPI":
        for item in spec.get("items") or []:
            if "fieldRef" not in item:
                raise PodRejected("downwardAPI resourceFieldRef is not supported")
            value = field_ref_value(pod, item["fieldRef"]["fieldPath"], node_name)
            _write_items(
                directory, {"v": value.encode()}, [{"key": "v", "path": item["path"]}], mode
            )
    elif kind == "serviceAccountToken":
        return  # no Kubernetes credentials for trial processes
    else:
        raise PodRejected(f"projected source {kind!r} is not supported by the node agent")


# The user a container image declares (its USER) when `image_users` does not say: the project's
# images (the Dockerfile's operator and runner targets) run as USER 65532:65532.
DEFAULT_IMAGE_USER: int | str = 65532


def verify_non_root(
    pod: Mapping[str, Any], container: Mapping[str, Any], image_user: int | str
) -> None:
    """The kubelet's runAsNonRoot check (kuberuntime `verifyRunAsNonRoot`), made before the
    container is created: a refusal leaves the pod Pending in CreateContainerConfigError, and
    the kubelet retries it forever, as a real node does.

    The effective user is the container's runAsUser, else the pod's, else the image's USER; a
    non-numeric image user cannot be verified and is refused likewise."""
    pod_context = pod["spec"].get("securityContext") or {}
    context = container.get("securityContext") or {}
    non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
    if not non_root:
        return
    where = f'(pod: "{pod["metadata"]["name"]}_{pod["metadata"]["namespace"]}", container: '
    where += f"{container['name']})"
    uid = context.get("runAsUser", pod_context.get("runAsUser"))
    if uid is not None:
        if int(uid) == 0:
            raise PodSetupError(f"container's runAsUser breaks non-root policy {where}")
        return
    if isinstance(image_user, str) and not image_user.isdigit():
        raise PodSetupError(
            f"container has runAsNonRoot and image has non-numeric user ({image_user}), "
            f"cannot verify user is non-root {where}"
        )
    if int(image_user) == 0:
        raise PodSetupError(f"container has runAsNonRoot and image will run as root {where}")


def container_command(
    container: Mapping[str, Any], entrypoints: Mapping[str, Sequence[str]], env: Mapping[str, str]
) -> list[str]:
    """command + args with `$(VAR)` expanded; the image's entrypoint comes from `entrypoints`."""
    command = list(container.get("command") or entrypoints.get(container.get("image", ""), []))
    if not command:
        raise PodRejected(
            f"container {container['name']} has no command and image "
            f"{container.get('image')!r} has no entrypoint known to the node agent"
        )
    return [expand_refs(part, env) for part in [*command, *(container.get("args") or [])]]


def volume_mounts(
    container: Mapping[str, Any], volumes: Mapping[str, Path]
) -> list[tuple[str, str]]:
    """(container path, host path) for each of the container's volumeMounts; a subPath is made."""
    mounts = []
    for mount in container.get("volumeMounts") or []:
        if mount["name"] not in volumes:
            raise PodRejected(f"volumeMount {mount['name']!r} names no volume")
        host = volumes[mount["name"]] / mount.get("subPath", "")
        if mount.get("subPath"):
            host.mkdir(parents=True, exist_ok=True)
        mounts.append((mount["mountPath"], str(host).rstrip("/")))
    return mounts


def base_env(pod_dir: Path) -> dict[str, str]:
    """What a container image would provide: PATH (with this interpreter's bin first, so
    `python` is the test environment's), a HOME and TMPDIR of the pod's own, a UTF-8 locale."""
    home, tmp = pod_dir / "home", pod_dir / "tmp"
    home.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {"PATH": path, "HOME": str(home), "TMPDIR": str(tmp), "LANG": "C.UTF-8"}
