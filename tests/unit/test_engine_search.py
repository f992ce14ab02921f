"""The search does its job: on a concave objective it beats every baseline and random search."""

from __future__ import annotations

import numpy as np
import pytest

from mergesearch.engine import EngineConfig, ask, done, init, status, tell
from mergesearch.engine.synthetic import SyntheticObjective

pytestmark = pytest.mark.unit

CHECKPOINTS = tuple(f"m{i}" for i in range(8))
TASKS = ("math", "code", "chat")
SEEDS = range(5)
GENERATIONS = 20


def search(seed: int) -> tuple[float, float, int, SyntheticObjective]:
    """Best search fitness, best baseline fitness, search trials used, the objective."""
    config = EngineConfig(
        checkpoints=CHECKPOINTS,
        tasks=dict.fromkeys(TASKS, 1.0),
        max_generations=GENERATIONS,
        seed=seed,
    )
    objective = SyntheticObjective.random(CHECKPOINTS, TASKS, 100 + seed)
    state = init(config)
    while not done(state)[0]:
        _, candidates = ask(state)
        state = tell(state, [objective.evaluate(c) for c in candidates])
    best_search = max(h.best for h in state.history if h.best is not None)
    best_baseline = max(b.fitness for b in state.baselines if b.fitness is not None)
    assert status(state).best["fitness"] == max(best_search, best_baseline)  # type: ignore[index]
    return best_search, best_baseline, GENERATIONS * config.popsize, objective


def random_search(objective: SyntheticObjective, budget: int, seed: int) -> float:
    rng = np.random.Generator(np.random.PCG64(seed))
    samples = rng.dirichlet(np.ones(len(CHECKPOINTS)), size=budget)
    return max(objective.fitness(w) for w in samples)


def test_cma_es_beats_baselines_and_random_search_and_nears_the_optimum() -> None:
    gains_over_random, gaps_to_optimum = [], []
    for seed in SEEDS:
        best_search, best_baseline, budget, objective = search(seed)
        assert best_search > best_baseline, f"seed {seed}"
        gains_over_random.append(best_search - random_search(objective, budget, seed))
        gaps_to_optimum.append(objective.fitness(objective.optimum()) - best_search)
    assert np.mean(gains_over_random) > 0
    assert min(gains_over_random) > 0
    assert max(gaps_to_optimum) < 2e-3
    assert min(gaps_to_optimum) >= -1e-12  # the known optimum is indeed the maximum
