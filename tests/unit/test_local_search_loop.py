"""Local mode's trial loop, with the evaluator faked at its boundary (a TrialResult per call):
fatal failure kinds stop the search at once, and nothing is evaluated once the search is over."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from mergerunner.trial import FailureKind, TrialResult
from mergesearch import engine
from mergesearch.local.records import read_records
from mergesearch.local.search import LocalInputError, LocalSearch
from mergesearch.spec import parse_manifest
from support.local_inputs import three_checkpoint_manifest

pytestmark = pytest.mark.unit

MANIFEST = three_checkpoint_manifest(
    [{"task": "x"}, {"task": "y"}], {"maxTrials": 30, "seed": 7, "confirm": {"enabled": False}}
)


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
        x, y = float(weights[0]), float(weights[1])  # each task has its own best checkpoint
        return TrialResult(id=trial_id, status="succeeded", held_in={"x": x, "y": y})


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


def test_the_final_message_names_the_cause_of_a_failed_search(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mergesearch.cli.local import print_summary

    local = search(tmp_path, FakeEvaluator(FailureKind.INTERNAL), maxFailedTrials=1)
    status = engine.status(local.run())
    print_summary(local, status, {})
    out = capsys.readouterr().out
    assert "stopped: max_failed_trials" in out
    last = list(local.records)[-1]
    assert f"last failure: trial {last}: internal in trial {last}" in out


def test_a_search_runs_to_its_budget_and_counts_what_ran(tmp_path: Path) -> None:
    fake = FakeEvaluator()
    local = search(tmp_path, fake)
    state = local.run()
    status = engine.status(state)
    assert status.phase == "succeeded"
    assert fake.calls == len(local.records) == status.trials_succeeded


def test_the_progress_bar_counts_what_runs_and_logs_print_above_it(tmp_path: Path) -> None:
    import io
    import logging

    from rich.console import Console

    from mergesearch.cli.local import _run_with_progress

    # 3 checkpoints: 5 baselines and populations of 7, so a budget of 20 runs 5 + 2·7 = 19.
    doc = copy.deepcopy(MANIFEST)
    doc["spec"]["search"]["maxTrials"] = 20
    local = LocalSearch(parse_manifest(doc), tmp_path, state_dir=tmp_path, cache_dir=tmp_path)
    local.evaluator = FakeEvaluator(FailureKind.NON_FINITE, after=18)  # the last one fails
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    handler = logging.StreamHandler(sys.stderr)  # as logging.basicConfig binds it
    logging.getLogger().addHandler(handler)
    try:
        state = _run_with_progress(local, console, show=True)
    finally:
        logging.getLogger().removeHandler(handler)
    assert engine.trials_told(state) == 19
    shown = buffer.getvalue()
    assert "19/19" in shown and "20" not in shown.replace("19/19", "")
    assert "trial g001-c06 failed" in shown  # the warning went through the bar's console


def test_a_run_says_whether_it_resumes_and_where_the_export_goes(tmp_path: Path) -> None:
    from mergesearch.cli.local import start_lines

    doc = copy.deepcopy(MANIFEST)
    doc["spec"]["search"]["maxTrials"] = 20
    doc["spec"]["output"] = {"uri": "out"}  # relative to the manifest's directory
    state_dir, out = tmp_path / "state", tmp_path / "out"

    def local(evaluator: Any, **kwargs: Any) -> LocalSearch:
        manifest = parse_manifest(doc)
        made = LocalSearch(manifest, tmp_path, state_dir=state_dir, cache_dir=tmp_path, **kwargs)
        made.evaluator = evaluator
        made.check_output()
        return made

    first = local(Killed(after=7))
    assert start_lines(first, state_dir) == [
        f"starting: 19 trials, state in {state_dir}",
        f"export: the best merge goes to {out}",
    ]
    with pytest.raises(KeyboardInterrupt):
        first.run()
    again = local(FakeEvaluator())
    assert (
        start_lines(again, state_dir)[0] == f"resuming: 7 of 19 trials done, state in {state_dir}"
    )

    # This search's own earlier export is replaced, and the run says so.
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier export")
    final = {"best": "g000-c00", "output": {"uri": str(out), "digest": "blake3:0123"}}
    (state_dir / "final.json").write_text(json.dumps(final))
    lines = start_lines(local(FakeEvaluator()), state_dir)
    assert lines[1] == (
        f"export: the best merge goes to {out}, "
        "replacing this search's earlier export (blake3:0123)"
    )

    # Starting over forgets the trials, not which model this search exported.
    assert local(FakeEvaluator(), fresh=True).own_export() == final["output"]

    # Any other model there is refused before the first trial, unless the user says so.
    (state_dir / "final.json").unlink()
    with pytest.raises(LocalInputError, match="--overwrite-output"):
        local(FakeEvaluator())
    lines = start_lines(local(FakeEvaluator(), overwrite_output=True), state_dir)
    assert lines[1].endswith(", replacing the model there")


class Killed(FakeEvaluator):
    """Interrupted (as by Ctrl-C) when asked for trial `after + 1`."""

    def trial(
        self, trial_id: str, weights: Any, *, with_held_out: bool = False, subset: str = "search"
    ) -> TrialResult:
        if self.calls == self.after:
            raise KeyboardInterrupt
        return super().trial(trial_id, weights, with_held_out=with_held_out, subset=subset)


def test_what_libraries_print_during_a_search_stays_off_stdout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mergesearch.local.search import quiet_libraries

    with quiet_libraries():
        print("Passed argument batch_size = auto. Detecting largest batch size")
    out, err = capsys.readouterr()
    assert out == "" and "Detecting largest batch size" in err


# --------------------------------------------------------------------------- as on a cluster
# A failing local trial is classified by mergerunner.trial's kinds and policy exactly as the
# operator classifies a trial Job's (tests/unit/test_operator_reconcile.py): an outage runs the
# trial again after the same backoff, uncounted; storage never reached is a misconfiguration;
# the final evaluation is retried as the final Job is, then fails the search.


class Scripted(FakeEvaluator):
    """Fails the calls numbered in `failures` (1, 2, …) with their kind; scores the others."""

    def __init__(self, failures: dict[int, FailureKind]) -> None:
        super().__init__()
        self.failures = failures
        self.ids: list[str] = []

    def trial(
        self, trial_id: str, weights: Any, *, with_held_out: bool = False, subset: str = "search"
    ) -> TrialResult:
        self.ids.append(trial_id)
        kind = self.failures.get(self.calls + 1)
        self.fail, self.after = kind, self.calls
        return super().trial(trial_id, weights, with_held_out=with_held_out, subset=subset)


def waiting(local: LocalSearch) -> list[float]:
    waits: list[float] = []
    local.sleep = waits.append
    return waits


def test_an_outage_runs_the_trial_again_after_a_backoff_uncounted(tmp_path: Path) -> None:
    storage = FailureKind.STORAGE_UNAVAILABLE
    fake = Scripted({3: storage, 4: storage})
    local = search(tmp_path, fake)
    waits = waiting(local)
    state = local.run()
    assert waits == [15, 30]
    assert fake.ids[2] == fake.ids[3] == fake.ids[4]  # the same trial, run three times
    assert state.trials.failed == 0 and engine.status(state).phase == "succeeded"
    assert all(r.status == "succeeded" for r in local.records.values())


def test_an_outage_retried_too_often_counts_as_a_failure(tmp_path: Path) -> None:
    from mergerunner.trial import RETRY_LIMIT, backoff_s

    runs = RETRY_LIMIT + 1
    fake = Scripted({2 + i: FailureKind.STORAGE_UNAVAILABLE for i in range(runs)})
    local = search(tmp_path, fake)
    waits = waiting(local)
    state = local.run()
    assert waits == [backoff_s(a) for a in range(1, runs)]
    assert waits[:6] == [15, 30, 60, 120, 240, 300]
    assert len(set(fake.ids[1 : 1 + runs])) == 1
    assert state.trials.failed == 1 and local.fatal is None
    failed = [r for r in local.records.values() if r.status == "failed"]
    assert [r.error_kind for r in failed] == ["storage-unavailable"]


def test_storage_never_reached_before_any_success_is_a_misconfiguration(tmp_path: Path) -> None:
    fake = Scripted({1: FailureKind.STORAGE_UNAVAILABLE})
    local = search(tmp_path, fake)
    waits = waiting(local)
    local.run()
    assert fake.calls == 1 and waits == []
    assert local.fatal is not None and local.fatal.kind is FailureKind.STORAGE_UNAVAILABLE
    assert local.records == {} and local.state.trials.failed == 0


def finished(tmp_path: Path) -> LocalSearch:
    local = search(tmp_path, FakeEvaluator())
    local.run()
    return local


def test_the_final_evaluation_is_tried_three_times_then_fails_the_search(tmp_path: Path) -> None:
    from mergerunner.trial import FINALIZATION_ATTEMPTS
    from mergesearch.local.search import FinalEvaluationFailed

    local = finished(tmp_path)
    fake = Scripted({1: FailureKind.TIMEOUT, 2: FailureKind.INTERNAL, 3: FailureKind.INTERNAL})
    local.evaluator = fake
    waits = waiting(local)
    with pytest.raises(FinalEvaluationFailed, match="final evaluation failed: evaluate: internal"):
        local.finish()
    assert fake.calls == FINALIZATION_ATTEMPTS == 3 and waits == [15, 30]
    assert not local.paths.final.exists()

    # A counted failure and then a success: the held-out scores of the chosen merge are kept.
    local.evaluator = Scripted({1: FailureKind.SERVER_FAILED})
    final = local.finish()
    assert final["best"] == engine.chosen(engine.status(local.state))["id"]
    assert json.loads(local.paths.final.read_text()) == final


def test_a_fatal_kind_fails_the_final_evaluation_at_once(tmp_path: Path) -> None:
    from mergesearch.local.search import FinalEvaluationFailed

    local = finished(tmp_path)
    local.evaluator = fake = Scripted({1: FailureKind.OUT_OF_MEMORY})
    waits = waiting(local)
    with pytest.raises(FinalEvaluationFailed, match="out-of-memory"):
        local.finish()
    assert fake.calls == 1 and waits == []
