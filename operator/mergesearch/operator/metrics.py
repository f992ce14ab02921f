"""Prometheus metrics of the operator: a pure core (status → samples, result → durations) and a
custom collector holding the latest status of each search.

Why a collector over a status snapshot rather than gauges set piecemeal: the status the
operator has just written *is* the truth (trial counts, best, σ), so exporting it whole keeps
every series consistent with `kubectl get mergesearch`, the counters included (they are the
status's own monotone counts, so an operator restart does not reset them), and forgetting a
deleted search is one dictionary removal — no series lingers with a stale label set.

The one thing the status does not hold is per-trial timing, so trial durations come from the
runner's results in the trial pods' termination messages, observed once per pod (by uid) into a
per-search histogram.

Series (all labelled `namespace`, `search`):

| name | type | extra labels |
|---|---|---|
| mergesearch_best_fitness | gauge | |
| mergesearch_winner_fitness | gauge | subset = search, confirmation |
| mergesearch_iteration | gauge | |
| mergesearch_sigma | gauge | |
| mergesearch_trials_total | counter | outcome = succeeded, failed |
| mergesearch_trials_running | gauge | |
| mergesearch_trial_duration_seconds | histogram | step = fetch, merge, evaluate, upload |
| mergesearch_task_score | gauge | task, split = held_in, held_out |
| mergesearch_checkpoint_weight | gauge | checkpoint |
| mergesearch_phase | gauge (1 for the current phase) | phase |
| mergesearch_evaluators | gauge (warm mode) | state = wanted, running, ready, busy |
| mergesearch_evaluator_fetched_bytes | gauge (warm mode) | |

Warm mode's trial timings come from the results evaluators post (`Plan.posted`), observed
once per evaluator and trial id, into the same histogram.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from mergesearch.operator.status import MergeSearchStatus, Phase, TrialEntry

log = logging.getLogger("mergesearch.operator.metrics")

Key = tuple[str, str]  # (namespace, search name)
LABELS = ("namespace", "search")
OUTCOMES = ("succeeded", "failed")
STEPS = ("fetch", "merge", "evaluate", "upload")
# A trial takes from seconds (a cached toy model) to hours (a 70B merge evaluated on GPUs).
BUCKETS: tuple[float, ...] = (
    0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800,
)  # fmt: skip

DELETED_UIDS = 1000  # tombstones kept (a uid is never reused, so this only bounds memory)
ADDRESS_ENV = "MERGESEARCH_METRICS_ADDRESS"
DEFAULT_ADDRESS = "0.0.0.0"  # noqa: S104 - in a pod; the chart's Service selects it

HELP = {
    "mergesearch_best_fitness": "Fitness (weighted mean held-in score) of the best trial.",
    "mergesearch_winner_fitness": "Fitness of the confirmed winner on the search's examples "
    "and on the unseen confirmation examples.",
    "mergesearch_iteration": "The search's current CMA-ES generation.",
    "mergesearch_sigma": "CMA-ES step size.",
    "mergesearch_trials_total": "Trials finished, by outcome.",
    "mergesearch_trials_running": "Trials (and the final evaluation) running now.",
    "mergesearch_trial_duration_seconds": "Duration of a trial's steps, from the runner.",
    "mergesearch_task_score": "Per-task score of the best trial, of the confirmed winner once "
    "there is one (held-in on the confirmation examples; held-out after finalizing).",
    "mergesearch_checkpoint_weight": "Weight of each checkpoint in the best (then the "
    "confirmed winner's) merge.",
    "mergesearch_phase": "1 for the search's current phase.",
    "mergesearch_evaluators": "Warm evaluator pods: wanted, running, ready, busy (leasing).",
    "mergesearch_evaluator_fetched_bytes": "Bytes the search's evaluators fetched from storage.",
}
EVALUATOR_STATES = ("wanted", "running", "ready", "busy")


@dataclass(frozen=True)
class Sample:
    """One gauge or counter value; `labels` beyond namespace and search."""

    name: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


# --------------------------------------------------------------------------- pure core


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def status_samples(status: MergeSearchStatus) -> list[Sample]:
    """The gauge and counter samples a MergeSearch status implies (no namespace/search labels;
    the collector adds them). Fields not there yet (no best before the first result) give no
    sample rather than a misleading zero."""
    out: list[Sample] = []
    best, trials, winner = status.best, status.trials, status.winner
    scalars = {
        "mergesearch_best_fitness": best.fitness if best else None,
        "mergesearch_iteration": status.iteration,
        "mergesearch_sigma": status.search.sigma if status.search else None,
        "mergesearch_trials_running": trials.running if trials else None,
    }
    for name, raw in scalars.items():
        if (value := _number(raw)) is not None:
            out.append(Sample(name, value))
    for outcome in OUTCOMES:
        if trials is not None and (value := _number(getattr(trials, outcome))) is not None:
            out.append(Sample("mergesearch_trials_total", value, (("outcome", outcome),)))
    if winner is not None:
        for subset, raw in (("search", winner.search_fitness), ("confirmation", winner.fitness)):
            if (value := _number(raw)) is not None:
                out.append(Sample("mergesearch_winner_fitness", value, (("subset", subset),)))
    chosen = status.chosen()
    if chosen is not None:
        out += _chosen_samples(chosen)
    evaluators = status.evaluators
    if evaluators is not None:
        for state in EVALUATOR_STATES:
            if (value := _number(getattr(evaluators, state))) is not None:
                out.append(Sample("mergesearch_evaluators", value, (("state", state),)))
        if (value := _number(evaluators.bytes_fetched)) is not None:
            out.append(Sample("mergesearch_evaluator_fetched_bytes", value))
    if status.phase is not None:
        for each in Phase:
            value = float(each is status.phase)
            out.append(Sample("mergesearch_phase", value, (("phase", each.value),)))
    return out


def _chosen_samples(chosen: TrialEntry) -> list[Sample]:
    """Per-task scores (held-in, and held-out once finalized) and weights of the merge the
    search hands over."""
    out: list[Sample] = []
    for split, scores in (("held_in", chosen.scores), ("held_out", chosen.held_out or {})):
        for task, raw in sorted(scores.items()):
            if (value := _number(raw)) is not None:
                labels = (("task", str(task)), ("split", split))
                out.append(Sample("mergesearch_task_score", value, labels))
    for checkpoint, raw in sorted(chosen.weights.items()):
        if (value := _number(raw)) is not None:
            labels = (("checkpoint", str(checkpoint)),)
            out.append(Sample("mergesearch_checkpoint_weight", value, labels))
    return out


def result_durations(result: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(step, seconds) for each step a runner result timed. A zero is a step that did not run
    (no upload without an output URI; a truncated termination message drops all timings), so it
    is not observed: it would drag the quantiles towards zero."""
    timings = result.get("timings") or {}
    out = []
    for step in STEPS:
        value = _number(timings.get(f"{step}S"))
        if value is not None and value > 0:
            out.append((step, value))
    return out


