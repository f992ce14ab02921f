"""The MergeSearch status document and its conditions (pure, bounded in size).

Everything here is a function of the engine state plus a few operator fields, and nothing
grows with the number of trials: the engine keeps a bounded history and Pareto front, baselines
are listed without their (implied) weights, failures are the last ten, and the operator's own
bookkeeping (`activeTrials`) is bounded by spec.execution.parallelism. A 64-checkpoint,
5000-trial search stays far below the 256 KiB budget (tests/unit/test_operator_status.py).
"""

from __future__ import annotations

import base64
import json
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from mergesearch import engine
from mergesearch.operator.observe import cut

Phase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]
CONDITION_TYPES = ("Ready", "Progressing", "Failed")
# Conditions about what the search waits for; each appears once it was first True, and
# then stays (False once the wait is over), so a reader sees when it cleared.
WAIT_CONDITIONS = ("QuotaExceeded", "StorageUnavailable", "TrialsBlocked")
MESSAGE_CHARS = 1000
SIZE_BUDGET = 256 * 1024


def camel(name: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m[1].upper(), name)


def camel_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    return {camel(k): v for k, v in data.items() if v is not None}


# --------------------------------------------------------------------------- conditions


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    *,
    type: str,
    status: bool,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """Upsert one condition; lastTransitionTime moves only when `status` flips."""
    value = "True" if status else "False"
    out: list[dict[str, Any]] = []
    found = False
    for cond in conditions:
        if cond.get("type") != type:
            out.append(dict(cond))
            continue
        found = True
        changed = cond.get("status") != value
        out.append(
            _condition(
                type,
                value,
                reason,
                message,
                now if changed else cond.get("lastTransitionTime", now),
                generation,
            )
        )
    if not found:
        out.append(_condition(type, value, reason, message, now, generation))
    return out


