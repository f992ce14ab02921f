"""The kopf shell: indexes of trial Jobs and pods, one daemon per MergeSearch, and pokes.

Thin on purpose. Each MergeSearch gets a daemon that loops: read the resource fresh, take its
Jobs and their pods' termination messages from the in-memory indexes, call the pure
`reconcile`, write the status with a resourceVersion precondition, then create and delete Jobs
and post events. It reconciles when poked (a trial Job or pod finished, the spec changed) and at
least every `poll_s` seconds anyway, so no step depends on having seen an event. See
docs/operator.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf

from mergesearch.operator import observe, reconcile, server, warm
from mergesearch.operator.jobs import (
    ANNOTATION_SEARCH,
    LABEL_ROLE,
    LABEL_SEARCH,
    JobSettings,
    Owner,
)
from mergesearch.operator.kube import PLURAL, ApiError, KubeClient
from mergesearch.operator.observe import JobSummary, PodSummary
from mergesearch.operator.reconcile import Plan, SearchView
from mergesearch.spec import API_GROUP, API_VERSION, KIND

log = logging.getLogger("mergesearch.operator")
Key = tuple[str, str]
Observer = Callable[[SearchView, Plan], None]


@dataclass
class Runtime:
    """Process-wide state of the shell: settings, the API client, wake-up events, observers
    (the hook for metrics: called with every reconcile's view and plan)."""

    settings: JobSettings = field(default_factory=JobSettings.from_env)
    poll_s: float = 30.0
    idle_poll_s: float = 300.0
    batch_s: float = 0.1
    metrics_port: int | None = None
    observers: list[Observer] = field(default_factory=list)
    credentials: kopf.ConnectionInfo | None = None
    login_settings: Any = None
    client: KubeClient | None = None
    wakeups: dict[Key, asyncio.Event] = field(default_factory=dict)
    # Warm mode: the evaluator endpoint's port (None: not served) and its inboxes.
    evaluator_port: int | None = None
    inboxes: server.Inboxes = field(default_factory=server.Inboxes)
    endpoint: Any = None

    def wakeup(self, key: Key) -> asyncio.Event:
        return self.wakeups.setdefault(key, asyncio.Event())

    def poke(self, key: Key) -> None:
        event = self.wakeups.get(key)
        if event is not None:
            event.set()

    def api(self) -> KubeClient:
        if self.client is None:
            self.client = KubeClient(self._fresh_credentials)
        return self.client

    def _fresh_credentials(self) -> kopf.ConnectionInfo | None:
        """Log in again when the client opens a session (after a 401: a rotated token)."""
        if self.login_settings is not None:
            self.credentials = _login(self.login_settings) or self.credentials
        return self.credentials


RUNTIME = Runtime()


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- kopf set-up


def _login(settings: Any) -> kopf.ConnectionInfo | None:
    """KUBECONFIG when it is set (tests, a developer's machine), else the pod's service
    account, else ~/.kube/config."""
    if os.environ.get("KUBECONFIG"):
        return kopf.login_with_kubeconfig(settings=settings)
    return kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
        settings=settings
    )


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
    RUNTIME.login_settings = settings
    RUNTIME.credentials = _login(settings)
    return RUNTIME.credentials


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """No peering (one replica; `standalone`), our own annotation prefix and finalizer name,
    and only warnings from kopf's own logs become Kubernetes Events."""
    settings.peering.standalone = True
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10


@kopf.on.startup()
async def serve_evaluators(**_: Any) -> None:
    """The warm evaluators' endpoint (operator/server.py), when a port is configured."""
    if RUNTIME.evaluator_port:
        app = server.make_app(RUNTIME.inboxes, lambda: RUNTIME.settings.evaluator_key, RUNTIME.poke)
        RUNTIME.endpoint = await server.start(app, RUNTIME.evaluator_port)


@kopf.on.cleanup()
async def close_client(**_: Any) -> None:
    if RUNTIME.endpoint is not None:
        await RUNTIME.endpoint.cleanup()
    if RUNTIME.client is not None:
        await RUNTIME.client.close()


# --------------------------------------------------------------------------- indexes and pokes


def _search_key(namespace: str | None, meta: Mapping[str, Any]) -> Key | None:
    name = (meta.get("annotations") or {}).get(ANNOTATION_SEARCH)
    return (namespace or "", name) if name else None


