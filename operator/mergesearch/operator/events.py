"""Kubernetes Events on a search's milestones, decided by comparing two status documents.

Pure: the events follow from what changed between the status before and after a reconcile,
so a reconcile that changes nothing (a repeat) posts nothing, and the shell posts them only
after the status write succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mergesearch.operator.status import ConditionType, MergeSearchStatus, Phase


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def _baselines_open(status: MergeSearchStatus) -> bool:
    return any(b.outcome in ("pending", "waiting") for b in status.baselines or ())


def milestones(old: MergeSearchStatus, new: MergeSearchStatus) -> list[Event]:
    """Started, BaselinesDone, NewBest, Suspended/Resumed, Finalizing, Succeeded, Failed."""
    events: list[Event] = []
    if not old.optimizer and new.optimizer:
        total = new.trials.total if new.trials else 0
        events.append(Event("Normal", "Started", f"{total} trials issued"))
    if old.optimizer and new.baselines and _baselines_open(old) and not _baselines_open(new):
        events.append(Event("Normal", "BaselinesDone", _baseline_summary(new)))
    best_old, best_new = old.best, new.best
    if best_new is not None and (best_old is None or best_new.trial != best_old.trial):
        message = f"trial {best_new.trial} fitness {best_new.fitness:.6g}"
        events.append(Event("Normal", "NewBest", message))
    events.extend(_phase_events(old, new))
    return events


def _baseline_summary(status: MergeSearchStatus) -> str:
    done = [b for b in status.baselines or () if b.fitness is not None]
    if not done:
        return "baselines finished; none succeeded"
    top = max(done, key=lambda b: b.fitness or 0.0)
    return f"{len(done)} baselines scored; best {top.id} fitness {top.fitness:.6g}"


def _phase_events(old: MergeSearchStatus, new: MergeSearchStatus) -> list[Event]:
    before, after = old.phase, new.phase
    events: list[Event] = []
    job_before = old.finalization.job if old.finalization else None
    job_after = new.finalization.job if new.finalization else None
    if not job_before and job_after:
        events.append(Event("Normal", "Finalizing", f"evaluating the best merge: Job {job_after}"))
    failed_new = new.condition(ConditionType.FAILED)
    if before == after:
        failed_old = old.condition(ConditionType.FAILED)
        old_reason = failed_old.reason if failed_old else None
        if after is Phase.FAILED and failed_new and old_reason != failed_new.reason:
            events.append(_failed(failed_new.reason, failed_new.message, ""))
        return events
    ready = new.condition(ConditionType.READY)
    if after is Phase.SUSPENDED:
        events.append(Event("Normal", "Suspended", "no new trials until spec.suspend is false"))
    elif before is Phase.SUSPENDED and after in (Phase.PENDING, Phase.RUNNING):
        events.append(Event("Normal", "Resumed", "spec.suspend is false"))
    elif after is Phase.SUCCEEDED:
        events.append(Event("Normal", "Succeeded", (ready.message if ready else None) or ""))
    elif after is Phase.FAILED:
        reason = failed_new.reason if failed_new else None
        events.append(_failed(reason, failed_new.message if failed_new else None, "failed"))
    return events


def _failed(reason: str | None, message: str | None, default: str) -> Event:
    return Event("Warning", reason or "Failed", message if message is not None else default)
