"""A test-side node agent: plays scheduler and kubelet for pods, running containers as processes.

The control plane of tests/support/cluster.py has no scheduler and no kubelet, and this machine
has no container engine. The agent fills that gap just enough for the real Job controller and
garbage collector to do their work:

- it registers a Ready Node (cpu, memory, pods and `nvidia.com/gpu` allocatable) and refreshes
  its status conditions every few seconds, so the node lifecycle controller keeps it Ready;
- it binds every pending, unscheduled pod to that node (pods/binding, as a scheduler would);
- it runs the pod's first container's command and args as a LOCAL process, at most
  `max_running` at a time, with the container's env (plain values, `valueFrom` secret/configMap/
  field references, `envFrom`, `$(VAR)` expansion) and volumes made into directories;
- it reports the pod's phase, conditions and container state through pods/status, exit code and
  termination message included, and confirms deletions (killing the process first).

Paths: the process runs on the host, so a `mountPath` such as /data does not exist. The agent
rewrites every env value, command and arg that mentions a mount path (as a whole path component,
after start, '=', ':', ',' or a space) to the host directory, and also passes the whole map as
JSON in MERGESEARCH_PATH_MAP. The termination message file (`terminationMessagePath`, by default
/dev/termination-log) is a file in the pod's directory, named by MERGERUNNER_TERMINATION_LOG.
The image is ignored: a container needs `command`, or an entry in `entrypoints` for its image.

Security checks the kubelet makes before it creates a container are made too, with the same
outcome (the pod stays Pending in `CreateContainerConfigError`, the message the kubelet's):
`runAsNonRoot` against the effective user, which is the container's or pod's `runAsUser`, else
the image's USER (`image_users`, default 65532 as the project's images declare). The process
itself runs as the agent's user: there is no container runtime to switch users or make the root
file system read-only, so those settings are checked, not enforced.

Not supported: init and sidecar containers, probes, persistent volumes, resource enforcement,
`kubectl logs`/`exec` (use `NodeAgent.logs`). Service-account tokens in projected volumes are
not written (the runner needs no Kubernetes credentials).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from support.cluster import ApiClient, ApiError, KubeCluster

NODE_NAME = "mergesearch-node"
KUBELET_VERSION = "v1.36.3"
DEFAULT_CAPACITY: dict[str, str] = {
    "cpu": "16",
    "memory": "64Gi",
    "pods": "110",
    "ephemeral-storage": "100Gi",
    "nvidia.com/gpu": "8",
}
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
MAX_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80
KILL_GRACE_CAP_S = 5.0


class PodSetupError(Exception):
    """The container cannot start yet (a missing secret, say): the pod stays Pending, retried.
    Messages are the kubelet's (`secret "x" not found`); the pod waits in
    CreateContainerConfigError, as the kubelet's does for env references."""


class VolumeSetupError(PodSetupError):
    """A volume cannot be set up (its Secret or ConfigMap is missing): as on a real kubelet,
    the pod stays ContainerCreating and a `FailedMount` Warning event says why."""


class PodRejected(Exception):
    """The pod asks for something the agent cannot do: the pod fails with this message."""


# ---------------------------------------------------------------------------------------------
# Pure core: manifests, statuses, env and path handling


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_status(name: str, capacity: Mapping[str, str], now: str) -> dict[str, Any]:
    """A Ready node's status; lastHeartbeatTime is what the node lifecycle controller watches."""

    def condition(kind: str, status: str, reason: str) -> dict[str, str]:
        return {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": "node agent of the test suite",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }

    return {
        "capacity": dict(capacity),
        "allocatable": dict(capacity),
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID"),
            condition("Ready", "True", "KubeletReady"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
            "kernelVersion": "",
            "osImage": "mergesearch test node agent",
            "containerRuntimeVersion": "process://local",
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": "amd64",
        },
    }


def node_manifest(name: str) -> dict[str, Any]:
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "mergesearch.io/node-agent": "true",
    }
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


