"""The pure parts of `mergesearch status` and of the cluster report, on a real status document
(built by the operator's status code from a real engine run)."""

from __future__ import annotations

from typing import Any

import pytest

from mergesearch import engine
from mergesearch.cli.cluster import records_from_status, score_rows, status_lines
from mergesearch.operator.status import engine_fields

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def obj() -> dict[str, Any]:
    config = engine.EngineConfig(
        checkpoints=("a", "b", "c"), tasks={"x": 1, "y": 1}, max_trials=17, seed=2
    )
    state = engine.init(config)
    while not engine.done(state)[0]:
        state, candidates = engine.ask(state)
        results = [
            engine.Result(
                candidate_id=c.id, scores={"x": c.weights["a"], "y": 1 - c.weights["a"] ** 2}
            )
            for c in candidates
        ]
        state = engine.tell(state, results)
    status = {**engine_fields(state).to_wire(), "phase": "Succeeded"}
    status["conditions"] = [
        {"type": "Ready", "status": "True", "reason": "Finished", "message": "done"}
    ]
    return {
        "metadata": {"name": "s", "namespace": "ns"},
        "spec": {"objective": {"heldIn": [{"task": "x"}, {"task": "y"}]}, "search": {}},
        "status": status,
    }


def test_status_lines(obj: dict[str, Any]) -> None:
    lines = status_lines(obj)
    assert lines[0] == "ns/s: Succeeded"
    best = obj["status"]["best"]
    assert f"best: {best['trial']} fitness {best['fitness']:.4f}" in lines


def test_score_rows_put_baselines_before_the_best(obj: dict[str, Any]) -> None:
    tasks, rows = score_rows(obj)
    assert tasks == ["x", "y"]
    labels = [label for label, _, _, _ in rows]
    assert labels[:4] == ["a", "b", "c", "uniform"]
    assert labels[-1].startswith("best (")
    best_fitness = rows[-1][2]
    assert all(fitness <= best_fitness for _, _, fitness, _ in rows)


def test_records_from_status(obj: dict[str, Any]) -> None:
    records = records_from_status(obj)
    ids = [r.id for r in records]
    assert ids[0].startswith("b-each-")
    assert obj["status"]["best"]["trial"] in ids
    assert len(ids) == len(set(ids))


def test_search_and_confirmation_scores_side_by_side() -> None:
    config = engine.EngineConfig(
        checkpoints=("a", "b", "c"), tasks={"x": 1}, max_trials=17, seed=2, confirm_top_k=2
    )
    state = engine.init(config)
    while not engine.done(state)[0]:
        state, candidates = engine.ask(state)
        state = engine.tell(
            state,
            [
                engine.Result(
                    c.id,
                    scores={"x": c.weights["a"] - (0.5 if c.subset == "confirmation" else 0)},
                )
                for c in candidates
            ],
        )
    obj = {
        "metadata": {"name": "s", "namespace": "ns"},
        "spec": {"objective": {"heldIn": [{"task": "x"}]}, "search": {}},
        "status": {**engine_fields(state).to_wire(), "phase": "Succeeded"},
    }
    winner = obj["status"]["winner"]
    assert winner["fitness"] == pytest.approx(winner["searchFitness"] - 0.5)
    assert (
        f"confirmed winner: {winner['trial']} fitness {winner['fitness']:.4f} on unseen "
        f"examples ({winner['searchFitness']:.4f} on the search's)"
    ) in status_lines(obj)
    _, rows = score_rows(obj)
    assert rows[-1][0] == f"confirmed winner ({winner['trial']})"
    confirmed = {label: (fit, conf) for label, _, fit, conf in rows}
    assert confirmed["uniform"][1] == pytest.approx(confirmed["uniform"][0] - 0.5)
