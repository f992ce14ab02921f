"""Per-trial overhead of one Job per trial against warm evaluators, on the real control plane.

    nice -n 5 $VENV/bin/python -P bench/trial_overhead.py        # the issue's scale (~0.5B)
    $VENV/bin/python -P bench/trial_overhead.py --small --out /tmp/overhead.json   # dry run

Starts its own control plane (tests/support/cluster.py), a node agent (one node), the real S3
server (SeaweedFS) and the operator as its own process (RBAC ServiceAccount credentials,
serving the evaluator endpoint, with a node cache directory). Generates 8 synthetic Llama
checkpoints (random init, nothing downloaded) and uploads them to S3. By default each has
0.50B parameters, 1.0 GB in bfloat16 (8.0 GB per pool): hidden 1536, MLP 4096, 16 layers, 12
heads with 4 key/value heads (grouped-query attention, as current Llamas) and a 32000-token
vocabulary with untied embeddings (Llama 2's): the tensor shapes of a small real LLM. The toy
pool's 44-token tokenizer comes with them, so that the toy tasks can score them (the other
vocabulary rows are merged and never indexed). Stored in bfloat16, as fine-tunes ship: half
the S3 bytes, fetch time and resident host memory of float32; merged to bfloat16
(`merge.dtype`, what a user exports), computed in float32 on this CPU (`compute_dtype`).

Then runs two searches side by side in time, one after the other, with the same cheap fixed
evaluation (one toy task, 2 examples, CPU):

- jobs mode, parallelism 1: per-trial non-scoring time = (Job seen Complete - Job seen
  created) - scoring time. Everything a trial pod does but score: start, runner start-up,
  fetch of all 8 checkpoints into its emptyDir, merge to disk, load, task-suite build;
- warm mode, `--warm-parallelism` evaluators (default 1, timed like the other two: one
  process at a time; 2 shows two evaluators on the node sharing its cache): per trial, from
  the evaluators' own log lines, the time from posting the previous result to holding the
  next lease, plus the trial's time other than scoring (the in-place merge and its content
  digest). Each evaluator's first trial (fetch, load, suite build: a one-off per pod) is
  reported apart.

Floors, at the same shapes and dtypes, measured in a child process before the cluster starts
(its resident checkpoints are freed when it ends): local mode's in-place merge
(`ResidentMerger.merge_into` with its content digest, the `local_merge_s` target's
denominator) and the scoring time. Bytes fetched from S3 by the warm search: the sum of what
its evaluators report (their log lines; a second evaluator on the node finds the cache filled
and fetches 0 bytes).

Memory: a warm evaluator holds the 8 checkpoints (8.0 GB) and the model in float32 (2.0 GB);
its peak RSS (from its log lines), the floors' child's and the least MemAvailable seen are
recorded. A collected trial pod's emptyDir is removed as a kubelet would (the node agent
keeps pod directories for their logs): 8 GB per trial would otherwise fill the disk.

Writes bench/results/trial_overhead.json (or `--out`) with the CPU count and the load average
per phase: on a shared machine compare the ratios, which are measured in one run.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [
    str(ROOT / "tests"),
    str(ROOT / "tests" / "e2e"),
    str(ROOT / "operator"),
    str(ROOT / "runner"),
    str(ROOT / "bench"),
]

from support.cluster import ApiClient, KubeCluster  # noqa: E402
from support.nodeagent import NodeAgent  # noqa: E402
from support.operator_proc import (  # noqa: E402
    Searches,
    evaluator_endpoint_env,
    running_operator,
)
from support.polling import wait_for  # noqa: E402
from support.s3server import SeaweedS3  # noqa: E402
from support.search_inputs import (  # noqa: E402
    STORE_SECRET,
    create_search_inputs,
    portable_tasks,
    upload_checkpoints,
)
from support.toypool import cached_pool  # noqa: E402

RESULT = ROOT / "bench" / "results" / "trial_overhead.json"
CHECKPOINTS = 8
TASK, METRIC, LIMIT = "toy_rev", "exact_match", 2
EVALUATOR = {"device": "cpu", "batchSize": 8, "seed": 1}
STORED_DTYPE = MERGE_DTYPE = "bfloat16"
T = TypeVar("T")
TRIAL_JOB = re.compile(r"-g\d+-c\d+$")  # a trial Job's name ends with its candidate id
TOY_VOCAB = 44  # the toy tokenizer's ids: the model's vocabulary must hold them


@dataclass(frozen=True)
class Shape:
    """A Llama's tensor shapes; the default is a ~0.5B-parameter model (see the docstring)."""

    hidden: int = 1536
    intermediate: int = 4096
    layers: int = 16
    heads: int = 12
    kv_heads: int = 4
    vocab: int = 32000

    def config(self) -> dict[str, int]:
        return {
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
        }

    def tensors(self) -> dict[str, tuple[int, ...]]:
        h, m, v = self.hidden, self.intermediate, self.vocab
        kv = h // self.heads * self.kv_heads
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (v, h),
            "lm_head.weight": (v, h),
            "model.norm.weight": (h,),
        }
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes |= {
                f"{p}self_attn.q_proj.weight": (h, h),
                f"{p}self_attn.k_proj.weight": (kv, h),
                f"{p}self_attn.v_proj.weight": (kv, h),
                f"{p}self_attn.o_proj.weight": (h, h),
                f"{p}mlp.gate_proj.weight": (m, h),
                f"{p}mlp.up_proj.weight": (m, h),
                f"{p}mlp.down_proj.weight": (h, m),
                f"{p}input_layernorm.weight": (h,),
                f"{p}post_attention_layernorm.weight": (h,),
            }
        return shapes

    @property
    def params(self) -> int:
        return sum(math.prod(s) for s in self.tensors().values())