@kopf.index("batch", "v1", "jobs", labels={LABEL_SEARCH: kopf.PRESENT})
async def trial_jobs(
    namespace: str, meta: Mapping[str, Any], body: kopf.Body, **_: Any
) -> dict[Key, JobSummary] | None:
    """(namespace, search name) → summaries of the search's Jobs."""
    key = _search_key(namespace, meta)
    summary = observe.job_summary(body)
    return {key: summary} if key and summary else None


@kopf.index("v1", "pods", labels={LABEL_SEARCH: kopf.PRESENT})
async def trial_pods(namespace: str, body: kopf.Body, **_: Any) -> dict[Key, PodSummary] | None:
    """(namespace, Job name) → the trial pods whose runner container has terminated, with the
    termination message (the result); None (not indexed) until then."""
    summary = observe.pod_summary(body)
    return {(namespace, summary.job): summary} if summary else None


@kopf.index("v1", "pods", labels={LABEL_ROLE: warm.EVALUATOR_ROLE})
async def evaluator_pods(
    namespace: str, meta: Mapping[str, Any], body: kopf.Body, **_: Any
) -> dict[Key, warm.EvaluatorPod] | None:
    """(namespace, search name) → the search's evaluator pods (warm mode), alive or ended."""
    key = _search_key(namespace, meta)
    pod = warm.evaluator_pod(body)
    return {key: pod} if key and pod else None


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_SEARCH: kopf.PRESENT})
async def job_changed(
    type: str | None, namespace: str, meta: Mapping[str, Any], body: kopf.Body, **_: Any
) -> None:
    summary = observe.job_summary(body)
    key = _search_key(namespace, meta)
    if key and (type == "DELETED" or (summary and summary.state != "active")):
        RUNTIME.poke(key)


@kopf.on.event("v1", "pods", labels={LABEL_SEARCH: kopf.PRESENT})
async def pod_changed(namespace: str, meta: Mapping[str, Any], body: kopf.Body, **_: Any) -> None:
    key = _search_key(namespace, meta)
    if key and observe.pod_summary(body) is not None:
        RUNTIME.poke(key)


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
async def search_changed(
    namespace: str, name: str, meta: Mapping[str, Any], status: Mapping[str, Any], **_: Any
) -> None:
    """A spec change (a new generation) wakes the daemon at once; our own status writes do
    not (they leave the generation alone)."""
    if meta.get("generation") != status.get("observedGeneration"):
        RUNTIME.poke((namespace, name))


# --------------------------------------------------------------------------- the daemon


