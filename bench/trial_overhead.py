"""Per-trial overhead of one Job per trial against warm evaluators, on the real control plane.

    V=$(scripts/env.sh); nice $V/bin/python -P bench/trial_overhead.py [--layers 4] [--trials 4]

Starts its own control plane (tests/support/cluster.py), a node agent (one node), the real S3
server (SeaweedFS) and the operator as its own process (RBAC ServiceAccount credentials,
serving the evaluator endpoint, with a node cache directory). Generates 8 synthetic Llama
checkpoints (random init, bf16, hidden 1024, MLP 2816, 16 heads, `--layers` layers; the toy
pool's 44-token tokenizer, so that the toy tasks can score them; nothing is downloaded) and
uploads them to S3. Then runs two searches side by side in time, one after the other, with
the same cheap fixed evaluation (one toy task, 2 examples, CPU, float32):

- jobs mode, parallelism 1: per-trial non-scoring time = (Job seen Complete - Job seen
  created) - scoring time. Everything a trial pod does but score: start, runner start-up,
  fetch of all 8 checkpoints into its emptyDir, merge to disk, load, task-suite build;
- warm mode, `--warm-parallelism` evaluators (default 1, timed like the other two: one
  process at a time; 2 shows two evaluators on the node sharing its cache, written to
  trial_overhead_p2.json): per trial, from the evaluators' own log lines, the time from
  posting the previous result to holding the next lease, plus the trial's time other than
  scoring (the in-place merge). Each evaluator's first trial (fetch, load, suite build: a
  one-off per pod) is reported apart.

Floors measured in this process at the same shapes: local mode's in-place merge
(`ResidentMerger.merge_into`, the `local_merge_s` target's denominator) and the scoring time.
Bytes fetched from S3 by the warm search: the sum of what its evaluators report (their log
lines; a second evaluator on the node finds the cache filled and fetches 0 bytes).

Writes bench/results/trial_overhead.json. A shared 2-core machine: compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

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


# --------------------------------------------------------------------------- checkpoints


def make_checkpoints(root: Path, layers: int, toy: Path) -> list[Path]:
    """8 fine-tune-like random-init Llamas: a shared base plus a per-checkpoint perturbation
    (bench/merge.py's shapes), with the toy tokenizer and a config transformers loads."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from merge import llama_shapes

    config = LlamaConfig(
        vocab_size=44,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    shapes = llama_shapes(
        {
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "vocab_size": 44,
            "num_hidden_layers": layers,
        }
    )
    generator = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=generator) * 0.02 for n, s in shapes.items()}
    dirs = []
    for i in range(CHECKPOINTS):
        gen = torch.Generator().manual_seed(i + 1)
        tensors = {
            n: (t + torch.randn(t.shape, generator=gen) * 0.002).to(torch.bfloat16)
            for n, t in base.items()
        }
        for n in tensors:
            if n.endswith("norm.weight"):
                tensors[n] = torch.ones_like(tensors[n])
        path = root / f"ckpt{i}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(path)
        for extra in toy.iterdir():
            if extra.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(extra, path / extra.name)
        dirs.append(path)
    return dirs


# --------------------------------------------------------------------------- floors


def floors(dirs: list[Path], tasks_dir: Path) -> dict[str, float]:
    """Local mode's in-place merge and the scoring time, at the searches' shapes and dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergerunner.evaluate import TaskSuite, make_lm
    from mergerunner.merge import ResidentMerger
    from mergerunner.trial import EvaluatorSpec, TaskSpec

    merger = ResidentMerger(dirs)
    model = AutoModelForCausalLM.from_pretrained(dirs[0], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(dirs[0])
    weights = [1 / len(dirs)] * len(dirs)
    merges, scores = [], []
    suite = TaskSuite([TaskSpec(task=TASK, metric=METRIC, limit=LIMIT)], include_path=tasks_dir)
    lm = make_lm(model, tokenizer, EvaluatorSpec.model_validate(EVALUATOR), progress=False)
    for i in range(3):
        start = time.perf_counter()
        mix = [w * (1 + 0.1 * ((i + j) % 3)) for j, w in enumerate(weights)]
        merger.merge_into(model, [m / sum(mix) for m in mix])
        merges.append(time.perf_counter() - start)
        start = time.perf_counter()
        suite.score(lm)
        scores.append(time.perf_counter() - start)
    return {"local_merge_s": statistics.median(merges), "scoring_s": statistics.median(scores)}


# --------------------------------------------------------------------------- the searches


def spec(uris: dict[str, str], s3: SeaweedS3, mode: str, parallelism: int, trials: int) -> dict:
    return {
        "checkpoints": [{"name": n, "uri": u} for n, u in uris.items()],
        "merge": {"dtype": "float32"},
        "objective": {
            "heldIn": [{"task": TASK, "metric": METRIC, "limit": LIMIT}],
            "customTasks": {"configMapRef": {"name": "toy-tasks"}},
            "evaluator": EVALUATOR,
        },
        "search": {"populationSize": trials, "maxGenerations": 1, "seed": 5, "baselines": []},
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

    def __init__(self, api: ApiClient, namespace: str) -> None:
        super().__init__(daemon=True)
        self.api, self.namespace = api, namespace
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
            time.sleep(0.2)


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


def warm_overheads(
    per_pod: dict[str, list[dict[str, Any]]],
) -> tuple[list[float], list[float], list[float]]:
    """(steady per-trial overheads, first-trial set-up times, hand-overs): overhead = the
    hand-over (the wait from posting the previous result to holding the next lease) + the
    trial's time other than scoring (the in-place merge)."""
    steady, setup, handovers = [], [], []
    for records in per_pod.values():
        for previous, record in zip([None, *records], records, strict=False):
            t = record["timings"]
            other = t.get("totalS", 0.0) - t.get("evaluateS", 0.0)
            if previous is None:
                setup.append(other + t.get("evaluateS", 0.0))
                continue
            handovers.append(record["leasedAt"] - previous["doneAt"])
            steady.append(handovers[-1] + other)
    return steady, setup, handovers


