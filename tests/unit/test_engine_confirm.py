"""Confirmation: once the search ends, finalists are re-scored on unseen examples and the winner
is chosen on those scores; restart-exact, arrival-order free, failures tolerated."""

from __future__ import annotations

import numpy as np
import pytest

from mergesearch.engine import (
    Candidate,
    EngineConfig,
    EngineState,
    Result,
    ask,
    chosen,
    done,
    init,
    status,
    tell,
)
from mergesearch.engine.synthetic import SyntheticObjective

pytestmark = pytest.mark.unit

CHECKPOINTS = ("a", "b", "c", "d")
TASKS = ("x", "y")


def config(**overrides: object) -> EngineConfig:
    base: dict[str, object] = {
        "checkpoints": CHECKPOINTS,
        "tasks": dict.fromkeys(TASKS, 1.0),
        "max_generations": 3,
        "seed": 7,
        "confirm_top_k": 3,
    }
    return EngineConfig(**(base | overrides))  # type: ignore[arg-type]


OBJECTIVE = SyntheticObjective.random(CHECKPOINTS, TASKS, 3)


def unseen(candidate: Candidate) -> Result:
    """The confirmation examples disagree with the search ones: a noisy objective's finalists
    are reordered (here: the search's favourite loses, a baseline wins)."""
    result = OBJECTIVE.evaluate(candidate)
    if candidate.subset != "confirmation":
        return result
    assert result.scores is not None
    bonus = 0.5 if candidate.baseline == "uniform" else 0.0
    return Result(candidate.id, scores={k: v - 0.1 + bonus for k, v in result.scores.items()})


def run(state: EngineState) -> tuple[EngineState, list[Candidate]]:
    seen: list[Candidate] = []
    while not done(state)[0]:
        _, candidates = ask(state)
        seen.extend(candidates)
        state = tell(state, [unseen(c) for c in candidates])
    return state, seen


def test_finalists_are_the_top_k_and_the_baselines_scored_on_unseen_examples() -> None:
    state, seen = run(init(config()))
    confirm = [c for c in seen if c.subset == "confirmation"]
    search_ids = [c.source for c in confirm if c.kind == "search"]
    assert len(search_ids) == 3
    final = status(state)
    assert final.best is not None and final.best["kind"] == "search"
    assert search_ids[0] == final.best["id"]  # the search's best is the first finalist
    baselines = [c.source for c in confirm if c.kind == "baseline"]
    assert baselines == [b["id"] for b in final.baselines if b.get("same_as") is None]
    assert all(c.id == "c-" + c.source for c in confirm if c.source)
    # side by side: every finalist carries both fitnesses
    rows = final.confirmation
    assert len(rows) == len(confirm) and all("search_fitness" in r and "fitness" in r for r in rows)
    assert final.winner is not None and final.winner["id"] == "b-uniform"
    assert final.winner["searchFitness"] < final.best["fitness"]  # type: ignore[index]
    assert chosen(final) == final.winner
    assert "confirmed winner b-uniform" in (final.message or "")
    assert final.trials_issued == final.trials_succeeded


def test_confirmation_is_restart_exact_and_order_free() -> None:
    straight, _ = run(init(config()))
    # kill and restore at every step of the confirmation, telling in reverse order
    state = init(config())
    while not done(state)[0]:
        state = EngineState.from_json(state.to_json())
        _, candidates = ask(state)
        if candidates and candidates[0].subset == "confirmation":
            candidates = candidates[::-1][:2]
        state = tell(state, [unseen(c) for c in candidates])
    assert state.to_json() == straight.to_json()


def test_told_twice_and_failed_confirmations() -> None:
    state = init(config())
    while True:
        _, candidates = ask(state)
        if candidates[0].subset == "confirmation":
            break
        state = tell(state, [unseen(c) for c in candidates])
    first, *rest = candidates
    state = tell(state, [Result(first.id, failed=True, reason="node lost")])
    state = tell(state, [unseen(first)])  # already told: ignored
    state = tell(state, [unseen(c) for c in rest])
    final = status(state)
    assert final.phase == "succeeded"
    assert final.confirmation[0]["status"] == "failed"
    assert final.winner is not None and final.winner["id"] != first.source


def test_off_by_default_in_the_engine_and_best_is_handed_over() -> None:
    state, seen = run(init(config(confirm_top_k=0)))
    assert all(c.subset == "search" for c in seen)
    final = status(state)
    assert final.winner is None and final.confirmation == []
    assert chosen(final) == final.best


def test_target_fitness_stops_the_search_and_confirms() -> None:
    state, seen = run(init(config(target_fitness=-10.0, max_generations=5)))
    final = status(state)
    assert final.reason == "target_fitness" and final.winner is not None
    assert any(c.subset == "confirmation" for c in seen)
    weights = np.array(list(final.winner["weights"].values()))
    assert abs(weights.sum() - 1.0) < 1e-9
