"""Where each part of a model goes: a pure plan from (layout, devices, memory) to a device map.

A trial pod gets one or more GPUs; a model of the paper's size (70B–100B parameters, 140–200 GB
in bf16) fits on none of them alone. This module decides, before any weight is read, which
module lives on which device — the accelerate-style `device_map` (module name → device) that
`transformers.from_pretrained(device_map=...)` and lm-eval's `parallelize=True` consume — or
refuses with the shortfall in bytes. Being pure (sizes in, names out) it is unit-tested for any
topology on a CPU, and preflight can call it with nothing but safetensors headers.

Units of placement are whole decoder layers (`model.layers.17`), so a layer's weights and its
KV cache sit on one device and activations cross a device boundary only between layers; other
tensors (embeddings, final norm, head) are their own units. The fill is *balanced* like
accelerate's `balanced` strategy (what `device_map="auto"` uses): each GPU gets about an equal
share, bounded by its capacity after a reserve for activations and KV cache; what no GPU can
hold goes to the CPU only when offload is allowed.

Numbers at the scale this is for: Llama-3-70B is 80 layers of 1.71 GB plus 2.1 GB of
embeddings and 2.1 GB of head in bf16 (141 GB); on 8 × 80 GB it takes ~17.6 GB per GPU; on
2 × 80 GB with 8 GB reserved on each (144 GB of room) it fits with 3 GB spare; on 1 × 80 GB it
is 69 GB short. A 100B model (200 GB) needs 3 × 80 GB GPUs at least.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mergerunner.checkpoint import (
    FLOAT_ITEMSIZE,
    HEAD_NAME,
    CheckpointLayout,
    MergePlan,
    effective_tensors,
)
from mergerunner.trial import FailureKind

GIB = 1 << 30
CPU = "cpu"
# A decoder stack's repeated block: `model.layers.3`, `transformer.h.3`, `gpt_neox.layers.3`,
# `model.decoder.layers.3`, `transformer.blocks.3`.
_BLOCK = re.compile(r"^(.*?\.(?:layers|h|blocks|layer)\.\d+)\.")
_INDEX = re.compile(r"\.(\d+)$")
_FIRST = ("embed", "wte", "wpe", "word_embeddings")


class PlacementError(ValueError):
    """The model does not fit the devices; `shortfall_bytes` says by how much. Fatal for a
    search: every candidate has the same size."""

    failure_kind = FailureKind.OUT_OF_MEMORY

    def __init__(self, message: str, shortfall_bytes: int) -> None:
        super().__init__(message)
        self.shortfall_bytes = shortfall_bytes


@dataclass(frozen=True)
class DeviceSpec:
    """One device and the bytes of it the model may use (free memory, not the card's size)."""

    name: str
    capacity_bytes: int


@dataclass(frozen=True)
class ModelLayout:
    """Tensor name → bytes as the evaluated model holds them, plus tied modules.

    `tied` maps a module that holds no bytes of its own (a head tied to the input embedding) to
    the tensor it shares, so that both land on the same device.
    """

    tensors: Mapping[str, int]
    tied: Mapping[str, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.tensors.values())


@dataclass(frozen=True)
class Placement:
    """A device map and what it puts where."""

    device_map: dict[str, str]
    bytes_per_device: dict[str, int]

    @property
    def devices(self) -> list[str]:
        """Devices in use, in placement order."""
        return list(dict.fromkeys(self.device_map.values()))

    @property
    def offloaded_bytes(self) -> int:
        return self.bytes_per_device.get(CPU, 0)

    def device_of(self, tensor: str) -> str:
        """The device of a tensor: its longest module prefix in the map."""
        parts = tensor.split(".")
        for cut in range(len(parts), 0, -1):
            device = self.device_map.get(".".join(parts[:cut]))
            if device is not None:
                return device
        raise KeyError(f"tensor {tensor!r} is under no module of the device map")


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


def layout_of_merge(plan: MergePlan, dtype: str) -> ModelLayout:
    """The merged model's layout in its output dtype (what it occupies once loaded)."""
    itemsize = FLOAT_ITEMSIZE[{"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype]]
    tensors = {t.name: t.numel * itemsize for t in plan.tensors}
    return ModelLayout(tensors, _tied_head(tensors, plan.checkpoints[0]))


def layout_of_checkpoint(layout: CheckpointLayout) -> ModelLayout:
    """A checkpoint's layout in its stored dtypes, from its safetensors headers only."""
    tensors = {n: t.nbytes for n, t in effective_tensors(layout).items()}
    return ModelLayout(tensors, _tied_head(tensors, layout))


def _tied_head(tensors: Mapping[str, int], layout: CheckpointLayout) -> dict[str, str]:
    if HEAD_NAME in tensors or layout.embedding is None or not layout.ties_head:
        return {}
    return {HEAD_NAME.rsplit(".", 1)[0]: layout.embedding}


def unit_of(tensor: str) -> str:
    """The module a tensor is placed with: its decoder layer, else its own module."""
    block = _BLOCK.match(tensor)
    if block:
        return block.group(1)
    return tensor.rsplit(".", 1)[0] if "." in tensor else tensor


def _order_key(unit: str) -> tuple[int, int, str]:
    """Embeddings, then layers by index, then the rest (final norm), the head last: the order
    activations flow in, so consecutive units share a device and transfers are few."""
    index = _INDEX.search(unit)
    if index and _BLOCK.match(unit + "."):
        return (1, int(index.group(1)), unit)
    if unit == HEAD_NAME.rsplit(".", 1)[0]:
        return (3, 0, unit)
    last = unit.rsplit(".", 1)[-1]
    return (0 if last.startswith(_FIRST) else 2, 0, unit)


def units(layout: ModelLayout) -> list[tuple[str, int]]:
    """(module, bytes) in flow order."""
    sizes: dict[str, int] = {}
    for name, nbytes in layout.tensors.items():
        unit = unit_of(name)
        sizes[unit] = sizes.get(unit, 0) + nbytes
    return sorted(sizes.items(), key=lambda item: _order_key(item[0]))


# ---------------------------------------------------------------------------------------------
# Reserves
# ---------------------------------------------------------------------------------------------


def activation_reserve_bytes(config: Mapping[str, object], tokens: int, dtype_bytes: int) -> int:
    """Bytes a forward pass over `tokens` tokens (batch × length) needs beside the weights.

    The KV cache (2 · layers · kv_heads · head_dim · tokens in the model's dtype) and the
    float32 logits lm-eval turns into log-probabilities (tokens · vocab · 4): for Llama-3-70B at
    8 × 2048 tokens that is 5.4 GB of cache and 8.4 GB of logits — the logits dominate, which
    is why the reserve is computed, not a fixed fraction.
    """
    layers = _int(config, "num_hidden_layers")
    heads = _int(config, "num_attention_heads")
    kv_heads = _int(config, "num_key_value_heads", heads)
    hidden = _int(config, "hidden_size")
    head_dim = _int(config, "head_dim", hidden // heads if heads else 0)
    vocab = _int(config, "vocab_size")
    kv = 2 * layers * kv_heads * head_dim * tokens * dtype_bytes
    return kv + tokens * vocab * 4


def _int(config: Mapping[str, object], key: str, default: int = 0) -> int:
    value = config.get(key, default)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def plan_placement(
    layout: ModelLayout,
    gpus: Sequence[DeviceSpec],
    *,
    reserve_bytes: int = 0,
    cpu: DeviceSpec | None = None,
) -> Placement:
    """Place every unit of `layout` on `gpus` (balanced), then on `cpu` if given, or raise.

    With no GPU at all and a `cpu`, everything goes to the CPU (a CPU trial). `reserve_bytes`
    is kept free on each GPU for activations and KV cache (see `activation_reserve_bytes`).
    """
    names = [d.name for d in gpus]
    if len(set(names)) != len(names):
        raise ValueError(f"devices listed twice: {names}")
    if not gpus and cpu is None:
        raise PlacementError("no device to place the model on (no GPU and no CPU offload)", 0)
    parts = units(layout)
    room = [max(0, d.capacity_bytes - reserve_bytes) for d in gpus]
    offload_room = cpu.capacity_bytes if cpu is not None else 0
    total = sum(size for _, size in parts)
    short = total - sum(room) - offload_room
    if short > 0:
        raise PlacementError(_shortfall(total, gpus, room, reserve_bytes, cpu, short), short)
    device_map, used = _fill(parts, gpus, room, cpu, offload_room)
    for module, tensor in layout.tied.items():
        device_map[module] = device_map[unit_of(tensor)]
    return Placement(device_map, used)


def _fill(
    parts: Sequence[tuple[str, int]],
    gpus: Sequence[DeviceSpec],
    room: Sequence[int],
    cpu: DeviceSpec | None,
    offload_room: int,
) -> tuple[dict[str, str], dict[str, int]]:
    """Balanced sequential fill: each GPU takes units until it holds its fair share of what is
    left (a unit counts if at least half of it is within the share), or more when the devices
    after it could not hold the rest, never beyond its room."""
    device_map: dict[str, str] = {}
    used: dict[str, int] = {}
    remaining = sum(size for _, size in parts)
    queue = list(parts)
    for index, gpu in enumerate(gpus):
        # A fair share of what is left, but at least what the devices after this one cannot take.
        later = sum(room[index + 1 :]) + offload_room
        share = max(math.ceil(remaining / (len(gpus) - index)), remaining - later)
        last = index == len(gpus) - 1 and cpu is None
        taken = 0
        while queue:
            unit, size = queue[0]
            if taken + size > room[index]:
                break
            if taken and not last and taken + size / 2 > share:
                break
            device_map[unit] = gpu.name
            taken += size
            queue.pop(0)
        if taken:
            used[gpu.name] = taken
        remaining -= taken
    if queue and cpu is not None and remaining <= offload_room:
        for unit, _ in queue:
            device_map[unit] = cpu.name
        used[cpu.name] = remaining
        queue = []
    if queue:
        unit, size = queue[0]
        raise PlacementError(
            f"module {unit!r} ({_gib(size)}) and {len(queue) - 1} after it ({_gib(remaining)} in "
            f"all) fit on no device: the free room is split across devices in pieces smaller "
            f"than whole layers ({_rooms(gpus, room)})",
            remaining,
        )
    return device_map, used


def _shortfall(
    total: int,
    gpus: Sequence[DeviceSpec],
    room: Sequence[int],
    reserve: int,
    cpu: DeviceSpec | None,
    short: int,
) -> str:
    where = f"{len(gpus)} GPU(s) offer {_gib(sum(room))}"
    if reserve:
        where += f" after reserving {_gib(reserve)} each for activations and KV cache"
    if gpus:
        where += f" ({_rooms(gpus, room)})"
    if cpu is not None:
        where += f", CPU offload {_gib(cpu.capacity_bytes)}"
    fix = "more or larger GPUs" + ("" if cpu is not None else ", or CPU offload")
    return f"the model needs {_gib(total)} but {where}: {_gib(short)} short ({short} bytes); {fix}"


def _rooms(gpus: Sequence[DeviceSpec], room: Sequence[int]) -> str:
    return ", ".join(f"{d.name} {_gib(r)}" for d, r in zip(gpus, room, strict=True))


def _gib(n: int) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / (1 << 20):.2f} MiB" if n >= 1 << 20 else f"{n} B"
