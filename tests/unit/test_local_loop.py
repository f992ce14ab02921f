"""Local mode's trial loop, with the evaluator faked at its boundary (a TrialResult per call):
fatal failure kinds stop the search at once, and nothing is evaluated once the search is over."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from mergerunner.trial import FailureKind, TrialResult
from mergesearch import engine
from mergesearch.local import LocalSearch
from mergesearch.records import read_records
from mergesearch.spec import parse_manifest

pytestmark = pytest.mark.unit

MANIFEST = {
    "apiVersion": "mergesearch.io/v1alpha1",
    "kind": "MergeSearch",
    "metadata": {"name": "t"},
    "spec": {
        "checkpoints": [{"name": n, "uri": f"ckpt/{n}"} for n in ("a", "b", "c")],
        "objective": {"heldIn": [{"task": "x"}, {"task": "y"}]},
        "search": {"maxTrials": 30, "seed": 7, "confirm": {"enabled": False}},
    },
}


class FakeEvaluator:
    """Answers every trial with `fail` (a failure kind) or scores; counts the calls."""

    def __init__(self, fail: FailureKind | None = None, after: int = 0) -> None:
        self.fail, self.after, self.calls = fail, after, 0

    def trial(
        self, trial_id: str, weights: Any, *, with_held_out: bool = False, subset: str = "search"
    ) -> TrialResult:
        self.calls += 1
        if self.fail is not None and self.calls > self.after:
            return TrialResult(
                id=trial_id,
                status="failed",
                failed_step="evaluate",
                error_kind=self.fail,
                error=f"{self.fail.value} in trial {trial_id}",
            )
        score = float(weights[0])
        return TrialResult(id=trial_id, status="succeeded", held_in={"x": score, "y": score})


def search(tmp_path: Path, evaluator: FakeEvaluator, **execution: Any) -> LocalSearch:
    doc = copy.deepcopy(MANIFEST)
    doc["spec"]["execution"] = execution
    local = LocalSearch(parse_manifest(doc), tmp_path, state_dir=tmp_path, cache_dir=tmp_path)
    local.evaluator = evaluator
    return local


def test_a_fatal_kind_stops_the_search_at_once(tmp_path: Path) -> None:
    fake = FakeEvaluator(FailureKind.UNKNOWN_METRIC, after=2)
    local = search(tmp_path, fake)
    local.run()
    assert fake.calls == 3  # the failing trial is the last one evaluated
    assert local.fatal is not None and local.fatal.kind is FailureKind.UNKNOWN_METRIC
    assert "unknown-metric" in local.fatal.message and local.fatal.trial in local.fatal.message
    # Not logged, not told: a rerun after the fix evaluates it again.
    assert [r.id for r in read_records(local.paths.trials)] == list(local.records)
    assert len(local.records) == 2 and local.state.trials.failed == 0


def test_counted_failures_stop_issuing_work_once_the_search_failed(tmp_path: Path) -> None:
    fake = FakeEvaluator(FailureKind.INTERNAL)
    local = search(tmp_path, fake, maxFailedTrials=2)
    state = local.run()
    status = engine.status(state)
    assert status.phase == "failed" and status.reason == "max_failed_trials"
    assert fake.calls == 3  # the third failure fails the search: nothing after it
    assert local.fatal is None
    assert [r.error_kind for r in local.records.values()] == ["internal"] * 3


def test_a_search_runs_to_its_budget_and_counts_what_ran(tmp_path: Path) -> None:
    fake = FakeEvaluator()
    local = search(tmp_path, fake)
    state = local.run()
    status = engine.status(state)
    assert status.phase == "succeeded"
    assert fake.calls == len(local.records) == status.trials_succeeded
