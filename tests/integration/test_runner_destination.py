"""`mergerunner run` checks its output destination and its tasks and metrics before it fetches or
merges anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration]


def document(toy_pool: Any, **changes: Any) -> dict[str, Any]:
    names = list(toy_pool.checkpoints)
    doc = {
        "apiVersion": "mergerunner.mergesearch.io/v2",
        "id": "final",
        "checkpoints": [{"name": n, "uri": str(p)} for n, p in toy_pool.checkpoints.items()],
        "weights": {n: 1 / len(names) for n in names},
        "heldIn": [{"task": t, "metric": m, "limit": 2} for t, m in toy_pool.heldin.items()],
        "customTasksDir": str(toy_pool.tasks_dir),
    }
    return doc | changes


def run(doc: dict[str, Any], tmp_path: Path) -> tuple[int, dict[str, Any]]:
    (tmp_path / "trial.json").write_text(json.dumps(doc))
    command = [sys.executable, "-m", "mergerunner", "run", "--trial", str(tmp_path / "trial.json")]
    proc = subprocess.run(
        [*command, "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
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
