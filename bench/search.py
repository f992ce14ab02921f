"""Search benchmark: our CMA-ES against random search and Optuna's CMA-ES, at equal budgets.

All methods score candidates on the same resident toy model and the same fixed examples, in
one process, so they differ only in which weights they ask for. Budgets count every
evaluation a method makes; for ours that includes its baselines (each checkpoint, uniform,
merge-best: 11 of the pool's 9 checkpoints), which makes the comparison strict for ours. For
every (method, seed) one run of the largest budget is made and its best-so-far read at each
smaller budget.

Ours runs with the product's defaults (what a MergeSearch without `search` settings gets):
the mean starts at the uniform merge, sigma0 is the simplex default. Optuna's CMA-ES gets the
same parameterisation, start and sigma0.

Every method's chosen best (the best on the examples it searched on) is then scored on the
confirmation examples, a seeded subset of each task disjoint from the search's
(`subset_indices(..., "confirmation")`): its score on the examples it was selected on is biased
upwards, and by how much depends on the method, so methods are compared on the unseen ones,
seed by seed (paired differences against Optuna's CMA-ES with a 90% t interval).

Also measured: how a local trial's time splits between merging into the resident model (plus
the engine's bookkeeping) and evaluation.

    python bench/search.py [--seeds 20] [--first-seed 0] [--budgets 25,50,100] [--limit 50]
                           [--sigma0 S] [--methods cmaes,random,optuna_cmaes]

A variant of ours changes one engine setting, e.g. `--methods
"cmaes[start=best-baseline],cmaes[population=6],optuna_cmaes"`: the ideas are measured against
Optuna on the same seeds, and an idea chosen on some seeds is checked on others
(`--first-seed`).

Writes bench/results/search.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "runner")]

from mergerunner.resident import ResidentEvaluator  # noqa: E402
from mergerunner.toys import build_pool, get_preset  # noqa: E402
from mergerunner.trial import EvaluatorSpec, TaskSpec  # noqa: E402
from mergesearch import engine  # noqa: E402
from mergesearch.engine.config import SIMPLEX_SIGMA0  # noqa: E402
from mergesearch.engine.parameterization import make_parameterization  # noqa: E402

SIGMA0 = SIMPLEX_SIGMA0
# Two-sided 90% Student t quantiles (0.95) by degrees of freedom; the normal's beyond 30.
T95 = {
    1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833,
    10: 1.812, 11: 1.796, 12: 1.782, 13: 1.771, 14: 1.761, 15: 1.753, 16: 1.746, 17: 1.740,
    18: 1.734, 19: 1.729, 20: 1.725, 25: 1.708, 30: 1.697,
}  # fmt: skip


def t95(df: int) -> float:
    if df in T95:
        return T95[df]
    below = [d for d in T95 if d <= df]
    return T95[max(below)] if df <= 30 else 1.645


def paired(diffs: list[float]) -> dict[str, float]:
    """Mean of paired differences with a 90% t interval (seeds are the pairs)."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "ci_low": mean, "ci_high": mean}
    half = t95(len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half}


class Scorer:
    """One resident model; counts evaluations and keeps the timings of each."""

    def __init__(self, pool: Any, limit: int) -> None:
        self.names = list(pool.checkpoints)
        spec = EvaluatorSpec(batch_size=3 * limit, device="cpu")
        self.heldin = list(pool.heldin)
        self.evaluator = ResidentEvaluator(
            list(pool.checkpoints.values()),
            held_in=[TaskSpec(task=t, metric=m, limit=limit) for t, m in pool.heldin.items()],
            held_out=[TaskSpec(task=t, metric=m, limit=limit) for t, m in pool.heldout.items()],
            evaluator=spec,
            custom_tasks_dir=pool.tasks_dir,
            dtype="float32",
            confirm=True,
        )
        self.merge_s: list[float] = []
        self.evaluate_s: list[float] = []

    def held_in(self, weights: np.ndarray) -> dict[str, float]:
        scores = self.evaluator.score([float(w) for w in weights])
        self.merge_s.append(scores.timings.merge_s)
        self.evaluate_s.append(scores.timings.evaluate_s)
        return scores.held_in

    def fitness(self, weights: np.ndarray) -> float:
        return statistics.fmean(self.held_in(weights).values())

    def confirmed(self, weights: np.ndarray) -> float:
        """Fitness on the confirmation examples (not counted: it is the measurement)."""
        scores = self.evaluator.score([float(w) for w in weights], subset="confirmation")
        return statistics.fmean(scores.held_in.values())

    def held_out(self, weights: np.ndarray) -> float:
        scores = self.evaluator.score([float(w) for w in weights], with_held_out=True)
        return statistics.fmean(scores.held_out.values())


