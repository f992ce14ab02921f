"""Trial records: the append-only log a local search keeps beside its engine state.

The engine's state is bounded (it keeps the best, a short history and the Pareto front), which
is right for a resource's status but too little for pictures of a whole search; so local mode
also appends one JSON line per finished trial. The log is also what lets a resumed search skip
trials that finished after the last state save.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TrialLogEntry:
    """One finished trial as local mode's log keeps it (a line of trials.jsonl) and as the
    reports draw it (`cli/cluster.py` builds the same entries from a resource's status)."""

    id: str
    kind: str  # "baseline" or "search"
    generation: int
    weights: dict[str, float]
    status: str  # "succeeded" or "failed"
    held_in: dict[str, float] = field(default_factory=dict)
    held_out: dict[str, float] = field(default_factory=dict)
    fitness: float | None = None
    error: str | None = None
    error_kind: str | None = None  # mergerunner.trial.FailureKind's value, for a failed trial
    merge_s: float = 0.0
    evaluate_s: float = 0.0
    digest: str | None = None
    # "confirmation": `source` (a baseline or search trial) re-scored on unseen held-in examples.
    subset: str = "search"
    source: str | None = None
    subtasks: dict[str, float] = field(default_factory=dict)  # members of group tasks

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> TrialLogEntry:
        data: dict[str, Any] = json.loads(line)
        return cls(**data)


def read_records(path: Path) -> list[TrialLogEntry]:
    """All complete records; a torn last line (a kill mid-write) is ignored, not fatal."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(TrialLogEntry.from_json(line))
        except (json.JSONDecodeError, TypeError):
            continue
    return records


def append_record(path: Path, record: TrialLogEntry) -> None:
    """Append and fsync, so a record on disk always precedes the state that counts it."""
    with path.open("a") as handle:
        handle.write(record.to_json() + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_json_atomic(path: Path, data: Any) -> None:
    """Write-then-rename: a reader (or a resumed run) sees the old file or the new, never half."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as handle:
        json.dump(data, handle, sort_keys=True, separators=(",", ":"))
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
