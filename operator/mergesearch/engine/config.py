"""The engine's configuration: everything a search's candidates depend on, validated once.

The config travels inside the engine state, so a state alone is enough to continue a search
and a state can never be continued under a different config by accident.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mergesearch.engine.parameterization import ParameterizationKind

BaselineKind = Literal["each", "uniform", "merge-best"]
FailurePolicy = Literal["penalize", "resample"]

BASELINE_ORDER: tuple[BaselineKind, ...] = ("each", "uniform", "merge-best")


class HeldInTask(BaseModel):
    """A held-in task and its weight in the fitness (the weighted mean of task scores)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0)

    @field_validator("weight")
    @classmethod
    def _finite(cls, weight: float) -> float:
        if not math.isfinite(weight):
            raise ValueError("task weight must be finite")
        return weight


def _duplicates(items: list[str]) -> list[str]:
    return sorted(x for x, count in Counter(items).items() if count > 1)


# Default initial step sizes. On the simplex, useful weights span log-ratios of about ±3
# (1:20); CMA-ES wants sigma0 around a fifth to a third of the range. Measured on the toy
# pool (bench/search.py, 3 seeds, 100 trials): sigma0 0.3 reached 0.751, 0.6 0.773, 1.0 0.778
# on the search's examples; at 0.3 the step size was still growing when the budget ran out. On
# unseen examples (20 seeds) 0.5 scored higher than 1.0, by straying less from the baselines,
# which is the confirmation stage's job: 1.0 stays (docs/engine.md, "Against Optuna's CMA-ES").
SIMPLEX_SIGMA0 = 1.0
UNCONSTRAINED_SIGMA0 = 0.5


class EngineConfig(BaseModel):
    """Search settings; see docs/engine.md for each field's meaning."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    checkpoints: tuple[str, ...] = Field(min_length=2)
    tasks: tuple[HeldInTask, ...] = Field(min_length=1)
    parameterization: ParameterizationKind = "simplex"
    population_size: int | None = Field(default=None, ge=3)
    sigma0: float | None = Field(default=None, gt=0)
    seed: int = Field(default=0, ge=0, lt=2**63)
    max_trials: int | None = Field(default=None, ge=1)
    max_generations: int | None = Field(default=None, ge=0)
    target_fitness: float | None = None
    stagnation_generations: int | None = Field(default=None, ge=1)
    stagnation_tolerance: float = Field(default=1e-4, ge=0)
    baselines: tuple[BaselineKind, ...] = BASELINE_ORDER
    start: Literal["uniform", "best-baseline"] | dict[str, float] = "uniform"
    failure_policy: FailurePolicy = "penalize"
    max_failed_trials: int | None = Field(default=None, ge=0)
    max_resamples: int = Field(default=3, ge=0)
    # When the search ends, the best `confirm_top_k` search candidates and every baseline are
    # scored again on examples the search never saw; the winner is chosen on those. 0: off.
    confirm_top_k: int = Field(default=0, ge=0, le=16)
    history_limit: int = Field(default=50, ge=1)
    pareto_limit: int = Field(default=16, ge=1)

    @property
    def task_weights(self) -> dict[str, float]:
        """The held-in tasks' weights by name, as `mergerunner.trial.fitness_of` takes them."""
        return {t.name: t.weight for t in self.tasks}

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks_from_mapping(cls, value: Any) -> Any:
        """Accept {task: weight} as well as a list of {name, weight}; order is kept."""
        if isinstance(value, Mapping):
            return tuple({"name": k, "weight": v} for k, v in value.items())
        return value

    @field_validator("baselines")
    @classmethod
    def _canonical_baselines(cls, value: tuple[BaselineKind, ...]) -> tuple[BaselineKind, ...]:
        twice = _duplicates(list(value))
        if twice:
            raise ValueError(f"each baseline may be listed once: {twice}")
        return tuple(b for b in BASELINE_ORDER if b in value)

    @model_validator(mode="after")
    def _consistent(self) -> EngineConfig:
        names = list(self.checkpoints)
        if any(not n for n in names) or _duplicates(names):
            raise ValueError(f"checkpoint names must be non-empty and unique: {_duplicates(names)}")
        task_names = [t.name for t in self.tasks]
        if _duplicates(task_names):
            raise ValueError(f"held-in tasks must be unique: {_duplicates(task_names)}")
        for field in ("sigma0", "target_fitness", "stagnation_tolerance"):
            value = getattr(self, field)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{field} must be finite")
        if "merge-best" in self.baselines and "each" not in self.baselines:
            raise ValueError("the merge-best baseline needs the each baseline")
        if self.max_trials is None and self.max_generations is None:
            raise ValueError("set max_trials or max_generations so that the search ends")
        if self.max_trials is not None and self.max_trials < self.baseline_trials:
            raise ValueError(
                f"max_trials={self.max_trials} does not cover the {self.baseline_trials} "
                "baseline trials"
            )
        self._check_start()
        return self

    def _check_start(self) -> None:
        if self.start == "best-baseline":
            if not self.baselines:
                raise ValueError("start 'best-baseline' needs at least one baseline")
            return
        if self.start == "uniform":
            return
        if sorted(self.start) != sorted(self.checkpoints):
            raise ValueError("start weights must name every checkpoint exactly once")
        values = list(self.start.values())
        if not all(math.isfinite(v) for v in values):
            raise ValueError("start weights must be finite")
        if self.parameterization == "simplex" and min(values) <= 0:
            raise ValueError("simplex start weights must be strictly positive")

    @property
    def step_size(self) -> float:
        """sigma0, else the default of the parameterization: SIMPLEX_SIGMA0 in log-ratio
        units, UNCONSTRAINED_SIGMA0/N in weight units (the start weights are 1/N)."""
        if self.sigma0 is not None:
            return self.sigma0
        if self.parameterization == "simplex":
            return SIMPLEX_SIGMA0
        return UNCONSTRAINED_SIGMA0 / self.n_checkpoints

    @property
    def n_checkpoints(self) -> int:
        return len(self.checkpoints)

    @property
    def popsize(self) -> int:
        """The configured population, else 4+⌊3 ln N⌋ with N the number of checkpoints."""
        if self.population_size is not None:
            return self.population_size
        return 4 + math.floor(3 * math.log(self.n_checkpoints))

    @property
    def baseline_trials(self) -> int:
        """Trials the baselines may need (merge-best can turn out to need none)."""
        count = self.n_checkpoints if "each" in self.baselines else 0
        return count + ("uniform" in self.baselines) + ("merge-best" in self.baselines)
