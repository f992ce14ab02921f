"""The metrics: status → samples (pure), runner timings → histogram, forgetting deleted searches,
and the exposition text Prometheus scrapes."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mergesearch.operator.metrics import (
    Histogram,
    Sample,
    SearchMetrics,
    registry,
    result_durations,
    status_samples,
)
from mergesearch.operator.status import MergeSearchStatus

pytestmark = pytest.mark.unit
read = MergeSearchStatus.read

STATUS = {
    "phase": "Running",
    "iteration": 3,
    "trials": {"total": 20, "running": 4, "succeeded": 14, "failed": 2, "finished": 16},
    "search": {"sigma": 0.125},
    "best": {
        "trial": "g002-c01",
        "kind": "search",
        "fitness": 0.61,
        "scores": {"gsm8k": 0.7, "mbpp": 0.52},
        "heldOut": {"ifeval": 0.4},
        "weights": {"sft-a": 0.25, "po-b": 0.75},
    },
}


def scrape(metrics: SearchMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition text, keyed by name and sorted labels."""
    text = generate_latest(registry(metrics)).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("mergesearch_"):
            continue
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_status_samples_cover_every_field() -> None:
    samples = {(s.name, s.labels): s.value for s in status_samples(read(STATUS))}
    assert samples[("mergesearch_best_fitness", ())] == 0.61
    assert samples[("mergesearch_iteration", ())] == 3
    assert samples[("mergesearch_sigma", ())] == 0.125
    assert samples[("mergesearch_trials_running", ())] == 4
    assert samples[("mergesearch_trials_total", (("outcome", "succeeded"),))] == 14
    assert samples[("mergesearch_trials_total", (("outcome", "failed"),))] == 2
    score = "mergesearch_task_score"
    assert samples[(score, (("task", "gsm8k"), ("split", "held_in")))] == 0.7
    assert samples[(score, (("task", "ifeval"), ("split", "held_out")))] == 0.4
    assert samples[("mergesearch_checkpoint_weight", (("checkpoint", "po-b"),))] == 0.75
    assert samples[("mergesearch_phase", (("phase", "Running"),))] == 1
    assert samples[("mergesearch_phase", (("phase", "Succeeded"),))] == 0


def test_a_fresh_status_has_no_best_and_no_made_up_zeros() -> None:
    fresh = {"phase": "Pending", "iteration": 0, "trials": {"running": 0}}
    names = {s.name for s in status_samples(read(fresh))}
    assert "mergesearch_best_fitness" not in names
    assert "mergesearch_task_score" not in names
    assert "mergesearch_checkpoint_weight" not in names
    assert "mergesearch_iteration" in names
    # malformed values (a hand-edited status) are skipped, not crashed on
    odd = {"iteration": "three", "best": {"fitness": True, "weights": {"a": None}}}
    assert status_samples(read(odd)) == []


def test_result_durations_skip_steps_that_did_not_run() -> None:
    result = {"timings": {"fetchS": 0.0, "mergeS": 1.5, "evaluateS": 12.0, "uploadS": 0.0}}
    assert result_durations(result) == [("merge", 1.5), ("evaluate", 12.0)]
    assert result_durations({"truncated": True}) == []


def test_histogram_buckets_are_cumulative() -> None:
    hist = Histogram(bounds=(1.0, 10.0))
    for value in (0.5, 1.0, 3.0, 100.0):
        hist.observe(value)
    assert hist.buckets() == [("1.0", 2), ("10.0", 3), ("+Inf", 4)]
    assert hist.total == pytest.approx(104.5)


def test_exposition_labels_each_series_by_namespace_and_search() -> None:
    metrics = SearchMetrics()
    metrics.update_status(("team-a", "demo"), read(STATUS))
    metrics.update_status(("team-b", "other"), read({**STATUS, "iteration": 9}))
    got = scrape(metrics)
    demo = (("namespace", "team-a"), ("search", "demo"))
    assert got[("mergesearch_iteration", demo)] == 3
    assert got[("mergesearch_iteration", (("namespace", "team-b"), ("search", "other")))] == 9
    failed = tuple(sorted((*demo, ("outcome", "failed"))))
    assert got[("mergesearch_trials_total", failed)] == 2
    key = ("mergesearch_checkpoint_weight", tuple(sorted((*demo, ("checkpoint", "sft-a")))))
    assert got[key] == 0.25


