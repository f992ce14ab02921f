"""The bounded Pareto front of held-in task scores."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from mergesearch.engine import EngineConfig, ask, done, init, tell
from mergesearch.engine.codec import encode_f8
from mergesearch.engine.pareto import crowding_distances, dominates, insert
from mergesearch.engine.records import ScoredTrial
from mergesearch.engine.synthetic import SyntheticObjective

pytestmark = pytest.mark.unit

TASKS = ("a", "b")


def record(seq: int, a: float, b: float) -> ScoredTrial:
    return ScoredTrial(
        id=f"t{seq}",
        seq=seq,
        kind="search",
        generation=0,
        fitness=(a + b) / 2,
        scores={"a": a, "b": b},
        weights=encode_f8(np.array([0.5, 0.5])),
    )


def build(points: list[tuple[float, float]], limit: int = 100) -> tuple[ScoredTrial, ...]:
    front: tuple[ScoredTrial, ...] = ()
    for seq, (a, b) in enumerate(points):
        front = insert(front, record(seq, a, b), TASKS, limit)
    return front


def brute_force_front(points: list[tuple[float, float]]) -> set[tuple[float, float]]:
    return {p for p in points if not any(dominates(q, p) for q in points)}


def test_dominance() -> None:
    assert dominates((1, 1), (0, 1)) and not dominates((0, 1), (1, 1))
    assert not dominates((1, 0), (0, 1)) and not dominates((1, 1), (1, 1))


def test_unbounded_front_is_exactly_the_non_dominated_set() -> None:
    rng = np.random.default_rng(0)
    points = [tuple(map(float, p)) for p in rng.random((300, 2)).round(2)]
    front = build(points)
    got = {(p.scores["a"], p.scores["b"]) for p in front}
    assert got == brute_force_front(points)
    assert [p.seq for p in front] == sorted(p.seq for p in front)


def test_duplicates_keep_the_earliest_trial() -> None:
    front = build([(0.5, 0.5), (0.5, 0.5), (0.2, 0.9)])
    assert [p.id for p in front] == ["t0", "t2"]


def test_crowding_distance_favours_the_extremes_and_isolated_points() -> None:
    front = build([(0.0, 1.0), (0.1, 0.9), (0.5, 0.5), (1.0, 0.0)])
    distances = crowding_distances(front, TASKS)
    assert math.isinf(distances[0]) and math.isinf(distances[3])
    assert distances[2] > distances[1]


def test_pruning_drops_the_most_crowded_point() -> None:
    front = build([(0.0, 1.0), (0.1, 0.9), (0.5, 0.5), (1.0, 0.0)], limit=3)
    assert [p.id for p in front] == ["t0", "t2", "t3"]  # t1 sat closest to its neighbours


def test_pruning_ties_drop_the_newest_and_the_protected_point_stays() -> None:
    front = build([(0.0, 1.0), (1.0, 0.0)], limit=1)
    assert [p.id for p in front] == ["t0"]  # both are extremes (infinitely far): the newest goes
    points = [(0.0, 1.0), (1.0, 0.0), (0.5, 0.5)]
    front = ()
    for seq, (a, b) in enumerate(points):
        front = insert(front, record(seq, a, b), TASKS, limit=2, protect="t2")
    assert "t2" in [p.id for p in front] and len(front) == 2


@pytest.mark.parametrize("limit", [1, 3, 8])
def test_front_never_exceeds_its_limit_and_holds_only_non_dominated_points(limit: int) -> None:
    rng = np.random.default_rng(limit)
    points = [tuple(map(float, p)) for p in rng.random((200, 2))]
    front: tuple[ScoredTrial, ...] = ()
    for seq, (a, b) in enumerate(points):
        front = insert(front, record(seq, a, b), TASKS, limit)
        assert len(front) <= limit
        vectors = [(p.scores["a"], p.scores["b"]) for p in front]
        assert not any(dominates(u, v) for u, v in itertools.permutations(vectors, 2))


def test_engine_front_contains_the_best_trial_and_stays_bounded() -> None:
    config = EngineConfig(
        checkpoints=tuple(f"m{i}" for i in range(6)),
        tasks={"a": 1.0, "b": 1.0, "c": 1.0},
        max_generations=12,
        pareto_limit=5,
    )
    objective = SyntheticObjective.random(config.checkpoints, ("a", "b", "c"), 1)
    state = init(config)
    while not done(state)[0]:
        _, candidates = ask(state)
        state = tell(state, [objective.evaluate(c) for c in candidates])
        assert len(state.pareto) <= 5
        assert state.best is None or state.best in state.pareto
    ids = [p.id for p in state.pareto]
    assert len(ids) == len(set(ids)) and len(ids) > 1
