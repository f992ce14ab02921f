"""The operator's API calls on the official clients, for bench/kube_client.py and
bench/operator_bench.py `--client`: drop-in stand-ins for operator/kube.py's `KubeClient`.

Each candidate has `KubeClient`'s methods, return values and errors (`ApiError` with the
server's status and reason, so the handlers decide exactly as they do on the shipped client),
and authenticates with the same kopf credentials. Only the transport differs:

- `kubernetes.aio`: the asyncio client inside the official `kubernetes` package;
- `kubernetes_asyncio`: the separately maintained asyncio port (when installed);
- `kubernetes+thread`: the synchronous official client, each call in `asyncio.to_thread`.

Run as a program, it starts the operator with `KubeClient` replaced by one of them:

    python bench/kube_candidates.py kubernetes.aio --namespace NS ...  (the operator's flags)
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "runner")]

import kopf  # noqa: E402

from mergesearch.operator.kube import PLURAL, ApiError, KubeClient  # noqa: E402
from mergesearch.spec import API_GROUP, API_VERSION  # noqa: E402

TIMEOUT_S = 30.0
Credentials = Callable[[], kopf.ConnectionInfo | None]


def _as_file(path: Any, data: Any, directory: Path, name: str) -> str | None:
    """A path for a certificate kopf holds as a path or as data (the clients take paths)."""
    if path:
        return os.fsdecode(path)
    if not data:
        return None
    target = directory / name
    target.write_bytes(data if isinstance(data, bytes) else data.encode())
    target.chmod(0o600)
    return str(target)


def configure(configuration: Any, info: kopf.ConnectionInfo, directory: Path) -> dict[str, str]:
    """The official client's Configuration from kopf's credentials; the headers to send."""
    configuration.host = info.server.rstrip("/")
    configuration.ssl_ca_cert = _as_file(info.ca_path, info.ca_data, directory, "ca.crt")
    configuration.cert_file = _as_file(
        info.certificate_path, info.certificate_data, directory, "client.crt"
    )
    configuration.key_file = _as_file(
        info.private_key_path, info.private_key_data, directory, "client.key"
    )
    configuration.verify_ssl = not info.insecure
    return {**info.as_http_headers(), "User-Agent": "mergesearch-operator"}


class _Official:
    """What the candidates share: error mapping, the re-login on 401, the request counter."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._dir = tempfile.TemporaryDirectory(prefix="mergesearch-kube-")
        self._api: Any = None
        self.requests: Counter[str] = Counter()

    def _info(self) -> kopf.ConnectionInfo:
        info = self._credentials()
        if info is None:
            raise RuntimeError("no Kubernetes credentials yet (kopf login has not run)")
        return info

    async def _close_api(self) -> None:
        raise NotImplementedError

    async def _open(self) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        if self._api is not None:
            await self._close_api()
            self._api = None

    async def _call(self, method: str, what: str, call: Callable[[Any], Awaitable[Any]]) -> Any:
        for attempt in (0, 1):
            if self._api is None:
                self._api = await self._open()
            self.requests[f"{method} {what}"] += 1
            try:
                return await call(self._api)
            except Exception as exc:
                status = getattr(exc, "status", None)
                if not isinstance(status, int) or not hasattr(exc, "body"):
                    raise
                if status == 401 and attempt == 0:
                    await self.close()  # credentials rotated: log in again
                    continue
                raise ApiError(method, what, status, str(exc.body or "")) from exc
        raise AssertionError("unreachable")

    # The calls, in KubeClient's terms; `_apis` gives (custom, batch, core) for an ApiClient.
    def _apis(self, api: Any) -> tuple[Any, Any, Any]:
        raise NotImplementedError

    async def _run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def get_search(self, namespace: str, name: str) -> dict[str, Any] | None:
        async def call(api: Any) -> Any:
            custom = self._apis(api)[0]
            return await self._run(
                custom.get_namespaced_custom_object,
                *(API_GROUP, API_VERSION, namespace, PLURAL, name),
            )

        try:
            return dict(await self._call("GET", PLURAL, call))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def replace_status(self, body: dict[str, Any]) -> dict[str, Any]:
        meta = body["metadata"]

        async def call(api: Any) -> Any:
            custom = self._apis(api)[0]
            return await self._run(
                custom.replace_namespaced_custom_object_status,
                *(API_GROUP, API_VERSION, meta["namespace"], PLURAL, meta["name"], body),
            )

        return dict(await self._call("PUT", f"{PLURAL}/status", call))

    async def _create(self, resource: str, call: Any) -> bool:
        """True when created, False when the object exists (as the shipped client answers)."""
        try:
            await self._call("POST", resource, call)
        except ApiError as exc:
            if exc.already_exists:
                return False
            raise
        return True

    async def create_job(self, manifest: dict[str, Any]) -> bool:
        async def call(api: Any) -> Any:
            batch = self._apis(api)[1]
            namespace = manifest["metadata"]["namespace"]
            return await self._run(batch.create_namespaced_job, namespace, manifest)

        return await self._create("jobs", call)

    async def create_secret(self, manifest: dict[str, Any]) -> bool:
        async def call(api: Any) -> Any:
            core = self._apis(api)[2]
            namespace = manifest["metadata"]["namespace"]
            return await self._run(core.create_namespaced_secret, namespace, manifest)

        return await self._create("secrets", call)

    async def delete_job(self, namespace: str, name: str) -> bool:
        async def call(api: Any) -> Any:
            batch = self._apis(api)[1]
            return await self._run(
                batch.delete_namespaced_job, name, namespace, propagation_policy="Background"
            )

        try:
            await self._call("DELETE", "jobs", call)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        async def call(api: Any) -> Any:
            core = self._apis(api)[2]
            return await self._run(core.list_namespaced_pod, namespace, label_selector=selector)

        pods = await self._call("GET", "pods", call)
        # The operator reads pods as the API's JSON (camelCase keys), as kopf hands them.
        return [self._api.sanitize_for_serialization(p) for p in pods.items]

    async def list_warnings(self, namespace: str, kind: str, name: str) -> list[tuple[str, str]]:
        selector = f"involvedObject.kind={kind},involvedObject.name={name},type=Warning"

        async def call(api: Any) -> Any:
            core = self._apis(api)[2]
            return await self._run(core.list_namespaced_event, namespace, field_selector=selector)

        events = (await self._call("GET", "events", call)).items

        def when(event: Any) -> str:
            return str(event.last_timestamp or event.event_time or "")

        return [(str(e.reason or ""), str(e.message or "")) for e in sorted(events, key=when)]


