"""Benchmark: the evaluator backends, and host memory when a realistic model is merged and loaded.

A benchmark, not a test: it prints its figures and writes bench/results/evaluator.json.

1. The toy pool (preset mini) through one trial each of the in-process hf backend and the
   server path (`backend: openai` on `transformers serve`, CPU): examples per second of the
   evaluate step (the server's start-up included, as a trial pays it) and whether the held-in
   scores are equal, on the same seeded subset of each task (--limit). Both at batch size 1:
   the server answers one request at a time.
2. Peak host memory when a random-init Llama of TinyLlama-1.1B's shape (hidden 2048, MLP 5632,
   32 heads / 4 KV heads, vocab 32000, bf16; 22 layers, or fewer with --layers to save CPU
   time: every tensor keeps its real shape) is merged from two checkpoints and loaded by the
   placement path, every weight then read once (as a first forward pass does), in a fresh
   process: the peak of VmRSS (`load_peak_rss_over_model`) and of RssAnon sampled every 5 ms,
   each minus the process's figure after its imports, over the model's bytes in bf16 (and
   ru_maxrss minus its high-water mark after the imports, which understates when the imports'
   own transient peak was higher). RssAnon
   leaves out file pages: transformers leaves CPU weights backed by the memory-mapped merged
   file, which the kernel can drop and re-read. On a CPU the loaded model itself lives in host
   memory, so 1.0 is the floor here; on a GPU the same path keeps about one tensor in host
   memory. Nothing is downloaded.

Usage: nice -n 10 python bench/evaluator.py [--layers 22] [--limit 60] [--skip-toy]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "evaluator.json"
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}


# ------------------------------------------------------------------------------------ toy pool


def toy_comparison(limit: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from mergerunner.run import run_trial
    from mergerunner.trial import TrialDocument
    from support.net import free_port
    from support.toypool import cached_pool

    pool = cached_pool("mini")
    names = list(pool.checkpoints)
    exe = str(Path(sys.executable).parent / "transformers")
    serve = [exe, "serve", "{model}", "--host", "{host}", "--port", "{port}", "--device", "cpu"]
    serve += ["--dtype", "float32", "--log-level", "warning"]

    def doc(evaluator: dict[str, Any]) -> TrialDocument:
        return TrialDocument.model_validate(
            {
                "id": "bench",
                "checkpoints": [{"name": n, "uri": str(pool.checkpoints[n])} for n in names],
                "weights": {n: 1 / len(names) for n in names},
                "dtype": "float32",
                "heldIn": [
                    {"task": t, "metric": m, "limit": limit} for t, m in pool.heldin.items()
                ],
                "customTasksDir": str(pool.tasks_dir),
                "evaluator": {"device": "cpu", "batchSize": 1, **evaluator},
            }
        )

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_HUB_CACHE"] = str(Path(tmp) / "hub")
        (Path(tmp) / "hub").mkdir()
        hf = run_trial(doc({"backend": "hf"}), cache_dir=Path(tmp) / "c", work_dir=Path(tmp))
        server = {"command": serve, "port": free_port()}
        served = run_trial(
            doc({"backend": "openai", "server": server}),
            cache_dir=Path(tmp) / "c",
            work_dir=Path(tmp),
        )
    assert hf.status == served.status == "succeeded", (hf.error, served.error)
    examples = sum(min(limit, _task_size(pool.tasks_dir, t)) for t in pool.heldin)
    return {
        "examples": examples,
        "hf_examples_per_s": round(examples / hf.timings.evaluate_s, 2),
        "server_examples_per_s": round(examples / served.timings.evaluate_s, 2),
        "scores_equal": hf.held_in == served.held_in,
        "hf_scores": hf.held_in,
        "server_scores": served.held_in,
    }


def _task_size(tasks_dir: Path, task: str) -> int:
    return sum(1 for line in (tasks_dir / f"{task}.jsonl").read_text().splitlines() if line)


# ------------------------------------------------------------------------------ host memory


def write_checkpoint(directory: Path, layers: int, seed: int) -> int:
    """A random-init Llama checkpoint of the 1B shape in bf16, one layer in memory at a time
    beside the embeddings; returns its bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(**LLAMA_1B, num_hidden_layers=layers, tie_word_embeddings=False)
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    h, m, v = LLAMA_1B["hidden_size"], LLAMA_1B["intermediate_size"], LLAMA_1B["vocab_size"]
    kv = h // LLAMA_1B["num_attention_heads"] * LLAMA_1B["num_key_value_heads"]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    shards: list[dict[str, torch.Tensor]] = [
        {"model.embed_tokens.weight": rand(v, h), "lm_head.weight": rand(v, h)},
        {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16)},
    ]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append(
            {
                p + "self_attn.q_proj.weight": rand(h, h),
                p + "self_attn.k_proj.weight": rand(kv, h),
                p + "self_attn.v_proj.weight": rand(kv, h),
                p + "self_attn.o_proj.weight": rand(h, h),
                p + "mlp.gate_proj.weight": rand(m, h),
                p + "mlp.up_proj.weight": rand(m, h),
                p + "mlp.down_proj.weight": rand(h, m),
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            }
        )
    weight_map: dict[str, str] = {}
    total = 0
    for n, shard in enumerate(shards):
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
        total += sum(t.numel() * 2 for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss_anon() -> int:
    return _status("RssAnon")


def measure_load(work: str) -> None:
    """Child process: merge the two checkpoints, load the result by the placement path."""
    import torch  # noqa: F401  (imports counted in the baseline, not in the load)
    import transformers  # noqa: F401

    from mergerunner.devices import load_placed, plan_for_directory
    from mergerunner.merge import merge_to_directory
    from mergerunner.trial import EvaluatorSpec

    base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base_anon, base_rss = _rss_anon(), _status("VmRSS")
    peak = {"anon": base_anon, "rss": base_rss}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak["anon"] = max(peak["anon"], _rss_anon())
            peak["rss"] = max(peak["rss"], _status("VmRSS"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    root = Path(work)
    start = time.perf_counter()
    merge_to_directory([root / "a", root / "b"], [0.5, 0.5], root / "merged", dtype="bfloat16")
    merged = time.perf_counter()
    spec = EvaluatorSpec(device="cpu")
    model = load_placed(
        root / "merged",
        plan_for_directory(root / "merged", spec, "bfloat16"),
        "bfloat16",
        trust=False,
    )
    loaded = time.perf_counter()
    # Touch every weight, as the first forward pass does: transformers may leave CPU weights
    # backed by the memory-mapped file, whose pages only count once they are read. A max is a
    # reduction that reads without allocating (a float() copy of the embedding alone would add
    # 0.12x of the model to the peak, the benchmark's own cost, not the load's).
    checksum = sum(float(p.detach().max()) for p in model.parameters())
    done.set()
    sampler.join()
    params = sum(p.numel() for p in model.parameters())
    out = {
        "params": params,
        "baseline_maxrss": base_max,
        "baseline_rss_anon": base_anon,
        "peak_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_anon": peak["anon"],
        "baseline_rss": base_rss,
        "peak_rss": peak["rss"],
        "merge_s": round(merged - start, 2),
        "load_s": round(loaded - merged, 2),
        "weights_max_sum": checksum,
    }
    print(json.dumps(out))


def memory_comparison(layers: int) -> dict[str, Any]:
    work = tempfile.mkdtemp(prefix="bench-evaluator-", dir=os.environ.get("BENCH_TMP"))
    try:
        gen = (
            "import sys; sys.path.insert(0, 'bench'); from evaluator import write_checkpoint; "
            "from pathlib import Path; "
            f"print(write_checkpoint(Path({work!r}) / 'a', {layers}, 0)); "
            f"write_checkpoint(Path({work!r}) / 'b', {layers}, 1)"
        )
        out = subprocess.run(
            [sys.executable, "-c", gen], cwd=ROOT, check=True, capture_output=True, text=True
        )
        model_bytes = int(out.stdout.split()[-1])
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; sys.path.insert(0, 'bench'); from evaluator import measure_load; "
                f"measure_load({work!r})",
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
        figures = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    anon = (figures["peak_rss_anon"] - figures["baseline_rss_anon"]) / model_bytes
    rss = (figures["peak_rss"] - figures["baseline_rss"]) / model_bytes
    maxrss = (figures["peak_maxrss"] - figures["baseline_maxrss"]) / model_bytes
    return {
        "layers": layers,
        "model_bytes": model_bytes,
        "load_peak_rss_over_model": round(rss, 3),
        "load_peak_maxrss_over_model": round(maxrss, 3),
        "load_peak_rss_anon_over_model": round(anon, 3),
        **figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--skip-toy", action="store_true")
    parser.add_argument("--limit", type=int, default=60, help="examples per toy task")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    if args.skip_toy and RESULTS.is_file():  # keep the last run's toy figures
        last = json.loads(RESULTS.read_text())
        results |= {k: v for k, v in last.items() if k not in ("memory", "machine")}
    if not args.skip_toy:
        results |= toy_comparison(args.limit)
        print(
            f"toy pool: hf {results['hf_examples_per_s']} ex/s, server "
            f"{results['server_examples_per_s']} ex/s, scores equal: {results['scores_equal']}"
        )
    memory = memory_comparison(args.layers)
    results |= {k: memory.pop(k) for k in ("load_peak_rss_over_model",)} | {"memory": memory}
    print(
        f"merge + load of a {memory['params'] / 1e9:.2f}B-parameter model "
        f"({memory['model_bytes'] / 2**30:.2f} GiB bf16), every weight read: peak RSS "
        f"{results['load_peak_rss_over_model']}x the model, RssAnon "
        f"{memory['load_peak_rss_anon_over_model']}x (above the interpreter after imports)"
    )
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