@kopf.daemon(API_GROUP, API_VERSION, PLURAL, cancellation_timeout=10.0)
async def run_search(
    stopped: kopf.DaemonStopped,
    namespace: str,
    name: str,
    trial_jobs: kopf.Index[Key, JobSummary],
    trial_pods: kopf.Index[Key, PodSummary],
    evaluator_pods: kopf.Index[Key, warm.EvaluatorPod],
    **_: Any,
) -> None:
    key = (namespace, name)
    wake = RUNTIME.wakeup(key)
    backoff = 1.0
    try:
        while not stopped:
            wake.clear()
            try:
                wait = await reconcile_once(namespace, name, trial_jobs, trial_pods, evaluator_pods)
                backoff = 1.0
            except (ApiError, aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                log.warning("%s/%s: reconcile failed, retrying in %.0fs: %s", *key, backoff, exc)
                wait, backoff = backoff, min(backoff * 2, 60.0)
            await _sleep(wake, stopped, wait)
            if wake.is_set():
                await asyncio.sleep(RUNTIME.batch_s)  # let the rest of a burst arrive
    finally:
        RUNTIME.wakeups.pop(key, None)
        RUNTIME.inboxes.forget(key)


async def _sleep(wake: asyncio.Event, stopped: kopf.DaemonStopped, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not stopped and not wake.is_set() and (left := deadline - time.monotonic()) > 0:
        try:
            await asyncio.wait_for(wake.wait(), timeout=min(left, 1.0))
        except TimeoutError:
            continue


async def reconcile_once(
    namespace: str,
    name: str,
    jobs_index: kopf.Index[Key, JobSummary],
    pods_index: kopf.Index[Key, PodSummary],
    evaluators_index: kopf.Index[Key, warm.EvaluatorPod] | None = None,
) -> float:
    """One reconcile; returns how long to wait before the next one unless poked."""
    api = RUNTIME.api()
    body = await api.get_search(namespace, name)
    if body is None:
        return RUNTIME.idle_poll_s
    meta = body["metadata"]
    view = SearchView(
        owner=Owner(name=name, namespace=namespace, uid=meta["uid"]),
        generation=meta.get("generation"),
        spec=body.get("spec") or {},
        status=body.get("status") or {},
    )
    jobs = [j for j in jobs_index.get((namespace, name), []) if j.owner_uid == view.owner.uid]
    pods = await _pods(api, namespace, jobs, pods_index, view.status)
    key = (namespace, name)
    RUNTIME.inboxes.owners[key] = view.owner
    inbox, taken = RUNTIME.inboxes.snapshot(key)
    evaluators = tuple(evaluators_index.get(key, [])) if evaluators_index is not None else ()
    try:
        plan = reconcile.reconcile(
            view, jobs, pods, RUNTIME.settings, now(), inbox=inbox, evaluators=evaluators
        )
    except Exception as exc:  # a bug met this resource: record it, never crash-loop
        log.exception("%s/%s: reconcile raised", namespace, name)
        plan = reconcile.internal_error(view, f"{type(exc).__name__}: {exc}", now())
    wait = await _apply(api, body, view, plan)
    if wait != CONFLICT_RETRY_S:
        RUNTIME.inboxes.settle(key, plan, taken)
    return wait


async def _pods(
    api: KubeClient,
    namespace: str,
    jobs: Iterable[JobSummary],
    index: kopf.Index[Key, PodSummary],
    status: Mapping[str, Any],
) -> dict[str, list[PodSummary]]:
    """Terminated pods per finished Job that matters, from the index; when the index has none
    yet (two watch streams, two orders), one list call reads them from the API server."""
    active = set(status.get("activeTrials") or [])
    out: dict[str, list[PodSummary]] = {}
    for job in jobs:
        if job.state == "active" or not (job.candidate in active or job.role == "final"):
            continue
        pods = list(index.get((namespace, job.name), []))
        if not pods:
            items = await api.list_pods(namespace, f"batch.kubernetes.io/job-name={job.name}")
            pods = [p for p in map(observe.pod_summary, items) if p is not None]
        out[job.name] = pods
    return out


async def _apply(api: KubeClient, body: Mapping[str, Any], view: SearchView, plan: Plan) -> float:
    """Status first (compare-and-set), then Jobs, then events: a Job is never created for a
    decision that was not recorded, and a lost race creates nothing."""
    meta = body["metadata"]
    if plan.changed:
        try:
            written = await api.replace_status(_status_body(meta, plan.status))
        except ApiError as exc:
            if exc.conflict:
                return CONFLICT_RETRY_S  # someone wrote first: decide again from the new status
            raise
        meta = written.get("metadata") or meta
    for secret in plan.secrets:  # before the evaluator Job, whose pods mount it
        await api.create_secret(secret)
    for manifest in plan.create:
        try:
            await api.create_job(manifest)
        except ApiError as exc:
            if not exc.invalid:
                raise
            await _reject(api, meta, view, plan, exc.detail)
            return RUNTIME.idle_poll_s
    for job in plan.delete:
        await api.delete_job(view.owner.namespace, job)
    ref = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "metadata": dict(meta)}
    for event in plan.events:
        kopf.event(ref, type=event.type, reason=event.reason, message=event.message)
    for observer in RUNTIME.observers:
        observer(view, plan)
    if plan.told:
        log.info("%s/%s: told %d results", view.owner.namespace, view.owner.name, len(plan.told))
    return RUNTIME.idle_poll_s if plan.idle else RUNTIME.poll_s


async def _reject(
    api: KubeClient, meta: Mapping[str, Any], view: SearchView, plan: Plan, detail: str
) -> None:
    after = SearchView(view.owner, view.generation, view.spec, plan.status)
    rejected = reconcile.job_rejected(after, detail, now())
    await api.replace_status(_status_body(meta, rejected.status))
    ref = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "metadata": dict(meta)}
    for event in rejected.events:
        kopf.event(ref, type=event.type, reason=event.reason, message=event.message)


CONFLICT_RETRY_S = 0.2


def _status_body(meta: Mapping[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "resourceVersion": meta["resourceVersion"],
        },
        "status": status,
    }