def run(layers: int, trials: int, warm_parallelism: int) -> dict[str, Any]:
    pool = cached_pool("mini")
    toy = next(iter(pool.checkpoints.values()))
    scratch = Path(tempfile.mkdtemp(prefix="mergesearch-overhead-"))
    try:
        dirs = make_checkpoints(scratch / "ckpt", layers, Path(toy))
        checkpoint_bytes = sum(f.stat().st_size for d in dirs for f in d.iterdir())
        tasks = portable_tasks(pool.tasks_dir, [TASK], scratch / "tasks")
        measured = floors(dirs, scratch / "tasks")
        print(f"floors: {measured}", flush=True)
        node_cache = scratch / "node-cache"
        node_cache.mkdir()
        env = {
            **evaluator_endpoint_env(scratch / "key"),
            "MERGESEARCH_NODE_CACHE_DIR": str(node_cache),
        }
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
            searches = Searches(cluster, namespace)
            with running_operator(cluster, [namespace], env=env):
                clock = JobClock(api, namespace)
                clock.start()
                searches.create("jobs", spec(uris, s3, "jobs", 1, trials))
                jobs_status = searches.wait_phase("jobs", ["Succeeded", "Failed"], 3600)
                time.sleep(2)  # the last Job's Complete condition follows the search's status
                clock.stop.set()
                searches.create("warm", spec(uris, s3, "warm", warm_parallelism, trials * 2))
                warm_status = searches.wait_phase("warm", ["Succeeded", "Failed"], 3600)
                per_pod = evaluator_records(agent, namespace)
        for name, status in (("jobs", jobs_status), ("warm", warm_status)):
            if status["phase"] != "Succeeded":
                raise SystemExit(f"{name} search: {status.get('conditions')}")
        walls = [
            clock.completed[n] - clock.created[n]
            for n in clock.completed
            if not n.endswith("-evaluators")
        ]
        steady, setup, handovers = warm_overheads(per_pod)
        fetched = sum(
            max((r["bytesFetched"] for r in recs), default=0) for recs in per_pod.values()
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    scoring = measured["scoring_s"]
    jobs_overhead = statistics.median(walls) - scoring
    warm_overhead = statistics.median(steady)
    return {
        "jobs_overhead_s": round(jobs_overhead, 3),
        "warm_overhead_s": round(warm_overhead, 3),
        "local_merge_s": round(measured["local_merge_s"], 3),
        "s3_bytes_per_search": fetched,
        "checkpoint_bytes": checkpoint_bytes,
        "nodes": 1,
        "scoring_s": round(scoring, 3),
        "warm_setup_s": [round(s, 3) for s in setup],
        "warm_overhead_samples_s": [round(s, 3) for s in steady],
        "warm_handover_samples_s": [round(s, 3) for s in handovers],
        "jobs_trial_wall_s": [round(w, 3) for w in walls],
        "evaluators": len(per_pod),
        "ratios": {
            "warm_over_local_merge": round(warm_overhead / measured["local_merge_s"], 2),
            "jobs_over_warm": round(jobs_overhead / warm_overhead, 1),
            "s3_copies_per_node": round(fetched / checkpoint_bytes, 3),
        },
        "targets": {"warm_over_local_merge": "<= 1.5", "jobs_over_warm": ">= 5"},
        "setup": {
            "checkpoints": CHECKPOINTS,
            "layers": layers,
            "params_per_checkpoint": 2 * 44 * 1024
            + 1024
            + layers * (4 * 1024 * 1024 + 3 * 1024 * 2816 + 2 * 1024),
            "dtype_stored": "bfloat16",
            "dtype_scored": "float32",
            "task": f"{TASK} (limit {LIMIT}), CPU",
            "jobs": {"parallelism": 1, "trials": trials, "timed": len(walls)},
            "warm": {"parallelism": warm_parallelism, "trials": trials * 2},
            "machine": f"{os.cpu_count()} CPUs, shared",
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers per checkpoint")
    parser.add_argument("--trials", type=int, default=4, help="trials of the jobs search")
    parser.add_argument(
        "--warm-parallelism",
        type=int,
        default=1,
        help="evaluators (1: timed like the one-Job and local runs, one process at a time; "
        "2: two evaluators share the node cache, written to trial_overhead_p2.json)",
    )
    args = parser.parse_args(argv)
    result = run(args.layers, args.trials, args.warm_parallelism)
    out = (
        RESULT
        if args.warm_parallelism == 1
        else RESULT.with_name(f"trial_overhead_p{args.warm_parallelism}.json")
    )
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
