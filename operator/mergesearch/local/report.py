"""Pictures of a search: fitness over trials, final weights, held-in scores and the Pareto front,
and the finalists' fitness on the search's examples beside that on unseen ones.

Drawing takes plain records (local mode's trial log, or trials rebuilt from a resource's
status), so the same pictures come out of a local run and of a search on a cluster.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mergesearch.engine.pareto import dominates
from mergesearch.local.records import TrialLogEntry
from mergesearch.local.summary import baseline_label, confirmed_fitness

EACH_PREFIX = "b-each-"


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


def _succeeded(records: Sequence[TrialLogEntry]) -> list[TrialLogEntry]:
    """Succeeded trials of the search itself (confirmation re-scores are drawn apart)."""
    return [
        r
        for r in records
        if r.status == "succeeded" and r.fitness is not None and r.subset == "search"
    ]


def confirmation_bars(records: Sequence[TrialLogEntry]) -> list[tuple[str, float, float]]:
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


def draw_confirmation(records: Sequence[TrialLogEntry], path: Path) -> Path:
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


def best_record(
    records: Sequence[TrialLogEntry], best_weights: Mapping[str, float] | None = None
) -> TrialLogEntry | None:
    """The trial the search reports as its best: the one with its weights, else the fittest
    (the first of equals, as the engine keeps the first)."""
    done = _succeeded(records)
    if best_weights:
        same = [r for r in done if r.weights == dict(best_weights)]
        if same:
            return max(same, key=lambda r: r.fitness or 0.0)
    return max(done, key=lambda r: r.fitness or 0.0, default=None)


def best_name(best: TrialLogEntry, *, short: bool = False) -> str:
    """How pictures name the best trial: a merge by its trial id; a baseline (the search found
    nothing better) by what it is, so it is not passed off as a merge."""
    if best.kind == "baseline":
        return f"best: {baseline_label(best.id)}"
    return "best merge" if short else f"best merge: {best.id}"


def best_single(records: Sequence[TrialLogEntry]) -> TrialLogEntry | None:
    """The best single checkpoint: claim (a) of the paper is measured against it."""
    singles = [r for r in _succeeded(records) if r.id.startswith(EACH_PREFIX)]
    return max(singles, key=lambda r: r.fitness or 0.0, default=None)


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in display units


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _inside(box: Box, bounds: Box) -> bool:
    return (
        bounds[0] <= box[0] and box[2] <= bounds[2] and bounds[1] <= box[1] and box[3] <= bounds[3]
    )


def _candidates(
    anchor: tuple[float, float], size: tuple[float, float], gap: float, rings: int
) -> Iterator[Box]:
    """Boxes of `size` around `anchor`, nearest first: rings `gap` apart, 24 directions a
    ring (right, up, left, down and the diagonals before the directions in between)."""
    (x, y), (w, h) = anchor, size
    angles = [math.pi * k / 8 for k in (0, 4, 8, 12, 2, 6, 10, 14)]
    angles += [math.pi * (2 * k + 1) / 16 for k in range(16)]
    for ring in range(rings):
        radius = gap * (1 + ring)
        for angle in angles:
            cx = x + math.cos(angle) * (radius + w / 2)
            cy = y + math.sin(angle) * (radius + h / 2)
            yield (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def place_labels(
    anchors: Sequence[tuple[float, float]],
    sizes: Sequence[tuple[float, float]],
    bounds: Box,
    *,
    markers: Sequence[tuple[float, float, float]] = (),
    gap: float = 3.0,
    rings: int = 40,
) -> list[Box]:
    """A box for each label, near its anchor, overlapping no other label and no marker.

    Greedy: each label in turn takes the nearest free spot around its anchor (`_candidates`)
    inside `bounds`. Markers (the plotted points: x, y and radius) are avoided, so a label
    never hides a point, and a spot nearer to another labelled point than to its own is
    passed over while any other is free, so a label is read as its own point's. Pure, in
    display units, so it is tested without drawing. With no free spot within `rings` rings,
    the label takes its first in-bounds candidate (not seen on our pictures).
    """
    taken: list[Box] = [(x - r, y - r, x + r, y + r) for x, y, r in markers]
    placed: list[Box] = []
    for index, (anchor, size) in enumerate(zip(anchors, sizes, strict=True)):
        others = [a for j, a in enumerate(anchors) if j != index]
        free = [
            box
            for box in itertools.islice(
                (c for c in _candidates(anchor, size, gap, rings) if _inside(c, bounds)), 2000
            )
            if not any(_overlaps(box, other) for other in (*taken, *placed))
        ]
        own = next((b for b in free if all(_gap(b, a) >= _gap(b, anchor) for a in others)), None)
        first = next((c for c in _candidates(anchor, size, gap, 1) if _inside(c, bounds)), None)
        x, y = anchor
        placed.append(
            own or (free[0] if free else None) or first or (x, y, x + size[0], y + size[1])
        )
    return placed


def _label_points(
    ax: Any,
    points: Sequence[tuple[float, float]],
    labels: Sequence[str],
    markers: Sequence[tuple[float, float, float]],
    fontsize: float = 7,
) -> None:
    """Write `labels` beside `points` without overlaps (`place_labels`); a label set apart
    from its point gets a thin leader line to it."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    to_display = ax.transData.transform
    sizes = []
    for label in labels:
        probe = ax.text(0, 0, label, fontsize=fontsize)
        extent = probe.get_window_extent(renderer)
        sizes.append((extent.width, extent.height))
        probe.remove()
    frame = ax.get_window_extent(renderer)
    boxes = place_labels(
        [tuple(to_display(p)) for p in points],
        sizes,
        (frame.x0, frame.y0, frame.x1, frame.y1),
        markers=[(*to_display((x, y)), radius) for x, y, radius in markers],
    )
    to_data = ax.transData.inverted().transform
    for point, label, box in zip(points, labels, boxes, strict=True):
        center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        ax.annotate(
            label,
            xy=point,
            xytext=tuple(to_data(center)),
            textcoords="data",
            ha="center",
            va="center",
            fontsize=fontsize,
            arrowprops=LEADER if _gap(box, tuple(to_display(point))) > LEADER_AFTER_PX else None,
        )


