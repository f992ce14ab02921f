"""`batchSize: auto` is probed once per search, capped in length, and never prints to stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from support.runner_process import run_runner, task_specs, toy_trial

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_auto_is_probed_once_for_a_whole_search(
    toy_pool: Any, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from lm_eval.models.huggingface import HFLM

    from mergerunner.resident import ResidentEvaluator
    from mergerunner.trial import EvaluatorSpec, TaskSpec

    probes: list[int] = []
    real = HFLM._detect_batch_size

    def counted(self: Any, *args: Any, **kwargs: Any) -> int:
        probes.append(self.max_length)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_detect_batch_size", counted)
    resident = ResidentEvaluator(
        list(toy_pool.checkpoints.values()),
        held_in=[TaskSpec(task=t, metric=m, limit=4) for t, m in toy_pool.heldin.items()],
        held_out=[TaskSpec(task=t, metric=m, limit=4) for t, m in toy_pool.heldout.items()],
        evaluator=EvaluatorSpec(batch_size="auto", device="cpu"),
        custom_tasks_dir=toy_pool.tasks_dir,
        dtype="float32",
    )
    n = len(toy_pool.checkpoints)
    for i in range(3):  # generate_until and multiple-choice tasks, three candidates
        weights = [1.0 if j == i else 0.0 for j in range(n)]
        resident.score(weights, with_held_out=True)
    assert len(probes) == 1
    assert isinstance(resident.lm.batch_size, int) and resident.lm.batch_size >= 1
    assert "Detecting largest batch size" not in capfd.readouterr().out


def test_probe_length_is_capped(toy_pool: Any) -> None:
    from mergerunner.evaluate import PROBE_MAX_LENGTH, probe_batch_size

    class FakeLM:  # only what the probe touches: the lm-eval model's context and detection
        _max_length = None
        max_length_seen: list[int] = []  # noqa: RUF012

        @property
        def max_length(self) -> int:
            return self._max_length or 131072

        def _detect_batch_size(self) -> int:
            self.max_length_seen.append(self.max_length)
            return 7

    lm = FakeLM()
    assert probe_batch_size(lm) == 7
    assert lm.max_length_seen == [PROBE_MAX_LENGTH]
    assert lm.max_length == 131072  # evaluation itself keeps the model's context


def test_runner_stdout_is_one_json_document_with_auto(toy_pool: Any, tmp_path: Path) -> None:
    doc = toy_trial(
        toy_pool,
        dtype="float32",
        heldIn=task_specs(toy_pool.heldin, 4),
        heldOut=task_specs(toy_pool.heldout, 4),
        evaluator={"batchSize": "auto", "device": "cpu"},
    )
    proc = run_runner(doc, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # the whole of stdout: one document, nothing else
    assert result["status"] == "succeeded"