SMALL = Shape(hidden=256, intermediate=688, layers=2, heads=4, kv_heads=2, vocab=1000)


# --------------------------------------------------------------------------- checkpoints


def make_checkpoints(root: Path, shape: Shape, toy: Path) -> list[Path]:
    """8 fine-tune-like random-init Llamas: a shared base plus a per-checkpoint perturbation,
    stored in bfloat16, with the toy tokenizer and a config transformers loads. Memory: the
    base and one checkpoint in bfloat16, one tensor in float32."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(
        **shape.config(),
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dtype=STORED_DTYPE,
    )
    generator = torch.Generator().manual_seed(0)
    base = {
        n: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16)
        for n, s in shape.tensors().items()
    }
    dirs = []
    for i in range(CHECKPOINTS):
        gen = torch.Generator().manual_seed(i + 1)
        tensors = {}
        for n, t in base.items():
            if n.endswith("norm.weight"):
                tensors[n] = torch.ones_like(t)
            else:
                noise = torch.randn(t.shape, generator=gen).mul_(0.002)
                tensors[n] = noise.add_(t).to(torch.bfloat16)
        path = root / f"ckpt{i}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        config.save_pretrained(path)
        for extra in toy.iterdir():
            if extra.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(extra, path / extra.name)
        dirs.append(path)
    return dirs


# --------------------------------------------------------------------------- floors


def floors(dirs: list[Path], tasks_dir: Path, score: bool = True) -> dict[str, Any]:
    """Local mode's in-place merge (with the content digest it computes) and the scoring time
    (when `score`), at the searches' shapes and dtypes, the model loaded and placed as local
    mode does."""
    import torch
    from transformers import AutoTokenizer

    from mergerunner.devices import load_placed, model_config, plan_for
    from mergerunner.evaluate import TaskSuite, compute_dtype, make_lm
    from mergerunner.placement import layout_of_merge
    from mergerunner.resident_merge import ResidentMerger
    from mergerunner.trial import EvaluatorSpec, TaskSpec

    evaluator = EvaluatorSpec.model_validate(EVALUATOR)
    merger = ResidentMerger(dirs)
    dtype = compute_dtype(MERGE_DTYPE, "cpu")
    layout = layout_of_merge(merger.plan, dtype)
    placement = plan_for(layout, model_config(dirs[0]), evaluator, dtype)
    model = load_placed(dirs[0], placement, dtype, trust=False)
    tokenizer = AutoTokenizer.from_pretrained(dirs[0])
    weights = [1 / len(dirs)] * len(dirs)
    merges, merge_cpus, scores = [], [], []
    suite = TaskSuite([TaskSpec(task=TASK, metric=METRIC, limit=LIMIT)], include_path=tasks_dir)
    lm = make_lm(model, tokenizer, evaluator, progress=False)
    for i in range(3):
        mix = [w * (1 + 0.1 * ((i + j) % 3)) for j, w in enumerate(weights)]
        start, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            merger.merge_into(model, [m / sum(mix) for m in mix], dtype=MERGE_DTYPE)
        merges.append(time.perf_counter() - start)
        merge_cpus.append(time.process_time() - cpu)
        if score:
            start = time.perf_counter()
            suite.score(lm)
            scores.append(time.perf_counter() - start)
    return {
        "merge_s": merges,
        "merge_cpu_s": merge_cpus,
        "scoring_s": scores,
        "peak_rss_bytes": peak_rss(),
    }


def apart(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a child process: what it holds (the generator's tensors, the
    floors' resident checkpoints: gigabytes) is returned to the system when it ends, before
    the searches' pods need the memory."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


# --------------------------------------------------------------------------- the machine


def peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    return 0


class Machine(threading.Thread):
    """Samples the 1-minute load average and MemAvailable every second, per phase: the run
    shares its CPUs, and a reader judges the noise of the figures from these."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.phase = "setup"
        self.load: dict[str, list[float]] = {}
        self.least_available = meminfo("MemAvailable")
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.load.setdefault(self.phase, []).append(os.getloadavg()[0])
            self.least_available = min(self.least_available, meminfo("MemAvailable"))
            time.sleep(1.0)

    def summary(self) -> dict[str, Any]:
        return {
            "cpus": os.cpu_count(),
            "load_1m_mean": {p: round(statistics.mean(v), 2) for p, v in self.load.items()},
            "load_1m_max": {p: round(max(v), 2) for p, v in self.load.items()},
            "mem_total_bytes": meminfo("MemTotal"),
            "least_mem_available_bytes": self.least_available,
        }


