"""What a kubelet and a scheduler report, as pure builders: the Node's manifest and status, a
pod's binding, its status in each state (waiting, running, finished, unschedulable, lost), a
container's termination message, and the Warning events about a pod.

No I/O and no clock: every builder takes `now` (an RFC 3339 time), so tests/unit can check them
against the shapes the real kubelet writes (k8s.io/api core/v1 PodStatus, ContainerStatus,
NodeStatus). tests/support/nodeagent.py sends what they build through the API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

KUBELET_VERSION = "v1.36.3"
MAX_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80


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


def condition(kind: str, status: bool, now: str, reason: str | None = None) -> dict[str, Any]:
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
        condition("PodScheduled", True, now),
        condition("PodReadyToStartContainers", running, now),
        condition("Initialized", True, now),
        condition("ContainersReady", running, now, reason),
        condition("Ready", running, now, reason),
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


def unschedulable_pod_status(missing: Sequence[str], now: str) -> dict[str, Any]:
    """What the scheduler reports for a pod no node can hold: PodScheduled False with reason
    Unschedulable, the message naming each resource the node lacks."""
    detail = ", ".join(f"1 Insufficient {name}" for name in missing)
    pod_scheduled = condition("PodScheduled", False, now, "Unschedulable")
    pod_scheduled["message"] = f"0/1 nodes are available: {detail}."
    return {"phase": "Pending", "conditions": [pod_scheduled]}


def warning_event(
    pod: Mapping[str, Any],
    reason: str,
    message: str,
    component: str,
    host: str,
    now: str,
    name: str,
) -> dict[str, Any]:
    """A Warning event about the pod, as the kubelet (or the scheduler, `component`) posts one;
    `name` is the event's unique name (the kubelet's: pod name, a dot, a random suffix)."""
    meta = pod["metadata"]
    return {
        "metadata": {"name": name},
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
        "source": {"component": component, "host": host},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
