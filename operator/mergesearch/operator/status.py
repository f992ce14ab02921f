"""The MergeSearch status document and its conditions (pure, bounded in size).

Everything here is a function of the engine state plus a few operator fields, and nothing
grows with the number of trials: the engine keeps a bounded history and Pareto front, baselines
are listed without their (implied) weights, failures are the last ten, and the operator's own
bookkeeping (`activeTrials`) is bounded by spec.execution.parallelism. A 64-checkpoint,
5000-trial search stays far below the 256 KiB budget (tests/unit/test_operator_status.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from mergesearch import engine
from mergesearch.operator.observe import cut

Phase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]
CONDITION_TYPES = ("Ready", "Progressing", "Failed")
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
        "optimizer": state.to_dict(),
    }
    if summary.best is not None:
        out["best"] = _trial(summary.best)
    if summary.confirmation:
        out["confirmation"] = [_confirmation(c) for c in summary.confirmation]
    if summary.winner is not None:
        out["winner"] = _winner(summary.winner)
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
    doc.update(
        phase=phase,
        observedGeneration=generation,
        activeTrials=list(active),
        conditions=phase_conditions(
            previous.get("conditions") or [],
            phase=phase,
            reason=reason,
            message=message,
            now=now,
            generation=generation,
        ),
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
