"""The engine's ask/tell contract: baselines, idempotence, partial tells, budgets, failures."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from mergesearch.engine import (
    Candidate,
    EngineConfig,
    EngineState,
    Result,
    ask,
    done,
    init,
    status,
    tell,
    tell_with_report,
)
from mergesearch.engine.codec import decode_f8_rows, encode_f8
from mergesearch.engine.synthetic import SyntheticObjective
from support.engine_runs import objective_for, roundtrip

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def make_config(n: int = 3, **overrides: Any) -> EngineConfig:
    fields: dict[str, Any] = {
        "checkpoints": tuple(f"ck{i}" for i in range(n)),
        "tasks": {"a": 1.0, "b": 1.0},
        "max_generations": 5,
        "seed": 0,
    }
    fields.update(overrides)
    return EngineConfig(**fields)


def tell_all(state: EngineState, objective: SyntheticObjective) -> EngineState:
    _, candidates = ask(state)
    return tell(state, [objective.evaluate(c) for c in candidates])


def run_to_end(state: EngineState, objective: SyntheticObjective) -> EngineState:
    for _ in range(1000):
        if done(state)[0]:
            return state
        state = tell_all(state, objective)
    raise AssertionError("the search did not end")


def ids(candidates: list[Candidate]) -> list[str]:
    return [c.id for c in candidates]


# --------------------------------------------------------------------------- baselines


@pytest.mark.parametrize(("n", "popsize"), [(3, 7), (8, 10), (64, 16)])
def test_baselines_come_first_then_generation_zero_of_default_size(n: int, popsize: int) -> None:
    config = make_config(n)
    assert config.popsize == 4 + math.floor(3 * math.log(n)) == popsize
    _, candidates = ask(init(config))
    names = config.checkpoints
    expected = [f"b-each-{x}" for x in names] + ["b-uniform"]
    expected += [f"g000-c{i:02d}" for i in range(popsize)]
    assert ids(candidates) == expected
    for c, name in zip(candidates, names, strict=False):
        assert c.kind == "baseline" and c.baseline == "each" and c.generation is None
        assert c.weights == {x: 1.0 if x == name else 0.0 for x in names}
    uniform = candidates[n]
    assert uniform.weights == {x: 1.0 / n for x in names}
    for c in candidates[n + 1 :]:
        assert c.kind == "search" and c.generation == 0 and c.baseline is None
        assert list(c.weights) == list(names)
        assert min(c.weights.values()) > 0
        assert sum(c.weights.values()) == pytest.approx(1.0, abs=1e-12)


def _each_results(scores: dict[str, dict[str, float]]) -> list[Result]:
    return [Result(f"b-each-{name}", scores=s) for name, s in scores.items()]


def test_merge_best_merges_the_best_checkpoint_of_each_task() -> None:
    state = init(make_config(4))
    _, before = ask(state)
    assert "b-merge-best" not in ids(before)  # needs every 'each' result first
    state = tell(
        state,
        _each_results(
            {
                "ck0": {"a": 0.9, "b": 0.1},
                "ck1": {"a": 0.2, "b": 0.3},
                "ck2": {"a": 0.3, "b": 0.8},
                "ck3": {"a": 0.9, "b": 0.2},  # ties ck0 on a: the earlier checkpoint wins
            }
        )[:3],
    )
    assert "b-merge-best" not in ids(ask(state)[1])
    state = tell(state, _each_results({"ck3": {"a": 0.9, "b": 0.2}}))
    _, after = ask(state)
    assert after[0].id == "b-uniform" and after[1].id == "b-merge-best"  # baselines first
    merge_best = after[1]
    assert merge_best.baseline == "merge-best"
    assert merge_best.weights == {"ck0": 0.5, "ck1": 0.0, "ck2": 0.5, "ck3": 0.0}
    assert state.trials.issued == 4 + 1 + state.config.popsize + 1


def test_merge_best_with_one_winner_reuses_its_each_result() -> None:
    state = init(make_config(3))
    state = tell(
        state,
        _each_results(
            {"ck0": {"a": 0.2, "b": 0.2}, "ck1": {"a": 0.7, "b": 0.6}, "ck2": {"a": 0.1, "b": 0.5}}
        ),
    )
    record = next(b for b in state.baselines if b.kind == "merge-best")
    assert record.status == "succeeded" and record.same_as == "b-each-ck1"
    assert record.fitness == pytest.approx(0.65)
    assert "b-merge-best" not in ids(ask(state)[1])
    assert state.trials.issued == 3 + 1 + state.config.popsize  # no extra evaluation


def test_merge_best_is_skipped_when_every_each_failed() -> None:
    state = init(make_config(3))
    state = tell(state, [Result(f"b-each-ck{i}", failed=True, reason="oom") for i in range(3)])
    record = next(b for b in state.baselines if b.kind == "merge-best")
    assert record.status == "skipped"
    assert state.trials.failed == 3


def test_baselines_can_be_chosen() -> None:
    config = make_config(3, baselines=["uniform"])
    _, candidates = ask(init(config))
    assert ids(candidates)[0] == "b-uniform"
    assert all(c.kind == "search" for c in candidates[1:])
    with pytest.raises(ValidationError, match="merge-best baseline needs the each"):
        make_config(3, baselines=["merge-best"])


# --------------------------------------------------------------------------- ask and tell


def _all_baselines(state: EngineState, scores: dict[str, dict[str, float]]) -> EngineState:
    """Tell every pending baseline: 'each' ones from `scores`, the others a fixed 0.3."""
    while True:
        _, pending = ask(state)
        baselines = [c for c in pending if c.kind == "baseline"]
        if not baselines:
            return state
        state = tell(
            state,
            [
                Result(c.id, scores=scores.get(c.id.removeprefix("b-each-"), {"a": 0.3, "b": 0.3}))
                for c in baselines
            ],
        )


def test_best_baseline_start_opens_generation_zero_at_the_best_baseline() -> None:
    config = make_config(4, start="best-baseline")
    state = init(config)
    _, first = ask(state)
    assert all(c.kind == "baseline" for c in first)  # generation 0 waits for the baselines
    scores = {f"ck{i}": {"a": 0.1 * i, "b": 0.1 * i} for i in range(4)}  # ck3 is best, 0.3
    scores["ck3"] = {"a": 0.9, "b": 0.7}
    state = _all_baselines(roundtrip(state), scores)
    _, candidates = ask(state)
    assert [c.generation for c in candidates] == [0] * config.popsize
    mean = status(state).mean_weights
    assert mean == pytest.approx({"ck0": 0.125, "ck1": 0.125, "ck2": 0.125, "ck3": 0.625})
    assert state.trials.issued == 4 + 1 + config.popsize  # merge-best is ck3 alone: no trial


def test_best_baseline_start_falls_back_to_uniform_when_every_baseline_failed() -> None:
    config = make_config(3, start="best-baseline", baselines=["each", "uniform"])
    state = init(config)
    _, pending = ask(state)
    state = tell(state, [Result(c.id, failed=True, reason="oom") for c in pending])
    assert status(state).mean_weights == pytest.approx({f"ck{i}": 1 / 3 for i in range(3)})
    assert ask(state)[1][0].id == "g000-c00"


def test_best_baseline_start_needs_a_baseline() -> None:
    with pytest.raises(ValidationError, match="needs at least one baseline"):
        make_config(3, start="best-baseline", baselines=[])


def test_ask_is_idempotent_and_does_not_change_the_state() -> None:
    state = init(make_config(5))
    state2, first = ask(state)
    assert state2 == state
    _, second = ask(state2)
    _, third = ask(roundtrip(state))
    assert first == second == third
    _, few = ask(state, k=3)
    assert few == first[:3]
    assert ask(state, k=0)[1] == []
    with pytest.raises(ValueError):
        ask(state, k=-1)


def test_init_is_deterministic_and_seeded() -> None:
    a, b = init(make_config(4)), init(make_config(4))
    assert a.to_json() == b.to_json()
    c = init(make_config(4, seed=1))
    assert ask(c)[1][5].weights != ask(a)[1][5].weights


def test_partial_tells_wait_for_the_whole_generation() -> None:
    config = make_config(3, baselines=[])
    objective = objective_for(config)
    state = init(config)
    _, gen0 = ask(state)
    half = len(gen0) // 2
    partial = tell(state, [objective.evaluate(c) for c in gen0[:half]])
    assert partial.cma == state.cma  # CMA-ES is told only complete generations
    assert partial.generation is not None and partial.generation.index == 0
    assert ids(ask(partial)[1]) == ids(gen0[half:])
    assert partial.trials.succeeded == half
    full = tell(partial, [objective.evaluate(c) for c in gen0[half:]])
    assert full.generations_completed == 1 and full.cma != state.cma
    _, gen1 = ask(full)
    assert all(c.generation == 1 for c in gen1) and ids(gen1)[0] == "g001-c00"
    assert len(full.history) == 1 and full.history[0].succeeded == len(gen0)


def test_results_not_pending_are_ignored_with_a_reason() -> None:
    config = make_config(3, baselines=["each", "uniform", "merge-best"])
    objective = objective_for(config)
    state = init(config)
    _, candidates = ask(state)
    first = candidates[5]
    state = tell(state, [objective.evaluate(first)])
    results = [
        objective.evaluate(first),  # told already
        Result("g007-c01", scores={"a": 1, "b": 1}),  # a generation not open
        Result("b-merge-best", scores={"a": 1, "b": 1}),  # not issued yet
        Result("nonsense", scores={"a": 1, "b": 1}),
    ]
    after, report = tell_with_report(state, results)
    assert after == state
    assert report.applied == ()
    assert [r for _, r in report.ignored] == [
        "already told",
        "unknown candidate",
        "not issued yet",
        "unknown candidate",
    ]
    # The same result twice in one call: the first is applied, the second ignored.
    second = candidates[6]
    _, report = tell_with_report(state, [objective.evaluate(second), objective.evaluate(second)])
    assert report.applied == (second.id,) and report.ignored == ((second.id, "already told"),)


def test_closed_generations_reject_late_results() -> None:
    config = make_config(3, baselines=[])
    objective = objective_for(config)
    state = init(config)
    _, gen0 = ask(state)
    state = tell(state, [objective.evaluate(c) for c in gen0])
    _, report = tell_with_report(state, [objective.evaluate(gen0[0])])
    assert report.ignored == ((gen0[0].id, "its generation is closed"),)


def test_results_accept_plain_dicts_and_fitness_is_the_weighted_mean() -> None:
    config = make_config(3, tasks={"a": 1.0, "b": 3.0})
    state = init(config)
    state = tell(state, [{"candidate_id": "b-each-ck0", "scores": {"a": 0.2, "b": 0.6, "x": 9}}])
    record = state.baselines[0]
    assert record.fitness == pytest.approx((0.2 + 3 * 0.6) / 4)
    assert record.scores == {"a": 0.2, "b": 0.6}  # only held-in tasks are kept
    assert state.best is not None and state.best.id == "b-each-ck0"


@pytest.mark.parametrize(
    ("scores", "reason"),
    [
        ({"a": 0.5}, "missing score for held-in task 'b'"),
        ({"a": 0.5, "b": float("nan")}, "score for task 'b' is not finite"),
        ({"a": 0.5, "b": True}, "score for task 'b' is not finite"),
        (None, "result has no scores"),
    ],
)
def test_unusable_results_are_failures(scores: dict[str, float] | None, reason: str) -> None:
    state = tell(init(make_config(3)), [Result("b-uniform", scores=scores)])
    record = next(b for b in state.baselines if b.kind == "uniform")
    assert record.status == "failed" and record.reason == reason
    assert state.trials.failed == 1 and state.recent_failures[-1].reason == reason


# --------------------------------------------------------------------------- budgets


def test_max_generations_ends_the_search() -> None:
    config = make_config(3, max_generations=3)
    state = run_to_end(init(config), objective_for(config))
    assert done(state) == (True, "max_generations")
    assert state.generations_completed == 3 and state.finished is not None
    assert state.finished.phase == "succeeded"
    assert ask(state)[1] == []


def test_max_trials_is_never_exceeded() -> None:
    config = make_config(3, max_generations=None, max_trials=30)  # 5 baselines + 7 per gen
    state = init(config)
    objective = objective_for(config)
    while not done(state)[0]:
        assert state.trials.issued <= 30
        state = tell_all(state, objective)
    assert done(state) == (True, "max_trials")
    assert state.trials.issued == 5 + 3 * 7 <= 30
    assert state.generations_completed == 3


def test_max_trials_must_cover_the_baselines() -> None:
    with pytest.raises(ValidationError, match="baseline trials"):
        make_config(8, max_trials=9)
    with pytest.raises(ValidationError, match="max_trials or max_generations"):
        make_config(3, max_generations=None)


def test_target_fitness_stops_at_once_and_abandons_running_trials() -> None:
    config = make_config(3, target_fitness=0.5)
    state = init(config)
    _, candidates = ask(state)
    good = Result(candidates[7].id, scores={"a": 0.5, "b": 0.6})
    state, report = tell_with_report(
        state, [good, Result(candidates[8].id, scores={"a": 1, "b": 1})]
    )
    assert done(state) == (True, "target_fitness")
    assert report.ignored == ((candidates[8].id, "the search has finished"),)
    assert state.best is not None and state.best.id == candidates[7].id
    assert ask(state)[1] == []


def test_stagnation_stops_after_k_generations_without_improvement() -> None:
    config = make_config(3, baselines=[], max_generations=50, stagnation_generations=3)
    state = init(config)
    while not done(state)[0]:
        _, candidates = ask(state)
        state = tell(state, [Result(c.id, scores={"a": 0.5, "b": 0.5}) for c in candidates])
    assert done(state) == (True, "stagnation")
    assert state.generations_completed == 4  # improved at 1, then 3 flat generations


# --------------------------------------------------------------------------- failures


def _fail(candidate: Candidate) -> Result:
    return Result(candidate.id, failed=True, reason="CUDA out of memory")


def test_penalized_failures_rank_last() -> None:
    """A failure is told as the worst fitness: the next generation is as if it scored lowest."""
    config = make_config(4, baselines=[], failure_policy="penalize")
    objective = objective_for(config)
    state = init(config)
    _, gen0 = ask(state)
    failed = tell(state, [_fail(gen0[2]), *[objective.evaluate(c) for c in gen0 if c != gen0[2]]])
    worst = Result(gen0[2].id, scores={"a": -50.0, "b": -50.0})
    scored = tell(state, [worst, *[objective.evaluate(c) for c in gen0 if c != gen0[2]]])
    assert failed.trials.failed == 1 and failed.history[0].failed == 1
    assert ask(failed)[1] == ask(scored)[1]


def test_resample_replaces_a_failed_candidate_deterministically() -> None:
    config = make_config(4, baselines=[], failure_policy="resample")
    objective = objective_for(config)
    state = init(config)
    _, gen0 = ask(state)
    state = tell(state, [_fail(gen0[1])])
    _, pending = ask(state)
    assert "g000-c01-r1" in ids(pending) and "g000-c01" not in ids(pending)
    replacement = next(c for c in pending if c.id == "g000-c01-r1")
    assert replacement.weights != gen0[1].weights
    _, report = tell_with_report(state, [objective.evaluate(gen0[1])])
    assert report.ignored == (("g000-c01", "replaced by a resample"),)
    assert state.trials.issued == len(gen0) + 1
    # The same failure on another run yields the same replacement.
    again = tell(init(config), [_fail(gen0[1])])
    assert ask(again)[1] == pending


def test_resampled_candidates_do_not_depend_on_failure_order() -> None:
    config = make_config(4, baselines=[], failure_policy="resample")
    objective = objective_for(config)
    state = init(config)
    _, gen0 = ask(state)
    one = tell(tell(state, [_fail(gen0[1])]), [_fail(gen0[3])])
    other = tell(tell(state, [_fail(gen0[3])]), [_fail(gen0[1])])
    assert sorted(ask(one)[1], key=lambda c: c.id) == sorted(ask(other)[1], key=lambda c: c.id)
    one = tell_all(one, objective)
    other = tell_all(other, objective)
    assert one.generations_completed == other.generations_completed == 1
    assert ask(one)[1] == ask(other)[1]


def test_resampling_stops_after_max_resamples_then_penalizes() -> None:
    config = make_config(3, baselines=[], failure_policy="resample", max_resamples=2)
    state = init(config)
    for attempt in ("g000-c00", "g000-c00-r1", "g000-c00-r2"):
        assert attempt in ids(ask(state)[1])
        state = tell(state, [Result(attempt, failed=True)])
    assert not any(c.id.startswith("g000-c00") for c in ask(state)[1])
    slot = state.generation.slots[0] if state.generation else None
    assert slot is not None and slot.status == "failed" and slot.attempt == 2


def test_resampling_respects_max_trials() -> None:
    config = make_config(
        3, baselines=[], failure_policy="resample", max_generations=None, max_trials=8
    )
    state = init(config)  # 7 issued, room for one replacement
    state = tell(state, [Result("g000-c00", failed=True), Result("g000-c01", failed=True)])
    pending = ids(ask(state)[1])
    assert "g000-c00-r1" in pending and "g000-c01-r1" not in pending
    assert state.trials.issued == 8


def test_too_many_failures_fail_the_search() -> None:
    config = make_config(3, max_failed_trials=2)
    state = init(config)
    _, candidates = ask(state)
    state, report = tell_with_report(state, [_fail(c) for c in candidates[:4]])
    assert done(state) == (True, "max_failed_trials")
    assert state.finished is not None and state.finished.phase == "failed"
    assert state.trials.failed == 3  # the third failure went over the limit
    assert report.ignored == ((candidates[3].id, "the search has finished"),)
    assert status(state).phase == "failed"


def test_a_generation_where_everything_failed_still_closes() -> None:
    config = make_config(3, baselines=[], failure_policy="penalize")
    state = init(config)
    _, gen0 = ask(state)
    state = tell(state, [_fail(c) for c in gen0])
    assert state.generations_completed == 1 and state.history[0].succeeded == 0
    assert state.best is None and not done(state)[0]


# --------------------------------------------------------------------------- determinism


def test_candidates_do_not_depend_on_the_order_results_arrive_in() -> None:
    config = make_config(5)
    objective = objective_for(config)
    forward, backward = init(config), init(config)
    for _ in range(4):
        _, candidates = ask(forward)
        assert ask(backward)[1] == candidates
        results = [objective.evaluate(c) for c in candidates]
        forward = tell(forward, results)
        for r in reversed(results):
            backward = tell(backward, [r])
    assert forward.cma == backward.cma and forward.rng == backward.rng
    assert forward.best == backward.best


_SMALL_SEARCH = """
from mergesearch.engine import EngineConfig, ask, done, init, tell
from mergesearch.engine.synthetic import SyntheticObjective

