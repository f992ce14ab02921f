"""Engine runs shared by the unit tests of the engine and of the status document: the synthetic
objective of a configuration, a state's trip through text, and the one large search (64
checkpoints, a 5,000-trial budget) that the size bounds are checked on.

The large search is the scale the status must hold (a Kubernetes object is at most ~1.5 MiB,
and the operator keeps its status well under that): 64 checkpoints is the top of the product's
range, and 5,000 trials is more than a user's budget at that size.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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
from mergesearch.engine.synthetic import SyntheticObjective

LARGE_CHECKPOINTS = tuple(f"checkpoint-{i:02d}" for i in range(64))
LARGE_TASKS = ("gsm8k", "mbpp", "ifeval", "arc_challenge")
LARGE_BUDGET = 5000


def objective_for(config: EngineConfig, seed: int = 0) -> SyntheticObjective:
    """A seeded synthetic objective over the configuration's checkpoints and tasks."""
    return SyntheticObjective.random(config.checkpoints, tuple(t.name for t in config.tasks), seed)


def roundtrip(state: EngineState) -> EngineState:
    """Through text, as the operator's status or local mode's state file would carry it."""
    return EngineState.from_dict(json.loads(json.dumps(json.loads(state.to_json()))))


@dataclass(frozen=True)
class Told:
    """One tell of the large search: what the generation asked, the state the batch was told
    to, and the state after it."""

    asked: list[Candidate]
    before: EngineState
    after: EngineState


def large_search(
    seed: int,
    objective_seed: int,
    fails: Callable[[int, int], bool],
    reason: str,
    halves: bool = False,
) -> Iterator[Told]:
    """Runs a 64-checkpoint search to its 5,000-trial budget (failures resampled), yielding
    after every tell.

    `fails(told, i)` decides whether the i-th candidate of a batch fails (with `reason`), `told`
    being the number of results told before that batch. With `halves`, each generation is told
    in two batches (the first half, then the rest), as results trickle in on a cluster."""
    config = EngineConfig(
        checkpoints=LARGE_CHECKPOINTS,
        tasks=dict.fromkeys(LARGE_TASKS, 1.0),
        max_trials=LARGE_BUDGET,
        failure_policy="resample",
        seed=seed,
    )
    objective = SyntheticObjective.random(LARGE_CHECKPOINTS, LARGE_TASKS, objective_seed)
    state = init(config)
    told = 0
    while not done(state)[0]:
        _, candidates = ask(state)
        half = max(1, len(candidates) // 2)
        batches = (candidates[:half], candidates[half:]) if halves else (candidates,)
        for batch in batches:
            results = [
                Result(c.id, failed=True, reason=reason)
                if fails(told, i)
                else objective.evaluate(c)
                for i, c in enumerate(batch)
            ]
            told += len(batch)
            before, state = state, tell(state, results)
            yield Told(asked=candidates, before=before, after=state)