def _condition(
    type: str, value: str, reason: str, message: str, when: str, generation: int | None
) -> dict[str, Any]:
    cond: dict[str, Any] = {
        "type": type,
        "status": value,
        "reason": reason,
        "message": cut(message, MESSAGE_CHARS),
        "lastTransitionTime": when,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def phase_conditions(
    conditions: Sequence[Mapping[str, Any]],
    *,
    phase: Phase,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """Ready / Progressing / Failed for a phase; `reason` is the phase's CamelCase reason.

    | phase      | Ready | Progressing | Failed |
    |------------|-------|-------------|--------|
    | Pending    | False | True        | False  |
    | Running    | False | True        | False  |
    | Suspended  | False | False       | False  |
    | Succeeded  | True  | False       | False  |
    | Failed     | False | False       | True   |
    """
    ready = phase == "Succeeded"
    progressing = phase in ("Pending", "Running")
    failed = phase == "Failed"
    out = list(conditions)
    for type, value in (("Ready", ready), ("Progressing", progressing), ("Failed", failed)):
        text = message if (value or type != "Failed") else "no failure"
        why = reason if (value or type != "Failed") else "NoFailure"
        out = set_condition(
            out, type=type, status=value, reason=why, message=text, now=now, generation=generation
        )
    return out


def wait_conditions(
    conditions: Sequence[Mapping[str, Any]],
    waits: Mapping[str, tuple[bool, str, str]],
    *,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """Upsert the wait conditions in `waits` (type → (status, reason, message)); a False one
    is only written when the condition is already there."""
    out = list(conditions)
    present = {c.get("type") for c in out}
    for type, (value, reason, message) in waits.items():
        if value or type in present:
            out = set_condition(
                out,
                type=type,
                status=value,
                reason=reason,
                message=message,
                now=now,
                generation=generation,
            )
    return out


def condition(status: Mapping[str, Any], type: str) -> dict[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == type:
            return dict(cond)
    return None


# --------------------------------------------------------------------------- the document


def _baseline(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A baseline without its weights: 'each' and 'merge-best' name their members (equal
    weights), 'uniform' is every checkpoint; the weights would only repeat that."""
    out = {
        "id": entry["id"],
        "kind": entry["kind"],
        "status": entry["status"],
        "fitness": entry.get("fitness"),
        "scores": entry.get("scores"),
        "reason": entry.get("reason"),
        "sameAs": entry.get("same_as"),
    }
    if entry["kind"] != "uniform":
        out["members"] = list(entry.get("members") or [])
    return {k: v for k, v in out.items() if v is not None}


def _trial(entry: Mapping[str, Any]) -> dict[str, Any]:
    return camel_keys(
        {
            "trial": entry["id"],
            "kind": entry["kind"],
            "generation": entry.get("generation"),
            "fitness": entry["fitness"],
            "scores": entry["scores"],
            "weights": entry["weights"],
        }
    )


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


def engine_fields(state: engine.EngineState) -> dict[str, Any]:
    """The status fields the engine's state determines."""
    summary = engine.status(state)
    finished = summary.trials_succeeded + summary.trials_failed
    out: dict[str, Any] = {
        "iteration": summary.generation,
        "trials": {
            "total": summary.trials_issued,
            "succeeded": summary.trials_succeeded,
            "failed": summary.trials_failed,
            "finished": finished,
        },
        "search": camel_keys(
            {
                "sigma": summary.sigma,
                "generations_completed": summary.generations_completed,
                "mean_weights": summary.mean_weights,
                "stop_reason": summary.reason,
                "replay_mismatches": summary.replay_mismatches or None,
            }
        ),
        "baselines": [_baseline(b) for b in summary.baselines],
        "history": [camel_keys(h) for h in summary.history],
        "paretoFront": [_trial(p) for p in summary.pareto],
        "recentFailures": [dict(f) for f in summary.recent_failures],
        "optimizer": encode_state(state),
    }
    if summary.best is not None:
        out["best"] = _trial(summary.best)
        out["bestFitness"] = fitness_text(summary.best["fitness"])
    if summary.confirmation:
        out["confirmation"] = [_confirmation(c) for c in summary.confirmation]
    if summary.winner is not None:
        out["winner"] = _winner(summary.winner)
        out["winnerFitness"] = fitness_text(summary.winner["fitness"])
    return out


def _confirmation(entry: Mapping[str, Any]) -> dict[str, Any]:
    """One finalist: its fitness on the search's examples beside that on unseen ones."""
    return camel_keys(
        {
            "trial": entry["source"],
            "kind": entry["kind"],
            "baseline": entry.get("baseline"),
            "status": entry["status"],
            "search_fitness": entry["search_fitness"],
            "fitness": entry.get("fitness"),
            "reason": entry.get("reason"),
        }
    )


def _winner(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The confirmed winner: `fitness` on the confirmation examples, `searchFitness` beside."""
    return camel_keys(
        {
            "trial": entry["id"],
            "kind": entry["kind"],
            "baseline": entry.get("baseline"),
            "generation": entry.get("generation"),
            "fitness": entry["fitness"],
            "search_fitness": entry["searchFitness"],
            "scores": entry["scores"],
            "search_scores": entry["searchScores"],
            "weights": entry["weights"],
        }
    )


def build_status(
    *,
    state: engine.EngineState | None,
    phase: Phase,
    reason: str,
    message: str,
    previous: Mapping[str, Any],
    active: Sequence[str],
    now: str,
    generation: int | None,
    final: Mapping[str, Any] | None = None,
    output: Mapping[str, Any] | None = None,
    held_out: Mapping[str, float] | None = None,
    retries: Sequence[Mapping[str, Any]] = (),
    waits: Mapping[str, tuple[bool, str, str]] | None = None,
) -> dict[str, Any]:
    """The whole status document. Without an engine state (an invalid spec before the search
    started), the previous document's engine fields are kept as they were."""
    doc: dict[str, Any] = {}
    if state is not None:
        doc.update(engine_fields(state))
    else:
        doc.update(
            {k: v for k, v in previous.items() if k not in _OPERATOR_FIELDS and v is not None}
        )
    trials = dict(doc.get("trials") or {"total": 0, "succeeded": 0, "failed": 0, "finished": 0})
    trials["running"] = len(active) + (1 if final and final.get("state") == "Running" else 0)
    doc["trials"] = trials
    doc.setdefault("iteration", 0)
    chosen = "winner" if "winner" in doc else "best"  # the merge the search hands over
    if held_out and chosen in doc:
        doc[chosen] = {**doc[chosen], "heldOut": dict(held_out)}
    conditions = phase_conditions(
        previous.get("conditions") or [],
        phase=phase,
        reason=reason,
        message=message,
        now=now,
        generation=generation,
    )
    if waits:
        conditions = wait_conditions(conditions, waits, now=now, generation=generation)
    doc.update(
        phase=phase,
        observedGeneration=generation,
        activeTrials=list(active),
        conditions=conditions,
        retries=[dict(r) for r in retries] or None,
    )
    if final:
        doc["final"] = dict(final)
    if output:
        doc["output"] = dict(output)
    terminal = phase in ("Succeeded", "Failed") and reason != "SpecInvalid"
    completion = previous.get("completionTime") if terminal else None
    if terminal:
        doc["completionTime"] = completion or now
    return {k: v for k, v in doc.items() if v is not None}


_OPERATOR_FIELDS = {
    "retries",
    "phase",
    "conditions",
    "observedGeneration",
    "activeTrials",
    "final",
    "output",
    "completionTime",
}


def size_of(status: Mapping[str, Any]) -> int:
    """Bytes of the status as compact JSON (what the API server stores, give or take)."""
    return len(json.dumps(status, separators=(",", ":")).encode())