def test_trial_timings_are_observed_once_per_pod() -> None:
    metrics = SearchMetrics()
    result = {"timings": {"mergeS": 2.0, "evaluateS": 40.0}}
    assert not metrics.observe_result(("ns", "s"), "pod-uid-0", result)  # search not known yet
    metrics.update_status(("ns", "s"), read(STATUS))
    assert metrics.observe_result(("ns", "s"), "pod-uid-1", result)
    assert not metrics.observe_result(("ns", "s"), "pod-uid-1", result)  # a repeated event
    assert metrics.observe_result(("ns", "s"), "pod-uid-2", {"timings": {"mergeS": 4.0}})
    got = scrape(metrics)
    base = (("namespace", "ns"), ("search", "s"))
    merge = tuple(sorted((*base, ("step", "merge"))))
    assert got[("mergesearch_trial_duration_seconds_count", merge)] == 2
    assert got[("mergesearch_trial_duration_seconds_sum", merge)] == 6.0
    evaluate = tuple(sorted((*base, ("step", "evaluate"))))
    assert got[("mergesearch_trial_duration_seconds_count", evaluate)] == 1
    le = tuple(sorted((*base, ("step", "merge"), ("le", "2.5"))))
    assert got[("mergesearch_trial_duration_seconds_bucket", le)] == 1


def test_a_deleted_search_leaves_no_series() -> None:
    metrics = SearchMetrics()
    metrics.update_status(("ns", "gone"), read(STATUS))
    metrics.update_status(("ns", "kept"), read(STATUS))
    metrics.observe_result(("ns", "gone"), "uid", {"timings": {"mergeS": 1.0}})
    metrics.forget(("ns", "gone"))
    got = scrape(metrics)
    searches = {dict(labels).get("search") for _, labels in got}
    assert searches == {"kept"}
    assert metrics.keys() == {("ns", "kept")}
    # the garbage collector deletes the search's pods after it: their events add nothing
    assert not metrics.observe_result(("ns", "gone"), "uid-2", {"timings": {"mergeS": 1.0}})
    assert {dict(labels).get("search") for _, labels in scrape(metrics)} == {"kept"}
    # a re-created search of the same name is observed again once its status is reported
    metrics.update_status(("ns", "gone"), read(STATUS))
    assert metrics.observe_result(("ns", "gone"), "uid", {"timings": {"mergeS": 1.0}})


def test_sample_is_hashable_data() -> None:
    assert Sample("a", 1.0) == Sample("a", 1.0)


def test_a_late_reconcile_of_a_deleted_search_does_not_bring_it_back() -> None:
    metrics = SearchMetrics()
    metrics.update_status(("ns", "s"), read(STATUS), uid="uid-1")
    metrics.forget(("ns", "s"), uid="uid-1")
    metrics.update_status(("ns", "s"), read(STATUS), uid="uid-1")  # read before the deletion
    assert metrics.keys() == set()
    metrics.update_status(("ns", "s"), read(STATUS), uid="uid-2")  # re-created under the same name
    assert metrics.keys() == {("ns", "s")}


def test_confirmed_winner_fitness_side_by_side_and_its_scores_and_weights() -> None:
    status = {
        **STATUS,
        "phase": "Succeeded",
        "winner": {
            "trial": "b-uniform",
            "kind": "baseline",
            "fitness": 0.55,
            "searchFitness": 0.58,
            "searchScores": {"gsm8k": 0.62, "mbpp": 0.54},
            "scores": {"gsm8k": 0.6, "mbpp": 0.5},
            "heldOut": {"ifeval": 0.45},
            "weights": {"sft-a": 0.5, "po-b": 0.5},
        },
    }
    samples = {(s.name, s.labels): s.value for s in status_samples(read(status))}
    assert samples[("mergesearch_winner_fitness", (("subset", "search"),))] == 0.58
    assert samples[("mergesearch_winner_fitness", (("subset", "confirmation"),))] == 0.55
    assert samples[("mergesearch_best_fitness", ())] == 0.61  # the search's best, as before
    score = "mergesearch_task_score"
    assert samples[(score, (("task", "gsm8k"), ("split", "held_in")))] == 0.6
    assert samples[(score, (("task", "ifeval"), ("split", "held_out")))] == 0.45
    assert samples[("mergesearch_checkpoint_weight", (("checkpoint", "po-b"),))] == 0.5
    assert not any(s.name == "mergesearch_winner_fitness" for s in status_samples(read(STATUS)))
