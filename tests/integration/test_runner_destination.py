"""`mergerunner run` checks its output destination before it fetches or merges anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration]


def test_a_bad_destination_fails_before_the_fetch(toy_pool: Any, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("a file")
    names = list(toy_pool.checkpoints)
    doc = {
        "apiVersion": "mergerunner.mergesearch.io/v2",
        "id": "final",
        "checkpoints": [{"name": n, "uri": str(p)} for n, p in toy_pool.checkpoints.items()],
        "weights": {n: 1 / len(names) for n in names},
        "heldIn": [{"task": t, "metric": m, "limit": 2} for t, m in toy_pool.heldin.items()],
        "customTasksDir": str(toy_pool.tasks_dir),
        "output": {"uri": str(taken), "saveModel": True},
    }
    (tmp_path / "trial.json").write_text(json.dumps(doc))
    command = [sys.executable, "-m", "mergerunner", "run", "--trial", str(tmp_path / "trial.json")]
    proc = subprocess.run(
        [*command, "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["failedStep"] == "upload" and result["errorKind"] == "config"
    assert str(taken) in result["error"]
    assert result["timings"]["fetchS"] == 0 and result["timings"]["mergeS"] == 0
