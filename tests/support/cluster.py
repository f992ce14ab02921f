"""A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver, kube-controller-manager.

The binaries come from scripts/build-testbin.sh (built from their Go modules at the versions pinned
in tests/k8s/, cached outside the clone); `MERGESEARCH_TESTBIN` may name a directory that already
holds them. There is no scheduler and no kubelet: tests/support/nodeagent.py plays both for pods.

Security is on, as in a real cluster, so that tests of RBAC mean something: TLS everywhere on the
apiserver, client certificates signed by a throw-away CA (the admin user is in system:masters),
`Node,RBAC` authorization, service-account tokens signed with a key pair of our own, and the
controller-manager running each controller under its own service account. Certificates are made
with the `openssl` command line tool, which every Debian machine has, because the test environment
does not ship the `cryptography` package.

`KubeCluster` is a plain context manager so that benchmarks can start the same control plane
outside pytest; the session-scoped `k8s_cluster` fixture wraps it.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.net import free_ports
from support.polling import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-testbin.sh"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm")
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
SERVICE_CIDR = "10.96.0.0/24"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
CERT_DAYS = 2


class ClusterError(RuntimeError):
    """The control plane did not come up or a call to it failed; messages carry log tails."""


class ApiError(ClusterError):
    """The API server answered with an error status; `status` and `body` say which."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


# ---------------------------------------------------------------------------------------------
# Binaries


def testbin_dir() -> Path:
    """The directory of the control-plane binaries, building them on first use (cached)."""
    override = os.environ.get("MERGESEARCH_TESTBIN")
    if override:
        bindir = Path(override)
    else:
        result = subprocess.run(
            ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ClusterError(f"build-testbin.sh failed:\n{result.stderr[-4000:]}")
        bindir = Path(result.stdout.strip().splitlines()[-1])
    missing = [name for name in BINARIES if not (bindir / name).is_file()]
    if missing:
        raise ClusterError(f"{bindir} lacks {', '.join(missing)}")
    return bindir


# ---------------------------------------------------------------------------------------------
# Certificates (openssl CLI)


@dataclass(frozen=True)
class Pki:
    """Paths of every key and certificate the control plane and its clients use."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    controller_manager_cert: Path
    controller_manager_key: Path
    sa_key: Path
    sa_pub: Path


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ClusterError(f"openssl {args[0]} failed: {result.stderr[-2000:]}")


def _ec_key(path: Path) -> None:
    """A P-256 key: fast to make, and accepted by Go's TLS stack and the SA token signer."""
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)
    )
    path.chmod(0o600)


def _make_ca(directory: Path) -> tuple[Path, Path]:
    key, cert = directory / "ca.key", directory / "ca.crt"
    _ec_key(key)
    _openssl(
        "req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", str(CERT_DAYS),
        "-subj", "/CN=mergesearch-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )  # fmt: skip
    return cert, key


def _make_leaf(
    directory: Path, name: str, subject: str, ca: tuple[Path, Path], extensions: Sequence[str]
) -> tuple[Path, Path]:
    """A certificate signed by the CA, with the given subject and X.509v3 extension lines."""
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    ext = directory / f"{name}.ext"
    ext.write_text("\n".join(extensions) + "\n")
    _ec_key(key)
    _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", subject)
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", str(cert), "-days", str(CERT_DAYS), "-extfile", str(ext),
    )  # fmt: skip
    return cert, key


def make_pki(directory: Path) -> Pki:
    """A fresh CA, the apiserver's serving certificate, two client certificates, an SA key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(directory)
    client_ext = ["keyUsage=critical,digitalSignature", "extendedKeyUsage=clientAuth"]
    serving = _make_leaf(
        directory,
        "apiserver",
        "/CN=kube-apiserver",
        ca,
        [
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "extendedKeyUsage=serverAuth",
            "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc",
        ],
    )
    admin = _make_leaf(directory, "admin", "/O=system:masters/CN=mergesearch-admin", ca, client_ext)
    kcm = _make_leaf(
        directory, "controller-manager", "/CN=system:kube-controller-manager", ca, client_ext
    )
    sa_key, sa_pub = directory / "sa.key", directory / "sa.pub"
    _ec_key(sa_key)
    _openssl("pkey", "-in", str(sa_key), "-pubout", "-out", str(sa_pub))
    return Pki(
        ca_cert=ca[0],
        ca_key=ca[1],
        serving_cert=serving[0],
        serving_key=serving[1],
        admin_cert=admin[0],
        admin_key=admin[1],
        controller_manager_cert=kcm[0],
        controller_manager_key=kcm[1],
        sa_key=sa_key,
        sa_pub=sa_pub,
    )


# ---------------------------------------------------------------------------------------------
# Kubeconfigs


def kubeconfig_document(server: str, ca_cert: Path, user: Mapping[str, str]) -> dict[str, Any]:
    """A one-cluster, one-user kubeconfig; `user` holds client-certificate/-key or a token."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "mergesearch-test",
                "cluster": {"server": server, "certificate-authority": str(ca_cert)},
            }
        ],
        "users": [{"name": "user", "user": dict(user)}],
        "contexts": [
            {"name": "mergesearch-test", "context": {"cluster": "mergesearch-test", "user": "user"}}
        ],
        "current-context": "mergesearch-test",
    }


