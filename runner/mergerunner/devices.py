"""The devices a trial gets, and loading a model onto them by the placement plan.

The imperative shell around `mergerunner.placement`: it asks torch which GPUs are visible and
how much of each is free, turns the evaluator's settings into the plan's inputs, and hands the
plan's device map to `from_pretrained`, which then reads each tensor of the safetensors files
(memory-mapped) straight to its device. Host memory therefore holds about one tensor at a time
for GPU-placed modules instead of the whole model first (the old path loaded the model into
host RAM, then moved it to `cuda:0`, which a 70B model in a 64 Gi pod cannot survive).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mergerunner.checkpoint import read_layout
from mergerunner.contract import CONFIG_FILE
from mergerunner.placement import (
    CPU,
    DeviceSpec,
    ModelLayout,
    Placement,
    activation_reserve_bytes,
    layout_of_checkpoint,
    plan_placement,
)
from mergerunner.trial import EvaluatorSpec

# The reserve is sized for one sequence this long unless maxLength says otherwise: lm-eval's
# batch-size probe then fills what is left, and a 128k-context config would otherwise reserve
# tens of GB of logits for a length no task here reaches.
RESERVE_TOKENS = 4096
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def visible_devices(spec: EvaluatorSpec) -> tuple[list[DeviceSpec], DeviceSpec | None]:
    """(GPUs with their free bytes, CPU or None) for the evaluator's `device` setting.

    `auto` uses every visible GPU, or the CPU when there is none; `cpu` only the CPU; `cuda:N`
    that one GPU. `cpuOffload` adds the host's available memory behind the GPUs.
    """
    import torch

    gpus: list[DeviceSpec] = []
    if spec.device == "auto" and torch.cuda.is_available():
        gpus = [_gpu(i) for i in range(torch.cuda.device_count())]
    elif spec.device.startswith("cuda"):
        index = int(spec.device.split(":")[1]) if ":" in spec.device else 0
        gpus = [_gpu(index)]
    cpu = DeviceSpec(CPU, host_available_bytes()) if spec.cpu_offload or not gpus else None
    return gpus, cpu


def _gpu(index: int) -> DeviceSpec:
    import torch

    free, _total = torch.cuda.mem_get_info(index)
    return DeviceSpec(f"cuda:{index}", int(free))


def host_available_bytes() -> int:
    """Host memory this process may still use: the smaller of MemAvailable and what the
    container's cgroup limit leaves (a pod sees the node's /proc/meminfo, not its own limit)."""
    return available_bytes(
        _read("/proc/meminfo"),
        _read("/sys/fs/cgroup/memory.max"),
        _read("/sys/fs/cgroup/memory.current"),
        fallback=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
    )


def available_bytes(
    meminfo: str | None, cgroup_max: str | None, cgroup_current: str | None, *, fallback: int
) -> int:
    """Pure part of `host_available_bytes`, from the files' texts (None: not readable)."""
    available = fallback
    for line in (meminfo or "").splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    limit = (cgroup_max or "").strip()
    if limit.isdigit() and (cgroup_current or "").strip().isdigit():
        available = min(available, max(0, int(limit) - int(str(cgroup_current).strip())))
    return available


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def model_config(model_dir: Path) -> dict[str, Any]:
    file = Path(model_dir) / CONFIG_FILE
    config = json.loads(file.read_text()) if file.is_file() else {}
    return config if isinstance(config, dict) else {}


def reserve_bytes(config: dict[str, Any], spec: EvaluatorSpec, dtype: str) -> int:
    """Bytes kept free on each GPU for the forward pass (see `activation_reserve_bytes`)."""
    batch = spec.batch_size if isinstance(spec.batch_size, int) else 1
    positions = config.get("max_position_embeddings")
    length = spec.max_length or min(
        positions if isinstance(positions, int) else RESERVE_TOKENS, RESERVE_TOKENS
    )
    return activation_reserve_bytes(config, batch * length, DTYPE_BYTES[dtype])


def plan_for(
    layout: ModelLayout, config: dict[str, Any], spec: EvaluatorSpec, dtype: str
) -> Placement:
    """The placement of a model of this layout (in `dtype`) on this machine's devices."""
    gpus, cpu = visible_devices(spec)
    reserve = reserve_bytes(config, spec, dtype) if gpus else 0
    return plan_placement(layout, gpus, reserve_bytes=reserve, cpu=cpu)


def plan_for_directory(model_dir: Path, spec: EvaluatorSpec, dtype: str) -> Placement:
    """The placement of the model in `model_dir`, from its headers and config only."""
    layout = layout_of_checkpoint(read_layout(Path(model_dir)))
    return plan_for(layout, model_config(model_dir), spec, dtype)


def load_placed(model_dir: Path, placement: Placement, dtype: str, *, trust: bool) -> Any:
    """Load a model by a placement: each tensor read from disk straight to its device."""
    import torch
    from transformers import AutoModelForCausalLM

    # One device: the whole model there, without accelerate's per-module hooks, which only
    # move activations between devices and cost a little on every forward call.
    devices = placement.devices
    device_map = {"": devices[0]} if len(devices) == 1 else placement.device_map
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), device_map=device_map, trust_remote_code=trust
    )
    return model.eval()
