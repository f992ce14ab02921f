"""The pure parts of `mergesearch status` and of the cluster report, on a real status document
(built by the operator's status code from a real engine run)."""

from __future__ import annotations

from typing import Any

import pytest

from mergesearch import engine
from mergesearch.cluster_cli import records_from_status, score_rows, status_lines
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
    status = {**engine_fields(state), "phase": "Succeeded"}
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
    labels = [label for label, _, _ in rows]
    assert labels[:4] == ["a", "b", "c", "uniform"]
    assert labels[-1].startswith("best (")
    best_fitness = rows[-1][2]
    assert all(fitness <= best_fitness for _, _, fitness in rows)


def test_records_from_status(obj: dict[str, Any]) -> None:
    records = records_from_status(obj)
    ids = [r.id for r in records]
    assert ids[0].startswith("b-each-")
    assert obj["status"]["best"]["trial"] in ids
    assert len(ids) == len(set(ids))
