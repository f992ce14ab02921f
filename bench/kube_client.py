"""Kubernetes client benchmark: the operator's own API calls through each candidate client.

    V=$(scripts/env.sh); nice -n 10 $V/bin/python -P bench/kube_client.py [--rounds 200]

The operator makes a handful of calls kopf does not make for it (operator/kube.py): a quorum
read of a MergeSearch, the status write under a resourceVersion precondition (compare-and-set),
Job create and delete, pods listed by label, Warning events listed by field selector. This
script starts its own control plane (tests/support/cluster.py), authenticates every client as
the operator's ServiceAccount (the token that `mergesearch.rbac` grants), and makes those calls
through each candidate in one process, one call of each candidate in turn (so a noisy moment
hits them all alike):

- `aiohttp`: the operator's client (operator/kube.py's `KubeClient`, kopf's credentials);
- `kubernetes.aio`: the asyncio client inside the official `kubernetes` package (typed API
  classes; Job and pod models deserialised, then `to_dict()`, as the operator reads dicts);
- `kubernetes_asyncio`: the separately maintained asyncio port, when installed (it is not in
  the lock: kopf imports it at start wherever it is; the committed figures used 36.1.0);
- `kubernetes+thread`: the synchronous official client, each call in `asyncio.to_thread`.

Measured per call: wall latency (p50/p99) and this process's CPU time (all threads); then
throughput with 32 calls in flight (20 searches reconciling at once is the operator benchmark's
load), where a thread pool bounds the synchronous client. Then the operator itself, once per
candidate: bench/operator_bench.py (20 searches, 3 generations) with its `KubeClient` replaced
by the candidate (bench/kube_candidates.py): generation turnaround, writes and CPU per trial.
docs/operator.md puts the figures side by side and says which client the operator uses.

Writes bench/results/kube_client.json. Noisy machines: compare the candidates of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [
    str(ROOT / "bench"),
    str(ROOT / "tests"),
    str(ROOT / "operator"),
    str(ROOT / "runner"),
]

import kopf  # noqa: E402
import yaml  # noqa: E402

from kube_candidates import CANDIDATES, make  # noqa: E402
from mergesearch.operator.kube import ApiError  # noqa: E402
from support.cluster import KubeCluster  # noqa: E402
from support.operator_proc import Searches, apply_crd, operator_kubeconfig  # noqa: E402

NAMESPACE = "kcbench"
RESULT = ROOT / "bench" / "results" / "kube_client.json"
SEARCH = "bench-search"
PODS = 8
EVENTS = 6
IN_FLIGHT = 32
SPEC: dict[str, Any] = {
    "checkpoints": [{"name": n, "uri": f"s3://unused/{n}/"} for n in ("a", "b", "c")],
    "objective": {"heldIn": [{"task": "one"}], "evaluator": {"backend": "analytic"}},
    "search": {"populationSize": 4, "maxGenerations": 2, "seed": 5},
}
LABEL = "mergesearch.io/search=bench-search"
WRITES = itertools.count(1)  # every status write changes the status (else it is a no-op)


def job_manifest(name: str) -> dict[str, Any]:
    """A suspended Job (no pods: the call, not the Job controller, is measured) of the size
    of a trial Job's manifest."""
    env = [{"name": f"MERGERUNNER_VAR_{i}", "value": "x" * 40} for i in range(12)]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": "kcbench"}},
        "spec": {
            "suspend": True,
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app": "kcbench"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "runner", "image": "runner:bench", "env": env}],
                },
            },
        },
    }


async def candidates(info: kopf.ConnectionInfo) -> list[tuple[str, Any]]:
    """Every installed candidate, each with `KubeClient`'s interface and kopf's credentials."""
    names = [
        n
        for n in CANDIDATES
        if n != "kubernetes_asyncio" or importlib.util.find_spec("kubernetes_asyncio")
    ]
    return [(name, make(name, lambda: info)) for name in names]