config = EngineConfig(checkpoints=("x", "y", "z", "w"), tasks={"t1": 1, "t2": 2},
                      max_generations=4, seed=3)
objective = SyntheticObjective.random(config.checkpoints, ("t1", "t2"), 0)
state = init(config)
while not done(state)[0]:
    _, candidates = ask(state)
    state = tell(state, [objective.evaluate(c) for c in candidates])
print(state.to_json(), end="")
"""


@pytest.mark.slow  # a fresh interpreter imports cma (and what it pulls in): seconds
def test_same_config_and_results_give_the_same_state_in_another_process(tmp_path: Path) -> None:
    script = tmp_path / "small_search.py"
    script.write_text(_SMALL_SEARCH)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT / "operator")}
    other = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    here = io.StringIO()
    with contextlib.redirect_stdout(here):
        runpy.run_path(str(script))
    assert other == here.getvalue()
    assert json.loads(other)["finished"]["reason"] == "max_generations"


def test_a_replay_that_differs_falls_back_to_the_stored_samples() -> None:
    """Another platform's floating point could replay a generation differently."""
    config = make_config(3, baselines=[])
    objective = objective_for(config)
    state = init(config)
    gen = state.generation
    assert gen is not None
    rows = decode_f8_rows(gen.samples, len(gen.slots), state.cma.dim)
    rows[0, 0] = np.nextafter(rows[0, 0], np.inf)  # one ulp: what was evaluated differs
    state = state.model_copy(
        update={"generation": gen.model_copy(update={"samples": encode_f8(rows)})}
    )
    _, candidates = ask(state)
    state = tell(state, [objective.evaluate(c) for c in candidates])
    assert state.generations_completed == 1 and state.replay_mismatches == 1
    assert status(state).replay_mismatches == 1


