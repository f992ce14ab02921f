"""Local mode's report (mergesearch/local/report.py): its pictures are drawn, and readable at a
glance: labels never overlap, the best merge is marked, and fitness.png draws the best single
checkpoint and every baseline, with a truthful legend."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib
import pytest
from matplotlib.text import Text

from mergesearch.local.records import TrialLogEntry
from mergesearch.local.report import (
    _fitness_figure,
    _scores_figure,
    best_record,
    best_so_far,
    draw_all,
    pareto_front,
    place_labels,
)
from support.local_inputs import trial_record as rec

matplotlib.use("Agg")
pytestmark = pytest.mark.unit

NAMES = ["base", "sft-add", "sft-rev", "sft-sort", "sft-add-sort", "sft-rev-lowlr", "sft-mix"]


def record(rid: str, kind: str, x: float, y: float, z: float) -> TrialLogEntry:
    return TrialLogEntry(
        id=rid,
        kind=kind,
        generation=-1 if kind == "baseline" else 0,
        weights={n: float(rid == f"b-each-{n}") for n in NAMES} if kind == "baseline" else {},
        status="succeeded",
        held_in={"add": x, "rev": y, "sort": z},
        fitness=(x + y + z) / 3,
    )


def clustered() -> list[TrialLogEntry]:
    """Single checkpoints bunched within a few examples of each other, as on a real pool."""
    singles = [
        record(f"b-each-{n}", "baseline", 0.20 + 0.01 * i, 0.15 + 0.01 * (i % 3), 0.5 - 0.01 * i)
        for i, n in enumerate(NAMES)
    ]
    merges = [
        record("b-uniform", "baseline", 0.80, 0.90, 0.90),
        record("b-merge-best", "baseline", 0.76, 0.78, 0.78),
    ]
    search = [
        record(f"g000-c{i:02d}", "search", 0.8 + 0.01 * (i % 5), 0.9 - 0.01 * (i % 4), 0.91)
        for i in range(12)
    ]
    return [*singles, *merges, *search]


def test_placed_labels_never_overlap_each_other_or_the_points() -> None:
    anchors = [(100.0 + 2 * i, 100.0 + (i % 3)) for i in range(9)]  # nine points in 16 px
    sizes = [(60.0, 10.0)] * 9
    markers = [(x, y, 4.0) for x, y in anchors]
    boxes = place_labels(anchors, sizes, (0, 0, 400, 300), markers=markers)
    for a, b in itertools.combinations(boxes, 2):
        assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    for box in boxes:
        assert box[0] >= 0 and box[2] <= 400 and box[1] >= 0 and box[3] <= 300
        for x, y, r in markers:
            assert not (box[0] < x + r and x - r < box[2] and box[1] < y + r and y - r < box[3])


def test_scores_labels_do_not_overlap_and_the_best_merge_is_marked() -> None:
    records = clustered()
    best = best_record(records)
    assert best is not None and best.id.startswith("g000")
    fig = _scores_figure(records, ["add", "rev", "sort"], best)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        labels = [t for t in ax.texts if t.get_text()]
        assert {t.get_text() for t in labels} >= {*NAMES, "uniform", "merge-best", "best merge"}
        # The text alone (an Annotation's own extent includes its leader line).
        boxes = [Text.get_window_extent(t, renderer) for t in labels]
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b)
        frame = ax.get_window_extent(renderer)
        assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 for b in boxes)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert f"best merge: {best.id}" in legend


def test_fitness_draws_every_baseline_and_a_truthful_legend() -> None:
    records = clustered()
    best = best_record(records)
    fig = _fitness_figure(records, best)
    (ax,) = fig.axes
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    single = max(records[: len(NAMES)], key=lambda r: r.fitness or 0.0)
    assert f"best single: {single.id.removeprefix('b-each-')} ({single.fitness:.3f})" in legend
    assert any(t.startswith("uniform (") for t in legend)
    assert any(t.startswith("merge-best (") for t in legend)
    assert best is not None and f"best merge: {best.id} ({best.fitness:.3f})" in legend
    assert {"baseline trial", "search trial", "best so far"} <= legend
    # Each horizontal line sits at its baseline's fitness.
    lines = {line.get_label(): line.get_ydata()[0] for line in ax.get_lines()}
    assert any(abs(y - single.fitness) < 1e-12 for k, y in lines.items() if k.startswith("best"))
    # The legend's colours are the plotted ones; the title claims no colours of its own.
    handles, labels = ax.get_legend_handles_labels()
    colours = dict(zip(labels, handles, strict=True))
    orange, blue = matplotlib.colors.to_rgba("tab:orange"), matplotlib.colors.to_rgba("tab:blue")
    assert tuple(colours["baseline trial"].get_facecolor()[0]) == orange
    assert tuple(colours["search trial"].get_facecolor()[0]) == blue
    assert not any(c in ax.get_title().lower() for c in ("orange", "blue", "red", "green"))


def test_a_baseline_that_stays_best_is_named_once_as_the_best() -> None:
    records = [r for r in clustered() if r.kind == "baseline"]
    best = best_record(records)
    assert best is not None and best.id == "b-uniform"
    fig = _scores_figure(records, ["add", "rev", "sort"], best)
    for ax in fig.axes:
        texts = [t.get_text() for t in ax.texts]
        assert texts.count("best: uniform") == 1 and "uniform" not in texts
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "best: uniform" in legend
    fitness = _fitness_figure(records, best)
    labels = {t.get_text() for t in fitness.axes[0].get_legend().get_texts()}
    assert f"best: uniform ({best.fitness:.3f})" in labels


def test_pareto_and_best_so_far() -> None:
    points = [(1, 0), (0, 1), (0.5, 0.5), (0.4, 0.4), (1, 0)]
    assert pareto_front(points) == [0, 1, 2, 4]
    assert best_so_far([0.1, 0.3, 0.2, 0.5]) == [0.1, 0.3, 0.3, 0.5]


def test_pictures_are_drawn(tmp_path: Path) -> None:
    records = [
        rec("b-each-a", "baseline", 0.5, 0.9, 0.4),
        rec("b-uniform", "baseline", 0.52, 0.5, 0.52),
        rec("g000-c00", "search", 0.6, 0.6, 0.6),
    ]
    paths = draw_all(records, {"a": 0.5, "b": 0.5}, ["x", "y"], tmp_path)
    assert [p.name for p in paths] == ["fitness.png", "weights.png", "scores.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_confirmation_picture(tmp_path: Path) -> None:
    records = [
        rec("b-uniform", "baseline", 0.52, 0.5, 0.52),
        rec("g000-c00", "search", 0.6, 0.6, 0.6),
        rec("c-g000-c00", "search", 0.51, 0.5, 0.52, subset="confirmation", source="g000-c00"),
    ]
    paths = draw_all(records, {"a": 0.5, "b": 0.5}, ["x", "y"], tmp_path)
    assert [p.name for p in paths][-1] == "confirmation.png"
    assert paths[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
