"""A real Prometheus (Debian's package, scripts/install-system-deps.sh) on 127.0.0.1, scraping
given targets every second, with a tiny client for its HTTP query API.

Started by the tests, stopped afterwards (SIGTERM to its process group, SIGKILL after 10 s), its
data in a temporary directory. The fixture `prometheus_factory` starts one per call.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.net import free_port
from support.polling import wait_for

SCRAPE_INTERVAL = "1s"


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    assert found, "prometheus is not installed: run scripts/install-system-deps.sh"
    return found


class Prometheus:
    """One Prometheus server; a context manager."""

    def __init__(self, targets: Sequence[str], workdir: Path | None = None) -> None:
        self.targets = list(targets)
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="mergesearch-prom-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "mergesearch-operator",
                    "scrape_interval": SCRAPE_INTERVAL,
                    "scrape_timeout": SCRAPE_INTERVAL,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }

    def __enter__(self) -> Prometheus:
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config()))
        command = [
            prometheus_binary(),
            f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        process = self.process
        assert process is not None

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:  # noqa: S310
                    return answer.status == 200
            except OSError:
                return False

        def not_ready() -> Exception:
            return TimeoutError(f"prometheus not ready after {timeout_s} s:\n{self.log_tail()}")

        wait_for(ready, timeout_s, "prometheus", interval_s=0.2, failure=not_ready)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns `data`, raising on an error status."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - loopback
                body = json.loads(answer.read())
        except urllib.error.HTTPError as err:  # 400 for a bad query: say which and why
            raise RuntimeError(f"prometheus {path} {params}: {err.read().decode()}") from err
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector (empty when the expression has no data)."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def targets_up(self) -> bool:
        active = self.api("targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


@pytest.fixture
def prometheus_factory() -> Iterator[Callable[[Sequence[str]], Prometheus]]:
    """`start(["127.0.0.1:PORT"])` → a running Prometheus scraping those targets every second;
    all are stopped when the test ends."""
    started: list[Prometheus] = []

    def start(targets: Sequence[str]) -> Prometheus:
        server = Prometheus(targets)
        started.append(server.__enter__())
        return server

    yield start
    for server in reversed(started):
        server.stop()