class AsyncOfficial(_Official):
    """`kubernetes.aio` or `kubernetes_asyncio` (the same generated API, awaited)."""

    def __init__(self, credentials: Credentials, module: str = "kubernetes.aio") -> None:
        super().__init__(credentials)
        self.module = importlib.import_module(module)

    async def _open(self) -> Any:
        client = self.module.client
        configuration = client.Configuration()
        headers = configure(configuration, self._info(), Path(self._dir.name))
        configuration.connection_pool_maxsize = 32
        api = client.ApiClient(configuration)
        for key, value in headers.items():
            api.set_default_header(key, value)
        return api

    async def _close_api(self) -> None:
        await self._api.close()

    def _apis(self, api: Any) -> tuple[Any, Any, Any]:
        client = self.module.client
        return client.CustomObjectsApi(api), client.BatchV1Api(api), client.CoreV1Api(api)

    async def _run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await function(*args, **kwargs, _request_timeout=TIMEOUT_S)


class ThreadedOfficial(_Official):
    """The synchronous `kubernetes` client; each call on asyncio's default thread pool."""

    async def _open(self) -> Any:
        from kubernetes import client

        configuration = client.Configuration()
        headers = configure(configuration, self._info(), Path(self._dir.name))
        configuration.connection_pool_maxsize = 32
        api = client.ApiClient(configuration)
        for key, value in headers.items():
            api.set_default_header(key, value)
        return api

    async def _close_api(self) -> None:
        self._api.close()

    def _apis(self, api: Any) -> tuple[Any, Any, Any]:
        from kubernetes import client

        return client.CustomObjectsApi(api), client.BatchV1Api(api), client.CoreV1Api(api)

    async def _run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(function, *args, **kwargs, _request_timeout=TIMEOUT_S)


def make(name: str, credentials: Credentials) -> Any:
    """A client by candidate name: `aiohttp` is the operator's own."""
    if name == "aiohttp":
        return KubeClient(credentials)
    if name in ("kubernetes.aio", "kubernetes_asyncio"):
        return AsyncOfficial(credentials, name)
    if name == "kubernetes+thread":
        return ThreadedOfficial(credentials)
    raise ValueError(f"unknown client {name!r}")


CANDIDATES = ("aiohttp", "kubernetes.aio", "kubernetes_asyncio", "kubernetes+thread")


def main(argv: list[str]) -> int:
    """The operator, its `KubeClient` replaced by the candidate named first."""
    from mergesearch.operator import __main__ as operator_main
    from mergesearch.operator import handlers

    name, *operator_args = argv
    handlers.KubeClient = lambda credentials: make(name, credentials)  # type: ignore[misc]
    return operator_main.main(operator_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