# Engine settings a variant of ours may change (`cmaes[start=best-baseline]`), by the
# spec's name: the ideas measured against the defaults, on the same seeds.
VARIANT_SETTINGS = {"start": str, "population": int, "sigma0": float}


def parse_method(name: str) -> tuple[str, dict[str, Any]]:
    """`cmaes[population=6;sigma0=0.5]` → ("cmaes", {"population_size": 6, "sigma0": 0.5})."""
    base, _, rest = name.partition("[")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.rstrip("]").split(";")):
        key, _, value = item.partition("=")
        if key not in VARIANT_SETTINGS or base != "cmaes":
            raise SystemExit(f"unknown variant setting {key!r} in {name!r}")
        field = "population_size" if key == "population" else key
        overrides[field] = VARIANT_SETTINGS[key](value)
    if base not in ("cmaes", "random", "optuna_cmaes"):
        raise SystemExit(f"unknown method {name!r}")
    return base, overrides


def run_ours(
    scorer: Scorer, seed: int, budget: int, **overrides: Any
) -> tuple[list[float], list[np.ndarray]]:
    """Best-so-far fitness and weights after each evaluation; also times the engine."""
    config = engine.EngineConfig(
        checkpoints=tuple(scorer.names),
        tasks=tuple(engine.HeldInTask(name=t) for t in scorer.heldin),
        seed=seed,
        max_trials=budget,
        **{"sigma0": SIGMA0, **overrides},
    )
    state = engine.init(config)
    trace: list[float] = []
    best_w: list[np.ndarray] = []
    best = (-1.0, np.zeros(len(scorer.names)))
    bookkeeping = 0.0
    # The search distribution's mean after each evaluation: another answer a search could
    # give (no argmax over noisy scores), measured beside the best.
    means: list[np.ndarray] = []
    while not engine.done(state)[0]:
        start = time.perf_counter()
        state, candidates = engine.ask(state)
        bookkeeping += time.perf_counter() - start
        if not candidates:
            break
        for cand in candidates:
            w = np.array([cand.weights[n] for n in scorer.names])
            scores = scorer.held_in(w)
            fit = statistics.fmean(scores.values())
            if fit > best[0]:
                best = (fit, w)
            trace.append(best[0])
            best_w.append(best[1])
            start = time.perf_counter()
            state = engine.tell(state, [engine.Result(candidate_id=cand.id, scores=scores)])
            bookkeeping += time.perf_counter() - start
            mean = engine.status(state).mean_weights
            means.append(np.array([mean[n] for n in scorer.names]))
    run_ours.bookkeeping_s = bookkeeping  # type: ignore[attr-defined]
    run_ours.means = means  # type: ignore[attr-defined]
    run_ours.trials = len(trace)  # type: ignore[attr-defined]
    return trace, best_w


