"""The benchmarking objective: score merge weights with a fixed function instead of a model.

Benchmarks of the operator (turnaround, API requests per trial) and crash-recovery tests need
trials that finish at once and give the same score for the same weights every time. With
`evaluator.backend: analytic` the runner fetches, merges and evaluates nothing: each task's
score is a smooth bump over the weight vector, centred on a point that depends only on the task
name and the checkpoint names. The optimum lies inside the simplex, so a working search beats
every single checkpoint, as on real models. It is selected only by that explicit backend value
of a trial document, never by a default, and a MergeSearch's spec cannot ask for it: only an
operator started for benchmarks writes it (`TrialEvaluatorSpec`), so a real search cannot end
up in it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from mergerunner.trial import TaskSpec, TrialDocument, TrialResult

_WIDTH = 0.5  # bump width: scores stay informative (far from 0) over the whole simplex


def task_centre(task: str, checkpoints: Sequence[str]) -> list[float]:
    """A point inside the simplex, a pure function of the task and checkpoint names."""
    raw = [
        0.2 + int.from_bytes(hashlib.sha256(f"{task}/{name}".encode()).digest()[:4]) / 2**32
        for name in checkpoints
    ]
    total = sum(raw)
    return [r / total for r in raw]


def task_score(task: str, checkpoints: Sequence[str], weights: Sequence[float]) -> float:
    """exp(-|w - centre|² / width): 1 at the task's centre, lower further away."""
    centre = task_centre(task, checkpoints)
    distance = sum((w - c) ** 2 for w, c in zip(weights, centre, strict=True))
    return math.exp(-distance / _WIDTH)


def scores(doc: TrialDocument, tasks: Sequence[TaskSpec]) -> dict[str, float]:
    names = [c.name for c in doc.checkpoints]
    weights = doc.weight_vector()
    return {t.task: task_score(t.task, names, weights) for t in tasks}


def analytic_digest(doc: TrialDocument) -> str:
    """Stands in for the merge digest: equal weights, equal digest."""
    text = ",".join(f"{c.name}={doc.weights[c.name]!r}" for c in doc.checkpoints)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def run_analytic(doc: TrialDocument) -> TrialResult:
    """The trial's result under the analytic objective; no step can fail."""
    return TrialResult.scored(
        doc.id,
        scores(doc, [*doc.held_in, *doc.held_out]),
        held_in=doc.held_in,
        held_out=doc.held_out,
        digest=analytic_digest(doc),
    )
