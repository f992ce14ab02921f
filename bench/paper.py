"""The paper's three claims as rates over toy pools and search seeds, not one run's yes/no.

For each pool seed (the `paper` recipe with its initialisation and data seeds shifted; pool 0
is the demo's pool) and each search seed, the product runs the demo's search in local mode
(`examples/toy-pool-search.yaml`'s settings, confirmation on) and checks, as the demo table
does (mergesearch.local.summary.check_claims):

- (a) the confirmed winner beats the best single checkpoint, the uniform merge and merge-best
  on held-in fitness measured on the confirmation examples (unseen by the search);
- (b) its mean held-out score is no worse than the uniform merge's;
- (c) more than half of the checkpoints get weight over 1/(10N).

Per claim: the fraction of runs where it holds, a 90% Wilson interval, and the mean paired
margin (winner minus the baseline, per run). Nothing here tunes the pool or the defaults: the
claims are reported whatever they show. Runs are resumable (each search keeps its local-mode
state under the cache), so an interrupted benchmark continues where it stopped.

    python bench/paper.py [--pools 5] [--seeds 5] [--limit 100] [--max-trials 80]

Writes bench/results/paper.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "runner")]

from mergerunner.toys import build_pool, get_preset  # noqa: E402
from mergerunner.toys.presets import Preset  # noqa: E402
from mergesearch import engine  # noqa: E402
from mergesearch.local.search import LocalSearch, quiet_libraries  # noqa: E402
from mergesearch.local.summary import check_claims, confirmed_fitness  # noqa: E402
from mergesearch.spec import parse_manifest  # noqa: E402

Z90 = 1.6448536269514722  # two-sided 90%: the standard normal's 95th percentile
POOL_SEED_STRIDE = 1000


def wilson(successes: int, n: int, z: float = Z90) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (sound at 0 and n, unlike Wald's)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pool_recipe(pool_seed: int) -> Preset:
    """The paper recipe with every seed shifted: another training run of the same recipe."""
    paper = get_preset("paper")
    if pool_seed == 0:
        return paper
    shift = POOL_SEED_STRIDE * pool_seed
    return dataclasses.replace(
        paper,
        name=f"paper-p{pool_seed}",
        init_seed=paper.init_seed + pool_seed,
        stages=tuple(dataclasses.replace(s, seed=s.seed + shift) for s in paper.stages),
    )


def manifest(pool: Any, name: str, seed: int, limit: int, max_trials: int) -> dict[str, Any]:
    """The demo's search (examples/toy-pool-search.yaml) on `pool` with search seed `seed`."""
    tasks = pool.manifest()
    return {
        "apiVersion": "mergesearch.io/v1alpha1",
        "kind": "MergeSearch",
        "metadata": {"name": name},
        "spec": {
            "checkpoints": [{"name": n, "uri": str(p)} for n, p in pool.checkpoints.items()],
            "merge": {"method": "linear", "parameterization": "simplex", "dtype": "float32"},
            "objective": {
                "heldIn": [
                    {"task": t["task"], "metric": t["metric"].split(",")[0], "limit": limit}
                    for t in tasks["heldin"]
                ],
                "heldOut": [
                    {"task": t["task"], "metric": t["metric"].split(",")[0], "limit": limit}
                    for t in tasks["heldout"]
                ],
                "customTasks": {"path": str(pool.tasks_dir)},
                "evaluator": {"batchSize": limit, "seed": 1234},
            },
            "search": {"maxTrials": max_trials, "seed": seed},
        },
    }


