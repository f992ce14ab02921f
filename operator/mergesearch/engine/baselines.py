"""The paper's reference points, evaluated before and beside the search.

- each: every checkpoint alone;
- uniform: the average of all checkpoints (the "model soup");
- merge-best: the uniform merge of the best checkpoint for each held-in task, which needs the
  'each' results first. When one checkpoint is best on every task it is that checkpoint alone,
  already evaluated, so it reuses that result instead of evaluating the same model again.
"""

from __future__ import annotations

import numpy as np

from mergesearch.engine.config import EngineConfig
from mergesearch.engine.state import BaselineRecord

UNIFORM_ID = "b-uniform"
MERGE_BEST_ID = "b-merge-best"


def each_id(checkpoint: str) -> str:
    return f"b-each-{checkpoint}"


def initial_baselines(config: EngineConfig, first_seq: int) -> tuple[BaselineRecord, ...]:
    """'each' then 'uniform' issued in that order; merge-best waits for the 'each' results."""
    records: list[BaselineRecord] = []
    seq = first_seq
    if "each" in config.baselines:
        for name in config.checkpoints:
            records.append(
                BaselineRecord(
                    id=each_id(name), kind="each", members=(name,), seq=seq, status="pending"
                )
            )
            seq += 1
    if "uniform" in config.baselines:
        records.append(
            BaselineRecord(
                id=UNIFORM_ID, kind="uniform", members=config.checkpoints, seq=seq, status="pending"
            )
        )
    if "merge-best" in config.baselines:
        records.append(
            BaselineRecord(id=MERGE_BEST_ID, kind="merge-best", members=(), status="waiting")
        )
    return tuple(records)


def baseline_weights(config: EngineConfig, record: BaselineRecord) -> np.ndarray:
    weights = np.zeros(config.n_checkpoints)
    share = 1.0 / len(record.members)
    for i, name in enumerate(config.checkpoints):
        if name in record.members:
            weights[i] = share
    return weights


def merge_best_members(
    config: EngineConfig, baselines: tuple[BaselineRecord, ...]
) -> tuple[str, ...]:
    """The best checkpoint per held-in task (ties: the earlier checkpoint), in config order.

    Empty when no 'each' baseline succeeded.
    """
    alone = {r.members[0]: r for r in baselines if r.kind == "each" and r.status == "succeeded"}
    chosen: set[str] = set()
    for task in config.tasks:
        best_name, best_score = None, -np.inf
        for name in config.checkpoints:
            record = alone.get(name)
            if record is not None and record.scores and record.scores[task.name] > best_score:
                best_name, best_score = name, record.scores[task.name]
        if best_name is not None:
            chosen.add(best_name)
    return tuple(n for n in config.checkpoints if n in chosen)


def each_resolved(baselines: tuple[BaselineRecord, ...]) -> bool:
    return all(r.status in ("succeeded", "failed") for r in baselines if r.kind == "each")