# --------------------------------------------------------------------------- measuring


class Timings:
    def __init__(self) -> None:
        self.wall: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.cpu: dict[tuple[str, str], list[float]] = defaultdict(list)

    async def time(self, who: str, call: str, run: Callable[[], Awaitable[Any]]) -> Any:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = await run()
        self.wall[(who, call)].append(time.perf_counter() - wall0)
        self.cpu[(who, call)].append(time.process_time() - cpu0)
        return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def one_round(cands: list[tuple[str, Any]], timings: Timings, round_no: int) -> None:
    """Each call once per candidate, candidates in turn; checks every answer's content."""
    for name, client in cands:
        obj = await timings.time(
            name, "get search", lambda c=client: c.get_search(NAMESPACE, SEARCH)
        )
        assert obj["metadata"]["name"] == SEARCH
        body = {
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "metadata": obj["metadata"],
            "status": {**(obj.get("status") or {}), "iteration": next(WRITES)},
        }
        written = await timings.time(
            name, "replace status (CAS)", lambda b=body, c=client: c.replace_status(b)
        )
        assert written["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]
        job = f"kcb-{name.replace('.', '-').replace('_', '-').replace('+', '-')}-{round_no}"
        created = await timings.time(
            name, "create job", lambda c=client, j=job: c.create_job(job_manifest(j))
        )
        assert created is True
        pods = await timings.time(
            name, "list pods by label", lambda c=client: c.list_pods(NAMESPACE, LABEL)
        )
        assert len(pods) == PODS and all(p["status"]["phase"] == "Pending" for p in pods)
        warnings = await timings.time(
            name,
            "list warning events",
            lambda c=client: c.list_warnings(NAMESPACE, "Pod", "kcbench-pod-0"),
        )
        assert [reason for reason, _ in warnings] == ["FailedMount"] * EVENTS
        assert warnings[0][1].endswith("volume 0")  # oldest first
        deleted = await timings.time(
            name, "delete job", lambda c=client, j=job: c.delete_job(NAMESPACE, j)
        )
        assert deleted is True


async def stale_write_is_refused(cands: list[tuple[str, Any]]) -> dict[str, str]:
    """The compare-and-set holds through every client: a write from a stale read is refused
    with the ApiError the handlers decide on (409, `conflict`)."""
    out = {}
    for name, client in cands:
        stale = await client.get_search(NAMESPACE, SEARCH)
        fresh = await client.get_search(NAMESPACE, SEARCH)
        await client.replace_status({**fresh, "status": {"iteration": next(WRITES)}})
        try:
            await client.replace_status({**stale, "status": {"iteration": next(WRITES)}})
        except ApiError as exc:
            out[name] = f"{exc.status} conflict={exc.conflict}"
        else:
            out[name] = "accepted"
    return out


async def throughput(client: Any, calls: int) -> float:
    """Quorum reads per second with IN_FLIGHT in flight."""
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one() -> None:
        async with gate:
            await client.get_search(NAMESPACE, SEARCH)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(calls)))
    return calls / (time.perf_counter() - started)


