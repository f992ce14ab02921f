"""The MergeSearch status document: its typed model, its phases and reasons, and how it is built
(pure, bounded in size).

`MergeSearchStatus` is the one description of the document: the operator builds it here, every
reader (reconcile, events, metrics, the CLI) reads it through its fields, and the CRD's status
schema is generated from it (`mergesearch.crd`), so what the operator writes and what the API
server accepts cannot drift apart. On the wire it is camelCase with unset fields left out,
exactly as the dict it replaced, so `kubectl get` columns and every reader keep working.

Everything here is a function of the engine state plus a few operator fields, and nothing
grows with the number of trials: the engine keeps a bounded history and Pareto front, baselines
are listed without their (implied) weights, failures are the last ten, and the operator's own
bookkeeping (`activeTrials`) is bounded by spec.execution.parallelism. A 64-checkpoint,
5000-trial search stays far below the 256 KiB budget (tests/unit/test_operator_status.py).
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Mapping, Sequence
from enum import Enum, StrEnum
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from mergesearch import engine
from mergesearch.engine.state import FailureNote, GenerationSummary

MESSAGE_CHARS = 1000
TEXT_CHARS = 300  # a failure's reason as the engine, events and the status carry it
SIZE_BUDGET = 256 * 1024


def one_line(text: str, limit: int = TEXT_CHARS) -> str:
    """`text` on one line (whitespace runs collapsed), at most `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- phases and reasons


class Phase(StrEnum):
    """The search's phase (status.phase, the PHASE column)."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def ended(self) -> bool:
        """Nothing runs any more (until a repair, for a recoverable failure)."""
        return self in (Phase.SUCCEEDED, Phase.FAILED)


class Finality(Enum):
    """What a reason says about the search's future."""

    PROGRESS = "progress"  # the search goes on (or waits for something that clears by itself)
    RECOVERABLE = "recoverable"  # failed until repaired: an edit of the spec (or of what it
    # names: a Secret, an image, an admission rule) resumes it where it was
    TERMINAL = "terminal"  # over: its completion time is set, nothing resumes it


class Reason(StrEnum):
    """Every reason the operator writes in a condition (CamelCase, as Kubernetes wants), with
    its finality. Decisions are made from these members, never from message text."""

    finality: Finality

    def __new__(cls, value: str, finality: Finality = Finality.PROGRESS) -> Reason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.finality = finality
        return member

    # a running search (Ready / Progressing)
    PREFLIGHT = "Preflight"
    BASELINES = "Baselines"
    SEARCHING = "Searching"
    SUSPENDED = "Suspended"
    FINALIZING = "Finalizing"
    SUCCEEDED = "Succeeded", Finality.TERMINAL
    NO_FAILURE = "NoFailure"
    # failures a user repairs by editing the spec (the generation changes); `SpecChanged`
    # too: a spec edited back to what the search started with carries on
    SPEC_INVALID = "SpecInvalid", Finality.RECOVERABLE
    TEMPLATE_INVALID = "TemplateInvalid", Finality.RECOVERABLE
    INTERNAL_ERROR = "InternalError", Finality.RECOVERABLE
    SPEC_CHANGED = "SpecChanged", Finality.RECOVERABLE
    # pod configuration repaired outside the spec (a missing Secret or ConfigMap, an image
    # that cannot be used, pods that admission refuses); any edit (e.g. toggling `suspend`)
    # then resumes the search
    POD_CONFIG_INVALID = "PodConfigInvalid", Finality.RECOVERABLE
    IMAGE_INVALID = "ImageInvalid", Finality.RECOVERABLE
    VOLUME_UNAVAILABLE = "VolumeUnavailable", Finality.RECOVERABLE
    POD_REFUSED = "PodRefused", Finality.RECOVERABLE
    # failures that end the search
    STATE_INVALID = "StateInvalid", Finality.TERMINAL
    MAX_FAILED_TRIALS = "MaxFailedTrials", Finality.TERMINAL
    NO_SUCCESSFUL_TRIAL = "NoSuccessfulTrial", Finality.TERMINAL
    SEARCH_FAILED = "SearchFailed", Finality.TERMINAL
    EVALUATORS_FAILED = "EvaluatorsFailed", Finality.TERMINAL
    FINALIZATION_FAILED = "FinalizationFailed", Finality.TERMINAL
    PREFLIGHT_FAILED = "PreflightFailed", Finality.TERMINAL
    STORAGE_UNREACHABLE = "StorageUnreachable", Finality.TERMINAL
    TRIAL_REJECTED = "TrialRejected", Finality.TERMINAL
    CHECKPOINT_UNAVAILABLE = "CheckpointUnavailable", Finality.TERMINAL
    CHECKPOINT_INVALID = "CheckpointInvalid", Finality.TERMINAL
    CHECKPOINTS_INCOMPATIBLE = "CheckpointsIncompatible", Finality.TERMINAL
    UNKNOWN_TASK = "UnknownTask", Finality.TERMINAL
    UNKNOWN_METRIC = "UnknownMetric", Finality.TERMINAL
    DATA_MISSING = "DataMissing", Finality.TERMINAL
    CONFIG_INVALID = "ConfigInvalid", Finality.TERMINAL
    OUT_OF_MEMORY = "OutOfMemory", Finality.TERMINAL
    # the wait conditions (they clear by themselves)
    PASSED = "Passed"
    JOB_QUOTA = "JobQuota"
    JOBS_CREATED = "JobsCreated"
    RETRYING_TRIALS = "RetryingTrials"
    REACHABLE = "Reachable"
    PODS_RUNNING = "Running"
    IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
    UNSCHEDULABLE = "Unschedulable"

    @property
    def recoverable(self) -> bool:
        return self.finality is Finality.RECOVERABLE

    @property
    def terminal(self) -> bool:
        return self.finality is Finality.TERMINAL

    @classmethod
    def of(cls, text: str | None) -> Reason | None:
        """The member written as `text`; None for a reason this operator does not write."""
        try:
            return cls(text) if text else None
        except ValueError:
            return None


class ConditionType(StrEnum):
    READY = "Ready"
    PROGRESSING = "Progressing"
    FAILED = "Failed"
    PREFLIGHT = "Preflight"
    # Conditions about what the search waits for; each appears once it was first True, and
    # then stays (False once the wait is over), so a reader sees when it cleared.
    QUOTA_EXCEEDED = "QuotaExceeded"
    STORAGE_UNAVAILABLE = "StorageUnavailable"
    TRIALS_BLOCKED = "TrialsBlocked"


# --------------------------------------------------------------------------- the model


_WIRE = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class _Wire(BaseModel):
    """camelCase on the wire, unset fields left out. Fields this version does not know (an
    older or newer operator's) are ignored on reading."""

    model_config = _WIRE

    def to_wire(self) -> dict[str, Any]:
        """As JSON on the wire (what the API server stores)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


Scores = dict[str, float]


class Condition(_Wire):
    type: str
    value: Literal["True", "False", "Unknown"] = Field(alias="status")
    reason: str | None = None
    message: str | None = None
    last_transition_time: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}
    )
    observed_generation: int | None = None

    @property
    def holds(self) -> bool:
        return self.value == "True"


class TrialCounts(_Wire):
    """Trials issued (`total`) and how they stand; `running` counts the final evaluation too."""

    total: int = 0
    succeeded: int = 0
    failed: int = 0
    finished: int = 0
    running: int = 0


class SearchProgress(_Wire):
    """status.search: CMA-ES's step size and mean, generations completed, why it stopped."""

    sigma: float | None = None
    generations_completed: int | None = None
    mean_weights: Scores | None = None
    stop_reason: str | None = None
    replay_mismatches: int | None = None


class BaselineEntry(_Wire):
    """A baseline without its weights: 'each' and 'merge-best' name their `members` (equal
    weights), 'uniform' is every checkpoint; the weights would only repeat that."""

    id: str
    kind: str
    outcome: str = Field(alias="status")  # pending, waiting, succeeded, failed
    fitness: float | None = None
    scores: Scores | None = None
    reason: str | None = None
    same_as: str | None = None
    members: list[str] | None = None


class TrialEntry(_Wire):
    """A succeeded trial (the best, the Pareto front). `generation`: the CMA-ES generation
    that issued it (None for a baseline). `heldOut`: the held-out scores of the merge the
    search hands over, once its final evaluation ran."""

    trial: str
    kind: str
    generation: int | None = None
    fitness: float
    scores: Scores
    weights: Scores
    held_out: Scores | None = None


class WinnerEntry(TrialEntry):
    """The confirmed winner: `fitness` and `scores` on the confirmation examples, the search's
    beside them."""

    baseline: str | None = None
    search_fitness: float
    search_scores: Scores


class ConfirmationEntry(_Wire):
    """One finalist: its fitness on the search's examples beside that on unseen ones."""

    trial: str
    kind: str
    baseline: str | None = None
    outcome: str = Field(alias="status")  # pending, succeeded, failed
    search_fitness: float
    fitness: float | None = None
    reason: str | None = None


class GenerationEntry(GenerationSummary):
    """One completed CMA-ES generation (the last 50 are kept): the engine's own record, on
    the wire in camelCase."""

    model_config = _WIRE


class FailureEntry(FailureNote):
    """One of the ten most recent failures: the engine's own record."""

    model_config = _WIRE


class RetryEntry(_Wire):
    """A trial that waits to run again after a transient failure (not told to the engine)."""

    trial: str
    attempt: int
    not_before: str | None = None
    reason: str | None = None


FinalizationState = Literal["Running", "Retrying", "Succeeded", "Failed"]


class Finalization(_Wire):
    """status.final: the Job that evaluates the chosen merge on held-out tasks and exports it.
    `retryRequest`: the value of the retry annotation last acted on."""

    job: str | None = None
    trial: str | None = None
    state: FinalizationState | None = None
    attempt: int | None = None
    not_before: str | None = None
    error: str | None = None
    kind: str | None = None
    retry_request: str | None = None


class OutputEntry(_Wire):
    uri: str | None = None
    digest: str | None = None


class LeaseEntry(_Wire):
    """Warm mode: an active candidate and the evaluator pod holding it (none: waiting)."""

    trial: str
    issued: int = 0
    evaluator: str | None = None
    since: str | None = None
    expires: str | None = None


class EvaluatorCounts(_Wire):
    """Warm mode: evaluator pods wanted, running, ready, busy (leasing), and what the running
    ones fetched from storage."""

    wanted: int = 0
    running: int = 0
    ready: int = 0
    busy: int = 0
    bytes_fetched: int | None = None


class MergeSearchStatus(_Wire):
    """The whole status document."""

    phase: Phase | None = None
    observed_generation: int | None = Field(
        default=None, description="metadata.generation of the spec this status answers."
    )
    iteration: int | None = Field(default=None, description="The current CMA-ES generation.")
    trials: TrialCounts | None = None
    search: SearchProgress | None = None
    best: TrialEntry | None = None
    best_fitness: str | None = Field(default=None, description="best.fitness, 4 decimals.")
    winner: WinnerEntry | None = None
    winner_fitness: str | None = Field(
        default=None,
        description="winner.fitness (on the confirmation examples), 4 decimals.",
    )
    confirmation: list[ConfirmationEntry] | None = None
    baselines: list[BaselineEntry] | None = None
    history: list[GenerationEntry] | None = None
    pareto_front: list[TrialEntry] | None = None
    recent_failures: list[FailureEntry] | None = None
    active_trials: list[str] | None = None
    retries: list[RetryEntry] | None = None
    finalization: Finalization | None = Field(default=None, alias="final")
    output: OutputEntry | None = None
    leases: list[LeaseEntry] | None = None
    evaluators: EvaluatorCounts | None = None
    conditions: list[Condition] | None = Field(
        default=None,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    completion_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    # The engine state as one opaque string (see `encode_state`), or the nested document
    # earlier operator versions wrote: the one open part of the document.
    optimizer: str | dict[str, Any] | None = Field(
        default=None,
        description="The optimizer's state (compressed canonical JSON; opaque).",
    )

    # reading ---------------------------------------------------------------------------

    @classmethod
    def read(cls, data: Mapping[str, Any] | None) -> MergeSearchStatus:
        """The status as the API server returned it. A top-level field that does not fit the
        model (a hand edit, an older operator's shape) is dropped rather than failing the
        whole document; the operator rewrites it on its next status write."""
        doc = dict(data or {})
        for _ in range(len(doc) + 1):
            try:
                return cls.model_validate(doc)
            except ValidationError as exc:
                bad = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
                if not bad & set(doc):
                    raise
                doc = {k: v for k, v in doc.items() if k not in bad}
        return cls()

    def condition(self, type: str) -> Condition | None:
        for cond in self.conditions or ():
            if cond.type == type:
                return cond
        return None

    def holds(self, type: str) -> bool:
        """Whether condition `type` is there and True."""
        cond = self.condition(type)
        return cond is not None and cond.holds

    def failed_reason(self) -> Reason | str | None:
        """The reason of a True `Failed` condition (a string this operator does not write
        stays a string: it is treated as terminal)."""
        cond = self.condition(ConditionType.FAILED)
        if cond is None or not cond.holds:
            return None
        return Reason.of(cond.reason) or cond.reason

    def chosen(self) -> TrialEntry | None:
        """The merge a finished search hands over: the confirmed winner, else the best."""
        return self.winner or self.best


# --------------------------------------------------------------------------- conditions


class Wait(NamedTuple):
    """A wait condition's content: whether it holds, its reason and message."""

    holds: bool
    reason: Reason
    message: str


def set_condition(
    conditions: Sequence[Condition],
    *,
    type: str,
    holds: bool,
    reason: str,
    message: str,
    now: str,
    spec_generation: int | None,
) -> list[Condition]:
    """Upsert one condition; lastTransitionTime moves only when whether it holds flips."""
    value: Literal["True", "False"] = "True" if holds else "False"
    out: list[Condition] = []
    found = False
    for cond in conditions:
        if cond.type != type:
            out.append(cond)
            continue
        found = True
        when = now if cond.value != value else (cond.last_transition_time or now)
        out.append(_condition(type, value, reason, message, when, spec_generation))
    if not found:
        out.append(_condition(type, value, reason, message, now, spec_generation))
    return out


def _condition(
    type: str,
    value: Literal["True", "False"],
    reason: str,
    message: str,
    when: str,
    spec_generation: int | None,
) -> Condition:
    return Condition(
        type=type,
        value=value,
        reason=str(reason),
        message=one_line(message, MESSAGE_CHARS),
        last_transition_time=when,
        observed_generation=spec_generation,
    )


def phase_conditions(
    conditions: Sequence[Condition],
    *,
    phase: Phase,
    reason: Reason,
    message: str,
    now: str,
    spec_generation: int | None,
) -> list[Condition]:
    """Ready / Progressing / Failed for a phase; `reason` is the phase's reason.

    | phase      | Ready | Progressing | Failed |
    |------------|-------|-------------|--------|
    | Pending    | False | True        | False  |
    | Running    | False | True        | False  |
    | Suspended  | False | False       | False  |
    | Succeeded  | True  | False       | False  |
    | Failed     | False | False       | True   |
    """
    out = list(conditions)
    for type, holds in (
        (ConditionType.READY, phase is Phase.SUCCEEDED),
        (ConditionType.PROGRESSING, phase in (Phase.PENDING, Phase.RUNNING)),
        (ConditionType.FAILED, phase is Phase.FAILED),
    ):
        quiet = not holds and type is ConditionType.FAILED
        out = set_condition(
            out,
            type=type,
            holds=holds,
            reason=Reason.NO_FAILURE if quiet else reason,
            message="no failure" if quiet else message,
            now=now,
            spec_generation=spec_generation,
        )
    return out


def wait_conditions(
    conditions: Sequence[Condition],
    waits: Mapping[str, Wait],
    *,
    now: str,
    spec_generation: int | None,
) -> list[Condition]:
    """Upsert the wait conditions in `waits` (type → Wait); one that does not hold is only
    written when the condition is already there."""
    out = list(conditions)
    present = {c.type for c in out}
    for type, wait in waits.items():
        if wait.holds or type in present:
            out = set_condition(
                out,
                type=type,
                holds=wait.holds,
                reason=wait.reason,
                message=wait.message,
                now=now,
                spec_generation=spec_generation,
            )
    return out


# --------------------------------------------------------------------------- the engine's fields


# status.optimizer: the engine state as ONE string, so that `kubectl describe` shows one line
# where the nested document took ~150 (base64 arrays, RNG state) above the useful fields.
# Canonical JSON (EngineState.to_json), zlib-compressed, base64: lossless, so a restart
# resumes exactly; plain data, never unpickled or evaluated. Cost, measured: encode 0.5 ms
# (3 checkpoints, 3.4 KB of JSON → 1.6 KB) to 4 ms (64 checkpoints, 48 KB → 38 KB) per status
# write, against ~50 ms of operator CPU per trial (docs/operator.md, "Benchmark").
STATE_PREFIX = "engine-json+zlib+base64:"
STATE_MAX_BYTES = 16 * 1024 * 1024  # decompressed: no zip bomb gets past this


def encode_state(state: engine.EngineState) -> str:
    packed = zlib.compress(state.to_json().encode(), 9)
    return STATE_PREFIX + base64.b64encode(packed).decode()


def decode_state(value: Any) -> engine.EngineState:
    """The engine state from status.optimizer: the encoded string, or the nested document
    written by earlier operator versions. Raises ValueError when it is not one."""
    if isinstance(value, Mapping):
        return engine.EngineState.from_dict(dict(value))
    if not isinstance(value, str) or not value.startswith(STATE_PREFIX):
        raise ValueError(f"not an encoded engine state (expected the prefix {STATE_PREFIX!r})")
    try:
        packed = base64.b64decode(value[len(STATE_PREFIX) :], validate=True)
        inflater = zlib.decompressobj()
        text = inflater.decompress(packed, STATE_MAX_BYTES)
    except (ValueError, zlib.error) as exc:
        raise ValueError(f"corrupt engine state: {exc}") from None
    if inflater.unconsumed_tail:
        raise ValueError(f"engine state larger than {STATE_MAX_BYTES} bytes")
    return engine.EngineState.from_json(text.decode())


def fitness_text(fitness: float | None) -> str | None:
    """The BEST printer column: 4 decimals (a full float's 16 digits are noise to a reader)."""
    return None if fitness is None else f"{fitness:.4f}"


def _baseline(entry: Mapping[str, Any]) -> BaselineEntry:
    return BaselineEntry(
        id=entry["id"],
        kind=entry["kind"],
        outcome=entry["status"],
        fitness=entry.get("fitness"),
        scores=entry.get("scores"),
        reason=entry.get("reason"),
        same_as=entry.get("same_as"),
        members=None if entry["kind"] == "uniform" else list(entry.get("members") or []),
    )


def _trial(entry: Mapping[str, Any]) -> TrialEntry:
    return TrialEntry(
        trial=entry["id"],
        kind=entry["kind"],
        generation=entry.get("generation"),
        fitness=entry["fitness"],
        scores=entry["scores"],
        weights=entry["weights"],
    )


def _confirmation(entry: Mapping[str, Any]) -> ConfirmationEntry:
    return ConfirmationEntry(
        trial=entry["source"],
        kind=entry["kind"],
        baseline=entry.get("baseline"),
        outcome=entry["status"],
        search_fitness=entry["search_fitness"],
        fitness=entry.get("fitness"),
        reason=entry.get("reason"),
    )


def _winner(entry: Mapping[str, Any]) -> WinnerEntry:
    return WinnerEntry(
        trial=entry["id"],
        kind=entry["kind"],
        baseline=entry.get("baseline"),
        generation=entry.get("generation"),
        fitness=entry["fitness"],
        search_fitness=entry["searchFitness"],
        scores=entry["scores"],
        search_scores=entry["searchScores"],
        weights=entry["weights"],
    )


def engine_fields(state: engine.EngineState) -> MergeSearchStatus:
    """A status holding only the fields the engine's state determines."""
    summary = engine.status(state)
    best = None if summary.best is None else _trial(summary.best)
    winner = None if summary.winner is None else _winner(summary.winner)
    return MergeSearchStatus(
        iteration=summary.generation,
        trials=TrialCounts(
            total=summary.trials_issued,
            succeeded=summary.trials_succeeded,
            failed=summary.trials_failed,
            finished=summary.trials_succeeded + summary.trials_failed,
        ),
        search=SearchProgress(
            sigma=summary.sigma,
            generations_completed=summary.generations_completed,
            mean_weights=summary.mean_weights,
            stop_reason=summary.reason,
            replay_mismatches=summary.replay_mismatches or None,
        ),
        baselines=[_baseline(b) for b in summary.baselines],
        history=[GenerationEntry.model_validate(h) for h in summary.history],
        pareto_front=[_trial(p) for p in summary.pareto],
        recent_failures=[FailureEntry.model_validate(f) for f in summary.recent_failures],
        optimizer=encode_state(state),
        best=best,
        best_fitness=None if best is None else fitness_text(best.fitness),
        confirmation=[_confirmation(c) for c in summary.confirmation] or None,
        winner=winner,
        winner_fitness=None if winner is None else fitness_text(winner.fitness),
    )


# The fields the operator decides itself (the others follow from the engine's state).
_OPERATOR_FIELDS = frozenset(
    {
        "retries",
        "phase",
        "conditions",
        "observed_generation",
        "active_trials",
        "finalization",
        "output",
        "completion_time",
    }
)


def build_status(
    *,
    state: engine.EngineState | None,
    phase: Phase,
    reason: Reason,
    message: str,
    previous: MergeSearchStatus,
    active: Sequence[str],
    now: str,
    spec_generation: int | None,
    finalization: Finalization | None = None,
    output: OutputEntry | None = None,
    held_out: Mapping[str, float] | None = None,
    retries: Sequence[RetryEntry] = (),
    waits: Mapping[str, Wait] | None = None,
) -> MergeSearchStatus:
    """The whole status document. Without an engine state (an invalid spec before the search
    started), the previous document's engine fields are kept as they were. A completion time
    is set once the search ended for good (a terminal reason), and kept."""
    if state is not None:
        doc = engine_fields(state)
    else:
        doc = previous.model_copy(update=dict.fromkeys(_OPERATOR_FIELDS))
    running = len(active) + int(finalization is not None and finalization.state == "Running")
    trials = (doc.trials or TrialCounts()).model_copy(update={"running": running})
    chosen = "winner" if doc.winner is not None else "best"  # the merge the search hands over
    entry = getattr(doc, chosen)
    update: dict[str, Any] = {}
    if held_out and entry is not None:
        update[chosen] = entry.model_copy(update={"held_out": dict(held_out)})
    conditions = phase_conditions(
        previous.conditions or [],
        phase=phase,
        reason=reason,
        message=message,
        now=now,
        spec_generation=spec_generation,
    )
    if waits:
        conditions = wait_conditions(conditions, waits, now=now, spec_generation=spec_generation)
    terminal = phase.ended and reason.terminal
    return doc.model_copy(
        update={
            **update,
            "trials": trials,
            "iteration": doc.iteration or 0,
            "phase": phase,
            "observed_generation": spec_generation,
            "active_trials": list(active),
            "conditions": conditions,
            "retries": list(retries) or None,
            "finalization": finalization,
            "output": output,
            "completion_time": (previous.completion_time or now) if terminal else None,
        }
    )


def size_of(status: MergeSearchStatus) -> int:
    """Bytes of the status as compact JSON (what the API server stores, give or take)."""
    return len(json.dumps(status.to_wire(), separators=(",", ":")).encode())