def write_kubeconfig(path: Path, server: str, ca_cert: Path, user: Mapping[str, str]) -> Path:
    """Writes a kubeconfig readable by its owner only (it may hold a bearer token)."""
    path.write_text(yaml.safe_dump(kubeconfig_document(server, ca_cert, user), sort_keys=False))
    path.chmod(0o600)
    return path


def cert_user(cert: Path, key: Path) -> dict[str, str]:
    return {"client-certificate": str(cert), "client-key": str(key)}


# ---------------------------------------------------------------------------------------------
# Command lines (pure)


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int


def etcd_command(bindir: Path, data_dir: Path, ports: Ports) -> list[str]:
    """Single-member etcd on loopback; fsync off because the data dies with the test session."""
    client, peer = f"http://127.0.0.1:{ports.etcd_client}", f"http://127.0.0.1:{ports.etcd_peer}"
    return [
        str(bindir / "etcd"),
        "--name=default",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}",
        "--unsafe-no-fsync",
        "--log-level=warn",
    ]


def apiserver_command(bindir: Path, workdir: Path, pki: Pki, ports: Ports) -> list[str]:
    """kube-apiserver with TLS, client-certificate and SA-token authentication, Node+RBAC."""
    return [
        str(bindir / "kube-apiserver"),
        f"--etcd-servers=http://127.0.0.1:{ports.etcd_client}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={ports.apiserver}",
        f"--cert-dir={workdir / 'apiserver-certs'}",
        f"--tls-cert-file={pki.serving_cert}",
        f"--tls-private-key-file={pki.serving_key}",
        f"--client-ca-file={pki.ca_cert}",
        "--authorization-mode=Node,RBAC",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        f"--service-account-issuer={SA_ISSUER}",
        f"--service-account-key-file={pki.sa_pub}",
        f"--service-account-signing-key-file={pki.sa_key}",
        f"--api-audiences={SA_ISSUER}",
        # The `kubernetes` Service's endpoints would point at 127.0.0.1, which Endpoints reject.
        "--endpoint-reconciler-type=none",
        "--profiling=false",
    ]


def controller_manager_command(bindir: Path, kubeconfig: Path, pki: Pki) -> list[str]:
    """kube-controller-manager with every default controller (Job, GC, SA tokens, namespaces...)."""
    return [
        str(bindir / "kube-controller-manager"),
        f"--kubeconfig={kubeconfig}",
        "--controllers=*",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki.sa_key}",
        f"--root-ca-file={pki.ca_cert}",
        "--leader-elect=false",
        # No HTTPS endpoint of its own: nothing scrapes it, and one port fewer to find.
        "--secure-port=0",
        "--profiling=false",
    ]


# ---------------------------------------------------------------------------------------------
# A REST client by path, on the official `kubernetes` client's transport