# --------------------------------------------------------------------------- config, state, status


def test_start_weights_set_the_initial_mean() -> None:
    start = {"ck0": 0.5, "ck1": 0.3, "ck2": 0.2}
    state = init(make_config(3, start=start))
    for name, weight in status(state).mean_weights.items():
        assert weight == pytest.approx(start[name], rel=1e-12)
    with pytest.raises(ValidationError, match="strictly positive"):
        make_config(3, start={"ck0": 1.0, "ck1": 0.0, "ck2": 0.0})
    with pytest.raises(ValidationError, match="every checkpoint"):
        make_config(3, start={"ck0": 1.0})


def test_unconstrained_weights_start_at_uniform_and_are_free() -> None:
    config = make_config(3, parameterization="unconstrained", sigma0=0.5, baselines=[])
    state = init(config)
    assert status(state).mean_weights == {"ck0": 1 / 3, "ck1": 1 / 3, "ck2": 1 / 3}
    _, candidates = ask(state)
    sums = [sum(c.weights.values()) for c in candidates]
    assert any(abs(s - 1) > 1e-3 for s in sums)
    assert any(w < 0 for c in candidates for w in c.weights.values())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"checkpoints": ("a", "a")}, "unique"),
        ({"checkpoints": ("a",)}, "at least 2"),
        ({"tasks": {}}, "at least 1"),
        ({"population_size": 2}, "greater than or equal to 3"),
        ({"sigma0": 0}, "greater than 0"),
        ({"baselines": ["each", "each"]}, "listed once"),
        ({"target_fitness": float("inf")}, "finite"),
    ],
)
def test_config_validation(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make_config(3, **overrides)


def test_state_json_is_canonical_and_round_trips() -> None:
    config = make_config(4)
    state = tell_all(init(config), objective_for(config))
    text = state.to_json()
    assert "NaN" not in text and "Infinity" not in text
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    assert EngineState.from_json(text) == state
    assert EngineState.from_dict(state.to_dict()) == state


def test_status_summarises_the_search() -> None:
    config = make_config(4, max_generations=2)
    state = run_to_end(init(config), objective_for(config))
    summary = status(state)
    assert summary.phase == "succeeded" and summary.reason == "max_generations"
    assert summary.generations_completed == 2 and summary.trials_pending == 0
    assert summary.trials_succeeded == summary.trials_issued
    assert summary.best is not None
    assert summary.best["fitness"] == max(
        [b["fitness"] for b in summary.baselines] + [h["best"] for h in summary.history]
    )
    assert set(summary.best["weights"]) == set(config.checkpoints)
    assert [h["generation"] for h in summary.history] == [0, 1]
    assert json.loads(json.dumps(summary.to_dict()))["reason"] == "max_generations"
