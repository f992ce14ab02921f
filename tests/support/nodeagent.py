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

Layout: the statuses it reports are built by the pure functions of tests/support/pod_status.py,
the environment, volumes and security check by tests/support/pod_setup.py; this module is the
process loop (`NodeAgent`) and the processes it runs (`LocalContainer`).

Not supported: init and sidecar containers, probes, persistent volumes, resource enforcement,
`kubectl logs`/`exec` (use `NodeAgent.logs`). Service-account tokens in projected volumes are
not written (the runner needs no Kubernetes credentials).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.cluster import ApiClient, ApiError, KubeCluster
from support.pod_setup import (
    DEFAULT_IMAGE_USER,
    ObjectReader,
    PodRejected,
    PodSetupError,
    VolumeSetupError,
    base_env,
    container_command,
    materialise_volume,
    resolve_env,
    rewrite_paths,
    verify_non_root,
    volume_mounts,
)
from support.pod_status import (
    ContainerRun,
    binding_manifest,
    exit_status,
    finished_pod_status,
    insufficient,
    lost_pod_status,
    node_manifest,
    node_status,
    now_rfc3339,
    running_pod_status,
    should_restart,
    terminated_state,
    termination_message,
    unschedulable_pod_status,
    waiting_pod_status,
    warning_event,
)

NODE_NAME = "mergesearch-node"
DEFAULT_CAPACITY: dict[str, str] = {
    "cpu": "16",
    "memory": "64Gi",
    "pods": "110",
    "ephemeral-storage": "100Gi",
    "nvidia.com/gpu": "8",
}
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
KILL_GRACE_CAP_S = 5.0


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
        status = unschedulable_pod_status(missing, now_rfc3339())
        self._report(pod, status)
        message = status["conditions"][0]["message"]
        self._warn(pod, "FailedScheduling", message, component="default-scheduler")

    def _warn(
        self, pod: Mapping[str, Any], reason: str, message: str, component: str = "kubelet"
    ) -> None:
        """A Warning event about the pod, as the kubelet (or the scheduler) posts one."""
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        event_name = f"{name}.{uuid.uuid4().hex[:16]}"
        event = warning_event(
            pod, reason, message, component, self.node_name, now_rfc3339(), event_name
        )
        self.api.create(f"/api/v1/namespaces/{namespace}/events", event)

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
        mounts = volume_mounts(container, volumes)
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
            **base_env(pod_dir),
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
