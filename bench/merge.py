"""Benchmark: our streamed linear merge against mergekit's, with the time to read the inputs as
the floor. A benchmark, not a test: it prints a table and writes bench/results/merge.json.

Eight synthetic Llama-shaped checkpoints (about 256 MiB each in bf16) are written to a temporary
directory, the page cache is warmed, then three workloads run side by side, alternating, each
repetition in a fresh subprocess so that peak memory is per process:

* ours      mergerunner.merge.merge_to_directory, bf16 out;
* mergekit  mergekit's linear merge (Python API, CPU, lazy unpickling, bf16, normalize off);
* floor     reading every input byte once from the page cache, nothing else.

Time is measured inside each worker around the merge call only (imports excluded), and
reported as the median over repetitions, with the CPU time (user + system) beside it: on a shared
machine the CPU time is the steadier figure. Peak memory: ru_maxrss of the child (os.wait4; the
checkpoints are generated in a subprocess too, so that the parent is small when it forks), and
the peak of RssAnon sampled from /proc every 5 ms. RssAnon leaves out the file pages that a
memory-mapping reader touches (both merges map their inputs), which the kernel can drop at will.
Every output is compared against a float64 reference computed tensor by tensor.

Usage: python bench/merge.py [--reps 3] [--checkpoints 8] [--layers 5] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "merge.json"
WEIGHTS_8 = [0.22, 0.05, 0.13, 0.08, 0.17, 0.11, 0.15, 0.09]
READ_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
# Synthetic checkpoints
# ---------------------------------------------------------------------------------------------


def llama_config(layers: int) -> dict[str, Any]:
    """A Llama layout at the small end of real LLMs: 32000 x 1024 embeddings, 2816-wide MLP."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def llama_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, m, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "lm_head.weight": (v, h),
        "model.norm.weight": (h,),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (h, h)
        shapes[f"{p}mlp.gate_proj.weight"] = (m, h)
        shapes[f"{p}mlp.up_proj.weight"] = (m, h)
        shapes[f"{p}mlp.down_proj.weight"] = (h, m)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    return shapes


def make_checkpoints(root: Path, count: int, layers: int) -> list[Path]:
    """Fine-tune-like variants: one shared base plus a per-checkpoint perturbation."""
    import torch
    from safetensors.torch import save_file

    config = llama_config(layers)
    shapes = llama_shapes(config)
    base_gen = torch.Generator().manual_seed(0)
    base = {
        n: (torch.randn(s, generator=base_gen) * 0.02).to(torch.bfloat16) for n, s in shapes.items()
    }
    dirs = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i + 1)
        tensors = {
            n: (t.float() + torch.randn(t.shape, generator=gen) * 0.002).to(torch.bfloat16)
            for n, t in base.items()
        }
        path = root / f"ckpt{i}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(config, indent=2))
        dirs.append(path)
        del tensors
    return dirs


# ---------------------------------------------------------------------------------------------
# Workers (each runs in its own subprocess)
# ---------------------------------------------------------------------------------------------


def rss_anon_kb(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """read() every input once into one page-aligned buffer: the fastest plain read measured
    here (a buffer misaligned within a cache line, as bytearray's is, reads 3-4x slower)."""
    buffer = memoryview(mmap.mmap(-1, READ_CHUNK))
    cpu = cpu_seconds()
    start = time.perf_counter()
    total = 0
    for directory in spec["inputs"]:
        for file in sorted(Path(directory).glob("*.safetensors")):
            fd = os.open(file, os.O_RDONLY)
            try:
                while got := os.readv(fd, [buffer]):
                    total += got
            finally:
                os.close(fd)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_s": cpu_seconds() - cpu, "bytes_read": total}


def worker_ours(spec: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "runner"))
    import torch  # noqa: F401  (imported before the clock starts, like mergekit's)

    from mergerunner.merge import merge_to_directory

    baseline = rss_anon_kb()
    cpu = cpu_seconds()
    start = time.perf_counter()
    report = merge_to_directory(
        [Path(p) for p in spec["inputs"]], spec["weights"], Path(spec["out"]), dtype="bfloat16"
    )
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "cpu_s": cpu_seconds() - cpu,
        "baseline_anon_kb": baseline,
        "digest": report.digest,
        "phases": dict(report.seconds),
    }


def worker_mergekit(spec: dict[str, Any]) -> dict[str, Any]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(
        {
            "merge_method": "linear",
            "dtype": "bfloat16",
            "out_dtype": "bfloat16",
            "parameters": {"normalize": False},
            "models": [
                {"model": p, "parameters": {"weight": w}}
                for p, w in zip(spec["inputs"], spec["weights"], strict=True)
            ],
        }
    )
    options = MergeOptions(
        cuda=False, lazy_unpickle=True, copy_tokenizer=False, write_model_card=False, quiet=True
    )
    baseline = rss_anon_kb()
    cpu = cpu_seconds()
    start = time.perf_counter()
    run_merge(config, spec["out"], options=options)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_s": cpu_seconds() - cpu, "baseline_anon_kb": baseline}


