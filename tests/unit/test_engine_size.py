"""The state stays small whatever the number of trials: it must fit a Kubernetes status."""

from __future__ import annotations

import pytest

from mergesearch.engine import EngineState
from support.engine_runs import large_search

pytestmark = [pytest.mark.unit, pytest.mark.slow]  # ~300 generations of 64 checkpoints

LIMIT = 150 * 1024


def test_state_for_64_checkpoints_and_5000_trials_stays_bounded() -> None:
    sizes: list[tuple[int, int]] = []
    for step in large_search(
        seed=9,
        objective_seed=3,
        fails=lambda told, _: told % 23 == 5,
        reason="x" * 5000,  # long reasons are truncated
        halves=True,
    ):
        sizes.append((step.after.trials.issued, len(step.after.to_json())))
    state = step.after
    assert state.trials.issued >= 4900 and state.finished is not None
    assert state.finished.reason == "max_trials"
    largest = max(size for _, size in sizes)
    assert largest < LIMIT * 0.66, f"largest state {largest} bytes"
    early = max(size for issued, size in sizes if issued < 1000)
    late = max(size for issued, size in sizes if issued > 4000)
    assert late < early * 1.25  # bounded, not growing with the trial count
    assert EngineState.from_json(state.to_json()) == state
