"""The state stays small whatever the number of trials: it must fit a Kubernetes status."""

from __future__ import annotations

import pytest

from mergesearch.engine import EngineConfig, EngineState, Result, ask, done, init, tell
from mergesearch.engine.synthetic import SyntheticObjective

pytestmark = [pytest.mark.unit, pytest.mark.slow]  # ~300 generations of 64 checkpoints

LIMIT = 150 * 1024


def test_state_for_64_checkpoints_and_5000_trials_stays_bounded() -> None:
    checkpoints = tuple(f"checkpoint-{i:02d}" for i in range(64))
    tasks = ("gsm8k", "mbpp", "ifeval", "arc_challenge")
    config = EngineConfig(
        checkpoints=checkpoints,
        tasks=dict.fromkeys(tasks, 1.0),
        max_trials=5000,
        failure_policy="resample",
        seed=9,
    )
    objective = SyntheticObjective.random(checkpoints, tasks, 3)
    state = init(config)
    sizes: list[tuple[int, int]] = []
    told = 0
    while not done(state)[0]:
        _, candidates = ask(state)
        half = max(1, len(candidates) // 2)
        for batch in (candidates[:half], candidates[half:]):
            results = [
                Result(c.id, failed=True, reason="x" * 5000)  # long reasons are truncated
                if told % 23 == 5
                else objective.evaluate(c)
                for c in batch
            ]
            told += len(batch)
            state = tell(state, results)
            sizes.append((state.trials.issued, len(state.to_json())))
    assert state.trials.issued >= 4900 and state.finished is not None
    assert state.finished.reason == "max_trials"
    largest = max(size for _, size in sizes)
    assert largest < LIMIT * 0.66, f"largest state {largest} bytes"
    early = max(size for issued, size in sizes if issued < 1000)
    late = max(size for issued, size in sizes if issued > 4000)
    assert late < early * 1.25  # bounded, not growing with the trial count
    assert EngineState.from_json(state.to_json()) == state
