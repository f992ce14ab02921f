"""The kopf shell: indexes of trial Jobs and pods, one reconcile loop per MergeSearch, pokes.

Thin on purpose. Each MergeSearch gets a task that loops: read the resource fresh, take its
Jobs and their pods' termination messages from the in-memory indexes, call the pure
`reconcile`, write the status with a resourceVersion precondition, then delete and create Jobs
and post events. It reconciles when poked (a trial Job or pod finished, the spec changed) and at
least every `poll_s` seconds anyway, so no step depends on having seen an event. See
docs/operator.md.

The loops are plain asyncio tasks started from the MergeSearch watch, not `kopf.daemon`s: a
kopf daemon makes kopf put a finalizer on every resource, and a finalizer with no operator
left to remove it (after `helm uninstall`) keeps the search, its namespace and the CRD in
Terminating for ever. Nothing needs one: trial Jobs go with the search through their owner
references, and a loop ends when its search's DELETED event (or a 404) arrives. An operator
of this version removes the finalizer older versions added.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
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
from mergesearch.operator.observe import SILENT_WAITING, JobSummary, PodSummary
from mergesearch.operator.reconcile import (
    ANNOTATION_RETRY_FINAL,
    STUCK_S,
    Plan,
    SearchView,
    parse_time,
)
from mergesearch.operator.status import condition
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
    loops: dict[Key, tuple[str, asyncio.Task[None]]] = field(default_factory=dict)
    # Warm mode: the evaluator endpoint's port (None: not served) and its inboxes.
    evaluator_port: int | None = None
    inboxes: server.Inboxes = field(default_factory=server.Inboxes)
    endpoint: Any = None
    quota_retry_s: float = 5.0

    def wakeup(self, key: Key) -> asyncio.Event:
        return self.wakeups.setdefault(key, asyncio.Event())

    def poke(self, key: Key) -> None:
        event = self.wakeups.get(key)
        if event is not None:
            event.set()

    def ensure_loop(self, key: Key, uid: str, start: Callable[[], Any]) -> None:
        """One reconcile loop per search (by uid: a search re-created under the same name
        gets a new loop, its predecessor's loop is stopped)."""
        running = self.loops.get(key)
        if running and running[0] == uid and not running[1].done():
            return
        if running:
            running[1].cancel()
        self.loops[key] = (uid, asyncio.get_running_loop().create_task(start()))

    def stop_loop(self, key: Key, uid: str | None = None) -> None:
        running = self.loops.get(key)
        if running and (uid is None or running[0] == uid):
            running[1].cancel()
            self.loops.pop(key, None)

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
    loops = [task for _, task in RUNTIME.loops.values()]
    for task in loops:
        task.cancel()
    await asyncio.gather(*loops, return_exceptions=True)
    RUNTIME.loops.clear()
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
    """A runner that terminated, or a pod that waits for a reason of its own (a missing
    Secret key, an image pull, no node): reconcile now. A pod merely being created does not
    poke (the poll looks at it if it stays stuck)."""
    key = _search_key(namespace, meta)
    summary = observe.pod_summary(body)
    if (
        key
        and summary is not None
        and (summary.terminated or summary.waiting not in SILENT_WAITING)
    ):
        RUNTIME.poke(key)


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
async def search_changed(
    type: str | None,
    namespace: str,
    name: str,
    meta: Mapping[str, Any],
    status: Mapping[str, Any],
    trial_jobs: kopf.Index[Key, JobSummary],
    trial_pods: kopf.Index[Key, PodSummary],
    evaluator_pods: kopf.Index[Key, warm.EvaluatorPod],
    **_: Any,
) -> None:
    """Starts the search's reconcile loop (the first event of a search, also the operator's
    initial listing), stops it when the search is deleted, and wakes it at once on a spec
    change (a new generation) or a retry request; our own status writes do neither."""
    key, uid = (namespace, name), str(meta.get("uid") or "")
    if type == "DELETED":
        RUNTIME.stop_loop(key, uid)
        return
    RUNTIME.ensure_loop(
        key, uid, lambda: run_search(namespace, name, trial_jobs, trial_pods, evaluator_pods)
    )
    retry = (meta.get("annotations") or {}).get(ANNOTATION_RETRY_FINAL)
    asked = retry and retry != (status.get("final") or {}).get("retryRequest")
    if meta.get("generation") != status.get("observedGeneration") or asked:
        RUNTIME.poke(key)


# --------------------------------------------------------------------------- the loop


async def run_search(
    namespace: str,
    name: str,
    trial_jobs: kopf.Index[Key, JobSummary],
    trial_pods: kopf.Index[Key, PodSummary],
    evaluator_pods: kopf.Index[Key, warm.EvaluatorPod] | None = None,
) -> None:
    """Reconcile until the search is gone (a 404) or the task is cancelled (DELETED event,
    operator shutdown)."""
    key = (namespace, name)
    wake = RUNTIME.wakeup(key)
    backoff = 1.0
    try:
        while True:
            wake.clear()
            try:
                wait = await reconcile_once(namespace, name, trial_jobs, trial_pods, evaluator_pods)
                backoff = 1.0
            except (ApiError, aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                log.warning("%s/%s: reconcile failed, retrying in %.0fs: %s", *key, backoff, exc)
                wait, backoff = backoff, min(backoff * 2, 60.0)
            if wait is None:
                return
            await _sleep(wake, wait)
            if wake.is_set():
                await asyncio.sleep(RUNTIME.batch_s)  # let the rest of a burst arrive
    finally:
        if RUNTIME.wakeups.get(key) is wake:
            RUNTIME.wakeups.pop(key, None)
            RUNTIME.inboxes.forget(key)


async def _sleep(wake: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), timeout=max(seconds, 0.0))


async def reconcile_once(
    namespace: str,
    name: str,
    jobs_index: kopf.Index[Key, JobSummary],
    pods_index: kopf.Index[Key, PodSummary],
    evaluators_index: kopf.Index[Key, warm.EvaluatorPod] | None = None,
) -> float | None:
    """One reconcile; returns how long to wait before the next one unless poked (None: the
    search is gone)."""
    api = RUNTIME.api()
    body = await api.get_search(namespace, name)
    if body is None:
        return None
    meta = body["metadata"]
    view = SearchView(
        owner=Owner(name=name, namespace=namespace, uid=meta["uid"]),
        generation=meta.get("generation"),
        spec=body.get("spec") or {},
        status=body.get("status") or {},
        annotations=dict(meta.get("annotations") or {}),
    )
    mine = [j for j in jobs_index.get((namespace, name), []) if j.owner_uid == view.owner.uid]
    jobs, pods = await _observe(api, namespace, mine, pods_index, view.status)
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
    return await _apply(
        api, body, view, plan, recorded=lambda: RUNTIME.inboxes.settle(key, plan, taken)
    )


async def _observe(
    api: KubeClient,
    namespace: str,
    jobs: Iterable[JobSummary],
    index: kopf.Index[Key, PodSummary],
    status: Mapping[str, Any],
) -> tuple[list[JobSummary], dict[str, list[PodSummary]]]:
    """The Jobs, and the pods per Job that matters, from the indexes. A finished Job's
    terminated pods: when the index has none yet (two watch streams, two orders), one list
    call reads them. A running Job's pods that do not start: their states, and for a pod or
    Job stuck for STUCK_S without a reason of its own, its Warning events (one call each)."""
    active = set(status.get("activeTrials") or [])
    out_jobs: list[JobSummary] = []
    out: dict[str, list[PodSummary]] = {}
    for job in jobs:
        running_evaluators = job.role == warm.EVALUATOR_ROLE and job.state == "active"
        if not (
            job.candidate in active or job.role in ("final", "preflight") or running_evaluators
        ):
            out_jobs.append(job)
            continue
        pods = [p for p in index.get((namespace, job.name), []) if p.of(job)]
        if job.state == "active":
            pods = [await _with_warnings(api, namespace, p) for p in pods]
            if not pods and not job.pods and not job.started and _stuck(job.created):
                job = replace(
                    job, warnings=tuple(await api.list_warnings(namespace, "Job", job.name))
                )
        elif not any(p.terminated for p in pods):
            items = await api.list_pods(namespace, f"batch.kubernetes.io/job-name={job.name}")
            pods = [p for p in map(observe.pod_summary, items) if p is not None and p.of(job)]
        out_jobs.append(job)
        out[job.name] = pods
    return out_jobs, out


async def _with_warnings(api: KubeClient, namespace: str, pod: PodSummary) -> PodSummary:
    if pod.terminated or pod.waiting not in SILENT_WAITING or not _stuck(pod.created):
        return pod
    return replace(pod, warnings=tuple(await api.list_warnings(namespace, "Pod", pod.name)))


def _stuck(created: str) -> bool:
    if not created:
        return False
    try:
        return (parse_time(now()) - parse_time(created)).total_seconds() >= STUCK_S
    except ValueError:
        return False


async def _apply(
    api: KubeClient,
    body: Mapping[str, Any],
    view: SearchView,
    plan: Plan,
    recorded: Callable[[], None] = lambda: None,
) -> float:
    """Status first (compare-and-set), then creations, then deletions, then events: a Job is
    never created for a decision that was not recorded, and a lost race creates nothing. The
    new Jobs go first because they are what the next generation waits for (the benchmark's
    turnaround); but a creation that fails (a quota, an API error) never keeps a collected Job
    from being deleted: deletions run whatever the creations did, and only then is the
    failure acted on. `recorded` runs once the plan's status is written (warm evaluators get
    their answers then)."""
    meta = body["metadata"]
    if plan.changed:
        try:
            written = await api.replace_status(_status_body(meta, plan.status))
        except ApiError as exc:
            if exc.conflict:
                return 0.2  # someone wrote first: decide again from the new status
            raise
        meta = written.get("metadata") or meta
    recorded()
    after = SearchView(view.owner, view.generation, view.spec, plan.status, view.annotations)
    refused: Plan | None = None
    failure: Exception | None = None
    try:
        for secret in plan.secrets:  # before the evaluator Job, whose pods mount it
            await api.create_secret(secret)
        for index, manifest in enumerate(plan.create):
            try:
                await api.create_job(manifest)
            except ApiError as exc:
                if not exc.quota_exceeded:
                    raise
                name, waiting = manifest["metadata"]["name"], len(plan.create) - index
                refused = reconcile.quota_refused(after, name, exc.detail, waiting, now())
                break
    except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
        failure = exc
    for job in plan.delete:
        await api.delete_job(view.owner.namespace, job)
    ref = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "metadata": dict(meta)}
    for event in plan.events:
        kopf.event(ref, type=event.type, reason=event.reason, message=event.message)
    for observer in RUNTIME.observers:
        observer(view, plan)
    if plan.told:
        log.info("%s/%s: told %d results", view.owner.namespace, view.owner.name, len(plan.told))
    wait = RUNTIME.idle_poll_s if plan.idle else RUNTIME.poll_s
    if plan.wake_after is not None:
        wait = min(wait, max(plan.wake_after, 0.5))
    if failure is not None:
        if isinstance(failure, ApiError) and failure.invalid:
            await _reject(api, meta, after, failure.detail)
            return RUNTIME.idle_poll_s
        raise failure
    if refused is not None:
        await _write_side(api, meta, refused)
        return min(wait, RUNTIME.quota_retry_s)
    if plan.create and (condition(plan.status, "QuotaExceeded") or {}).get("status") == "True":
        await _write_side(api, meta, reconcile.quota_cleared(after, now()))
    return wait


async def _write_side(api: KubeClient, meta: Mapping[str, Any], plan: Plan) -> None:
    """A second status write in one reconcile (a condition the shell learnt while acting),
    on top of the first; a conflict just leaves it to the next reconcile."""
    if not plan.changed:
        return
    try:
        await api.replace_status(_status_body(meta, plan.status))
    except ApiError as exc:
        if not exc.conflict:
            raise
        return
    ref = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "metadata": dict(meta)}
    for event in plan.events:
        kopf.event(ref, type=event.type, reason=event.reason, message=event.message)


async def _reject(api: KubeClient, meta: Mapping[str, Any], after: SearchView, detail: str) -> None:
    rejected = reconcile.job_rejected(after, detail, now())
    await api.replace_status(_status_body(meta, rejected.status))
    ref = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "metadata": dict(meta)}
    for event in rejected.events:
        kopf.event(ref, type=event.type, reason=event.reason, message=event.message)


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
