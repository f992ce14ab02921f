"""The placement plan: layouts, devices and memory in, a device map or the shortfall out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergerunner.checkpoint import read_layout, validate_checkpoints
from mergerunner.placement import (
    CPU,
    DeviceSpec,
    ModelLayout,
    PlacementError,
    activation_reserve_bytes,
    layout_of_checkpoint,
    layout_of_merge,
    plan_placement,
    unit_of,
    units,
)

pytestmark = pytest.mark.unit

GB = 10**9


def llama_layout(
    layers: int, layer_bytes: int, embed: int, *, tied: bool = False, norm: int = 16_384
) -> ModelLayout:
    """A Llama-shaped layout: per layer, attention and MLP tensors summing to `layer_bytes`."""
    tensors = {"model.embed_tokens.weight": embed, "model.norm.weight": norm}
    parts = {"self_attn.q_proj": 0.2, "self_attn.k_proj": 0.05, "self_attn.v_proj": 0.05}
    parts |= {"self_attn.o_proj": 0.2, "mlp.gate_proj": 0.25, "mlp.up_proj": 0.25}
    for i in range(layers):
        given = 0
        for part, share in parts.items():
            nbytes = int(layer_bytes * share)
            tensors[f"model.layers.{i}.{part}.weight"] = nbytes
            given += nbytes
        tensors[f"model.layers.{i}.mlp.down_proj.weight"] = layer_bytes - given
    if tied:
        return ModelLayout(tensors, {"lm_head": "model.embed_tokens.weight"})
    return ModelLayout(tensors | {"lm_head.weight": embed})


def gpus(count: int, capacity: int) -> list[DeviceSpec]:
    return [DeviceSpec(f"cuda:{i}", capacity) for i in range(count)]


LLAMA70B = llama_layout(80, 1_711_276_032, 1_050_673_152 * 2)


def _check_invariants(layout: ModelLayout, placement, devices, reserve: int = 0) -> None:
    """Every module placed once, flow order kept (devices never go back), room respected."""
    placed = set(placement.device_map)
    assert {u for u, _ in units(layout)} | set(layout.tied) == placed
    order = [d.name for d in devices] + [CPU]
    seen = [order.index(placement.device_map[u]) for u, _ in units(layout)]
    assert seen == sorted(seen)
    capacity = {d.name: d.capacity_bytes - reserve for d in devices}
    for device, used in placement.bytes_per_device.items():
        if device != CPU:
            assert used <= capacity[device]
    assert sum(placement.bytes_per_device.values()) == layout.total_bytes


def test_one_gpu_holds_a_model_that_fits():
    layout = llama_layout(32, 218_112_000, 262_144_000 * 2)  # an 8B model, 16 GB in bf16
    placement = plan_placement(layout, gpus(1, 80 * GB))
    assert set(placement.device_map.values()) == {"cuda:0"}
    assert placement.bytes_per_device == {"cuda:0": layout.total_bytes}
    assert placement.offloaded_bytes == 0


@pytest.mark.parametrize("count", [2, 4, 8])
def test_a_70b_model_is_balanced_over_every_gpu(count: int):
    devices = gpus(count, 80 * GB)
    placement = plan_placement(LLAMA70B, devices, reserve_bytes=8 * GB)
    _check_invariants(LLAMA70B, placement, devices, reserve=8 * GB)
    assert placement.devices == [d.name for d in devices]
    loads = placement.bytes_per_device.values()
    largest_unit = max(size for _, size in units(LLAMA70B))
    # Balanced: no GPU holds more than its fair share by over one layer (plus the head).
    assert max(loads) - min(loads) <= 2 * largest_unit
    assert max(loads) <= LLAMA70B.total_bytes / count + 2 * largest_unit


def test_layers_stay_whole_and_in_order():
    placement = plan_placement(LLAMA70B, gpus(8, 80 * GB))
    assert placement.device_map["model.embed_tokens"] == "cuda:0"
    assert placement.device_map["lm_head"] == "cuda:7"
    assert placement.device_of("model.layers.0.mlp.up_proj.weight") == "cuda:0"
    assert placement.device_of("model.layers.79.self_attn.q_proj.weight") == "cuda:7"
    assert "model.layers.0.mlp" not in placement.device_map


def test_a_model_that_does_not_fit_names_the_shortfall_in_bytes():
    with pytest.raises(PlacementError) as caught:
        plan_placement(LLAMA70B, gpus(1, 80 * GB), reserve_bytes=8 * GB)
    short = LLAMA70B.total_bytes - 72 * GB
    assert caught.value.shortfall_bytes == short
    message = str(caught.value)
    assert f"{short} bytes" in message
    assert "short" in message and "cuda:0" in message and "CPU offload" in message


def test_the_reserve_is_what_tips_a_tight_fit_over():
    devices = gpus(2, 72 * GB)
    plan_placement(LLAMA70B, devices)  # fits without a reserve
    with pytest.raises(PlacementError) as caught:
        plan_placement(LLAMA70B, devices, reserve_bytes=2 * GB)
    assert caught.value.shortfall_bytes == LLAMA70B.total_bytes - 140 * GB
    assert "reserving" in str(caught.value)


def test_cpu_offload_takes_what_the_gpus_cannot():
    devices = gpus(1, 80 * GB)
    placement = plan_placement(LLAMA70B, devices, cpu=DeviceSpec(CPU, 512 * GB))
    _check_invariants(LLAMA70B, placement, devices)
    assert placement.devices == ["cuda:0", CPU]
    assert 0 < placement.bytes_per_device["cuda:0"] <= 80 * GB
    assert placement.offloaded_bytes == LLAMA70B.total_bytes - placement.bytes_per_device["cuda:0"]
    assert placement.device_map["lm_head"] == CPU


def test_offload_too_small_is_still_a_shortfall():
    with pytest.raises(PlacementError) as caught:
        plan_placement(LLAMA70B, gpus(1, 80 * GB), cpu=DeviceSpec(CPU, 10 * GB))
    assert caught.value.shortfall_bytes == LLAMA70B.total_bytes - 90 * GB
    assert "CPU offload 9.31 GiB" in str(caught.value)


def test_no_gpu_with_cpu_places_everything_on_the_cpu():
    layout = llama_layout(4, 1000, 500)
    placement = plan_placement(layout, [], cpu=DeviceSpec(CPU, 10**6))
    assert set(placement.device_map.values()) == {CPU}
    with pytest.raises(PlacementError, match="no device"):
        plan_placement(layout, [])


def test_balance_gives_way_when_later_devices_are_smaller():
    layout = ModelLayout({f"model.layers.{i}.w": 40 for i in range(4)})
    devices = [DeviceSpec("cuda:0", 120), DeviceSpec("cuda:1", 40)]
    # A fair share (80 each) would leave 80 for a device with room for 40.
    assert plan_placement(layout, devices).bytes_per_device == {"cuda:0": 120, "cuda:1": 40}
    even = [DeviceSpec("cuda:0", 120), DeviceSpec("cuda:1", 120)]
    assert plan_placement(layout, even).bytes_per_device == {"cuda:0": 80, "cuda:1": 80}


def test_room_split_in_pieces_smaller_than_a_layer_is_refused():
    layout = ModelLayout({"model.layers.0.w": 100, "model.layers.1.w": 100})
    with pytest.raises(PlacementError, match="fit on no device") as caught:
        plan_placement(layout, gpus(3, 80))  # 240 bytes of room in all, but layers are 100
    assert caught.value.shortfall_bytes > 0


def test_a_tied_head_follows_its_embedding():
    layout = llama_layout(8, 1000, 4000, tied=True, norm=16)
    placement = plan_placement(layout, gpus(4, 10_000))
    assert placement.device_map["lm_head"] == placement.device_map["model.embed_tokens"]


def test_devices_listed_twice_are_refused():
    with pytest.raises(ValueError, match="twice"):
        plan_placement(LLAMA70B, [DeviceSpec("cuda:0", GB), DeviceSpec("cuda:0", GB)])


@pytest.mark.parametrize(
    ("tensor", "unit"),
    [
        ("model.layers.12.mlp.up_proj.weight", "model.layers.12"),
        ("transformer.h.3.attn.c_attn.bias", "transformer.h.3"),
        ("gpt_neox.layers.0.attention.dense.weight", "gpt_neox.layers.0"),
        ("model.decoder.layers.5.fc1.weight", "model.decoder.layers.5"),
        ("model.embed_tokens.weight", "model.embed_tokens"),
        ("lm_head.weight", "lm_head"),
        ("model.norm.weight", "model.norm"),
    ],
)
def test_units_are_decoder_layers_or_modules(tensor: str, unit: str):
    assert unit_of(tensor) == unit


def test_units_follow_the_flow_of_activations():
    order = [u for u, _ in units(llama_layout(12, 100, 10, norm=16))]
    assert order[0] == "model.embed_tokens"
    assert order[1:13] == [f"model.layers.{i}" for i in range(12)]
    assert order[-2:] == ["model.norm", "lm_head"]


def test_reserve_for_llama_3_70b():
    config = {
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "hidden_size": 8192,
        "vocab_size": 128256,
    }
    reserve = activation_reserve_bytes(config, tokens=8 * 2048, dtype_bytes=2)
    kv = 2 * 80 * 8 * 128 * 8 * 2048 * 2
    assert reserve == kv + 8 * 2048 * 128256 * 4
    assert 13 * GB < reserve < 14 * GB


def _checkpoint(path: Path, *, tied: bool) -> Path:
    path.mkdir()
    tensors = {
        "model.embed_tokens.weight": torch.zeros(16, 8, dtype=torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.zeros(12, 8, dtype=torch.bfloat16),
        "model.layers.1.mlp.up_proj.weight": torch.zeros(12, 8, dtype=torch.bfloat16),
        "model.norm.weight": torch.zeros(8, dtype=torch.bfloat16),
    }
    if not tied:
        tensors["lm_head.weight"] = torch.zeros(16, 8, dtype=torch.bfloat16)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"tie_word_embeddings": tied}))
    return path


def test_layouts_come_from_headers(tmp_path: Path):
    tied = _checkpoint(tmp_path / "tied", tied=True)
    layout = layout_of_checkpoint(read_layout(tied))
    assert layout.tensors["model.layers.0.mlp.up_proj.weight"] == 12 * 8 * 2
    assert layout.tied == {"lm_head": "model.embed_tokens.weight"}
    merged = layout_of_merge(validate_checkpoints([tied, tied]), "float32")
    assert merged.total_bytes == (16 * 8 + 2 * 12 * 8 + 8) * 4
    untied = _checkpoint(tmp_path / "untied", tied=False)
    assert layout_of_checkpoint(read_layout(untied)).tied == {}


def test_host_memory_is_bounded_by_the_containers_cgroup_limit():
    from mergerunner.devices import available_bytes

    meminfo = "MemTotal: 200000000 kB\nMemAvailable:  100000000 kB\n"
    assert available_bytes(meminfo, None, None, fallback=1) == 100000000 * 1024
    assert available_bytes(meminfo, "max\n", "100\n", fallback=1) == 100000000 * 1024
    limited = available_bytes(meminfo, str(64 << 30), str(60 << 30), fallback=1)
    assert limited == 4 << 30
    assert available_bytes(meminfo, "100", "200", fallback=1) == 0
    assert available_bytes(None, None, None, fallback=7) == 7


def test_the_reserve_follows_batch_size_and_length():
    from mergerunner.devices import RESERVE_TOKENS, reserve_bytes
    from mergerunner.trial import EvaluatorSpec

    config = {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_size": 64,
        "vocab_size": 100,
        "max_position_embeddings": 131072,
    }
    per_token = 2 * 2 * 4 * 16 * 2 + 100 * 4
    # batch auto counts as 1; a 128k context is capped to RESERVE_TOKENS unless maxLength says
    assert reserve_bytes(config, EvaluatorSpec(), "bfloat16") == RESERVE_TOKENS * per_token
    spec = EvaluatorSpec(batch_size=8, max_length=512)
    assert reserve_bytes(config, spec, "bfloat16") == 8 * 512 * per_token
    short = config | {"max_position_embeddings": 64}
    assert reserve_bytes(short, EvaluatorSpec(), "bfloat16") == 64 * per_token
