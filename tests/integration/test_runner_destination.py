"""`mergerunner run` checks its output destination and its tasks and metrics before it fetches or
merges anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from support.runner_process import run_runner, task_specs, toy_trial

pytestmark = [pytest.mark.integration]


def document(toy_pool: Any, **changes: Any) -> dict[str, Any]:
    return toy_trial(
        toy_pool, **{"id": "final", "heldIn": task_specs(toy_pool.heldin, 2), **changes}
    )


def run(doc: dict[str, Any], tmp_path: Path) -> tuple[int, dict[str, Any]]:
    proc = run_runner(doc, tmp_path)
    return proc.returncode, json.loads(proc.stdout)


def test_a_bad_destination_fails_before_the_fetch(toy_pool: Any, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("a file")
    doc = document(toy_pool, output={"uri": str(taken), "saveModel": True})
    code, result = run(doc, tmp_path)
    assert code == 1
    assert result["failedStep"] == "upload" and result["errorKind"] == "config"
    assert str(taken) in result["error"]
    assert result["timings"]["fetchS"] == 0 and result["timings"]["mergeS"] == 0


def test_a_wrong_metric_fails_before_the_fetch(toy_pool: Any, tmp_path: Path) -> None:
    doc = document(toy_pool)
    doc["heldIn"][0]["metric"] = "acc"  # a generate_until task reports exact_match
    code, result = run(doc, tmp_path)
    assert code == 1
    assert result["failedStep"] == "evaluate" and result["errorKind"] == "unknown-metric"
    assert "'acc'" in result["error"] and doc["heldIn"][0]["task"] in result["error"]
    assert result["timings"]["fetchS"] == 0 and result["timings"]["mergeS"] == 0