def run_random(
    scorer: Scorer, seed: int, budget: int, **_: Any
) -> tuple[list[float], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    trace, best_w, best = [], [], (-1.0, None)
    for _ in range(budget):
        w = rng.dirichlet(np.ones(len(scorer.names)))
        fit = scorer.fitness(w)
        if fit > best[0]:
            best = (fit, w)
        trace.append(best[0])
        best_w.append(best[1])
    return trace, best_w


def run_optuna(
    scorer: Scorer, seed: int, budget: int, **_: Any
) -> tuple[list[float], list[np.ndarray]]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    param = make_parameterization("simplex", len(scorer.names))
    dim = param.dim
    sampler = optuna.samplers.CmaEsSampler(
        x0={f"z{i}": 0.0 for i in range(dim)}, sigma0=SIGMA0, seed=seed
    )
    study = optuna.create_study(direction="maximize", sampler=sampler)
    trace, best_w, best = [], [], (-1.0, None)
    for _ in range(budget):
        t = study.ask({f"z{i}": optuna.distributions.FloatDistribution(-6, 6) for i in range(dim)})
        w = param.to_weights(np.array([t.params[f"z{i}"] for i in range(dim)]))
        fit = scorer.fitness(w)
        study.tell(t, fit)
        if fit > best[0]:
            best = (fit, w)
        trace.append(best[0])
        best_w.append(best[1])
    return trace, best_w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds first-seed … first-seed+seeds-1"
    )
    parser.add_argument(
        "--methods",
        default="cmaes,random,optuna_cmaes",
        help="comma-separated; a variant of ours: cmaes[start=best-baseline;population=6]",
    )
    parser.add_argument("--budgets", default="25,50,100")
    parser.add_argument("--limit", type=int, default=50, help="examples per task")
    parser.add_argument("--sigma0", type=float, default=SIMPLEX_SIGMA0, help="for both CMA-ES")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "search.json")
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    cache = Path(os.environ.get("MERGESEARCH_CACHE", Path.home() / ".cache" / "mergesearch"))
    pool = build_pool(cache / "toys" / f"paper-{get_preset('paper').key()}", "paper")
    scorer = Scorer(pool, args.limit)
    global SIGMA0
    SIGMA0 = args.sigma0

    runners = {"cmaes": run_ours, "random": run_random, "optuna_cmaes": run_optuna}
    methods = {m: parse_method(m) for m in args.methods.split(",")}
    results: dict[str, Any] = {m: {str(b): {"runs": []} for b in budgets} for m in methods}
    ours_split: list[tuple[float, float, float, int]] = []
    started = time.monotonic()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for seed in seeds:
        for method, (base, overrides) in methods.items():
            merge_mark = len(scorer.merge_s)
            trace, best_w = runners[base](scorer, seed, max(budgets), **overrides)
            if method == "cmaes":
                merge = sum(scorer.merge_s[merge_mark:])
                evaluate = sum(scorer.evaluate_s[merge_mark:])
                ours_split.append((merge, evaluate, run_ours.bookkeeping_s, run_ours.trials))  # type: ignore[attr-defined]
            for b in budgets:
                k = min(b, len(trace)) - 1
                run = {
                    "seed": seed,
                    "best": trace[k],
                    "confirmed": scorer.confirmed(best_w[k]),
                    "heldout": scorer.held_out(best_w[k]),
                }
                if base == "cmaes":
                    run["mean_confirmed"] = scorer.confirmed(run_ours.means[k])  # type: ignore[attr-defined]
                results[method][str(b)]["runs"].append(run)
            print(f"seed {seed} {method}: best@{max(budgets)} {trace[-1]:.4f}", flush=True)

    for method in methods:
        for b in budgets:
            runs = results[method][str(b)]["runs"]
            bests = [r["best"] for r in runs]
            confirmed = [r["confirmed"] for r in runs]
            results[method][str(b)].update(
                mean=statistics.fmean(bests),
                sd=statistics.stdev(bests) if len(bests) > 1 else 0.0,
                confirmed=statistics.fmean(confirmed),
                confirmed_sd=statistics.stdev(confirmed) if len(confirmed) > 1 else 0.0,
                heldout=statistics.fmean(r["heldout"] for r in runs),
            )
            if method != "optuna_cmaes" and "optuna_cmaes" in results:
                theirs = {
                    r["seed"]: r["confirmed"] for r in results["optuna_cmaes"][str(b)]["runs"]
                }
                results[method][str(b)]["paired_diff_vs_optuna"] = paired(
                    [r["confirmed"] - theirs[r["seed"]] for r in runs]
                )
                if "mean_confirmed" in runs[0]:
                    results[method][str(b)]["mean_confirmed"] = statistics.fmean(
                        r["mean_confirmed"] for r in runs
                    )
                    results[method][str(b)]["mean_paired_diff_vs_optuna"] = paired(
                        [r["mean_confirmed"] - theirs[r["seed"]] for r in runs]
                    )
    # the moonshot: ours at half the budget against Optuna's at the largest
    top, half = max(budgets), max(budgets) // 2
    ours = [m for m, (base, _) in methods.items() if base == "cmaes"]
    if str(half) in results[ours[0] if ours else "-"] and "optuna_cmaes" in results:
        theirs = {r["seed"]: r["confirmed"] for r in results["optuna_cmaes"][str(top)]["runs"]}
        for method in ours:
            results[method][f"{half}_vs_optuna_{top}"] = paired(
                [r["confirmed"] - theirs[r["seed"]] for r in results[method][str(half)]["runs"]]
            )

    baselines = {}
    n = len(scorer.names)
    per_task: dict[str, list[float]] = {t: [] for t in scorer.heldin}
    for i, name in enumerate(scorer.names):
        w = np.eye(n)[i]
        scores = scorer.held_in(w)
        for task, value in scores.items():
            per_task[task].append(value)
        baselines[name] = {
            "fitness": statistics.fmean(scores.values()),
            "confirmed": scorer.confirmed(w),
            "heldout": scorer.held_out(w),
        }
    chosen = sorted({int(np.argmax(values)) for values in per_task.values()})
    merge_best = np.zeros(n)
    merge_best[chosen] = 1 / len(chosen)
    baselines["merge-best"] = {
        "fitness": scorer.fitness(merge_best),
        "confirmed": scorer.confirmed(merge_best),
        "heldout": scorer.held_out(merge_best),
    }
    uniform = np.full(n, 1 / n)
    baselines["uniform"] = {
        "fitness": scorer.fitness(uniform),
        "confirmed": scorer.confirmed(uniform),
        "heldout": scorer.held_out(uniform),
    }

    summary = {
        **results,
        "baselines": baselines,
        "seeds": args.seeds,
        "first_seed": args.first_seed,
        "scored_on": "confirmation",
        **trial_split(ours_split),
        "settings": {
            "pool": f"toy paper preset {pool.key}",
            "checkpoints": n,
            "limit_per_task": args.limit,
            "seeds": args.seeds,
            "sigma0": SIGMA0,
            "ours_start": "uniform",
            "budget_counts_our_baselines": True,
        },
        "seconds": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    best_baseline = max(v["fitness"] for v in baselines.values())
    print(f"\n{'confirmed':<14}" + "".join(f"{'@' + str(b):>22}" for b in budgets))
    for method in methods:
        cells = "".join(
            f"{results[method][str(b)]['confirmed']:>10.4f} ± "
            f"{results[method][str(b)]['confirmed_sd']:.4f}  "
            for b in budgets
        )
        print(f"{method:<14}{cells}")
    for method in ours if "optuna_cmaes" in results else ():
        for b in budgets:
            for key, what in (
                ("paired_diff_vs_optuna", "best"),
                ("mean_paired_diff_vs_optuna", "mean"),
            ):
                diff = results[method][str(b)][key]
                print(
                    f"{method} ({what}) - optuna @{b} (confirmed): {diff['mean']:+.4f} "
                    f"[{diff['ci_low']:+.4f}, {diff['ci_high']:+.4f}]"
                )
    print(f"best baseline  {best_baseline:.4f}   uniform {baselines['uniform']['fitness']:.4f}")
    if "merge_fraction" in summary:
        print(f"merge + bookkeeping fraction of a trial: {summary['merge_fraction']:.3%}")


def trial_split(ours_split: list[tuple[float, float, float, int]]) -> dict[str, Any]:
    """How ours' local trial splits between merging (plus the engine) and evaluating."""
    if not ours_split:
        return {}
    merge = sum(s[0] for s in ours_split)
    evaluate = sum(s[1] for s in ours_split)
    bookkeeping = sum(s[2] for s in ours_split)
    trials = sum(s[3] for s in ours_split)
    return {
        "merge_fraction": (merge + bookkeeping) / (merge + evaluate + bookkeeping),
        "trial_split_s": {
            "merge": merge / trials,
            "evaluate": evaluate / trials,
            "bookkeeping": bookkeeping / trials,
        },
    }


if __name__ == "__main__":
    main()