def worker_make(spec: dict[str, Any]) -> dict[str, Any]:
    dirs = make_checkpoints(Path(spec["root"]), spec["count"], spec["layers"])
    return {"dirs": [str(d) for d in dirs]}


WORKERS = {
    "ours": worker_ours,
    "mergekit": worker_mergekit,
    "floor": worker_floor,
    "make": worker_make,
}


def peak_rss_mb() -> float:
    """VmHWM: this process's own peak RSS (unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker_main(kind: str, spec_file: Path) -> None:
    result = WORKERS[kind](json.loads(spec_file.read_text()))
    result["vmhwm_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


class AnonSampler(threading.Thread):
    """Peak RssAnon of a child, sampled from /proc: there is no kernel counter for it."""

    def __init__(self, pid: int, period: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.pid, self.period, self.peak_kb = pid, period, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak_kb = max(self.peak_kb, rss_anon_kb(self.pid))
            except (FileNotFoundError, ProcessLookupError, ValueError):
                return
            self.stop.wait(self.period)


def run_worker(kind: str, spec: dict[str, Any], scratch: Path) -> dict[str, Any]:
    spec_file = scratch / f"spec-{kind}.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    wall = time.perf_counter()
    # stderr to a file: reading two pipes one after the other can deadlock on a chatty child.
    with (scratch / f"stderr-{kind}.txt").open("w+b") as err:
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", kind, str(spec_file)],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            cwd=ROOT,
        )
        sampler = AnonSampler(child.pid)
        sampler.start()
        out = child.stdout.read()  # type: ignore[union-attr]
        child.stdout.close()  # type: ignore[union-attr]
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not all children's
        child.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop.set()
        sampler.join()
        if child.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-4000:]
            raise RuntimeError(f"{kind} worker failed ({child.returncode}):\n{tail}")
    line = next(x for x in out.decode().splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result.update(
        wall_s=time.perf_counter() - wall,
        maxrss_mb=usage.ru_maxrss / 1024,
        peak_anon_mb=sampler.peak_kb / 1024,
    )
    if "baseline_anon_kb" in result:
        result["baseline_anon_mb"] = result.pop("baseline_anon_kb") / 1024
    return result


def warm_page_cache(dirs: list[Path]) -> None:
    buffer = memoryview(mmap.mmap(-1, READ_CHUNK))
    for directory in dirs:
        for file in directory.glob("*.safetensors"):
            with file.open("rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass


def max_abs_error(dirs: list[Path], weights: list[float], out: Path) -> float:
    """max |merged - Σ wᵢθᵢ| over every element, the reference in float64, tensor by tensor."""
    import torch
    from safetensors import safe_open

    inputs = [safe_open(str(d / "model.safetensors"), "pt") for d in dirs]
    outputs = {}
    for file in sorted(out.glob("*.safetensors")):
        handle = safe_open(str(file), "pt")
        outputs.update(dict.fromkeys(handle.keys(), handle))
    names = set(inputs[0].keys())
    if set(outputs) != names:
        raise RuntimeError(f"{out}: tensor names differ from the inputs'")
    worst = 0.0
    for name in sorted(names):
        exact = torch.zeros(inputs[0].get_slice(name).get_shape(), dtype=torch.float64)
        for w, handle in zip(weights, inputs, strict=True):
            exact.add_(handle.get_tensor(name).double(), alpha=w)
        got = outputs[name].get_tensor(name)
        if got.dtype != torch.bfloat16:
            raise RuntimeError(f"{out}: {name} is {got.dtype}, expected bfloat16")
        worst = max(worst, (got.double() - exact).abs().max().item())
    return worst


def loads_with_transformers(out: Path) -> bool:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    return bool(torch.isfinite(logits).all())


def summarize(runs: dict[str, list[dict[str, Any]]], extra: dict[str, Any]) -> dict[str, Any]:
    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    summary = {
        "ours_s": med("ours", "seconds"),
        "mergekit_s": med("mergekit", "seconds"),
        "floor_s": med("floor", "seconds"),
        "ours_peak_mb": max(r["maxrss_mb"] for r in runs["ours"]),
        "mergekit_peak_mb": max(r["maxrss_mb"] for r in runs["mergekit"]),
        "ours_vmhwm_mb": max(r["vmhwm_mb"] for r in runs["ours"]),
        "mergekit_vmhwm_mb": max(r["vmhwm_mb"] for r in runs["mergekit"]),
        "ours_peak_anon_mb": max(r["peak_anon_mb"] for r in runs["ours"]),
        "mergekit_peak_anon_mb": max(r["peak_anon_mb"] for r in runs["mergekit"]),
        "ours_cpu_s": med("ours", "cpu_s"),
        "mergekit_cpu_s": med("mergekit", "cpu_s"),
        "floor_cpu_s": med("floor", "cpu_s"),
        "ours_baseline_anon_mb": med("ours", "baseline_anon_mb"),
        "mergekit_baseline_anon_mb": med("mergekit", "baseline_anon_mb"),
        **extra,
    }
    summary["speedup_vs_mergekit"] = summary["mergekit_s"] / summary["ours_s"]
    summary["ours_over_floor"] = summary["ours_s"] / summary["floor_s"]
    summary["ours_over_floor_cpu"] = summary["ours_cpu_s"] / summary["floor_cpu_s"]
    summary["ours_anon_above_baseline_mb"] = (
        summary["ours_peak_anon_mb"] - summary["ours_baseline_anon_mb"]
    )
    summary["anon_budget_mb"] = 2 * summary["largest_tensor_fp32_mb"]
    summary["runs"] = runs
    return summary


def print_table(s: dict[str, Any]) -> None:
    rows = [
        ("ours", s["ours_s"], s["ours_peak_mb"], s["ours_peak_anon_mb"], s["ours_max_err"]),
        ("mergekit", s["mergekit_s"], s["mergekit_peak_mb"], s["mergekit_peak_anon_mb"],
         s["mergekit_max_err"]),
        ("floor (read)", s["floor_s"], float("nan"), float("nan"), float("nan")),
    ]  # fmt: skip
    gib = s["input_bytes"] / 2**30
    print(f"\n{s['checkpoints']} checkpoints, {gib:.2f} GiB bf16 in, median of {s['repetitions']}")
    cpu = {
        "ours": s["ours_cpu_s"],
        "mergekit": s["mergekit_cpu_s"],
        "floor (read)": s["floor_cpu_s"],
    }
    print(
        f"{'':14}{'time s':>9}{'cpu s':>8}{'GiB/s':>8}{'maxrss MB':>11}{'peak anon MB':>14}"
        f"{'max err':>11}"
    )
    for name, sec, rss, anon, err in rows:
        print(
            f"{name:14}{sec:9.3f}{cpu[name]:8.2f}{gib / sec:8.2f}{rss:11.0f}{anon:14.0f}{err:11.2e}"
        )
    print(
        f"\nours/mergekit time {s['ours_s'] / s['mergekit_s']:.3f} "
        f"(speed-up {s['speedup_vs_mergekit']:.2f}x, target >= 2)"
        f"\nours/floor time    {s['ours_over_floor']:.2f} (target <= 3); "
        f"cpu time {s['ours_over_floor_cpu']:.2f}"
        f"\nours peak anon above interpreter baseline {s['ours_anon_above_baseline_mb']:.0f} MB "
        f"(target < 2 x largest fp32 tensor = {s['anon_budget_mb']:.0f} MB)"
        f"\nmax abs error ours {s['ours_max_err']:.3e} vs mergekit {s['mergekit_max_err']:.3e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="default: the temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic data")
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker[0], Path(args.worker[1]))
        return

    weights = WEIGHTS_8 if args.checkpoints == 8 else [1 / args.checkpoints] * args.checkpoints
    workdir = args.workdir or Path(tempfile.gettempdir())
    scratch = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=workdir))
    try:
        print(f"writing {args.checkpoints} synthetic checkpoints to {scratch} ...", flush=True)
        # In a subprocess, so that this process stays small: a child's ru_maxrss starts from
        # its parent's RSS at fork time.
        make = {"root": str(scratch / "inputs"), "count": args.checkpoints, "layers": args.layers}
        dirs = [Path(d) for d in run_worker("make", make, scratch)["dirs"]]
        warm_page_cache(dirs)
        load_at_start = round(os.getloadavg()[0], 2)
        shapes = llama_shapes(llama_config(args.layers))
        largest = max(math.prod(s) for s in shapes.values())
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "mergekit": [], "floor": []}
        order = ["floor", "ours", "mergekit"]
        for rep in range(args.reps):
            for kind in order[rep % 3 :] + order[: rep % 3]:
                out = scratch / f"out-{kind}"
                shutil.rmtree(out, ignore_errors=True)
                os.sync()  # earlier runs' dirty pages must not be flushed on this run's clock
                spec = {"inputs": [str(d) for d in dirs], "weights": weights, "out": str(out)}
                result = run_worker(kind, spec, scratch)
                runs[kind].append(result)
                sec, cpu = result["seconds"], result["cpu_s"]
                print(f"  rep {rep} {kind:9} {sec:7.3f} s  cpu {cpu:6.2f} s", flush=True)
        print("checking outputs against a float64 reference ...", flush=True)
        extra = {
            "checkpoints": args.checkpoints,
            "repetitions": args.reps,
            "weights": weights,
            "input_bytes": sum(f.stat().st_size for d in dirs for f in d.glob("*.safetensors")),
            "largest_tensor_fp32_mb": largest * 4 / 2**20,
            "ours_max_err": max_abs_error(dirs, weights, scratch / "out-ours"),
            "mergekit_max_err": max_abs_error(dirs, weights, scratch / "out-mergekit"),
            "ours_loads_with_transformers": loads_with_transformers(scratch / "out-ours"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
            "load_average_1m": [load_at_start, round(os.getloadavg()[0], 2)],
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"),
        }
        summary = summarize(runs, extra)
        print_table(summary)
        if not args.no_write:
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
            print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
