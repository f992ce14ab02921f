"""Preflight cost: bytes read and time for the checkpoint checks of 8 Llama-1B-shaped checkpoints.

The preflight (mergerunner.preflight) must find checkpoints that cannot be merged without
downloading them: it reads each checkpoint's listing, config.json and safetensors header with
ranged requests. Target: under 1 % of the checkpoints' bytes.

The checkpoints are generated here, nothing is downloaded: the tensor names and shapes of a
1.1B-parameter Llama (TinyLlama's configuration: hidden 2048, 22 layers, 32 heads with 4 KV
heads, intermediate 5632, vocabulary 32000; shapes from transformers' own LlamaForCausalLM on
the meta device), bfloat16, one `model.safetensors` each. The weight region of each file is
sparse (its size is real, its bytes are never written) — the preflight never reads it, and
writing 17 GB of random numbers would only measure the disk.

Reads go through obstore's LocalStore, the same code path as S3 (ranged GETs), so the bytes
counted are the bytes a pod would fetch; the time is a local-disk time, not a network one.

    python bench/preflight.py [--checkpoints 8] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "runner")]

from mergerunner.preflight import check_checkpoints  # noqa: E402

LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def llama_shapes() -> dict[str, list[int]]:
    """Tensor name -> shape of the model, from transformers on the meta device (no memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in LLAMA_1B.items() if k != "architectures"})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def write_checkpoint(directory: Path, shapes: dict[str, list[int]], seed: int) -> int:
    """A safetensors file with this header and a sparse weight region; returns its size."""
    directory.mkdir(parents=True)
    header: dict[str, object] = {"__metadata__": {"format": "pt", "seed": str(seed)}}
    offset = 0
    for name in sorted(shapes):
        size = 2 * math.prod(shapes[name])  # bfloat16
        header[name] = {
            "dtype": "BF16",
            "shape": shapes[name],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as safetensors writes it
    path = directory / "model.safetensors"
    with path.open("wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        handle.truncate(8 + len(raw) + offset)
    (directory / "config.json").write_text(json.dumps(LLAMA_1B, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1}))
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="write the checkpoints here and keep them")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "preflight.json")
    args = parser.parse_args()
    shapes = llama_shapes()
    params = sum(math.prod(s) for s in shapes.values())
    with tempfile.TemporaryDirectory(prefix="bench-preflight-") as tmp:
        root = args.keep or Path(tmp)
        dirs = [root / f"ckpt-{i}" for i in range(args.checkpoints)]
        header_bytes = 0
        for i, d in enumerate(dirs):
            write_checkpoint(d, shapes, seed=i)
            header_bytes = int.from_bytes((d / "model.safetensors").read_bytes()[:8], "little")
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            plan, stats = check_checkpoints([str(d) for d in dirs])
            times.append(time.perf_counter() - start)
    result = {
        "checkpoints": args.checkpoints,
        "parameters_per_checkpoint": params,
        "tensors_per_checkpoint": len(plan.tensors),
        "safetensors_header_bytes": header_bytes,
        "checkpoint_bytes": stats.checkpoint_bytes,
        "bytes_read": stats.bytes_read,
        "requests": stats.requests,
        "read_fraction": stats.bytes_read / stats.checkpoint_bytes,
        "seconds": sorted(times)[len(times) // 2],
        "rounds": args.rounds,
        "target_read_fraction": 0.01,
        "storage": "local files through obstore LocalStore (ranged GETs, as on S3)",
        "weights": "sparse: header and size real, weight bytes never written (never read)",
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.checkpoints} checkpoints x {params / 1e9:.2f}B parameters "
        f"({stats.checkpoint_bytes / 1e9:.1f} GB): preflight read {stats.bytes_read} bytes "
        f"({100 * result['read_fraction']:.5f} %, target < 1 %) in {stats.requests} requests, "
        f"{result['seconds']:.3f} s (median of {args.rounds})"
    )


if __name__ == "__main__":
    main()
