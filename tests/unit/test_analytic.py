"""The analytic benchmarking mode: deterministic, model-free, and never on by accident."""

from __future__ import annotations

import pytest

from mergerunner.analytic import run_analytic, task_score
from mergerunner.trial import EvaluatorSpec, TrialDocument, TrialEvaluatorSpec

pytestmark = pytest.mark.unit


def doc(backend: str = "analytic", **weights: float) -> TrialDocument:
    return TrialDocument(
        id="g000-c00",
        checkpoints=[{"name": "a", "uri": "/x/a"}, {"name": "b", "uri": "/x/b"}],
        weights=weights or {"a": 0.3, "b": 0.7},
        held_in=[{"task": "t1"}, {"task": "t2", "weight": 2}],
        held_out=[{"task": "t3"}],
        evaluator=TrialEvaluatorSpec(backend=backend),
    )


def test_scores_are_deterministic_and_bounded() -> None:
    first, second = run_analytic(doc()), run_analytic(doc())
    assert first == second
    assert first.status == "succeeded"
    assert all(0.0 <= s <= 1.0 for s in (*first.held_in.values(), *first.held_out.values()))
    assert first.fitness == pytest.approx((first.held_in["t1"] + 2 * first.held_in["t2"]) / 3)


def test_scores_depend_on_weights_and_task() -> None:
    names = ["a", "b"]
    assert task_score("t1", names, [0.3, 0.7]) != task_score("t1", names, [0.9, 0.1])
    assert task_score("t1", names, [0.3, 0.7]) != task_score("t2", names, [0.3, 0.7])


def test_default_backend_is_a_real_model() -> None:
    assert EvaluatorSpec().backend == "hf"
