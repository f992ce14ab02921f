"""What goes in and out of the engine: candidates, results, and how a result is scored."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mergerunner.trial import fitness_of
from mergesearch.engine.codec import decode_f8
from mergesearch.engine.config import EngineConfig

CandidateKind = Literal["baseline", "search"]
# "confirmation": a candidate scored again, on the held-in examples the search never saw.
Subset = Literal["search", "confirmation"]
REASON_CHARS = 300


@dataclass(frozen=True)
class Candidate:
    """A merge to evaluate. `id` is stable: asking twice yields the same ids and weights.

    `generation` is None for baselines. `baseline` names the baseline ("each", "uniform",
    "merge-best") and is None for search candidates. A confirmation candidate (`subset`
    "confirmation") re-scores the trial `source` (of `kind`) on the unseen held-in examples.
    """

    id: str
    kind: CandidateKind
    generation: int | None
    weights: dict[str, float]
    baseline: str | None = None
    subset: Subset = "search"
    source: str | None = None


@dataclass(frozen=True)
class Result:
    """The outcome of evaluating one candidate: per-task scores, or a failure with a reason."""

    candidate_id: str
    scores: Mapping[str, float] | None = None
    failed: bool = False
    reason: str | None = None

    @classmethod
    def coerce(cls, value: Result | Mapping[str, Any]) -> Result:
        """A `Result`, or a mapping with `candidate_id` (or `id`), `scores`, `failed`, `reason`."""
        if isinstance(value, Result):
            return value
        return cls(
            candidate_id=str(value["candidate_id"] if "candidate_id" in value else value["id"]),
            scores=value.get("scores"),
            failed=bool(value.get("failed", False)),
            reason=value.get("reason"),
        )


@dataclass(frozen=True)
class Outcome:
    """A result as the engine understands it: held-in scores and fitness, or a failure."""

    failed: bool
    fitness: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    reason: str | None = None


@dataclass(frozen=True)
class TellReport:
    """Which results a `tell` applied and which it ignored, with why (for logs and events)."""

    applied: tuple[str, ...]
    ignored: tuple[tuple[str, str], ...]


class ScoredTrial(BaseModel):
    """A succeeded trial with its fitness, as the state keeps it (the best one, the leaders,
    the Pareto front).

    `weights` are base64 float64 in the config's checkpoint order (see `codec`: exact and half
    the size of decimals, which matters with a Pareto front of 64-checkpoint merges); `seq` is
    the order of issue, used to break ties so that the best trial does not depend on the order
    results arrive in.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    seq: int = Field(ge=0)
    kind: CandidateKind
    generation: int | None = None
    fitness: float
    scores: dict[str, float]
    weights: str

    def weight_vector(self, n: int) -> np.ndarray:
        return decode_f8(self.weights, n)

    def to_public(self, checkpoints: tuple[str, ...]) -> dict[str, Any]:
        weights = self.weight_vector(len(checkpoints))
        return {
            "id": self.id,
            "kind": self.kind,
            "generation": self.generation,
            "fitness": self.fitness,
            "scores": dict(self.scores),
            "weights": {n: float(w) for n, w in zip(checkpoints, weights, strict=True)},
        }


def truncate_reason(reason: str | None) -> str:
    text = (reason or "failed").strip() or "failed"
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


def _as_score(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def score_result(config: EngineConfig, result: Result) -> Outcome:
    """Turn a result into an outcome; a result without usable held-in scores is a failure."""
    if result.failed:
        return Outcome(failed=True, reason=truncate_reason(result.reason))
    if result.scores is None:
        return Outcome(failed=True, reason="result has no scores")
    held_in: dict[str, float] = {}
    for task in config.tasks:
        if task.name not in result.scores:
            return Outcome(failed=True, reason=f"missing score for held-in task {task.name!r}")
        score = _as_score(result.scores[task.name])
        if score is None:
            return Outcome(failed=True, reason=f"score for task {task.name!r} is not finite")
        held_in[task.name] = score
    return Outcome(failed=False, fitness=fitness_of(held_in, config.task_weights), scores=held_in)
