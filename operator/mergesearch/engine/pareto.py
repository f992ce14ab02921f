"""A bounded Pareto front of held-in task scores (all maximised).

The front keeps the non-dominated trials seen so far. When it outgrows its limit, the most
crowded point goes (NSGA-II crowding distance: the per-task gap between a point's neighbours,
normalised by the task's range; the extremes of every task are infinitely far). Ties go against
the most recently issued trial, and the trial named `protect` (the best by fitness) never goes.
With identical score vectors only the earliest-issued trial is kept. So the front is a function
of the sequence of insertions alone, and its size never exceeds the limit.

Once a point is pruned, a later point it would have dominated may enter: the front is the
non-dominated set of the points *kept*, the price of a bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mergesearch.engine.records import ScoredTrial


def _vector(record: ScoredTrial, tasks: Sequence[str]) -> tuple[float, ...]:
    return tuple(record.scores[t] for t in tasks)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a is at least as good on every task and strictly better on one."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(
        x > y for x, y in zip(a, b, strict=True)
    )


def crowding_distances(front: Sequence[ScoredTrial], tasks: Sequence[str]) -> list[float]:
    distances = [0.0] * len(front)
    for task in tasks:
        order = sorted(range(len(front)), key=lambda i: (front[i].scores[task], front[i].seq))
        low, high = front[order[0]].scores[task], front[order[-1]].scores[task]
        distances[order[0]] = distances[order[-1]] = math.inf
        if high <= low:
            continue
        for rank in range(1, len(order) - 1):
            gap = front[order[rank + 1]].scores[task] - front[order[rank - 1]].scores[task]
            distances[order[rank]] += gap / (high - low)
    return distances


def _prune_one(front: list[ScoredTrial], tasks: Sequence[str], protect: str | None) -> None:
    distances = crowding_distances(front, tasks)
    candidates = [i for i in range(len(front)) if front[i].id != protect]
    victim = min(candidates, key=lambda i: (distances[i], -front[i].seq))
    del front[victim]


def insert(
    front: Sequence[ScoredTrial],
    record: ScoredTrial,
    tasks: Sequence[str],
    limit: int,
    protect: str | None = None,
) -> tuple[ScoredTrial, ...]:
    """The front after offering `record`, sorted by issue order and at most `limit` long."""
    v = _vector(record, tasks)
    for point in front:
        p = _vector(point, tasks)
        if dominates(p, v) or (p == v and point.seq <= record.seq):
            return tuple(front)
    kept = [p for p in front if not dominates(v, _vector(p, tasks)) and _vector(p, tasks) != v]
    kept.append(record)
    kept.sort(key=lambda p: p.seq)
    while len(kept) > limit:
        _prune_one(kept, tasks, protect)
    return tuple(kept)
