"""Small local-mode inputs the unit tests share: a MergeSearch manifest over three checkpoints
(a, b, c) and a succeeded trial record with two held-in scores (x, y)."""

from __future__ import annotations

from typing import Any

from mergesearch.local.records import TrialLogEntry


def three_checkpoint_manifest(
    held_in: list[dict[str, Any]], search: dict[str, Any]
) -> dict[str, Any]:
    """A manifest over checkpoints a, b, c (relative locations), with these held-in tasks and
    search settings."""
    return {
        "apiVersion": "mergesearch.io/v1alpha1",
        "kind": "MergeSearch",
        "metadata": {"name": "t"},
        "spec": {
            "checkpoints": [{"name": n, "uri": f"ckpt/{n}"} for n in ("a", "b", "c")],
            "objective": {"heldIn": held_in},
            "search": search,
        },
    }


def trial_record(rid: str, kind: str, fit: float, x: float, y: float, **kw: Any) -> TrialLogEntry:
    """A succeeded trial `rid` of `kind` (baseline or search) with fitness `fit` and held-in
    scores x and y; `kw` sets any other field (held_out, subset, source...)."""
    return TrialLogEntry(
        id=rid,
        kind=kind,
        generation=-1 if kind == "baseline" else 0,
        weights={"a": 0.4, "b": 0.35, "c": 0.25},
        status="succeeded",
        held_in={"x": x, "y": y},
        fitness=fit,
        **kw,
    )
