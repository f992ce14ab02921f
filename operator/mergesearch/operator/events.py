"""Kubernetes Events on a search's milestones, decided by comparing two status documents.

Pure: the events follow from what changed between the status before and after a reconcile,
so a reconcile that changes nothing (a repeat) posts nothing, and the shell posts them only
after the status write succeeded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from mergesearch.operator.status import condition


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def _baselines_open(status: Mapping[str, Any]) -> bool:
    return any(b.get("status") in ("pending", "waiting") for b in status.get("baselines") or [])


def _best(status: Mapping[str, Any]) -> Mapping[str, Any]:
    return status.get("best") or {}


def milestones(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """Started, BaselinesDone, NewBest, Suspended/Resumed, Finalizing, Succeeded, Failed."""
    events: list[Event] = []
    if not old.get("optimizer") and new.get("optimizer"):
        trials = new.get("trials") or {}
        events.append(Event("Normal", "Started", f"{trials.get('total', 0)} trials issued"))
    if (
        old.get("optimizer")
        and new.get("baselines")
        and _baselines_open(old)
        and not _baselines_open(new)
    ):
        events.append(Event("Normal", "BaselinesDone", _baseline_summary(new)))
    best_old, best_new = _best(old), _best(new)
    if best_new and best_new.get("trial") != best_old.get("trial"):
        events.append(
            Event(
                "Normal",
                "NewBest",
                f"trial {best_new.get('trial')} fitness {best_new.get('fitness'):.6g}",
            )
        )
    events.extend(_phase_events(old, new))
    return events


def _baseline_summary(status: Mapping[str, Any]) -> str:
    done = [b for b in status.get("baselines") or [] if b.get("fitness") is not None]
    if not done:
        return "baselines finished; none succeeded"
    top = max(done, key=lambda b: b["fitness"])
    return f"{len(done)} baselines scored; best {top['id']} fitness {top['fitness']:.6g}"


def _phase_events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    before, after = old.get("phase"), new.get("phase")
    events: list[Event] = []
    if not (old.get("final") or {}).get("job") and (new.get("final") or {}).get("job"):
        events.append(
            Event("Normal", "Finalizing", f"evaluating the best merge: Job {new['final']['job']}")
        )
    if before == after:
        failed_old, failed_new = condition(old, "Failed"), condition(new, "Failed")
        if (
            after == "Failed"
            and failed_new
            and (failed_old or {}).get("reason") != failed_new.get("reason")
        ):
            events.append(Event("Warning", failed_new["reason"], failed_new.get("message", "")))
        return events
    ready = condition(new, "Ready") or {}
    if after == "Suspended":
        events.append(Event("Normal", "Suspended", "no new trials until spec.suspend is false"))
    elif before == "Suspended" and after in ("Pending", "Running"):
        events.append(Event("Normal", "Resumed", "spec.suspend is false"))
    elif after == "Succeeded":
        events.append(Event("Normal", "Succeeded", ready.get("message", "")))
    elif after == "Failed":
        failed = condition(new, "Failed") or {}
        events.append(
            Event("Warning", failed.get("reason", "Failed"), failed.get("message", "failed"))
        )
    return events