# --------------------------------------------------------------------------- the searches


def spec(uris: dict[str, str], s3: SeaweedS3, mode: str, parallelism: int, trials: int) -> dict:
    return {
        "checkpoints": [{"name": n, "uri": u} for n, u in uris.items()],
        "merge": {"dtype": MERGE_DTYPE},
        "objective": {
            "heldIn": [{"task": TASK, "metric": METRIC, "limit": LIMIT}],
            "customTasks": {"configMapRef": {"name": "toy-tasks"}},
            "evaluator": EVALUATOR,
        },
        "search": {
            "populationSize": trials,
            "maxGenerations": 1,
            "seed": 5,
            "baselines": [],
            "confirm": {"enabled": False},  # exactly `trials` trials, all alike
        },
        "execution": {
            "mode": mode,
            "parallelism": parallelism,
            "backoffLimit": 0,
            "trialTimeoutSeconds": 1800,
            # INFO: the evaluators' per-trial log lines (timings, bytes fetched)
            "template": {
                "containers": [
                    {"name": "runner", "env": [{"name": "MERGERUNNER_LOG_LEVEL", "value": "INFO"}]}
                ]
            },
        },
        "storage": {
            "endpoint": s3.endpoint,
            "region": s3.region,
            "secretRef": {"name": STORE_SECRET},
        },
    }


