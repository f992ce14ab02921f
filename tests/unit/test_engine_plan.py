"""`planned_trials`: what a progress count's total is, which is not the nominal budget."""

from __future__ import annotations

from typing import Any

import pytest

from mergesearch.engine import (
    EngineConfig,
    ask,
    done,
    init,
    planned_trials,
    tell,
    trials_told,
)
from mergesearch.engine.synthetic import SyntheticObjective

pytestmark = pytest.mark.unit


def config(**fields: Any) -> EngineConfig:
    base: dict[str, Any] = {
        "checkpoints": tuple(f"ck{i}" for i in range(8)),
        "tasks": {"a": 1.0, "b": 1.0},
        "seed": 0,
    }
    return EngineConfig(**(base | fields))


@pytest.mark.parametrize(
    "fields",
    [
        {"max_trials": 45},
        {"max_trials": 40, "start": "best-baseline"},
        {"max_generations": 3},
        {"max_trials": 100, "max_generations": 2},
        {"max_trials": 30, "population_size": 6},
    ],
)
def test_the_plan_is_what_runs_and_holds_throughout(fields: dict[str, Any]) -> None:
    cfg = config(**fields)
    objective = SyntheticObjective.random(cfg.checkpoints, ("a", "b"), 0)
    state = init(cfg)
    plan = planned_trials(state)
    seen = {plan}
    while not done(state)[0]:
        _, candidates = ask(state, 1)
        state = tell(state, [objective.evaluate(candidates[0])])
        seen.add(planned_trials(state))
    assert seen == {plan} == {trials_told(state)}


def test_a_budget_cut_at_a_generation_boundary_is_not_the_nominal_budget() -> None:
    cfg = config(max_trials=45)  # 8 checkpoints: 10 baselines, populations of 10
    assert cfg.popsize == 10
    assert planned_trials(init(cfg)) == 10 + 3 * 10
