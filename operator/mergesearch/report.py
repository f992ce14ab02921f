"""Pictures of a search: fitness over trials, final weights, held-in scores and the Pareto front,
and the finalists' fitness on the search's examples beside that on unseen ones.

Drawing takes plain records (local mode's trial log, or trials rebuilt from a resource's
status), so the same pictures come out of a local run and of a search on a cluster.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from mergesearch.engine.pareto import dominates
from mergesearch.records import TrialRecord
from mergesearch.summary import baseline_label, confirmed_fitness


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (all objectives maximised)."""
    return [
        i
        for i, p in enumerate(points)
        if not any(dominates(q, p) for j, q in enumerate(points) if j != i)
    ]


def best_so_far(values: Sequence[float]) -> list[float]:
    out: list[float] = []
    for v in values:
        out.append(v if not out else max(out[-1], v))
    return out


def _succeeded(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Succeeded trials of the search itself (confirmation re-scores are drawn apart)."""
    return [
        r
        for r in records
        if r.status == "succeeded" and r.fitness is not None and r.subset == "search"
    ]


def confirmation_bars(records: Sequence[TrialRecord]) -> list[tuple[str, float, float]]:
    """(label, fitness on the search's examples, on unseen ones) per confirmed finalist."""
    searched = {r.id: r for r in _succeeded(records)}
    confirmed = confirmed_fitness(records)
    return [
        (
            baseline_label(trial) if trial.startswith("b-") else trial,
            searched[trial].fitness or 0.0,
            fit,
        )
        for trial, fit in confirmed.items()
        if trial in searched
    ]


def draw_confirmation(records: Sequence[TrialRecord], path: Path) -> Path:
    """The winner's curse made visible: the search's figures of its best are inflated."""
    import matplotlib.pyplot as plt

    bars = confirmation_bars(records)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(bars) + 2), 4.5))
    xs = list(range(len(bars)))
    ax.bar([x - 0.2 for x in xs], [b[1] for b in bars], width=0.4, label="search examples")
    ax.bar([x + 0.2 for x in xs], [b[2] for b in bars], width=0.4, label="unseen examples")
    ax.set_xticks(xs, [b[0] for b in bars], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("held-in fitness")
    ax.set_title("Finalists: fitness on the search's examples and on unseen ones")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_fitness(records: Sequence[TrialRecord], path: Path) -> Path:
    import matplotlib.pyplot as plt

    done = _succeeded(records)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = list(range(1, len(done) + 1))
    colors = ["tab:orange" if r.kind == "baseline" else "tab:blue" for r in done]
    ax.scatter(xs, [r.fitness for r in done], c=colors, s=14, label="trial")
    ax.plot(xs, best_so_far([r.fitness or 0.0 for r in done]), color="black", label="best so far")
    for r in done:
        if r.id in {"b-uniform", "b-merge-best"}:
            ax.axhline(r.fitness or 0.0, ls="--", lw=1, color="tab:orange")
            ax.annotate(baseline_label(r.id), (xs[-1], r.fitness or 0.0), fontsize=8)
    ax.set_xlabel("trial")
    ax.set_ylabel("held-in fitness")
    ax.set_title("Fitness per trial (orange: baselines)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_weights(weights: dict[str, float], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(weights)
    ax.bar(names, [weights[n] for n in names], color="tab:green")
    ax.axhline(1 / max(len(names), 1), ls="--", color="gray", lw=1, label="uniform")
    ax.set_ylabel("weight")
    ax.set_title("Weights of the chosen merge")
    ax.tick_params(axis="x", rotation=45)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_scores(records: Sequence[TrialRecord], tasks: Sequence[str], path: Path) -> Path:
    """Every pair of held-in tasks: all trials, the Pareto front, the baselines."""
    import matplotlib.pyplot as plt

    done = [r for r in _succeeded(records) if all(t in r.held_in for t in tasks)]
    pairs = list(itertools.combinations(tasks, 2)) or [(tasks[0], tasks[0])]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 4), squeeze=False)
    points = [[r.held_in[t] for t in tasks] for r in done]
    front = set(pareto_front(points))
    for ax, (a, b) in zip(axes[0], pairs, strict=True):
        search = [r for r in done if r.kind != "baseline"]
        ax.scatter([r.held_in[a] for r in search], [r.held_in[b] for r in search], s=10, alpha=0.5)
        pf = [done[i] for i in sorted(front)]
        ax.scatter(
            [r.held_in[a] for r in pf],
            [r.held_in[b] for r in pf],
            s=26,
            facecolors="none",
            edgecolors="red",
            label="Pareto front",
        )
        for r in done:
            if r.kind == "baseline":
                ax.scatter(r.held_in[a], r.held_in[b], marker="x", color="tab:orange")
                ax.annotate(
                    baseline_label(r.id),
                    (r.held_in[a], r.held_in[b]),
                    fontsize=7,
                )
        ax.set_xlabel(a)
        ax.set_ylabel(b)
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.suptitle("Held-in task scores (x: baselines)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(
    records: Sequence[TrialRecord], best_weights: dict[str, float], tasks: Sequence[str], out: Path
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        draw_fitness(records, out / "fitness.png"),
        draw_weights(best_weights, out / "weights.png"),
        draw_scores(records, tasks, out / "scores.png"),
    ]
    if confirmation_bars(records):
        paths.append(draw_confirmation(records, out / "confirmation.png"))
    return paths