@dataclass
class Histogram:
    """Cumulative-bucket histogram state (what Prometheus's exposition format wants)."""

    bounds: tuple[float, ...] = BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


# --------------------------------------------------------------------------- the collector


class SearchMetrics(Collector):
    """What the operator knows about each search, exported on scrape. Thread-safe: updates come
    from the operator's event loop, scrapes from the HTTP server's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: dict[Key, MergeSearchStatus] = {}
        self._durations: dict[Key, dict[str, Histogram]] = {}
        self._seen_pods: dict[Key, set[str]] = {}
        self._deleted: dict[str, None] = {}  # uids of deleted searches, insertion-ordered

    # updates ---------------------------------------------------------------------------------

    def update_status(self, key: Key, status: MergeSearchStatus, uid: str | None = None) -> None:
        """The status a reconcile decided. Ignored for a search already forgotten (`uid`
        deleted): a reconcile that read the resource just before its deletion may report after
        the deletion event, and must not bring its series back."""
        with self._lock:
            if uid is not None and uid in self._deleted:
                return
            self._status[key] = status  # immutable: kept as it is

    def observe_result(self, key: Key, pod_uid: str, result: Mapping[str, Any]) -> bool:
        """Observe a trial result's step durations once per pod; False if already seen.

        Only for a search this collector knows (its status was reported): the garbage
        collector deletes a deleted search's pods after the search, and those pod events must
        not bring its series back."""
        with self._lock:
            if key not in self._status:
                return False
            seen = self._seen_pods.setdefault(key, set())
            if pod_uid in seen:
                return False
            seen.add(pod_uid)
            histograms = self._durations.setdefault(key, {})
            for step, seconds in result_durations(result):
                histograms.setdefault(step, Histogram()).observe(seconds)
            return True

    def forget(self, key: Key, uid: str | None = None) -> None:
        """A deleted search: all its series disappear from the next scrape."""
        with self._lock:
            if uid is not None:
                self._deleted[uid] = None
                while len(self._deleted) > DELETED_UIDS:  # oldest first
                    del self._deleted[next(iter(self._deleted))]
            self._status.pop(key, None)
            self._durations.pop(key, None)
            self._seen_pods.pop(key, None)

    def keys(self) -> set[Key]:
        with self._lock:
            return set(self._status) | set(self._durations)

    # scrape ----------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            statuses = dict(self._status)
            durations = {
                k: {s: (h.buckets(), h.total) for s, h in v.items()}
                for k, v in self._durations.items()
            }
        yield from _families(statuses)
        histogram = HistogramMetricFamily(
            "mergesearch_trial_duration_seconds",
            HELP["mergesearch_trial_duration_seconds"],
            labels=[*LABELS, "step"],
        )
        for (namespace, search), steps in sorted(durations.items()):
            for step, (buckets, total) in sorted(steps.items()):
                histogram.add_metric([namespace, search, step], buckets, total)
        yield histogram


def _families(statuses: Mapping[Key, MergeSearchStatus]) -> Iterable[Metric]:
    families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
    extra: dict[str, tuple[str, ...]] = {
        "mergesearch_trials_total": ("outcome",),
        "mergesearch_task_score": ("task", "split"),
        "mergesearch_winner_fitness": ("subset",),
        "mergesearch_checkpoint_weight": ("checkpoint",),
        "mergesearch_phase": ("phase",),
        "mergesearch_evaluators": ("state",),
    }
    for name, doc in HELP.items():
        if name == "mergesearch_trial_duration_seconds":
            continue
        labels = [*LABELS, *extra.get(name, ())]
        if name == "mergesearch_trials_total":  # the client appends _total itself
            families[name] = CounterMetricFamily("mergesearch_trials", doc, labels=labels)
        else:
            families[name] = GaugeMetricFamily(name, doc, labels=labels)
    for (namespace, search), status in sorted(statuses.items()):
        for sample in status_samples(status):
            values = [namespace, search, *(v for _, v in sample.labels)]
            families[sample.name].add_metric(values, sample.value)
    return families.values()


# --------------------------------------------------------------------------- the shell


METRICS = SearchMetrics()


def registry(metrics: SearchMetrics = METRICS) -> CollectorRegistry:
    """A registry with the search metrics and the process's own (CPU, memory, open files)."""
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

    reg = CollectorRegistry()
    reg.register(metrics)
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    return reg


