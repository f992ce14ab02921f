"""The engine state: plain data, JSON in and out, bounded in size whatever the trial count.

A state is everything needed to continue a search: the config, the CMA-ES snapshot at the last
generation boundary, the main random stream's state at that boundary, the open generation's
samples and results so far, the baselines, and bounded summaries (best trial, Pareto front,
recent history, recent failures). Nothing in it grows with the number of trials.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mergesearch.engine.cmastate import CmaSnapshot
from mergesearch.engine.config import BaselineKind, EngineConfig
from mergesearch.engine.records import ScoredTrial

FORMAT = "mergesearch.engine/v1"

TrialStatus = Literal["pending", "succeeded", "failed"]
BaselineStatus = Literal["waiting", "pending", "succeeded", "failed", "skipped"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RngState(_Frozen):
    """A PCG64 state; the 128-bit integers are decimal strings (see `codec`)."""

    bit_generator: Literal["PCG64"]
    state: str = Field(pattern=r"^[0-9]{1,40}$")
    inc: str = Field(pattern=r"^[0-9]{1,40}$")
    has_uint32: int
    uinteger: int


class BaselineRecord(_Frozen):
    """One baseline. `members` share the weight equally (one for 'each', all for 'uniform').

    `waiting`: merge-best before every 'each' result is in. `same_as`: merge-best picked a
    single checkpoint, so it is that checkpoint's 'each' trial and costs no evaluation.
    """

    id: str
    kind: BaselineKind
    members: tuple[str, ...]
    seq: int | None = None
    status: BaselineStatus
    fitness: float | None = None
    scores: dict[str, float] | None = None
    reason: str | None = None
    same_as: str | None = None


class SlotRecord(_Frozen):
    """One position of the open generation's population; `attempt` > 0 after resampling."""

    slot: int = Field(ge=0)
    attempt: int = Field(ge=0)
    seq: int = Field(ge=0)
    status: TrialStatus
    fitness: float | None = None
    reason: str | None = None


class Replacement(_Frozen):
    """A resampled slot, in the order the replacement was asked (replayed in that order)."""

    slot: int = Field(ge=0)
    attempt: int = Field(ge=1)


class OpenGeneration(_Frozen):
    """A generation that was asked and not yet fully told.

    `samples` holds one search vector per slot, that of the slot's latest attempt (base64
    float64 rows in slot order, at most the population size whatever the resampling). They are
    what was evaluated, and what a replay of the asks from the boundary snapshot must reproduce
    bit for bit.
    """

    index: int = Field(ge=0)
    sigma: float
    samples: str
    replacements: tuple[Replacement, ...] = ()
    slots: tuple[SlotRecord, ...]
    penalty_floor: float


class GenerationSummary(_Frozen):
    """None (a generation without a success) is left out of the JSON, so it must default."""

    generation: int
    sigma: float
    best: float | None = None
    mean: float | None = None
    worst: float | None = None
    succeeded: int
    failed: int
    best_so_far: float | None = None


class ConfirmRecord(_Frozen):
    """One candidate re-scored on the confirmation examples once the search has ended.

    `source` is the trial it re-scores (a search candidate among the best, or a baseline);
    `search_fitness` is that trial's fitness on the search examples, kept for the side-by-side
    report; `fitness` and `scores` are the confirmation ones. Bounded: at most topK (<= 16)
    search trials and N + 2 baselines, whose weights are not stored twice.
    """

    id: str
    source: str
    kind: Literal["baseline", "search"]
    baseline: BaselineKind | None = None
    generation: int | None = None
    seq: int = Field(ge=0)
    status: TrialStatus
    weights: str | None = None  # a search trial's; a baseline's follow from its record
    search_fitness: float
    search_scores: dict[str, float]
    fitness: float | None = None
    scores: dict[str, float] | None = None
    reason: str | None = None


class TrialCounters(_Frozen):
    issued: int = 0
    succeeded: int = 0
    failed: int = 0


class FailureNote(_Frozen):
    id: str
    reason: str


class Finish(_Frozen):
    phase: Literal["succeeded", "failed"]
    reason: str
    message: str


class EngineState(_Frozen):
    """See the module docstring and docs/engine.md ("State format")."""

    format: Literal["mergesearch.engine/v1"] = FORMAT
    config: EngineConfig
    cma: CmaSnapshot
    rng: RngState
    generations_completed: int = Field(default=0, ge=0)
    # The start point (base64 float64 search vector) when it was chosen from the baselines'
    # results; None while it follows from the config alone.
    start: str | None = None
    generation: OpenGeneration | None = None
    search_stop: str | None = None
    baselines: tuple[BaselineRecord, ...] = ()
    trials: TrialCounters = TrialCounters()
    best: ScoredTrial | None = None
    # The best `config.confirm_top_k` search trials (fitness, then issue order), and the
    # confirmation trials once the search has ended (empty until then).
    leaders: tuple[ScoredTrial, ...] = ()
    confirmations: tuple[ConfirmRecord, ...] = ()
    pareto: tuple[ScoredTrial, ...] = ()
    history: tuple[GenerationSummary, ...] = ()
    worst_fitness: float | None = None
    best_reference: float | None = None
    last_improvement: int = 0
    recent_failures: tuple[FailureNote, ...] = ()
    replay_mismatches: int = 0
    finished: Finish | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; fields that are None are left out (they read back as None)."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_json(self) -> str:
        """Compact, key-sorted JSON; NaN and infinities are refused rather than written."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineState:
        return cls.model_validate(data)

    @classmethod
    def from_json(cls, text: str) -> EngineState:
        return cls.model_validate(json.loads(text))
