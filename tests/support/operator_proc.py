"""The operator as its own process, with only the rights that mergesearch.rbac grants.

End-to-end tests must see what a deployed operator sees: its own process (so it can be killed
with SIGKILL and restarted), credentials of a ServiceAccount bound to exactly the ClusterRole
from `mergesearch.rbac` (so a missing rule fails a test instead of passing as the admin), and
the real control plane. `OperatorProcess` starts, stops, kills and restarts it and reads its
log and CPU time; the `operator_factory` fixture stops whatever it started and prints the logs
of a failed test's operators.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support.cluster import ApiError, KubeCluster
from support.net import free_port
from support.polling import wait_for

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "mergesearch.yaml"
ADMISSION_PATH = ROOT / "crds" / "mergesearch-admission.yaml"
OPERATOR_NAMESPACE = "mergesearch-system"
OPERATOR_ACCOUNT = "mergesearch-operator"
MS_PATH = "/apis/mergesearch.io/v1alpha1/namespaces/{ns}/mergesearches"
STOP_GRACE_S = 10.0
# An operator started with this environment runs every trial on the benchmarking objective
# (mergerunner.analytic: no checkpoint fetched, no model, a trial in a blink). It is the
# deployment's choice, never a spec's: the e2e tests of the operator's own behaviour use it.
ANALYTIC_TRIALS = {"MERGESEARCH_BENCHMARK_OBJECTIVE": "analytic"}


def apply_crd(cluster: KubeCluster) -> None:
    """The committed CRD and its admission policy, applied the way a user would
    (`kubectl apply --server-side -f crds/`), the CRD Established before returning."""
    for path in (CRD_PATH, ADMISSION_PATH):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/mergesearches.mergesearch.io", "--timeout=60s"
    )


def _create(cluster: KubeCluster, path: str, body: Mapping[str, Any]) -> None:
    try:
        cluster.api().create(path, dict(body))
    except ApiError as err:
        if err.status != 409:
            raise


def operator_kubeconfig(
    cluster: KubeCluster, namespace: str = OPERATOR_NAMESPACE, account: str = OPERATOR_ACCOUNT
) -> Path:
    """A kubeconfig for a ServiceAccount bound to rbac.cluster_role() and nothing else."""
    from mergesearch import rbac

    try:
        cluster.create_namespace(namespace)
    except ApiError as err:
        if err.status != 409:
            raise
    _create(cluster, "/apis/rbac.authorization.k8s.io/v1/clusterroles", rbac.cluster_role())
    _create(
        cluster,
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        rbac.cluster_role_binding(account, namespace),
    )
    return cluster.service_account_kubeconfig(namespace, account)


def evaluator_endpoint_env(key_file: Path) -> dict[str, str]:
    """The operator's environment for serving warm-mode evaluators on a free loopback port,
    with a fresh random key written to `key_file`."""
    port = free_port()
    key_file.write_text(os.urandom(16).hex())
    return {
        "MERGESEARCH_EVALUATOR_PORT": str(port),
        "MERGESEARCH_EVALUATOR_URL": f"http://127.0.0.1:{port}",
        "MERGESEARCH_EVALUATOR_KEY_FILE": str(key_file),
    }


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc/<pid>/stat (clock ticks → seconds)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), after the name
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class OperatorProcess:
    """`python -m mergesearch.operator` in its own process group, logging to a file."""

    kubeconfig: Path
    namespaces: Sequence[str]
    log_dir: Path
    env: Mapping[str, str] = field(default_factory=dict)
    poll_seconds: float = 5.0
    extra_args: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    cpu_seconds_before: float = 0.0  # CPU time of the processes that were stopped or killed

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"operator-{self.starts}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None, "the operator is not running"
        return self.process.pid

    def command(self) -> list[str]:
        scope = [arg for ns in self.namespaces for arg in ("--namespace", ns)]
        return [
            *(sys.executable, "-m", "mergesearch.operator", *scope),
            *("--liveness", "off", "--poll-seconds", str(self.poll_seconds), *self.extra_args),
        ]

    def start(self) -> OperatorProcess:
        assert not self.alive(), "already running"
        self.starts += 1
        path = os.pathsep.join(
            [str(ROOT / "operator"), str(ROOT / "runner"), os.environ.get("PYTHONPATH", "")]
        )
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONPATH": path, **self.env}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def cpu_seconds(self) -> float:
        """CPU time of every operator process this object started (live one included)."""
        live = process_cpu_seconds(self.pid) if self.alive() else 0.0
        return self.cpu_seconds_before + live

    def _account_cpu(self) -> None:
        if self.alive():
            self.cpu_seconds_before += process_cpu_seconds(self.pid)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no final status write; what a node failure or OOM kill does."""
        if not self.alive():
            return
        assert self.process is not None
        self._account_cpu()
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=STOP_GRACE_S)

    def stop(self) -> None:
        """SIGTERM (kopf stops its daemons), SIGKILL after a grace period."""
        if not self.alive():
            return
        assert self.process is not None
        self._account_cpu()
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=STOP_GRACE_S)

    def restart(self) -> OperatorProcess:
        self.stop()
        return self.start()

    def logs(self) -> str:
        """Every start's log, oldest first."""
        parts = []
        for n in range(1, self.starts + 1):
            path = self.log_dir / f"operator-{n}.log"
            text = path.read_text(errors="replace") if path.exists() else "(no log)"
            parts.append(f"--- operator start {n} ---\n{text}")
        return "\n".join(parts)

    def log_lines(self, needle: str) -> list[str]:
        return [line for line in self.logs().splitlines() if needle in line]


