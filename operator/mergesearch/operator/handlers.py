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

The process's state (its settings, the API client, the loops and their wake-ups) is one
`Runtime`, carried in kopf's `memo` (`memo.runtime`): every handler gets it from kopf, so
nothing here is a mutable module global, and a test (or a second operator in one process) can
run with a Runtime of its own.
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
from mergesearch.operator.jobs import ANNOTATION_SEARCH, LABEL_ROLE, LABEL_SEARCH, JobSettings
from mergesearch.operator.kube import PLURAL, ApiError, KubeClient
from mergesearch.operator.observe import SILENT_WAITING, JobSummary, PodSummary
from mergesearch.operator.reconcile import (
    ANNOTATION_RETRY_FINAL,
    STUCK_S,
    Creation,
    Plan,
    SearchView,
    parse_time,
)
from mergesearch.operator.status import MergeSearchStatus
from mergesearch.spec import API_GROUP, API_VERSION, KIND

log = logging.getLogger("mergesearch.operator")
Key = tuple[str, str]
Observer = Callable[[SearchView, Plan], None]


@dataclass(frozen=True)
class ShellSettings:
    """How the shell runs, fixed for the process (the command line and the environment):
    what trial Jobs get (`jobs`), how often a search is reconciled unpoked (`poll_s`; once
    it is finished or blocked, `idle_poll_s`), how long a burst of pokes is let arrive
    (`batch_s`), how soon a quota refusal is tried again, and the evaluator endpoint's port
    (warm mode; None: not served)."""

    jobs: JobSettings = field(default_factory=JobSettings.from_env)
    poll_s: float = 30.0
    idle_poll_s: float = 300.0
    batch_s: float = 0.1
    quota_retry_s: float = 5.0
    evaluator_port: int | None = None


@dataclass
class Runtime:
    """The shell's state in one process: its settings, the API client, the reconcile loops
    and their wake-up events, the warm evaluators' inboxes, and the observers (the hook for
    metrics: called with every reconcile's view and plan). Carried in kopf's memo."""

    settings: ShellSettings = field(default_factory=ShellSettings)
    observers: list[Observer] = field(default_factory=list)
    credentials: kopf.ConnectionInfo | None = None
    login_settings: Any = None
    client: KubeClient | None = None
    wakeups: dict[Key, asyncio.Event] = field(default_factory=dict)
    loops: dict[Key, tuple[str, asyncio.Task[None]]] = field(default_factory=dict)
    inboxes: server.Inboxes = field(default_factory=server.Inboxes)
    endpoint: Any = None

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


def runtime_of(memo: Any) -> Runtime:
    """The Runtime kopf carries in its memo (`kopf.run(memo=kopf.Memo(runtime=...))`); the
    startup handler puts a default one there when the operator was started without."""
    return memo.runtime  # type: ignore[no-any-return]


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


def _ensure_runtime(memo: Any) -> Runtime:
    if getattr(memo, "runtime", None) is None:
        memo.runtime = Runtime()
    return runtime_of(memo)


