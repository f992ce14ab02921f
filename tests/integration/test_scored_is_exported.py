"""What is scored is what is exported: local mode's resident merge, `mergerunner run` and the
exported model give the same scores and the same digest for the same weights, in every dtype."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from support.runner_process import run_runner, task_specs, toy_trial

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMIT = 12
WEIGHTS = [0.1, 0.45, 0.2, 0.25]


def specs(tasks: dict[str, str]) -> list[dict[str, Any]]:
    return task_specs(tasks, LIMIT)


@pytest.fixture(scope="module")
def resident_by_dtype(toy_pool: Any) -> dict[str, Any]:
    """One resident evaluator per dtype, built as local mode builds it."""
    from mergerunner.resident import ResidentEvaluator
    from mergerunner.trial import EvaluatorSpec, TaskSpec

    return {
        dtype: ResidentEvaluator(
            list(toy_pool.checkpoints.values()),
            held_in=[TaskSpec.model_validate(s) for s in specs(toy_pool.heldin)],
            held_out=[TaskSpec.model_validate(s) for s in specs(toy_pool.heldout)],
            evaluator=EvaluatorSpec(batch_size=32, device="cpu"),
            custom_tasks_dir=toy_pool.tasks_dir,
            dtype=dtype,
        )
        for dtype in ("float32", "bfloat16", "float16")
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_local_runner_and_export_agree(
    toy_pool: Any, resident_by_dtype: dict[str, Any], tmp_path: Path, dtype: str
) -> None:
    from mergerunner.evaluate import TaskSuite
    from mergerunner.merge import merge_to_directory
    from mergerunner.trial import TaskSpec

    names = list(toy_pool.checkpoints)
    weights = dict(zip(names, WEIGHTS, strict=True))
    local = resident_by_dtype[dtype].trial("t", WEIGHTS, with_held_out=True)
    assert local.status == "succeeded", local.error

    out = tmp_path / "exported"
    doc = toy_trial(
        toy_pool,
        weights=weights,
        dtype=dtype,
        heldIn=specs(toy_pool.heldin),
        heldOut=specs(toy_pool.heldout),
        evaluator={"batchSize": 32, "device": "cpu"},
        output={"uri": str(out), "saveModel": True},
    )
    proc = run_runner(doc, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pod = json.loads(proc.stdout)

    # Local mode's export of the same weights (LocalSearch.export writes it this way).
    export = merge_to_directory(
        list(toy_pool.checkpoints.values()), WEIGHTS, tmp_path / "local-export", dtype=dtype
    )
    # The exported model, loaded afresh by lm-eval itself (on a CPU in float32, as every mode
    # computes there) and scored on the same examples.
    from lm_eval.models.huggingface import HFLM

    plain = HFLM(pretrained=str(out), dtype="float32", device="cpu", batch_size=32)
    tasks = [TaskSpec.model_validate(s) for s in specs(toy_pool.tasks)]
    again = TaskSuite(tasks, include_path=toy_pool.tasks_dir).score(plain)

    assert local.digest == pod["digest"] == export.digest
    assert local.held_in == pod["heldIn"]
    assert local.held_out == pod["heldOut"]
    assert local.fitness == pod["fitness"]
    assert again == {**pod["heldIn"], **pod["heldOut"]}