_SUFFIXES = {
    "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}  # fmt: skip


def parse_quantity(text: str | int | float) -> float:
    """A Kubernetes quantity (`500m`, `8`, `64Gi`) as a number."""
    text = str(text)
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * _SUFFIXES[suffix]
    return float(text)


def insufficient(pod: Mapping[str, Any], capacity: Mapping[str, str]) -> list[str]:
    """The resources the pod's containers request (limits for extended resources, which need
    no request) beyond what the node has: what the scheduler reports as `Insufficient`."""
    wanted: dict[str, float] = {}
    for container in pod["spec"].get("containers") or []:
        resources = container.get("resources") or {}
        merged = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        for name, value in merged.items():
            wanted[name] = wanted.get(name, 0.0) + parse_quantity(value)
    return sorted(
        name for name, value in wanted.items() if value > parse_quantity(capacity.get(name, "0"))
    )


def binding_manifest(pod_name: str, node_name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": pod_name},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node_name},
    }


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


def termination_message(file_text: str, log_text: str, exit_code: int, policy: str | None) -> str:
    """The message the kubelet would report: the file, else (FallbackToLogsOnError) the log tail
    of a failed container; at most 4 KiB either way."""
    message = file_text
    if not message.strip() and exit_code != 0 and policy == "FallbackToLogsOnError":
        message = "\n".join(log_text.splitlines()[-FALLBACK_LOG_LINES:])
    encoded = message.encode()
    if len(encoded) > MAX_MESSAGE_BYTES:
        message = encoded[-MAX_MESSAGE_BYTES:].decode(errors="ignore")
    return message


@dataclass(frozen=True)
class ContainerRun:
    """What the pod status needs to know about one run of the container."""

    name: str
    image: str
    container_id: str
    started_at: str
    restart_count: int = 0
    finished_at: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    message: str = ""
    last_state: Mapping[str, Any] | None = None


def _condition(kind: str, status: bool, now: str, reason: str | None = None) -> dict[str, Any]:
    condition: dict[str, Any] = {
        "type": kind,
        "status": "True" if status else "False",
        "lastTransitionTime": now,
        "lastProbeTime": None,
    }
    if reason:
        condition["reason"] = reason
    return condition


def pod_conditions(now: str, running: bool, reason: str | None = None) -> list[dict[str, Any]]:
    return [
        _condition("PodScheduled", True, now),
        _condition("PodReadyToStartContainers", running, now),
        _condition("Initialized", True, now),
        _condition("ContainersReady", running, now, reason),
        _condition("Ready", running, now, reason),
    ]


def container_status(run: ContainerRun) -> dict[str, Any]:
    status: dict[str, Any] = {
        "name": run.name,
        "image": run.image,
        "imageID": run.image,
        "containerID": run.container_id,
        "restartCount": run.restart_count,
        "lastState": dict(run.last_state or {}),
    }
    if run.exit_code is None:
        status.update(ready=True, started=True, state={"running": {"startedAt": run.started_at}})
    else:
        status.update(ready=False, started=False, state={"terminated": terminated_state(run)})
    return status


def terminated_state(run: ContainerRun) -> dict[str, Any]:
    state: dict[str, Any] = {
        "exitCode": run.exit_code,
        "reason": run.reason or ("Completed" if run.exit_code == 0 else "Error"),
        "startedAt": run.started_at,
        "finishedAt": run.finished_at,
        "containerID": run.container_id,
    }
    if run.message:
        state["message"] = run.message
    return state


def running_pod_status(run: ContainerRun, now: str) -> dict[str, Any]:
    return {
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
        "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}],
        "startTime": run.started_at,
        "conditions": pod_conditions(now, running=True),
        "containerStatuses": [container_status(run)],
    }


def finished_pod_status(
    run: ContainerRun, now: str, phase_reason: str | None = None
) -> dict[str, Any]:
    """Succeeded if the container exited 0, else Failed; `phase_reason` (DeadlineExceeded, ...)
    becomes the pod's reason."""
    status = running_pod_status(run, now)
    status["phase"] = "Succeeded" if run.exit_code == 0 else "Failed"
    status["conditions"] = pod_conditions(now, running=False, reason="PodCompleted")
    if phase_reason:
        status["reason"] = phase_reason
        status["message"] = run.message
    return status


def waiting_pod_status(
    pod: Mapping[str, Any], reason: str, message: str, now: str
) -> dict[str, Any]:
    container = pod["spec"]["containers"][0]
    return {
        "phase": "Pending",
        "hostIP": "127.0.0.1",
        "conditions": pod_conditions(now, running=False, reason="ContainersNotReady"),
        "containerStatuses": [
            {
                "name": container["name"],
                "image": container.get("image", ""),
                "imageID": "",
                "ready": False,
                "started": False,
                "restartCount": 0,
                "state": {"waiting": {"reason": reason, "message": message}},
            }
        ],
    }


def lost_pod_status(now: str) -> dict[str, Any]:
    """A pod this node was running before the agent (re)started: its process is gone."""
    return {
        "phase": "Failed",
        "reason": "NodeAgentRestarted",
        "message": "the node agent that ran this pod is gone",
        "conditions": pod_conditions(now, running=False, reason="PodCompleted"),
    }


def should_restart(restart_policy: str, exit_code: int) -> bool:
    return restart_policy == "Always" or (restart_policy == "OnFailure" and exit_code != 0)


def exit_status(returncode: int) -> int:
    """A shell-style exit status: death by signal N is 128 + N, as container runtimes report."""
    return 128 - returncode if returncode < 0 else returncode


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# The agent (imperative shell)


@dataclass
class LocalContainer:
    """One running (or just finished) container process of a pod on this node."""

    namespace: str
    name: str
    uid: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    pod_dir: Path
    termination_file: Path
    message_policy: str | None
    restart_policy: str
    deadline: float | None
    run: ContainerRun
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.pod_dir / f"{self.run.name}.log"

    def spawn(self) -> None:
        """Starts the process in a session of its own (so the whole tree can be signalled)."""
        self.termination_file.write_text("")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def kill(self, grace_s: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, KILL_GRACE_CAP_S)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def finished(self, exit_code: int, reason: str | None = None) -> ContainerRun:
        log_text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        file_text = self.termination_file.read_text(errors="replace")
        message = termination_message(file_text, log_text, exit_code, self.message_policy)
        return ContainerRun(
            name=self.run.name,
            image=self.run.image,
            container_id=self.run.container_id,
            started_at=self.run.started_at,
            restart_count=self.run.restart_count,
            finished_at=now_rfc3339(),
            exit_code=exit_code,
            reason=reason,
            message=message,
        )


def _base_env(pod_dir: Path) -> dict[str, str]:
    """What a container image would provide: PATH (with this interpreter's bin first, so
    `python` is the test environment's), a HOME and TMPDIR of the pod's own, a UTF-8 locale."""
    home, tmp = pod_dir / "home", pod_dir / "tmp"
    home.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {"PATH": path, "HOME": str(home), "TMPDIR": str(tmp), "LANG": "C.UTF-8"}


class NodeAgent:
    """Binds, runs and reports pods on one fake node; a context manager running a thread.

    It takes every pod of the cluster unless `namespaces` or `label_selector` narrow it: a pod
    it cannot run (a Deployment's server without a known entrypoint) fails, and its controller
    makes another, so tests that install such workloads should narrow it to the pods they mean.
    """

    def __init__(
        self,
        api: ApiClient,
        workdir: Path | None = None,
        node_name: str = NODE_NAME,
        max_running: int = 4,
        namespaces: Sequence[str] | None = None,
        label_selector: str | None = None,
        capacity: Mapping[str, str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        entrypoints: Mapping[str, Sequence[str]] | None = None,
        image_users: Mapping[str, int | str] | None = None,
        poll_interval_s: float = 0.3,
        heartbeat_s: float = 10.0,
    ) -> None:
        self.api = api
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="mergesearch-node-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.node_name = node_name
        self.max_running = max_running
        self.namespaces = list(namespaces) if namespaces else None
        self.label_selector = label_selector
        self.capacity = dict(capacity or DEFAULT_CAPACITY)
        self.extra_env = dict(extra_env or {})
        self.entrypoints = dict(entrypoints or {})
        self.image_users = dict(image_users or {})  # image → its USER; else DEFAULT_IMAGE_USER
        self.poll_interval_s = poll_interval_s
        self.heartbeat_s = heartbeat_s
        self.errors: list[str] = []
        self._containers: dict[str, LocalContainer] = {}
        self._done: dict[str, LocalContainer] = {}
        self._finished: set[str] = set()
        self._waiting: dict[str, str] = {}
        self._unschedulable_pods: set[str] = set()
        self._deleted: set[str] = set()
        self._last_heartbeat = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="node-agent", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> NodeAgent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._register_node()
        self._thread.start()

    def stop(self) -> None:
        """Stops the loop and kills every process still running (the node 'powers off')."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        with self._lock:
            for container in self._containers.values():
                container.kill(grace_s=1.0)
            self._containers.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def logs(self, namespace: str, name: str) -> str:
        """The combined stdout/stderr of the pod's container (what `kubectl logs` would show)."""
        with self._lock:
            known = [*self._containers.values(), *self._done.values()]
        for container in known:
            if (container.namespace, container.name) == (namespace, name):
                return container.log_path.read_text(errors="replace")
        raise KeyError(f"no container of pod {namespace}/{name} ran on this node")

    def running_count(self) -> int:
        with self._lock:
            return len(self._containers)

    def running(self) -> list[LocalContainer]:
        """The containers whose processes this agent runs now."""
        with self._lock:
            return list(self._containers.values())

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception as err:  # the loop must survive a bad pod or a restarting server
                self.errors.append(f"{type(err).__name__}: {err}")
            self._stop.wait(self.poll_interval_s)

    def sync_once(self) -> None:
        """One level-triggered pass: heartbeat, bind, then converge every pod on this node."""
        if time.monotonic() - self._last_heartbeat >= self.heartbeat_s:
            self._heartbeat()
        for pod in self._list_pods("spec.nodeName=,status.phase=Pending"):
            self._bind(pod)
        pods = self._list_pods(f"spec.nodeName={self.node_name}")
        self._forget_vanished({p["metadata"]["uid"] for p in pods})
        for pod in pods:
            self._sync_pod(pod)

    def _list_pods(self, field_selector: str) -> list[dict[str, Any]]:
        paths = (
            [f"/api/v1/namespaces/{ns}/pods" for ns in self.namespaces]
            if self.namespaces
            else ["/api/v1/pods"]
        )
        query = {"fieldSelector": field_selector}
        if self.label_selector:
            query["labelSelector"] = self.label_selector
        pods: list[dict[str, Any]] = []
        for path in paths:
            pods.extend(self.api.get(path, query)["items"])
        return pods

    # -- node -----------------------------------------------------------------------------------

    def _register_node(self) -> None:
        try:
            self.api.create("/api/v1/nodes", node_manifest(self.node_name))
        except ApiError as err:
            if err.status != 409:
                raise
        self._heartbeat()

    def _heartbeat(self) -> None:
        status = node_status(self.node_name, self.capacity, now_rfc3339())
        self.api.merge_patch(f"/api/v1/nodes/{self.node_name}/status", {"status": status})
        self._last_heartbeat = time.monotonic()

    # -- pods -----------------------------------------------------------------------------------

    def _pod_path(self, pod: Mapping[str, Any], sub: str = "") -> str:
        meta = pod["metadata"]
        return f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}{sub}"

    def _bind(self, pod: Mapping[str, Any]) -> None:
        if pod["metadata"].get("deletionTimestamp"):
            return
        missing = insufficient(pod, self.capacity)
        if missing:
            self._unschedulable(pod, missing)
            return
        try:
            self.api.create(
                self._pod_path(pod, "/binding"),
                binding_manifest(pod["metadata"]["name"], self.node_name),
            )
        except ApiError as err:
            # Deleted or bound meanwhile, or its namespace is being deleted (a scheduler too
            # gets that refusal and moves on).
            if err.status not in (404, 409) and "NamespaceTerminating" not in err.body:
                raise

    def _report(self, pod: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        try:
            self.api.request(
                "PATCH",
                self._pod_path(pod, "/status"),
                {"status": status},
                content_type="application/strategic-merge-patch+json",
            )
        except ApiError as err:
            if err.status != 404:
                raise

    def _forget_vanished(self, uids: set[str]) -> None:
        """A pod gone from the API (force-deleted) leaves no process behind."""
        with self._lock:
            for uid in [u for u in self._containers if u not in uids]:
                self._containers.pop(uid).kill(grace_s=1.0)
        self._deleted &= uids

    def _sync_pod(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        phase = pod.get("status", {}).get("phase")
        if pod["metadata"].get("deletionTimestamp"):
            self._confirm_deletion(pod)
        elif uid in self._containers:
            self._check_running(pod, self._containers[uid])
        elif uid in self._finished:
            return  # reported terminal; a stale listing must not start it again
        elif phase == "Pending" and self.running_count() < self.max_running:
            self._start(pod)
        elif phase == "Running":
            self._finished.add(uid)
            self._report(pod, lost_pod_status(now_rfc3339()))

    def _confirm_deletion(self, pod: Mapping[str, Any]) -> None:
        """What the kubelet does on a graceful delete: kill, report a terminal phase, then
        delete with grace 0 so the apiserver removes the object (once finalizers allow)."""
        uid = pod["metadata"]["uid"]
        if uid in self._deleted:
            return
        with self._lock:
            container = self._containers.pop(uid, None)
        if container is not None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
            container.kill(grace_s=min(float(grace), KILL_GRACE_CAP_S))
            code = container.process.returncode if container.process else None
            finished = container.finished(137 if code is None else exit_status(code))
            self._report(pod, finished_pod_status(finished, now_rfc3339()))
            with self._lock:
                self._done[uid] = container
            self._finished.add(uid)
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        try:
            self.api.delete(self._pod_path(pod), body)
        except ApiError as err:
            if err.status not in (404, 409):
                raise
        self._deleted.add(uid)

    def _start(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        try:
            container = self._prepare(pod)
        except PodSetupError as err:
            if self._waiting.get(uid) != str(err):
                self._waiting[uid] = str(err)
                if isinstance(err, VolumeSetupError):
                    waiting = waiting_pod_status(pod, "ContainerCreating", "", now_rfc3339())
                    self._warn(pod, "FailedMount", str(err))
                else:
                    waiting = waiting_pod_status(
                        pod, "CreateContainerConfigError", str(err), now_rfc3339()
                    )
                self._report(pod, waiting)
            return
        except PodRejected as err:
            self._fail_unstartable(pod, str(err), reason="Unsupported")
            return
        self._waiting.pop(uid, None)
        try:
            container.spawn()
        except OSError as err:
            self._fail_unstartable(pod, f"cannot start {container.argv[0]}: {err}", "StartError")
            return
        with self._lock:
            self._containers[uid] = container
        self._report(pod, running_pod_status(container.run, now_rfc3339()))

    def _unschedulable(self, pod: Mapping[str, Any], missing: Sequence[str]) -> None:
        """What the scheduler does with a pod no node can hold: PodScheduled False with reason
        Unschedulable, and a FailedScheduling event (once per pod)."""
        uid = pod["metadata"]["uid"]
        if uid in self._unschedulable_pods:
            return
        self._unschedulable_pods.add(uid)
        detail = ", ".join(f"1 Insufficient {name}" for name in missing)
        message = f"0/1 nodes are available: {detail}."
        condition = _condition("PodScheduled", False, now_rfc3339(), "Unschedulable")
        condition["message"] = message
        self._report(pod, {"phase": "Pending", "conditions": [condition]})
        self._warn(pod, "FailedScheduling", message, component="default-scheduler")

    def _warn(
        self, pod: Mapping[str, Any], reason: str, message: str, component: str = "kubelet"
    ) -> None:
        """A Warning event about the pod, as the kubelet (or the scheduler) posts one."""
        meta = pod["metadata"]
        now = now_rfc3339()
        event = {
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}"},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "reason": reason,
            "message": message,
            "type": "Warning",
            "source": {"component": component, "host": self.node_name},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.api.create(f"/api/v1/namespaces/{meta['namespace']}/events", event)

    def _fail_unstartable(self, pod: Mapping[str, Any], message: str, reason: str) -> None:
        container = pod["spec"]["containers"][0]
        now = now_rfc3339()
        run = ContainerRun(
            name=container["name"],
            image=container.get("image", ""),
            container_id="",
            started_at=now,
            finished_at=now,
            exit_code=128,
            reason=reason,
            message=message,
        )
        self._finished.add(pod["metadata"]["uid"])
        self._report(pod, finished_pod_status(run, now))

    def _prepare(self, pod: dict[str, Any]) -> LocalContainer:
        """Everything the process needs, from the pod spec; raises before anything starts."""
        spec, meta = pod["spec"], pod["metadata"]
        if spec.get("initContainers"):
            raise PodRejected("init containers are not supported by the node agent")
        container = spec["containers"][0]
        image_user = self.image_users.get(container.get("image", ""), DEFAULT_IMAGE_USER)
        verify_non_root(pod, container, image_user)
        reader = ObjectReader(self.api, meta["namespace"])
        pod_dir = self.workdir / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        volumes = {
            v["name"]: materialise_volume(
                v, pod_dir / "volumes" / v["name"], pod, reader, self.node_name
            )
            for v in spec.get("volumes") or []
        }
        mounts = self._mounts(container, volumes)
        termination_file = pod_dir / "termination-log"
        container_tm_path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
        mounts.append((container_tm_path, str(termination_file)))
        env = resolve_env(container, pod, reader, self.node_name)
        env = {k: rewrite_paths(v, mounts) for k, v in env.items()}
        argv = [
            rewrite_paths(a, mounts) for a in container_command(container, self.entrypoints, env)
        ]
        cwd = Path(rewrite_paths(container.get("workingDir") or str(pod_dir / "work"), mounts))
        cwd.mkdir(parents=True, exist_ok=True)
        process_env = {
            **_base_env(pod_dir),
            "HOSTNAME": meta["name"],
            **self.extra_env,
            **env,
            "MERGERUNNER_TERMINATION_LOG": str(termination_file),
            "MERGESEARCH_PATH_MAP": json.dumps(dict(mounts)),
        }
        deadline = spec.get("activeDeadlineSeconds")
        return LocalContainer(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            argv=argv,
            env=process_env,
            cwd=cwd,
            pod_dir=pod_dir,
            termination_file=termination_file,
            message_policy=container.get("terminationMessagePolicy"),
            restart_policy=spec.get("restartPolicy", "Always"),
            deadline=time.monotonic() + float(deadline) if deadline else None,
            run=ContainerRun(
                name=container["name"],
                image=container.get("image", ""),
                container_id=f"process://{meta['uid']}",
                started_at=now_rfc3339(),
            ),
        )

    @staticmethod
    def _mounts(container: Mapping[str, Any], volumes: Mapping[str, Path]) -> list[tuple[str, str]]:
        mounts = []
        for mount in container.get("volumeMounts") or []:
            if mount["name"] not in volumes:
                raise PodRejected(f"volumeMount {mount['name']!r} names no volume")
            host = volumes[mount["name"]] / mount.get("subPath", "")
            if mount.get("subPath"):
                host.mkdir(parents=True, exist_ok=True)
            mounts.append((mount["mountPath"], str(host).rstrip("/")))
        return mounts

    def _check_running(self, pod: Mapping[str, Any], container: LocalContainer) -> None:
        assert container.process is not None
        exit_code = container.process.poll()
        if exit_code is None:
            if container.deadline is not None and time.monotonic() > container.deadline:
                container.kill(grace_s=KILL_GRACE_CAP_S)
                self._finish(pod, container, 137, "DeadlineExceeded")
            return
        exit_code = exit_status(exit_code)
        if should_restart(container.restart_policy, exit_code):
            self._restart(pod, container, exit_code)
        else:
            self._finish(pod, container, exit_code)

    def _finish(
        self,
        pod: Mapping[str, Any],
        container: LocalContainer,
        exit_code: int,
        phase_reason: str | None = None,
    ) -> None:
        run = container.finished(exit_code, reason=phase_reason)
        with self._lock:
            self._containers.pop(container.uid, None)
            self._done[container.uid] = container
        self._finished.add(container.uid)
        self._report(pod, finished_pod_status(run, now_rfc3339(), phase_reason))

    def _restart(self, pod: Mapping[str, Any], container: LocalContainer, exit_code: int) -> None:
        """restartPolicy OnFailure/Always: the same container again, restartCount + 1."""
        last = {"terminated": terminated_state(container.finished(exit_code))}
        container.run = ContainerRun(
            name=container.run.name,
            image=container.run.image,
            container_id=container.run.container_id,
            started_at=now_rfc3339(),
            restart_count=container.run.restart_count + 1,
            last_state=last,
        )
        container.spawn()
        self._report(pod, running_pod_status(container.run, now_rfc3339()))


@pytest.fixture(scope="session")
def k8s_node_agent(k8s_cluster: KubeCluster) -> Iterator[NodeAgent]:
    """One node agent for the session, running every pod of the cluster; its loop errors (a
    failed status update, say) fail the session at teardown rather than passing unseen."""
    agent = NodeAgent(k8s_cluster.api())
    with agent:
        yield agent
    assert not agent.errors, "node agent errors:\n" + "\n".join(agent.errors[-20:])


def wait_for(
    condition: Callable[[], Any], timeout_s: float = 60.0, interval_s: float = 0.25, what: str = ""
) -> Any:
    """Polls until `condition()` returns something truthy and returns it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what or condition}")