@kopf.on.login()
def login(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo | None:
    runtime = _ensure_runtime(memo)
    runtime.login_settings = settings
    runtime.credentials = _login(settings)
    return runtime.credentials


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """No peering (one replica; `standalone`), our own annotation prefix and finalizer name,
    and only warnings from kopf's own logs become Kubernetes Events."""
    _ensure_runtime(memo)
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
async def serve_evaluators(memo: kopf.Memo, **_: Any) -> None:
    """The warm evaluators' endpoint (operator/server.py), when a port is configured."""
    runtime = _ensure_runtime(memo)
    port = runtime.settings.evaluator_port
    if port:
        key = runtime.settings.jobs.evaluator_key
        app = server.make_app(runtime.inboxes, lambda: key, runtime.poke)
        runtime.endpoint = await server.start(app, port)


@kopf.on.cleanup()
async def close_client(memo: kopf.Memo, **_: Any) -> None:
    runtime = runtime_of(memo)
    if runtime.endpoint is not None:
        await runtime.endpoint.cleanup()
    loops = [task for _, task in runtime.loops.values()]
    for task in loops:
        task.cancel()
    await asyncio.gather(*loops, return_exceptions=True)
    runtime.loops.clear()
    if runtime.client is not None:
        await runtime.client.close()


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
    type: str | None,
    namespace: str,
    meta: Mapping[str, Any],
    body: kopf.Body,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    summary = observe.job_summary(body)
    key = _search_key(namespace, meta)
    if key and (type == "DELETED" or (summary and summary.state != "active")):
        runtime_of(memo).poke(key)


@kopf.on.event("v1", "pods", labels={LABEL_SEARCH: kopf.PRESENT})
async def pod_changed(
    namespace: str, meta: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
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
        runtime_of(memo).poke(key)


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
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Starts the search's reconcile loop (the first event of a search, also the operator's
    initial listing), stops it when the search is deleted, and wakes it at once on a spec
    change (a new generation) or a retry request; our own status writes do neither."""
    runtime = runtime_of(memo)
    key, uid = (namespace, name), str(meta.get("uid") or "")
    if type == "DELETED":
        runtime.stop_loop(key, uid)
        return
    indexes = Indexes(trial_jobs, trial_pods, evaluator_pods)
    runtime.ensure_loop(key, uid, lambda: run_search(runtime, namespace, name, indexes))
    current = MergeSearchStatus.read(status)
    retry = (meta.get("annotations") or {}).get(ANNOTATION_RETRY_FINAL)
    acted_on = current.finalization.retry_request if current.finalization else None
    asked = retry and retry != acted_on
    if meta.get("generation") != current.observed_generation or asked:
        runtime.poke(key)


# --------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class Indexes:
    """kopf's in-memory indexes the loop reads: the searches' Jobs, their terminated (or
    stuck) pods, and the warm evaluators' pods."""

    jobs: kopf.Index[Key, JobSummary]
    pods: kopf.Index[Key, PodSummary]
    evaluators: kopf.Index[Key, warm.EvaluatorPod] | None = None


async def run_search(runtime: Runtime, namespace: str, name: str, indexes: Indexes) -> None:
    """Reconcile until the search is gone (a 404) or the task is cancelled (DELETED event,
    operator shutdown)."""
    key = (namespace, name)
    wake = runtime.wakeup(key)
    backoff = 1.0
    try:
        while True:
            wake.clear()
            try:
                wait = await reconcile_once(runtime, namespace, name, indexes)
                backoff = 1.0
            except (ApiError, aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                log.warning("%s/%s: reconcile failed, retrying in %.0fs: %s", *key, backoff, exc)
                wait, backoff = backoff, min(backoff * 2, 60.0)
            if wait is None:
                return
            await _sleep(wake, wait)
            if wake.is_set():
                await asyncio.sleep(runtime.settings.batch_s)  # let the rest of a burst arrive
    finally:
        if runtime.wakeups.get(key) is wake:
            runtime.wakeups.pop(key, None)
            runtime.inboxes.forget(key)


async def _sleep(wake: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), timeout=max(seconds, 0.0))


async def reconcile_once(
    runtime: Runtime, namespace: str, name: str, indexes: Indexes
) -> float | None:
    """One reconcile; returns how long to wait before the next one unless poked (None: the
    search is gone)."""
    api = runtime.api()
    body = await api.get_search(namespace, name)
    if body is None:
        return None
    view = SearchView.of(body)
    key = (namespace, name)
    owned = reconcile.owned_jobs(view, indexes.jobs.get(key, []))
    jobs, pods = await _observe(api, namespace, owned, indexes.pods, view.status)
    runtime.inboxes.owners[key] = view.owner
    inbox, taken = runtime.inboxes.snapshot(key)
    evaluators = tuple(indexes.evaluators.get(key, [])) if indexes.evaluators is not None else ()
    settings = runtime.settings.jobs
    try:
        plan = reconcile.reconcile(
            view, jobs, pods, settings, now(), inbox=inbox, evaluators=evaluators
        )
    except Exception as exc:  # a bug met this resource: record it, never crash-loop
        log.exception("%s/%s: reconcile raised", namespace, name)
        plan = reconcile.internal_error(view, f"{type(exc).__name__}: {exc}", now())
    return await _apply(
        runtime, api, body, view, plan, recorded=lambda: runtime.inboxes.settle(key, plan, taken)
    )


async def _observe(
    api: KubeClient,
    namespace: str,
    jobs: Iterable[JobSummary],
    index: kopf.Index[Key, PodSummary],
    status: MergeSearchStatus,
) -> tuple[list[JobSummary], dict[str, list[PodSummary]]]:
    """The Jobs, and the pods of each Job whose pods matter (`reconcile.pods_matter`), from
    the indexes. A finished Job's terminated pods: when the index has none yet (two watch
    streams, two orders), one list call reads them. A running Job's pods that do not start:
    their states, and for a pod or Job stuck for STUCK_S without a reason of its own, its
    Warning events (one call each)."""
    out_jobs: list[JobSummary] = []
    out: dict[str, list[PodSummary]] = {}
    for job in jobs:
        if not reconcile.pods_matter(status, job):
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
    runtime: Runtime,
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
    from being deleted: deletions run whatever the creations did, and only then is what the
    creation came to handed back to the core (`reconcile.after_creation`) and its status
    written. `recorded` runs once the plan's status is written (warm evaluators get their
    answers then)."""
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
    creation, failure = await _create(api, plan)
    for job in plan.delete:
        await api.delete_job(view.owner.namespace, job)
    _post_events(meta, plan)
    for observer in runtime.observers:
        observer(view, plan)
    if plan.applied:
        owner = view.owner
        log.info("%s/%s: told %d results", owner.namespace, owner.name, len(plan.applied))
    settings = runtime.settings
    wait = settings.idle_poll_s if plan.idle else settings.poll_s
    if plan.wake_after is not None:
        wait = min(wait, max(plan.wake_after, 0.5))
    if failure is not None:
        raise failure
    side = reconcile.after_creation(view.with_status(plan.status), plan, creation, now())
    if side is not None:
        await _write_side(api, meta, side)
    if creation.rejected is not None:
        return settings.idle_poll_s
    if creation.quota_job is not None:
        return min(wait, settings.quota_retry_s)
    return wait


async def _create(api: KubeClient, plan: Plan) -> tuple[Creation, Exception | None]:
    """Create the plan's Secrets and Jobs in order, stopping at the first refusal: what it
    came to, and an error that is not the cluster's answer to the Jobs themselves (raised by
    the caller once the deletions ran)."""
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
                return Creation(quota_job=name, quota_detail=exc.detail, waiting=waiting), None
    except ApiError as exc:
        if exc.invalid:
            return Creation(rejected=exc.detail), None
        return Creation(), exc
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Creation(), exc
    return Creation(), None


async def _write_side(api: KubeClient, meta: Mapping[str, Any], plan: Plan) -> None:
    """A second status write in one reconcile (what the core made of the Jobs' creation), on
    top of the first; a conflict just leaves it to the next reconcile."""
    if not plan.changed:
        return
    try:
        await api.replace_status(_status_body(meta, plan.status))
    except ApiError as exc:
        if not exc.conflict:
            raise
        return
    _post_events(meta, plan)


def _post_events(meta: Mapping[str, Any], plan: Plan) -> None:
    ref = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "metadata": dict(meta)}
    for event in plan.events:
        kopf.event(ref, type=event.type, reason=event.reason, message=event.message)


def _status_body(meta: Mapping[str, Any], status: MergeSearchStatus) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "resourceVersion": meta["resourceVersion"],
        },
        "status": status.to_wire(),
    }