# A label further than this from its point gets a leader line: beside a point it is plainly
# that point's; set apart in a cluster it could be read as a neighbour's.
LEADER_AFTER_PX = 3.0
LEADER = {"arrowstyle": "-", "lw": 0.6, "color": "dimgray", "shrinkA": 0, "shrinkB": 3}
# Half-sizes, in display pixels, of the markers labels must not cover.
SEARCH_PX, BASELINE_PX, BEST_PX = 3.0, 5.0, 10.0


def _gap(box: Box, point: tuple[float, float]) -> float:
    """Distance from a point to the nearest point of a box (0 inside it)."""
    dx = max(box[0] - point[0], 0.0, point[0] - box[2])
    dy = max(box[1] - point[1], 0.0, point[1] - box[3])
    return math.hypot(dx, dy)


BASELINE_COLOR, SEARCH_COLOR, BEST_COLOR = "tab:orange", "tab:blue", "gold"
LINE_STYLES = {"best single": ("tab:red", "-"), "uniform": ("tab:green", "--")}
MERGE_BEST_STYLE = ("tab:purple", "-.")


def _fitness_figure(records: Sequence[TrialLogEntry], best: TrialLogEntry | None) -> Any:
    import matplotlib.pyplot as plt

    done = _succeeded(records)
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    order = {r.id: i for i, r in enumerate(done, start=1)}
    for kind, color, label in (
        ("baseline", BASELINE_COLOR, "baseline trial"),
        ("search", SEARCH_COLOR, "search trial"),
    ):
        mine = [r for r in done if (r.kind == "baseline") == (kind == "baseline")]
        ax.scatter(
            [order[r.id] for r in mine], [r.fitness for r in mine], s=14, c=color, label=label
        )
    xs = list(order.values())
    ax.step(
        xs,
        best_so_far([r.fitness or 0.0 for r in done]),
        where="post",
        color="black",
        lw=1.2,
        label="best so far",
    )
    lines = []
    single = best_single(records)
    if single is not None:
        lines.append(
            (f"best single: {baseline_label(single.id)}", single, *LINE_STYLES["best single"])
        )
    for r in done:
        if r.id == "b-uniform":
            lines.append(("uniform", r, *LINE_STYLES["uniform"]))
        elif r.id == "b-merge-best":
            lines.append(("merge-best", r, *MERGE_BEST_STYLE))
    for name, r, color, style in lines:
        ax.axhline(r.fitness or 0.0, color=color, ls=style, lw=1, label=f"{name} ({r.fitness:.3f})")
    if best is not None:
        ax.scatter(
            [order[best.id]],
            [best.fitness],
            marker="*",
            s=160,
            c=BEST_COLOR,
            edgecolors="black",
            zorder=5,
            label=f"{best_name(best)} ({best.fitness:.3f})",
        )
    ax.set_xlabel("trial, in the order run")
    ax.set_ylabel("held-in fitness")
    ax.set_title("Held-in fitness per trial, against every baseline")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    return fig