class JobClock(threading.Thread):
    """Polls the namespace's Jobs: when each was first seen, and when first seen Complete or
    gone (the operator deletes a succeeded trial's Job as soon as it has its pod's result,
    often before the Job controller marks it Complete)."""

    def __init__(self, api: ApiClient, namespace: str, node_dir: Path) -> None:
        super().__init__(daemon=True)
        self.api, self.namespace, self.node_dir = api, namespace, node_dir
        self.created: dict[str, float] = {}
        self.completed: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            items = self.api.get(f"/apis/batch/v1/namespaces/{self.namespace}/jobs")["items"]
            present = set()
            for job in items:
                name = job["metadata"]["name"]
                present.add(name)
                self.created.setdefault(name, now)
                conditions = (job.get("status") or {}).get("conditions") or []
                if any(c["type"] == "Complete" and c["status"] == "True" for c in conditions):
                    self.completed.setdefault(name, now)
            for name in set(self.created) - present:
                self.completed.setdefault(name, now)  # collected (deleted) by the operator
                self.remove_scratch(name)
            time.sleep(0.2)

    def remove_scratch(self, job: str) -> None:
        """What a kubelet does with a deleted pod's emptyDirs (the node agent keeps the pod's
        directory for its log): each trial pod fetched every checkpoint into one."""
        for pod_dir in self.node_dir.glob(f"{self.namespace}_{job}-*"):
            for scratch in ("volumes", "tmp", "work"):
                shutil.rmtree(pod_dir / scratch, ignore_errors=True)


def evaluator_records(agent: NodeAgent, namespace: str) -> dict[str, list[dict[str, Any]]]:
    """Per evaluator pod, its per-trial log lines (mergerunner.evaluator.trial_record)."""
    out: dict[str, list[dict[str, Any]]] = {}
    # From the pods' directories on the node (they outlive the pods: a pod deleted with its
    # Job is forgotten by the agent, its log file is not).
    for log in sorted(agent.workdir.glob(f"{namespace}_*-evaluators-*/*.log")):
        lines = log.read_text(errors="replace").splitlines()
        records = [json.loads(line.split(" trial ", 1)[1]) for line in lines if " trial {" in line]
        out[log.parent.name] = records
    return out


@dataclass
class WarmTimes:
    """Per steady trial: overhead = the hand-over (the wait from posting the previous result
    to holding the next lease) + the trial's time other than scoring (the in-place merge);
    each evaluator's first trial (fetch, load, suite build) apart."""

    steady: list[float]
    setup: list[float]
    handovers: list[float]
    merges: list[float]
    merge_cpus: list[float]


def warm_overheads(per_pod: dict[str, list[dict[str, Any]]]) -> WarmTimes:
    times = WarmTimes([], [], [], [], [])
    for records in per_pod.values():
        for previous, record in zip([None, *records], records, strict=False):
            t = record["timings"]
            other = t.get("totalS", 0.0) - t.get("evaluateS", 0.0)
            if previous is None:
                times.setup.append(other + t.get("evaluateS", 0.0))
                continue
            times.handovers.append(record["leasedAt"] - previous["doneAt"])
            times.merges.append(t.get("mergeS", 0.0))
            times.merge_cpus.append(record.get("mergeCpuS", 0.0))
            times.steady.append(times.handovers[-1] + other)
    return times