def seed_objects(cluster: KubeCluster) -> None:
    """The search, PODS labelled pods (Pending: no scheduler) and EVENTS Warning events."""
    Searches(cluster, NAMESPACE).create(SEARCH, SPEC)
    api = cluster.api()
    for i in range(PODS):
        api.create(
            f"/api/v1/namespaces/{NAMESPACE}/pods",
            {
                "metadata": {
                    "name": f"kcbench-pod-{i}",
                    "labels": {"mergesearch.io/search": SEARCH, "app": "kcbench"},
                },
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "runner", "image": "runner:bench"}],
                },
            },
        )
    for i in range(EVENTS):
        api.create(
            f"/api/v1/namespaces/{NAMESPACE}/events",
            {
                "metadata": {"name": f"kcbench-event-{i}"},
                "involvedObject": {
                    "kind": "Pod",
                    "name": "kcbench-pod-0",
                    "namespace": NAMESPACE,
                    "apiVersion": "v1",
                },
                "reason": "FailedMount",
                "message": f"MountVolume.SetUp failed for volume {i}",
                "type": "Warning",
                "lastTimestamp": f"2026-01-01T00:00:0{i}Z",
            },
        )


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("kubernetes", "kubernetes_asyncio", "aiohttp", "kopf"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out


async def measure(cluster: KubeCluster, rounds: int, calls: int) -> dict[str, Any]:
    kubeconfig = yaml.safe_load(operator_kubeconfig(cluster).read_text())
    token = kubeconfig["users"][0]["user"]["token"]
    info = kopf.ConnectionInfo(server=cluster.server, ca_path=str(cluster.ca_path), token=token)
    cands = await candidates(info)
    try:
        timings = Timings()
        for warm in range(3):  # connections opened, imports done, caches filled
            await one_round(cands, Timings(), -1 - warm)
        for round_no in range(rounds):
            await one_round(cands, timings, round_no)
        conflicts = await stale_write_is_refused(cands)
        rates: dict[str, list[float]] = defaultdict(list)
        for _ in range(3):
            for name, client in cands:
                rates[name].append(await throughput(client, calls))
    finally:
        for _, client in cands:
            await client.close()
    per_call: dict[str, dict[str, Any]] = defaultdict(dict)
    for (who, call), walls in timings.wall.items():
        per_call[call][who] = {
            "p50_ms": round(1000 * statistics.median(walls), 2),
            "p99_ms": round(1000 * percentile(walls, 99), 2),
            "cpu_ms": round(1000 * statistics.mean(timings.cpu[(who, call)]), 3),
        }
    totals = {
        name: {
            "round_p50_ms": round(sum(per_call[call][name]["p50_ms"] for call in per_call), 2),
            "round_cpu_ms": round(sum(per_call[call][name]["cpu_ms"] for call in per_call), 3),
            "reads_per_s_at_32_in_flight": round(statistics.median(rates[name]), 1),
            "stale_write_answer": conflicts[name],
        }
        for name, _ in cands
    }
    return {
        "rounds": rounds,
        "throughput_calls": calls,
        "in_flight": IN_FLIGHT,
        "versions": versions(),
        "per_call": per_call,
        "per_candidate": totals,
        "machine": f"{os.cpu_count()} cores, shared; the control plane on the same cores",
    }


def operator_runs(names: list[str], searches: int) -> dict[str, Any]:
    """bench/operator_bench.py once per candidate (its own control plane each time): the
    operator's generation turnaround, API writes and CPU per trial with that client."""
    import operator_bench

    out = {}
    for name in names:
        result = operator_bench.run(searches, 3, 4, "jobs", name)
        out[name] = {
            key: result[key]
            for key in (
                "phases",
                "trials",
                "wall_s",
                "turnaround_samples",
                "turnaround_p50_s",
                "turnaround_p99_s",
                "writes_per_trial",
                "search_gets_per_trial",
                "cpu_s_per_trial",
            )
        }
        print(name, json.dumps(out[name]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--calls", type=int, default=600, help="reads per throughput run")
    parser.add_argument(
        "--operator-searches",
        type=int,
        default=20,
        help="searches per operator benchmark run, one run per candidate (0: none)",
    )
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    with KubeCluster() as cluster:
        cluster.create_namespace(NAMESPACE)
        apply_crd(cluster)
        seed_objects(cluster)
        result = asyncio.run(measure(cluster, args.rounds, args.calls))
    if args.operator_searches:
        names = list(result["per_candidate"])
        result["operator_bench"] = {
            "searches": args.operator_searches,
            "generations": 3,
            "population": 4,
            "by_client": operator_runs(names, args.operator_searches),
        }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
