"""`mergesearch run` with malformed checkpoint files: exit 2 naming the file, never a
traceback, before the first trial."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}


def _metadata_list(directory: Path) -> Path:
    """Rewrite model.safetensors with `__metadata__` a JSON list (safetensors refuses it)."""
    file = directory / "model.safetensors"
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header["__metadata__"] = ["format", "pt"]
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])
    return file


def _index(directory: Path, weight_map: Any) -> Path:
    """Turn the single file into one shard named by an index whose weight_map is given."""
    (directory / "model.safetensors").rename(directory / "model-00001-of-00001.safetensors")
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


CASES = {
    "metadata-list": _metadata_list,
    "weight-map-list": lambda d: _index(d, ["model-00001-of-00001.safetensors"]),
    "weight-map-int": lambda d: _index(d, {"model.embed_tokens.weight": 1}),
    "weight-map-dotdot": lambda d: _index(d, {"model.embed_tokens.weight": ".."}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_checkpoint_is_bad_input_naming_the_file(
    toy_pool: Any, tmp_path: Path, case: str
) -> None:
    checkpoints = dict(toy_pool.checkpoints)
    name = sorted(checkpoints)[1]
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints[name], broken)
    file = CASES[case](broken)
    checkpoints[name] = broken
    spec = {
        "apiVersion": "mergesearch.io/v1alpha1",
        "kind": "MergeSearch",
        "metadata": {"name": f"bad-{case}"},
        "spec": {
            "checkpoints": [{"name": n, "uri": str(p)} for n, p in checkpoints.items()],
            "merge": {"dtype": "float32"},
            "objective": {
                "heldIn": [
                    {"task": t, "metric": m, "limit": 4} for t, m in toy_pool.heldin.items()
                ],
                "customTasks": {"path": str(toy_pool.tasks_dir)},
            },
            "search": {"maxTrials": 14, "seed": 1},
        },
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec))
    state = tmp_path / "state"
    proc = subprocess.run(
        [sys.executable, "-m", "mergesearch", "run", str(path), "--state-dir", str(state)],
        capture_output=True,
        text=True,
        env=ENV,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    unwrapped = "".join(proc.stderr.split())  # the console wraps long lines
    assert str(broken) in unwrapped and file.name in unwrapped  # the checkpoint and its file
    assert "Traceback" not in proc.stderr
    assert not (state / "trials.jsonl").exists()
