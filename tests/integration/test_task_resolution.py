"""Metrics are resolved against their tasks when the tasks load, before any model runs."""

from __future__ import annotations

from typing import Any

import pytest

from mergerunner.evaluate import EvaluationError, TaskSuite
from mergerunner.trial import FAILURE_POLICY, FailureKind, FailurePolicy, TaskSpec

pytestmark = [pytest.mark.integration]


def test_each_metric_maps_to_its_result_key(toy_pool: Any) -> None:
    specs = [TaskSpec(task=t, metric=m, limit=4) for t, m in toy_pool.heldin.items()]
    suite = TaskSuite(specs, include_path=toy_pool.tasks_dir)
    assert {r.spec.task: r.key for r in suite.resolved} == {
        t: m for t, m in toy_pool.heldin.items()
    }


def test_a_metric_the_task_does_not_report_fails_when_the_tasks_load(toy_pool: Any) -> None:
    generative = "toy_rev"  # generate_until: reports exact_match, never acc
    with pytest.raises(EvaluationError) as caught:
        TaskSuite([TaskSpec(task=generative, metric="acc")], include_path=toy_pool.tasks_dir)
    assert caught.value.failure_kind is FailureKind.UNKNOWN_METRIC
    assert FAILURE_POLICY[caught.value.failure_kind] is FailurePolicy.FATAL
    assert "toy_rev" in str(caught.value) and "'acc'" in str(caught.value)
    assert "exact_match,none" in str(caught.value)  # says what the task does report


def test_a_filter_the_task_lacks_is_refused(toy_pool: Any) -> None:
    with pytest.raises(EvaluationError) as caught:
        TaskSuite(
            [TaskSpec(task="toy_rev", metric="exact_match,strict-match")],
            include_path=toy_pool.tasks_dir,
        )
    assert caught.value.failure_kind is FailureKind.UNKNOWN_METRIC