def searches(
    dirs: list[Path], tasks: dict[str, str], scratch: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Both searches on one control plane, S3 server and node, and the floors measured just
    before and just after the warm search (on a shared machine the load drifts: the two
    bracket the warm trials in time). Each holds 8 checkpoints resident: one at a time."""
    node_cache = scratch / "node-cache"
    node_cache.mkdir()
    env = {
        **evaluator_endpoint_env(scratch / "key"),
        "MERGESEARCH_NODE_CACHE_DIR": str(node_cache),
    }
    machine: Machine = args.machine
    with (
        KubeCluster(scratch / "cluster") as cluster,
        NodeAgent(cluster.api(), max_running=4) as agent,
        SeaweedS3(scratch / "s3") as s3,
    ):
        bucket = s3.create_bucket()
        uris = upload_checkpoints(s3, bucket, {d.name: d for d in dirs})
        namespace = "overhead"
        cluster.create_namespace(namespace)
        api = cluster.api()
        create_search_inputs(api, namespace, s3, tasks)
        made = Searches(cluster, namespace)
        with running_operator(cluster, [namespace], env=env):
            clock = JobClock(api, namespace, agent.workdir)
            clock.start()
            machine.phase = "jobs"
            made.create("jobs", spec(uris, s3, "jobs", 1, args.trials))
            jobs_status = made.wait_phase("jobs", ["Succeeded", "Failed"], 3600)
            time.sleep(2)  # the last Job's Complete condition follows the search's status
            clock.stop.set()
            machine.phase = "floors"
            before = apart(floors, dirs, scratch / "tasks")
            print(f"floors before the warm search: {before}", flush=True)
            shutil.rmtree(scratch / "ckpt")  # in S3; the evaluators fetch the node cache's copy
            machine.phase = "warm"
            made.create("warm", spec(uris, s3, "warm", args.warm_parallelism, args.warm_trials))
            warm_status = made.wait_phase("warm", ["Succeeded", "Failed"], 3600)
            machine.phase = "teardown"
            evaluators_gone(api, namespace)
            per_pod = evaluator_records(agent, namespace)
        machine.phase = "floors"
        cached = sorted(f.parent for f in node_cache.rglob("model.safetensors"))
        after = apart(floors, cached, scratch / "tasks", False) if cached else None
        print(f"floors after the warm search: {after}", flush=True)
    for name, status in (("jobs", jobs_status), ("warm", warm_status)):
        if status["phase"] != "Succeeded":
            raise SystemExit(f"{name} search: {status.get('conditions')}")
    # Trial Jobs only (`…-g000-c01`): not the preflight Job, which reads headers only.
    walls = {
        n: clock.completed[n] - clock.created[n]
        for n in sorted(clock.completed)
        if TRIAL_JOB.search(n)
    }
    return {"walls": walls, "per_pod": per_pod, "floors": [before, *([after] if after else [])]}


def evaluators_gone(api: ApiClient, namespace: str, timeout_s: float = 300) -> None:
    """Wait until no evaluator pod runs (they exit when told the search is done): their
    resident checkpoints must be freed before the next floor loads its own."""

    def none_left() -> bool:
        pods = api.get(f"/api/v1/namespaces/{namespace}/pods")["items"]
        return not any(
            "-evaluators-" in p["metadata"]["name"]
            and (p.get("status") or {}).get("phase") in ("Pending", "Running")
            for p in pods
        )

    def still_running() -> SystemExit:
        return SystemExit("the evaluator pods did not end after the warm search")

    wait_for(
        none_left, timeout_s, "the evaluator pods to end", interval_s=1.0, failure=still_running
    )


def run(shape: Shape, args: argparse.Namespace) -> dict[str, Any]:
    machine = args.machine = Machine()
    machine.start()
    pool = cached_pool("mini")
    toy = next(iter(pool.checkpoints.values()))
    scratch = Path(tempfile.mkdtemp(prefix="mergesearch-overhead-"))
    try:
        started = time.monotonic()
        dirs = apart(make_checkpoints, scratch / "ckpt", shape, Path(toy))
        checkpoint_bytes = sum(f.stat().st_size for d in dirs for f in d.iterdir())
        generated = time.monotonic() - started
        tasks = portable_tasks(pool.tasks_dir, [TASK], scratch / "tasks")
        observed = searches(dirs, tasks, scratch, args)
    finally:
        machine.stop.set()
        shutil.rmtree(scratch, ignore_errors=True)
    per_pod, walls = observed["per_pod"], list(observed["walls"].values())
    measured = {
        key: [v for floor in observed["floors"] for v in floor[key]]
        for key in ("merge_s", "merge_cpu_s", "scoring_s")
    }
    local_merge = statistics.median(measured["merge_s"])
    local_merge_cpu = statistics.median(measured["merge_cpu_s"])
    warm = warm_overheads(per_pod)
    fetched = sum(max((r["bytesFetched"] for r in recs), default=0) for recs in per_pod.values())
    scoring = statistics.median(measured["scoring_s"])
    jobs_overhead = statistics.median(walls) - scoring
    warm_overhead = statistics.median(warm.steady)
    rounded = lambda values: [round(v, 3) for v in values]  # noqa: E731
    return {
        "jobs_overhead_s": round(jobs_overhead, 3),
        "warm_overhead_s": round(warm_overhead, 3),
        "local_merge_s": round(local_merge, 3),
        "s3_bytes_per_search": fetched,
        "checkpoint_bytes": checkpoint_bytes,
        "nodes": 1,
        "jobs_s3_bytes_per_search": checkpoint_bytes * len(walls),
        "scoring_s": round(scoring, 3),
        "local_merge_samples_s": rounded(measured["merge_s"]),
        "warm_setup_s": rounded(warm.setup),
        "warm_overhead_samples_s": rounded(warm.steady),
        "warm_merge_samples_s": rounded(warm.merges),
        "warm_handover_samples_s": rounded(warm.handovers),
        "jobs_trial_wall_s": {n: round(w, 3) for n, w in observed["walls"].items()},
        "evaluators": len(per_pod),
        "ratios": {
            "warm_over_local_merge": round(warm_overhead / local_merge, 2),
            "jobs_over_warm": round(jobs_overhead / warm_overhead, 1),
            "s3_copies_per_node": round(fetched / checkpoint_bytes, 3),
        },
        "targets": {"warm_over_local_merge": "<= 1.5", "jobs_over_warm": ">= 5"},
        # The same merge in CPU seconds (one thread): what the load average cannot stretch.
        # The floor and the warm trials run minutes apart, at whatever load the machine has.
        "merge_cpu_s": {
            "local": round(local_merge_cpu, 3),
            "warm": round(statistics.median(warm.merge_cpus), 3),
            "warm_over_local": round(statistics.median(warm.merge_cpus) / local_merge_cpu, 2),
        },
        "memory": {
            "evaluator_peak_rss_bytes": [
                max((r.get("peakRssBytes", 0) for r in recs), default=0)
                for recs in per_pod.values()
            ],
            "floors_peak_rss_bytes": [f["peak_rss_bytes"] for f in observed["floors"]],
            "bench_peak_rss_bytes": peak_rss(),
        },
        "machine": machine.summary(),
        "setup": {
            "checkpoints": CHECKPOINTS,
            "shape": asdict(shape),
            "params_per_checkpoint": shape.params,
            "dtype_stored": STORED_DTYPE,
            "dtype_merged": MERGE_DTYPE,
            "dtype_computed": "float32 (CPU)",
            "generation_s": round(generated, 1),
            "task": f"{TASK} (limit {LIMIT}), CPU",
            "jobs": {"parallelism": 1, "trials": args.trials, "timed": len(walls)},
            "warm": {"parallelism": args.warm_parallelism, "trials": args.warm_trials},
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small", action="store_true", help=f"a dry run at a toy shape ({SMALL.params:,} params)"
    )
    parser.add_argument("--layers", type=int, help="decoder layers per checkpoint")
    parser.add_argument("--trials", type=int, default=3, help="trials of the jobs search")
    parser.add_argument("--warm-trials", type=int, default=6, help="trials of the warm search")
    parser.add_argument(
        "--warm-parallelism",
        type=int,
        default=1,
        help="evaluators (1: timed like the one-Job and local runs, one process at a time; "
        "2: two evaluators share the node cache)",
    )
    parser.add_argument("--out", type=Path, default=RESULT, help="where the JSON goes")
    args = parser.parse_args(argv)
    shape = SMALL if args.small else Shape()
    if args.layers:
        shape = replace(shape, layers=args.layers)
    if shape.vocab < TOY_VOCAB:
        parser.error(f"the vocabulary must hold the toy tokenizer's {TOY_VOCAB} ids")
    result = run(shape, args)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
