"""From a MergeSearch spec to the engine's configuration (pure; shared by operator and local mode).

Some rules only the engine can check (a trial budget too small for the baselines, say); their
errors are reported against the spec field a user would edit, never the engine's field name.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from mergesearch.engine import EngineConfig, HeldInTask
from mergesearch.spec import MergeSearchSpec, SpecError

# engine field → the spec path a user edits
_FIELDS = {
    "checkpoints": "spec.checkpoints",
    "tasks": "spec.objective.heldIn",
    "parameterization": "spec.merge.parameterization",
    "population_size": "spec.search.populationSize",
    "sigma0": "spec.search.sigma0",
    "seed": "spec.search.seed",
    "start": "spec.search.start",
    "max_trials": "spec.search.maxTrials",
    "max_generations": "spec.search.maxGenerations",
    "target_fitness": "spec.search.targetFitness",
    "stagnation_generations": "spec.search.stagnationGenerations",
    "baselines": "spec.search.baselines",
    "failure_policy": "spec.search.failurePolicy",
    "confirm_top_k": "spec.search.confirm.topK",
    "max_failed_trials": "spec.execution.maxFailedTrials",
}


def engine_config(spec: MergeSearchSpec, source: str = "spec") -> EngineConfig:
    """The engine configuration a spec asks for; SpecError names the spec field on a problem."""
    search = spec.search
    try:
        return EngineConfig(
            checkpoints=tuple(spec.checkpoint_names),
            tasks=tuple(HeldInTask(name=t.task, weight=t.weight) for t in spec.objective.held_in),
            parameterization=spec.merge.parameterization,
            population_size=search.population_size,
            sigma0=search.sigma0,
            seed=search.seed,
            start=search.start,
            max_trials=search.max_trials,
            max_generations=search.max_generations,
            target_fitness=search.target_fitness,
            stagnation_generations=search.stagnation_generations,
            baselines=tuple(search.baselines),
            failure_policy=search.failure_policy,
            confirm_top_k=search.confirm.top_k if search.confirm.enabled else 0,
            max_failed_trials=spec.execution.max_failed_trials,
        )
    except ValidationError as exc:
        raise SpecError(source, [_spec_error(err) for err in exc.errors()]) from None


def _spec_error(err: Any) -> str:
    """Name the spec field: by the error's location, or (for a rule across fields) by the
    first engine field its message mentions, whose name is also rewritten to the spec's."""
    message = str(err["msg"]).removeprefix("Value error, ")
    loc = err["loc"]
    mentioned = [f for f in _FIELDS if f in message]
    field = _FIELDS.get(str(loc[0])) if loc else None
    field = field or (_FIELDS[mentioned[0]] if mentioned else "spec.search")
    for name in mentioned:
        message = message.replace(name, _FIELDS[name].rsplit(".", 1)[-1])
    return f"{field}: {message}"
