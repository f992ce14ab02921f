"""Interrupt a search anywhere, restore it from JSON, and it goes on exactly as if never stopped.

Each run tells one result per call, in a scrambled order, so that the state is written and
read back after every ask and every tell: between generations, mid-generation with only some
results told, while baselines are pending, and around resampled failures.
"""

from __future__ import annotations

from typing import Any

import cma
import numpy as np
import pytest

from mergerunner.trial import fitness_of
from mergesearch.engine import (
    Candidate,
    EngineConfig,
    EngineState,
    Result,
    ask,
    done,
    init,
    tell,
)
from mergesearch.engine.cmastate import NormalSource, StrategySettings, strategy_options
from mergesearch.engine.engine import start_weights
from mergesearch.engine.parameterization import make_parameterization
from mergesearch.engine.streams import main_generator
from support.engine_runs import objective_for, roundtrip

pytestmark = pytest.mark.unit

# (checkpoints, generations); 64 checkpoints take seconds, mostly JSON round trips.
CASES = [(3, 8), (8, 5), pytest.param(64, 3, marks=pytest.mark.slow)]

Log = list[tuple[tuple[str, bytes], ...]]


def make_config(n: int, generations: int, **overrides: Any) -> EngineConfig:
    fields: dict[str, Any] = {
        "checkpoints": tuple(f"model-{i}" for i in range(n)),
        "tasks": {"math": 1.0, "code": 2.0, "chat": 0.5},
        "max_generations": generations,
        "seed": 42,
    }
    fields.update(overrides)
    return EngineConfig(**fields)


def _fingerprint(candidates: list[Candidate]) -> tuple[tuple[str, bytes], ...]:
    return tuple(
        (c.id, np.array(list(c.weights.values()), dtype=np.float64).tobytes()) for c in candidates
    )


def _fails(candidate: Candidate) -> bool:
    """A fixed, content-free choice of failures: slot 2 of every generation, one baseline."""
    return candidate.id.endswith("-c02") or candidate.id == "b-each-model-1"


def drive(
    config: EngineConfig, *, interrupt: bool, with_failures: bool = False
) -> tuple[Log, EngineState]:
    objective = objective_for(config, 7)
    state = init(config)
    log: Log = []
    step = 0
    while not done(state)[0]:
        if interrupt:
            state = roundtrip(state)
        state, pending = ask(state)
        log.append(_fingerprint(pending))
        if interrupt:
            state = roundtrip(state)
        chosen = pending[(7 * step) % len(pending)]  # scrambled telling order
        if with_failures and _fails(chosen):
            result = Result(chosen.id, failed=True, reason="node lost")
        else:
            result = objective.evaluate(chosen)
        state = tell(state, [result])
        step += 1
    return log, state


@pytest.mark.parametrize(("n", "generations"), CASES)
@pytest.mark.parametrize("start", ["uniform", "best-baseline"])
def test_restoring_at_every_ask_and_tell_changes_nothing(
    n: int, generations: int, start: str
) -> None:
    config = make_config(n, generations, start=start)
    straight_log, straight = drive(config, interrupt=False)
    restored_log, restored = drive(config, interrupt=True)
    assert len(straight_log) == config.baseline_trials - 1 + generations * config.popsize + 1
    assert restored_log == straight_log
    assert restored.to_json() == straight.to_json()
    assert straight.generations_completed == generations
    assert straight.replay_mismatches == 0 and restored.replay_mismatches == 0


@pytest.mark.parametrize(("n", "generations"), CASES)
@pytest.mark.parametrize("policy", ["penalize", "resample"])
@pytest.mark.parametrize("start", ["uniform", "best-baseline"])
def test_restoring_around_failures_changes_nothing(
    n: int, generations: int, policy: str, start: str
) -> None:
    config = make_config(n, generations, failure_policy=policy, start=start)
    straight_log, straight = drive(config, interrupt=False, with_failures=True)
    restored_log, restored = drive(config, interrupt=True, with_failures=True)
    assert restored_log == straight_log
    assert restored.to_json() == straight.to_json()
    assert straight.trials.failed >= generations
    if policy == "resample":
        assert any("-r1" in cid for entry in straight_log for cid, _ in entry)
    assert straight.replay_mismatches == 0 and restored.replay_mismatches == 0


@pytest.mark.parametrize(("n", "generations"), CASES)
@pytest.mark.parametrize("start", ["uniform", "best-baseline"])
def test_search_candidates_are_what_a_single_live_cma_run_asks(
    n: int, generations: int, start: str
) -> None:
    """The reference never serialises anything: one `CMAEvolutionStrategy`, ask and tell."""
    config = make_config(n, generations, start=start)
    objective = objective_for(config, 7)
    param = make_parameterization(config.parameterization, n)
    log, final = drive(config, interrupt=True)
    x0 = param.origin()
    if start == "best-baseline":
        x0 = param.from_weights(start_weights(config, final.baselines))
    settings = StrategySettings(tuple(x0), config.step_size, config.popsize)
    source = NormalSource(main_generator(config.seed))
    live = cma.CMAEvolutionStrategy(
        list(settings.x0), settings.sigma0, strategy_options(settings, source)
    )
    expected: list[list[bytes]] = []
    for _ in range(generations):
        samples = live.ask()
        weights = [param.to_weights(np.asarray(x)) for x in samples]
        expected.append([w.tobytes() for w in weights])
        fitness = [fitness_of(objective.scores(w), config.task_weights) for w in weights]
        live.tell(samples, [-f for f in fitness])  # cma minimises

    seen: dict[int, dict[str, bytes]] = {}
    for entry in log:
        for cid, blob in entry:
            if cid.startswith("g"):
                seen.setdefault(int(cid[1:4]), {})[cid] = blob
    got = [[seen[g][f"g{g:03d}-c{i:02d}"] for i in range(config.popsize)] for g in seen]
    assert got == expected