def draw_fitness(
    records: Sequence[TrialLogEntry], path: Path, best_weights: Mapping[str, float] | None = None
) -> Path:
    """Every trial's fitness in run order, the best so far, a line for the best single
    checkpoint, the uniform merge and merge-best, and the best merge starred."""
    import matplotlib.pyplot as plt

    fig = _fitness_figure(records, best_record(records, best_weights))
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


def _scores_figure(
    records: Sequence[TrialLogEntry], tasks: Sequence[str], best: TrialLogEntry | None
) -> Any:
    import matplotlib.pyplot as plt

    done = [r for r in _succeeded(records) if all(t in r.held_in for t in tasks)]
    pairs = list(itertools.combinations(tasks, 2)) or [(tasks[0], tasks[0])]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 5), squeeze=False)
    points = [[r.held_in[t] for t in tasks] for r in done]
    front = [done[i] for i in sorted(set(pareto_front(points)))]
    search = [r for r in done if r.kind != "baseline"]
    baselines = [r for r in done if r.kind == "baseline"]
    for ax, (a, b) in zip(axes[0], pairs, strict=True):

        def xy(
            rs: Sequence[TrialLogEntry], a: str = a, b: str = b
        ) -> tuple[list[float], list[float]]:
            return [r.held_in[a] for r in rs], [r.held_in[b] for r in rs]

        ax.scatter(*xy(search), s=10, alpha=0.5, c=SEARCH_COLOR, label="search trial")
        ax.scatter(*xy(front), s=30, facecolors="none", edgecolors="red", label="Pareto front")
        ax.scatter(*xy(baselines), marker="x", c=BASELINE_COLOR, label="baseline")
        if best is not None:
            ax.scatter(
                *xy([best]),
                marker="*",
                s=180,
                c=BEST_COLOR,
                edgecolors="black",
                zorder=5,
                label=best_name(best),
            )
        ax.set_xlabel(a)
        ax.set_ylabel(b)
        ax.margins(0.12)
    fig.suptitle("Held-in task scores, pair by pair")
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = len(labels) if len(pairs) > 1 else 2  # one panel is too narrow for one row
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8)
    fig.tight_layout(rect=(0, 0.02 + 0.045 * math.ceil(len(labels) / columns), 1, 1))
    for ax, (a, b) in zip(axes[0], pairs, strict=True):
        ax.set_xlim(ax.get_xlim())  # freeze the limits: labels are placed in display units
        ax.set_ylim(ax.get_ylim())
        # The best is labelled once, as the best, even when it is a baseline.
        named = [*(r for r in baselines if r is not best), *([best] if best is not None else [])]
        _label_points(
            ax,
            [(r.held_in[a], r.held_in[b]) for r in named],
            [best_name(r, short=True) if r is best else baseline_label(r.id) for r in named],
            markers=[
                (r.held_in[a], r.held_in[b], BASELINE_PX if r.kind == "baseline" else SEARCH_PX)
                for r in done
            ]
            + ([(best.held_in[a], best.held_in[b], BEST_PX)] if best is not None else []),
        )
    return fig


def draw_scores(
    records: Sequence[TrialLogEntry],
    tasks: Sequence[str],
    path: Path,
    best_weights: Mapping[str, float] | None = None,
) -> Path:
    """Every pair of held-in tasks: all trials, the Pareto front, every baseline labelled
    (labels never overlap), the best merge starred."""
    import matplotlib.pyplot as plt

    fig = _scores_figure(records, tasks, best_record(records, best_weights))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(
    records: Sequence[TrialLogEntry],
    best_weights: dict[str, float],
    tasks: Sequence[str],
    out: Path,
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        draw_fitness(records, out / "fitness.png", best_weights),
        draw_weights(best_weights, out / "weights.png"),
        draw_scores(records, tasks, out / "scores.png", best_weights),
    ]
    if confirmation_bars(records):
        paths.append(draw_confirmation(records, out / "confirmation.png"))
    return paths
