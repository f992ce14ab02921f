"""Checkpoint directories written the way Hugging Face writes them: one `model.safetensors`, or
shards `model-0000N-of-0000M.safetensors` with a `model.safetensors.index.json` weight map."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file


def write_checkpoint(
    path: Path,
    tensors: Mapping[str, Any],
    *,
    shards: int = 1,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Writes `tensors` (torch tensors by name) to a new directory `path`, in `shards` files
    (tensors dealt round-robin in name order), with `config` as config.json when given."""
    path.mkdir(parents=True)
    if shards == 1:
        save_file(dict(tensors), str(path / "model.safetensors"))
    else:
        names = sorted(tensors)
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::shards]}
            save_file(part, str(path / file))
            weight_map.update(dict.fromkeys(part, file))
        index = {"metadata": {}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    if config is not None:
        (path / "config.json").write_text(json.dumps(dict(config)))
    return path