@dataclass(frozen=True)
class ApiClient:
    """JSON to and from the apiserver by path, authenticated by a client certificate or a bearer
    token. Tests speak in the API's paths and JSON documents (the manifests the operator builds
    are dicts too), so the calls are by path; the transport is the official client's
    (`kubernetes.client.ApiClient`: its TLS set-up, auth header and pooled urllib3 connections,
    safe to share across the node agent's threads).
    """

    host: str
    port: int
    ca_cert: Path
    cert: Path | None = None
    key: Path | None = None
    token: str | None = None
    timeout_s: float = 30.0
    _client: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = f"https://{self.host}:{self.port}"
        configuration.ssl_ca_cert = str(self.ca_cert)
        if self.cert and self.key:
            configuration.cert_file, configuration.key_file = str(self.cert), str(self.key)
        if self.token:
            configuration.api_key = {"BearerToken": self.token}
            configuration.api_key_prefix = {"BearerToken": "Bearer"}
        object.__setattr__(self, "_client", client.ApiClient(configuration))

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """For a raw stream (a benchmark's watch, timed on receipt of each line)."""
        return client_ssl_context(self.ca_cert, self.cert, self.key)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        if query:
            path = f"{path}?{urllib.parse.urlencode(query)}"
        headers = {"Accept": "application/json", "Content-Type": content_type}
        request = self._client.param_serialize(
            method, path, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        response = self._client.call_api(*request, _request_timeout=self.timeout_s)
        data = response.read().decode()
        if response.status >= 400:
            raise ApiError(method, path, response.status, data)
        return json.loads(data) if data else None

    def get(self, path: str, query: Mapping[str, str] | None = None) -> Any:
        return self.request("GET", path, query=query)

    def create(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def merge_patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def delete(self, path: str, body: Any = None) -> Any:
        return self.request("DELETE", path, body)


def client_ssl_context(
    ca_cert: Path, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_cert))
    if cert and key:
        context.load_cert_chain(str(cert), str(key))
    return context


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass
class Service:
    """One control-plane process in its own process group, logging to a file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, name: str, command: Sequence[str], log_path: Path) -> Service:
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                list(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return cls(name, process, log_path)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise ClusterError(
                f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL after a grace period: nothing is left running."""
        if self.process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


# ---------------------------------------------------------------------------------------------
# The cluster


@dataclass
class KubeCluster:
    """Context manager: starts etcd, kube-apiserver and kube-controller-manager, stops them after.

    Attributes once entered: `kubeconfig` (admin, system:masters), `server` (https URL),
    `ca_path`, `bindir` (kubectl and helm live there too), `workdir` (logs, certificates, data).
    """

    workdir: Path | None = None
    bindir: Path | None = None
    services: list[Service] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    _apis: dict[str | None, ApiClient] = field(default_factory=dict, repr=False)

    # Set by __enter__.
    pki: Pki = field(init=False)
    ports: Ports = field(init=False)
    kubeconfig: Path = field(init=False)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def ca_path(self) -> Path:
        return self.pki.ca_cert

    def __enter__(self) -> KubeCluster:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mergesearch-k8s-")
            self.workdir = Path(self._tmp.name)
        self.bindir = self.bindir or testbin_dir()
        try:
            self._start()
        except BaseException:
            self.print_logs()
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.print_logs()
        self.stop()

    def _start(self) -> None:
        assert self.workdir is not None and self.bindir is not None
        self.pki = make_pki(self.workdir / "pki")
        self.ports = Ports(*free_ports(3))
        self.kubeconfig = write_kubeconfig(
            self.workdir / "admin.kubeconfig",
            self.server,
            self.pki.ca_cert,
            cert_user(self.pki.admin_cert, self.pki.admin_key),
        )
        kcm_kubeconfig = write_kubeconfig(
            self.workdir / "controller-manager.kubeconfig",
            self.server,
            self.pki.ca_cert,
            cert_user(self.pki.controller_manager_cert, self.pki.controller_manager_key),
        )
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        self._launch("etcd", etcd_command(self.bindir, self.workdir / "etcd", self.ports), logs)
        self._wait_for("etcd /health", self._etcd_ready)
        self._launch(
            "kube-apiserver",
            apiserver_command(self.bindir, self.workdir, self.pki, self.ports),
            logs,
        )
        self._wait_for("apiserver /readyz", self._apiserver_ready)
        self._launch(
            "kube-controller-manager",
            controller_manager_command(self.bindir, kcm_kubeconfig, self.pki),
            logs,
        )
        # The default ServiceAccount is made by the controller-manager: proof that it works.
        self._wait_for("default ServiceAccount", lambda: self._service_account_exists("default"))

    def _launch(self, name: str, command: Sequence[str], logs: Path) -> None:
        self.services.append(Service.start(name, command, logs / f"{name}.log"))

    def _wait_for(self, what: str, ready: Any) -> None:
        def alive_and_ready() -> Any:
            for service in self.services:
                service.check_alive()
            return ready()

        def timed_out() -> Exception:
            return ClusterError(f"timed out after {START_TIMEOUT_S:.0f} s waiting for {what}")

        wait_for(alive_and_ready, START_TIMEOUT_S, what, failure=timed_out)

    def _etcd_ready(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.ports.etcd_client, timeout=5)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            return response.status == 200 and b'"true"' in response.read()
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def _apiserver_ready(self) -> bool:
        """One plain probe per poll (no client retries: the server may not listen yet)."""
        try:
            conn = http.client.HTTPSConnection(
                "127.0.0.1", self.ports.apiserver, context=self._admin_ssl(), timeout=5
            )
            try:
                conn.request("GET", "/readyz")
                return conn.getresponse().status == 200
            finally:
                conn.close()
        except (OSError, http.client.HTTPException):
            return False

    def _service_account_exists(self, name: str, namespace: str = "default") -> bool:
        try:
            self.api().get(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}")
            return True
        except ApiError as err:
            if err.status == 404:
                return False
            raise

    def _admin_ssl(self) -> ssl.SSLContext:
        return client_ssl_context(self.pki.ca_cert, self.pki.admin_cert, self.pki.admin_key)

    # -- public helpers ------------------------------------------------------------------------

    def api(self, token: str | None = None) -> ApiClient:
        """A REST client as the admin (client certificate) or as the bearer of `token`; one per
        identity, so its pooled connections are reused across calls."""
        if token not in self._apis:
            pki, port = self.pki, self.ports.apiserver
            self._apis[token] = (
                ApiClient("127.0.0.1", port, pki.ca_cert, token=token)
                if token
                else ApiClient("127.0.0.1", port, pki.ca_cert, pki.admin_cert, pki.admin_key)
            )
        return self._apis[token]

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        input: str | None = None,
        check: bool = True,
    ) -> str:
        """Runs kubectl against this cluster (as the admin by default); returns its stdout."""
        assert self.bindir is not None
        command = [str(self.bindir / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}"]
        result = subprocess.run(
            [*command, *args], input=input, capture_output=True, text=True, check=False
        )
        if check and result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def helm(self, *args: str, kubeconfig: Path | None = None) -> str:
        """Runs helm against this cluster; returns its stdout."""
        assert self.bindir is not None and self.workdir is not None
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig or self.kubeconfig),
            # Helm's caches and config stay in the session's directory, not in $HOME.
            "HELM_CACHE_HOME": str(self.workdir / "helm" / "cache"),
            "HELM_CONFIG_HOME": str(self.workdir / "helm" / "config"),
            "HELM_DATA_HOME": str(self.workdir / "helm" / "data"),
        }
        result = subprocess.run(
            [str(self.bindir / "helm"), *args], capture_output=True, text=True, env=env, check=False
        )
        if result.returncode != 0:
            raise ClusterError(f"helm {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def create_namespace(self, name: str) -> None:
        """Creates a namespace and waits for its default ServiceAccount (pods need it)."""
        self.api().create("/api/v1/namespaces", {"metadata": {"name": name}})
        self._wait_for(
            f"ServiceAccount default in {name}",
            lambda: self._service_account_exists("default", name),
        )

    def service_account_token(
        self, namespace: str, name: str, expiration_s: int = 3600, create: bool = True
    ) -> str:
        """A token for the ServiceAccount from the TokenRequest API (creating the SA if asked)."""
        api = self.api()
        if create:
            try:
                api.create(
                    f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": name}}
                )
            except ApiError as err:
                if err.status != 409:
                    raise
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"audiences": [SA_ISSUER], "expirationSeconds": expiration_s},
        }
        answer = api.create(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", request)
        return str(answer["status"]["token"])

    def service_account_kubeconfig(
        self, namespace: str, name: str, expiration_s: int = 3600, create: bool = True
    ) -> Path:
        """A kubeconfig that authenticates as the ServiceAccount, so a process started with it
        (an operator, say) has exactly the rights RBAC grants that account."""
        assert self.workdir is not None
        token = self.service_account_token(namespace, name, expiration_s, create)
        path = self.workdir / f"sa-{namespace}-{name}.kubeconfig"
        return write_kubeconfig(path, self.server, self.pki.ca_cert, {"token": token})

    def print_logs(self, chars: int = 4000) -> None:
        """Prints the tail of every component's log (pytest shows it for failing tests)."""
        for service in self.services:
            print(f"----- {service.name} ({service.log_path}) -----\n{service.log_tail(chars)}")

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.services.clear()
        self._apis.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def decode_secret_data(data: Mapping[str, str]) -> dict[str, bytes]:
    """Secret `data` values are base64; test code reads them as bytes."""
    return {key: base64.b64decode(value) for key, value in data.items()}


@pytest.fixture(scope="session")
def k8s_cluster(request: pytest.FixtureRequest) -> Iterator[KubeCluster]:
    """One control plane for the whole session; its logs are shown if any test failed.

    The logs go straight to the terminal: output of a session fixture's teardown is otherwise
    captured and dropped.
    """
    failed_before = request.session.testsfailed
    with KubeCluster() as cluster:
        yield cluster
        if request.session.testsfailed > failed_before:
            reporter = request.config.pluginmanager.get_plugin("terminalreporter")
            for service in cluster.services:
                text = f"----- {service.name} log tail -----\n{service.log_tail()}"
                if reporter is not None:
                    reporter.write_line(text)
                else:
                    print(text, file=sys.stderr)
