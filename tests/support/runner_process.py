"""`mergerunner run`, the trial program, as the pod runs it: its own process, a trial document
in a file, the result on stdout. Trial documents here are over the toy pool's checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TRIAL_API_VERSION = "mergerunner.mergesearch.io/v2"


def task_specs(tasks: Mapping[str, str], limit: int) -> list[dict[str, Any]]:
    """The trial document's task entries: each task with its metric, scored on `limit` rows."""
    return [{"task": t, "metric": m, "limit": limit} for t, m in tasks.items()]


def toy_trial(toy_pool: Any, **fields: Any) -> dict[str, Any]:
    """A trial document `t` of the uniform merge of the toy pool's checkpoints (local paths),
    its custom tasks from the pool; `fields` add to it or replace what it has."""
    names = list(toy_pool.checkpoints)
    doc: dict[str, Any] = {
        "apiVersion": TRIAL_API_VERSION,
        "id": "t",
        "checkpoints": [{"name": n, "uri": str(p)} for n, p in toy_pool.checkpoints.items()],
        "weights": {n: 1 / len(names) for n in names},
        "customTasksDir": str(toy_pool.tasks_dir),
    }
    return {**doc, **fields}


def run_runner(
    doc: Mapping[str, Any],
    work: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Runs `mergerunner run` on `doc` (written to work/trial.json), with its cache and work
    directories under `work` and any further `args`; stdout and stderr captured, never raising
    on the exit code."""
    (work / "trial.json").write_text(json.dumps(doc))
    command = [sys.executable, "-m", "mergerunner", "run", "--trial", str(work / "trial.json")]
    return subprocess.run(
        [*command, "--cache-dir", str(work / "cache"), "--work-dir", str(work), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env} if env is not None else None,
        check=False,
    )