def serve(port: int, address: str | None = None, metrics: SearchMetrics = METRICS) -> Any:
    """Start the /metrics HTTP server in a thread; returns the server (tests shut it down)."""
    from prometheus_client import start_http_server

    address = address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS
    server, _ = start_http_server(port, addr=address, registry=registry(metrics))
    log.info("metrics on http://%s:%d/metrics", address, port)
    return server


def install(runtime: Any, metrics: SearchMetrics = METRICS) -> None:
    """Wire the collector into the kopf shell: an observer of every reconcile (the status it
    decided), a pod watcher for trial timings, and a watcher that forgets deleted searches.
    Imported lazily so that the pure core needs neither kopf nor the operator's modules."""
    import kopf

    from mergesearch.operator import observe
    from mergesearch.operator.jobs import ANNOTATION_SEARCH, LABEL_SEARCH
    from mergesearch.spec import API_GROUP, API_VERSION

    def on_reconcile(view: Any, plan: Any) -> None:
        owner = view.owner
        key = (owner.namespace, owner.name)
        metrics.update_status(key, plan.status, uid=owner.uid)
        for posted in plan.posted:  # warm mode: results evaluators posted and the plan told
            trial = f"{posted.evaluator}/{posted.result.id}"
            metrics.observe_result(key, trial, posted.result.to_wire())

    runtime.observers.append(on_reconcile)

    @kopf.on.event("v1", "pods", labels={LABEL_SEARCH: kopf.PRESENT})
    async def trial_pod_timings(
        namespace: str, meta: Mapping[str, Any], body: kopf.Body, **_: Any
    ) -> None:
        search = (meta.get("annotations") or {}).get(ANNOTATION_SEARCH)
        summary = observe.pod_summary(body)
        if not search or summary is None or not meta.get("uid"):
            return
        result, _ = observe.parse_result(summary.message, summary.job)
        if result is not None:
            metrics.observe_result((namespace, search), meta["uid"], result.to_wire())

    @kopf.on.event(API_GROUP, API_VERSION, "mergesearches")
    async def forget_deleted(
        type: str | None, namespace: str, name: str, meta: Mapping[str, Any], **_: Any
    ) -> None:
        if type == "DELETED":
            metrics.forget((namespace, name), uid=meta.get("uid"))
            log.info("%s/%s: deleted, its series are dropped", namespace, name)

    del trial_pod_timings, forget_deleted  # registered with kopf by the decorators