OperatorFactory = Callable[..., OperatorProcess]


@contextmanager
def running_operator(
    cluster: KubeCluster,
    namespaces: Sequence[str],
    env: Mapping[str, str] | None = None,
    poll_seconds: float = 5.0,
) -> Iterator[OperatorProcess]:
    """An operator for the block (module-scoped fixtures, benchmarks); stopped afterwards,
    its log printed if the block raised."""
    apply_crd(cluster)
    kubeconfig = operator_kubeconfig(cluster)
    with tempfile.TemporaryDirectory(prefix="mergesearch-operator-") as tmp:
        proc = OperatorProcess(kubeconfig, list(namespaces), Path(tmp), dict(env or {}))
        proc.poll_seconds = poll_seconds
        try:
            yield proc.start()
        except BaseException:
            print(f"\n===== operator {proc.namespaces} =====\n{proc.logs()[-8000:]}")
            raise
        finally:
            proc.stop()


@pytest.fixture
def operator_factory(
    k8s_cluster: KubeCluster, request: pytest.FixtureRequest
) -> Iterator[OperatorFactory]:
    """Starts operators for the test (`operator_factory(["ns"], env={...})`) with the RBAC
    ServiceAccount's credentials; stops them all afterwards and prints their logs if the test
    failed."""
    apply_crd(k8s_cluster)
    kubeconfig = operator_kubeconfig(k8s_cluster)
    started: list[OperatorProcess] = []
    failed_before = request.session.testsfailed
    with tempfile.TemporaryDirectory(prefix="mergesearch-operator-") as tmp:

        def start(
            namespaces: Sequence[str],
            env: Mapping[str, str] | None = None,
            poll_seconds: float = 5.0,
        ) -> OperatorProcess:
            log_dir = Path(tmp) / str(len(started))
            log_dir.mkdir()
            proc = OperatorProcess(kubeconfig, list(namespaces), log_dir, dict(env or {}))
            proc.poll_seconds = poll_seconds
            started.append(proc)
            return proc.start()

        try:
            yield start
        finally:
            for proc in started:
                proc.stop()
            if request.session.testsfailed > failed_before:
                for proc in started:
                    print(f"\n===== operator {proc.namespaces} =====\n{proc.logs()[-8000:]}")


@dataclass
class Searches:
    """MergeSearch resources of one namespace, through the admin's REST client."""

    cluster: KubeCluster
    namespace: str

    @property
    def path(self) -> str:
        return MS_PATH.format(ns=self.namespace)

    def create(self, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": "mergesearch.io/v1alpha1",
            "kind": "MergeSearch",
            "metadata": {"name": name},
            "spec": dict(spec),
        }
        return self.cluster.api().create(self.path, body)

    def get(self, name: str) -> dict[str, Any]:
        return self.cluster.api().get(f"{self.path}/{name}")

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def patch_spec(self, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        return self.cluster.api().merge_patch(f"{self.path}/{name}", {"spec": dict(spec)})

    def delete(self, name: str) -> None:
        self.cluster.api().delete(f"{self.path}/{name}")

    def wait_phase(
        self, name: str, phases: Sequence[str], timeout_s: float = 120.0
    ) -> dict[str, Any]:
        """The status once its phase is one of `phases`."""

        def reached() -> dict[str, Any] | None:
            status = self.status(name)
            return status if status.get("phase") in phases else None

        return wait_for(reached, timeout_s, f"{self.namespace}/{name} in phase {phases}")

    def jobs(self, name: str | None = None) -> list[dict[str, Any]]:
        """Trial Jobs of the namespace (of one search when `name` is given)."""
        items = self.cluster.api().get(f"/apis/batch/v1/namespaces/{self.namespace}/jobs")["items"]
        return [
            j
            for j in items
            if name is None
            or (j["metadata"].get("annotations") or {}).get("mergesearch.io/search-name") == name
        ]

    def pods(self) -> list[dict[str, Any]]:
        return self.cluster.api().get(f"/api/v1/namespaces/{self.namespace}/pods")["items"]

    def events(self) -> list[dict[str, Any]]:
        """Every Event of the namespace."""
        return self.cluster.api().get(f"/api/v1/namespaces/{self.namespace}/events")["items"]

    def job_events(self) -> list[dict[str, Any]]:
        """The Job controller's `SuccessfulCreate` events: one per pod it ever created, naming
        the Job (and its uid), so pods that already went with their Job are still counted."""
        items = self.cluster.api().get(f"/api/v1/namespaces/{self.namespace}/events")["items"]
        return [
            e
            for e in items
            if e["involvedObject"].get("kind") == "Job" and e.get("reason") == "SuccessfulCreate"
        ]
