"""Operator benchmark: many concurrent searches with instant trials on the real control plane.

    V=$(scripts/env.sh); $V/bin/python -P bench/operator_bench.py [--searches 20] [--generations 3]

Starts its own control plane (tests/support/cluster.py), a node agent that runs up to 48 trial
pods at once, and the operator as its own process with the RBAC ServiceAccount's credentials;
creates N MergeSearches whose trials use the benchmarking objective (the operator started
with MERGESEARCH_BENCHMARK_OBJECTIVE=analytic: no model, a trial is a ~0.5 s process), and
measures:

- generation turnaround: from the moment the last Job of generation g-1 is seen Complete to
  the moment the first Job of generation g is seen created, both from one watch on the Jobs
  (the watch's own delay is on both ends). Baselines → generation 0 is not counted: the first
  generation starts while baselines still run.
- API writes per trial: the apiserver's `apiserver_request_total` before and after, restricted
  to what only the operator writes (MergeSearch and its status, Job create/delete), plus the
  Events it posted (counted on the objects); reads of MergeSearches likewise.
- operator CPU seconds per trial, from /proc/<pid>/stat.

With `--mode warm` the searches run on warm evaluators (docs/operator.md, "Warm evaluators"):
no trial Jobs, so the turnaround is measured from the evaluators' own per-trial log lines (the
last result of generation g-1 done → the first lease of generation g, both on this host's clock),
and the writes counted include the per-search evaluator Job and token Secret. Writes
bench/results/operator_warm.json.

With `--client NAME` the operator's own API client (operator/kube.py) is replaced by one of
bench/kube_candidates.py's (the official clients), everything else alike; bench/kube_client.py
runs this once per candidate for docs/operator.md's comparison.

Writes bench/results/operator.json. Noisy machines: compare runs, don't quote single numbers.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "operator"), str(ROOT / "runner")]

from mergesearch.engine.engine import CONFIRM_PREFIX  # noqa: E402
from mergesearch.operator.jobs import LABEL_CANDIDATE  # noqa: E402
from support.cluster import ApiClient, KubeCluster  # noqa: E402
from support.net import free_port  # noqa: E402
from support.nodeagent import NodeAgent  # noqa: E402
from support.operator_proc import ANALYTIC_TRIALS, OperatorProcess, Searches, running_operator  # noqa: E402

NAMESPACE = "bench"
RESULT = ROOT / "bench" / "results" / "operator.json"
RESULT_WARM = ROOT / "bench" / "results" / "operator_warm.json"
OPERATOR_RESOURCES = {
    ("PATCH", "mergesearches", ""),
    ("PUT", "mergesearches", "status"),
    ("PATCH", "mergesearches", "status"),
    ("POST", "jobs", ""),
    ("DELETE", "jobs", ""),
    ("POST", "secrets", ""),
}
WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE"}
_SAMPLE = re.compile(r"^apiserver_request_total\{([^}]*)\} ([0-9.e+]+)$")


def spec(generations: int, population: int, mode: str = "jobs") -> dict[str, Any]:
    execution: dict[str, Any] = {"parallelism": population}
    if mode == "warm":  # INFO: the evaluators' per-trial log lines (the turnaround's clock)
        execution["mode"] = "warm"
        env = [{"name": "MERGERUNNER_LOG_LEVEL", "value": "INFO"}]
        execution["template"] = {"containers": [{"name": "runner", "env": env}]}
    return {
        "checkpoints": [{"name": n, "uri": f"s3://unused/{n}/"} for n in ("a", "b", "c")],
        "objective": {
            "heldIn": [{"task": "one", "limit": 8}, {"task": "two", "limit": 8}],
        },
        "search": {"populationSize": population, "maxGenerations": generations, "seed": 5},
        "execution": execution,
    }


_GENERATION = re.compile(r"-g(\d+)-c\d+$")


def warm_turnarounds(agent: NodeAgent, namespace: str) -> list[float]:
    """Per search and generation g ≥ 1, from the evaluators' log lines: first lease of g −
    last result of g-1 done (the search's name is the pod's search annotation's prefix)."""
    done: dict[tuple[str, int], float] = defaultdict(float)
    leased: dict[tuple[str, int], float] = {}
    for log in sorted(agent.workdir.glob(f"{namespace}_*-evaluators-*/*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if " trial {" not in line:
                continue
            record = json.loads(line.split(" trial ", 1)[1])
            match = _GENERATION.search(record["trial"])
            if not match:
                continue
            search = record["trial"][: match.start()]
            key = (search, int(match.group(1)))
            done[key] = max(done[key], record["doneAt"])
            leased[key] = min(leased.get(key, record["leasedAt"]), record["leasedAt"])
    return [
        leased[(search, gen)] - done[(search, gen - 1)]
        for (search, gen) in leased
        if gen >= 1 and (search, gen - 1) in done
    ]


def request_counts(cluster: KubeCluster) -> dict[tuple[str, str, str], float]:
    """(verb, resource, subresource) → requests so far, from the apiserver's metrics."""
    counts: dict[tuple[str, str, str], float] = defaultdict(float)
    for line in cluster.kubectl("get", "--raw", "/metrics").splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        key = (labels.get("verb", ""), labels.get("resource", ""), labels.get("subresource", ""))
        counts[key] += float(match.group(2))
    return counts


class JobWatch(threading.Thread):
    """Records, with local receive times, when each trial Job is first seen and first seen
    Complete. Watches from the list's resourceVersion, so no event is missed."""

    def __init__(self, api: ApiClient, namespace: str) -> None:
        super().__init__(daemon=True)
        self.api, self.namespace = api, namespace
        self.created: dict[str, tuple[str, str, float]] = {}  # job → (search, iteration, t)
        self.completed: dict[str, float] = {}
        self.stop = threading.Event()
        listing = api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs")
        self.resource_version = listing["metadata"]["resourceVersion"]

    def run(self) -> None:
        path = (
            f"/apis/batch/v1/namespaces/{self.namespace}/jobs?watch=1&allowWatchBookmarks=false"
            f"&resourceVersion={self.resource_version}&timeoutSeconds=3600"
        )
        conn = http.client.HTTPSConnection(
            self.api.host, self.api.port, context=self.api.ssl_context, timeout=3600
        )
        conn.request("GET", path, headers={"Accept": "application/json"})
        response = conn.getresponse()
        while not self.stop.is_set():
            line = response.readline()
            if not line:
                return
            self._record(json.loads(line), time.monotonic())

    def _record(self, event: dict[str, Any], now: float) -> None:
        job = event["object"]
        meta = job["metadata"]
        name = meta["name"]
        labels = meta.get("labels") or {}
        if labels.get(LABEL_CANDIDATE, "").startswith(CONFIRM_PREFIX):
            # A finalist scored again after the search (its generation's label, but no part
            # of that generation's turnaround).
            return
        if name not in self.created:
            search = (meta.get("annotations") or {}).get("mergesearch.io/search-name", "")
            self.created[name] = (search, labels.get("mergesearch.io/iteration", ""), now)
        conditions = (job.get("status") or {}).get("conditions") or []
        done = any(
            c["type"] in ("Complete", "Failed") and c["status"] == "True" for c in conditions
        )
        if done and name not in self.completed:
            self.completed[name] = now

    def turnarounds(self) -> list[float]:
        """Per search and generation g ≥ 1: first Job of g created − last Job of g-1 done."""
        by_gen: dict[tuple[str, int], list[str]] = defaultdict(list)
        for name, (search, iteration, _) in self.created.items():
            if iteration.isdigit():
                by_gen[(search, int(iteration))].append(name)
        out = []
        for (search, gen), names in by_gen.items():
            previous = by_gen.get((search, gen - 1))
            if gen == 0 or not previous or any(n not in self.completed for n in previous):
                continue
            last_done = max(self.completed[n] for n in previous)
            first_created = min(self.created[n][2] for n in names)
            out.append(first_created - last_done)
        return out


@contextmanager
def operator_client(client: str) -> Iterator[None]:
    """Operators started in the block run with `client` as their API client (`aiohttp`: the
    operator as shipped), through bench/kube_candidates.py."""
    if client == "aiohttp":
        yield
        return
    original = OperatorProcess.command

    def command(self: OperatorProcess) -> list[str]:
        python, _, _, *flags = original(self)  # python -m mergesearch.operator FLAGS
        return [python, str(ROOT / "bench" / "kube_candidates.py"), client, *flags]

    OperatorProcess.command = command  # type: ignore[method-assign]
    try:
        yield
    finally:
        OperatorProcess.command = original  # type: ignore[method-assign]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def operator_writes(delta: dict[tuple[str, str, str], float]) -> dict[str, float]:
    return {
        f"{verb} {res}{'/' + sub if sub else ''}": n
        for (verb, res, sub), n in sorted(delta.items())
        if (verb, res, sub) in OPERATOR_RESOURCES and n
    }


def run(
    searches_n: int,
    generations: int,
    population: int,
    mode: str = "jobs",
    client: str = "aiohttp",
) -> dict[str, Any]:
    env: dict[str, str] = dict(ANALYTIC_TRIALS)
    key_dir = tempfile.TemporaryDirectory(prefix="mergesearch-bench-key-")
    if mode == "warm":
        port = free_port()
        (Path(key_dir.name) / "key").write_text(uuid.uuid4().hex)
        env |= {
            "MERGESEARCH_EVALUATOR_PORT": str(port),
            "MERGESEARCH_EVALUATOR_URL": f"http://127.0.0.1:{port}",
            "MERGESEARCH_EVALUATOR_KEY_FILE": str(Path(key_dir.name) / "key"),
        }
    with KubeCluster() as cluster, key_dir:
        cluster.create_namespace(NAMESPACE)
        api = cluster.api()
        with (
            NodeAgent(api, namespaces=[NAMESPACE], max_running=48, poll_interval_s=0.1) as agent,
            operator_client(client),
            running_operator(cluster, [NAMESPACE], env=env, poll_seconds=30) as operator,
        ):
            searches = Searches(cluster, NAMESPACE)
            time.sleep(3)  # let kopf start its watches before the clock starts
            watch = JobWatch(api, NAMESPACE)
            watch.start()
            before = request_counts(cluster)
            cpu_before = operator.cpu_seconds()
            started = time.monotonic()
            names = [f"s{i:02d}" for i in range(searches_n)]
            for name in names:
                searches.create(name, spec(generations, population, mode))
            statuses = {}
            for name in names:
                statuses[name] = searches.wait_phase(name, ["Succeeded", "Failed"], 600)
            wall = time.monotonic() - started
            cpu = operator.cpu_seconds() - cpu_before
            after = request_counts(cluster)
            events = api.get(f"/api/v1/namespaces/{NAMESPACE}/events")["items"]
            watch.stop.set()
            if mode == "warm":
                turnaround = warm_turnarounds(agent, NAMESPACE)
            else:
                turnaround = watch.turnarounds()
    phases = {s["phase"] for s in statuses.values()}
    trials = sum(s["trials"]["total"] for s in statuses.values())
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    writes = operator_writes(delta)
    operator_events = sum(
        int(e.get("count") or 1) for e in events if e["involvedObject"].get("kind") == "MergeSearch"
    )
    writes["POST events (operator's, counted on the objects)"] = operator_events
    write_total = sum(writes.values())
    reads = delta.get(("GET", "mergesearches", ""), 0.0)
    return {
        "mode": mode,
        **({"client": client} if client != "aiohttp" else {}),
        "searches": searches_n,
        "generations": generations,
        "population": population,
        "phases": sorted(phases),
        "trials": trials,
        "wall_s": round(wall, 2),
        "turnaround_samples": len(turnaround),
        "turnaround_p50_s": round(statistics.median(turnaround), 3),
        "turnaround_p99_s": round(percentile(turnaround, 99), 3),
        "turnaround_max_s": round(max(turnaround), 3),
        "writes_per_trial": round(write_total / trials, 2),
        "writes_by_kind": writes,
        "search_gets_per_trial": round(reads / trials, 2),
        "cpu_s_per_trial": round(cpu / trials, 4),
        "operator_cpu_s": round(cpu, 2),
        "machine": f"{os.cpu_count()} cores, shared; trials are processes on the same cores",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--searches", type=int, default=20)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--mode", choices=["jobs", "warm"], default="jobs")
    parser.add_argument(
        "--client",
        choices=["aiohttp", "kubernetes.aio", "kubernetes_asyncio", "kubernetes+thread"],
        default="aiohttp",
        help="the operator's API client (bench/kube_candidates.py); default: its own",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.client != "aiohttp" and args.out is None:
        parser.error("--client: give --out (operator.json holds the operator as shipped)")
    args.out = args.out or (RESULT_WARM if args.mode == "warm" else RESULT)
    result = run(args.searches, args.generations, args.population, args.mode, args.client)
    print(json.dumps(result, indent=2))
    targets = {
        "turnaround_p99_s < 2": result["turnaround_p99_s"] < 2,
        "writes_per_trial <= 10": result["writes_per_trial"] <= 10,
    }
    for target, met in targets.items():
        print(f"{'met   ' if met else 'MISSED'} {target}")
    result["targets_met"] = targets
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