def one_run(pool: Any, pool_seed: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    name = f"paper-p{pool_seed}-s{seed}"
    doc = parse_manifest(manifest(pool, name, seed, args.limit, args.max_trials))
    state_dir = args.cache / "bench-paper" / f"{name}-l{args.limit}-t{args.max_trials}"
    search = LocalSearch(doc, ROOT, state_dir=state_dir, cache_dir=args.cache / "checkpoints")
    started = time.monotonic()
    with quiet_libraries():
        search.prepare()
        state = search.run()
        final = search.finish()
    status = engine.status(state)
    chosen = engine.chosen(status)
    assert chosen is not None, f"{name}: no trial succeeded"
    records = list(search.records.values())
    held_out = final.get("heldOut", {})
    claims = check_claims(records, chosen["id"], chosen["weights"], held_out)
    confirmed = confirmed_fitness(records)
    done = {r.id: r for r in records if r.subset == "search" and r.status == "succeeded"}
    winner = confirmed[chosen["id"]]
    singles = [confirmed[i] for i in done if i.startswith("b-each-")]
    uniform = done["b-uniform"]
    return {
        "pool": pool_seed,
        "seed": seed,
        "winner": chosen["id"],
        "winner_kind": chosen["kind"],
        "basis": claims.basis,
        # merge-best None: it is one checkpoint's trial, covered by "best single"
        "a": claims.beats_best_single
        and claims.beats_uniform
        and claims.beats_merge_best is not False,
        "a_parts": [claims.beats_best_single, claims.beats_uniform, claims.beats_merge_best],
        "b": bool(claims.held_out_no_worse),
        "c": claims.weights_spread,
        "margin_best_single": winner - max(singles),
        "margin_uniform": winner - confirmed["b-uniform"],
        "margin_merge_best": (
            winner - confirmed["b-merge-best"] if "b-merge-best" in confirmed else None
        ),
        "margin_held_out_vs_uniform": (
            statistics.fmean(held_out.values()) - statistics.fmean(uniform.held_out.values())
        ),
        "search_fitness": chosen.get("searchFitness", chosen["fitness"]),
        "confirmed_fitness": winner,
        "nonnegligible_weights": claims.nonnegligible_weights,
        "checkpoints": claims.checkpoints,
        "trials": status.trials_issued,
        "seconds": round(time.monotonic() - started, 1),
    }


def rate(runs: list[dict[str, Any]], claim: str) -> dict[str, Any]:
    held = sum(bool(r[claim]) for r in runs)
    low, high = wilson(held, len(runs))
    return {"rate": held / len(runs), "ci_low": low, "ci_high": high, "runs": len(runs)}


def mean_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.fmean(values) if values else None


def summarise(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    return {
        "benchmark": "paper-claims",
        "pools": sorted({r["pool"] for r in runs}),
        "seeds": sorted({r["seed"] for r in runs}),
        "limit": args.limit,
        "max_trials": args.max_trials,
        "interval": "Wilson, 90%",
        "claims": {
            "a": {
                **rate(runs, "a"),
                "statement": "the confirmed winner beats the best single checkpoint, the "
                "uniform merge and merge-best on held-in (confirmation examples)",
                "mean_margin_best_single": mean_of(runs, "margin_best_single"),
                "mean_margin_uniform": mean_of(runs, "margin_uniform"),
                "mean_margin_merge_best": mean_of(runs, "margin_merge_best"),
            },
            "b": {
                **rate(runs, "b"),
                "statement": "held-out mean no worse than the uniform merge's",
                "mean_margin_held_out_vs_uniform": mean_of(runs, "margin_held_out_vs_uniform"),
            },
            "c": {
                **rate(runs, "c"),
                "statement": "weight over 1/(10N) on more than half of the checkpoints",
                "mean_nonnegligible_weights": mean_of(runs, "nonnegligible_weights"),
            },
        },
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--limit", type=int, default=100, help="examples per task")
    parser.add_argument("--max-trials", type=int, default=80)
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("MERGESEARCH_CACHE", "~/.cache/mergesearch")).expanduser(),
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "paper.json")
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    pools: dict[int, Any] = {}
    # Seed-major order: an interrupted benchmark has covered every pool with fewer seeds.
    for seed in range(args.seeds):
        for pool_seed in range(args.pools):
            if pool_seed not in pools:
                recipe = pool_recipe(pool_seed)
                started = time.monotonic()
                pool = build_pool(args.cache / "toys" / f"{recipe.name}-{recipe.key()}", recipe)
                print(f"pool {pool_seed} ({pool.digest[:12]}) in {time.monotonic() - started:.0f}s")
                pools[pool_seed] = pool
            run = one_run(pools[pool_seed], pool_seed, seed, args)
            runs.append(run)
            print(json.dumps({k: run[k] for k in ("pool", "seed", "a", "b", "c", "seconds")}))
            args.out.write_text(json.dumps(summarise(runs, args), indent=2) + "\n")
    result = summarise(runs, args)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for claim, entry in result["claims"].items():
        print(
            f"({claim}) {entry['rate']:.2f} [{entry['ci_low']:.2f}, {entry['ci_high']:.2f}] "
            f"over {entry['runs']} runs"
        )


if __name__ == "__main__":
    main()
