"""Local mode's summary (mergesearch/local/summary.py): the claims a search can make and the
table's rows, on the search's examples or, once confirmed, on unseen ones."""

from __future__ import annotations

import pytest

from mergesearch.local.report import confirmation_bars
from mergesearch.local.summary import check_claims, table_rows
from support.local_inputs import trial_record as rec

pytestmark = pytest.mark.unit


def test_claims_and_rows() -> None:
    records = [
        rec("b-each-a", "baseline", 0.50, 0.9, 0.4),
        rec("b-each-b", "baseline", 0.55, 0.1, 0.7),
        rec("b-uniform", "baseline", 0.52, 0.5, 0.52, held_out={"z": 0.3}),
        rec("b-merge-best", "baseline", 0.56, 0.6, 0.55),
        rec("g001-c02", "search", 0.60, 0.6, 0.6),
    ]
    weights = {"a": 0.7, "b": 0.29, "c": 0.01}
    claims = check_claims(records, "g001-c02", weights, {"z": 0.35})
    assert claims.beats_best_single and claims.beats_uniform and claims.beats_merge_best
    assert claims.held_out_no_worse is True
    assert claims.nonnegligible_weights == 2  # 0.01 < 1/30
    assert claims.weights_spread
    rows = table_rows(records, "g001-c02", {"z": 0.35})
    assert [r.label for r in rows] == ["a", "b", "uniform", "merge-best", "best (g001-c02)"]
    worse = check_claims(records, "g001-c02", weights, {"z": 0.1})
    assert worse.held_out_no_worse is False
    assert "NO" in worse.lines()[1]


def test_confirmation_is_drawn_and_tabled_beside_the_search() -> None:
    records = [
        rec("b-each-a", "baseline", 0.5, 0.9, 0.4),
        rec("b-uniform", "baseline", 0.52, 0.5, 0.52),
        rec("g000-c00", "search", 0.6, 0.6, 0.6),
        rec("c-g000-c00", "search", 0.51, 0.5, 0.52, subset="confirmation", source="g000-c00"),
        rec("c-b-each-a", "baseline", 0.45, 0.8, 0.3, subset="confirmation", source="b-each-a"),
        rec("c-b-uniform", "baseline", 0.53, 0.5, 0.56, subset="confirmation", source="b-uniform"),
    ]
    assert confirmation_bars(records) == [
        ("g000-c00", 0.6, 0.51),
        ("a", 0.5, 0.45),
        ("uniform", 0.52, 0.53),
    ]
    rows = table_rows(records, "b-uniform", {})
    assert [(r.label, r.fitness, r.confirmed) for r in rows] == [
        ("a", 0.5, 0.45),
        ("uniform", 0.52, 0.53),
        ("best (b-uniform)", 0.52, 0.53),
    ]
    # (a) is judged on the unseen examples: the search's best loses there
    claims = check_claims(records, "g000-c00", {"a": 0.5, "b": 0.5}, {})
    assert claims.basis == "confirmation" and not claims.beats_uniform
    assert claims.beats_best_single
    search_only = check_claims(records[:3], "g000-c00", {"a": 0.5, "b": 0.5}, {})
    assert search_only.basis == "search" and search_only.beats_uniform
