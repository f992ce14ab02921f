"""Local mode's pure pieces: records, summary claims, spec fingerprint, engine config mapping."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from mergesearch import engine
from mergesearch.local.records import TrialRecord, append_record, read_records
from mergesearch.local.report import best_so_far, confirmation_bars, draw_all, pareto_front
from mergesearch.local.search import (
    LocalInputError,
    LocalSearch,
    StatePaths,
    load_state,
    resolve_location,
    save_state,
    saved_under_other_spec,
    spec_fingerprint,
)
from mergesearch.local.summary import check_claims, table_rows
from mergesearch.searchconfig import engine_config
from mergesearch.spec import SpecError, parse_manifest

pytestmark = pytest.mark.unit

MANIFEST = {
    "apiVersion": "mergesearch.io/v1alpha1",
    "kind": "MergeSearch",
    "metadata": {"name": "t"},
    "spec": {
        "checkpoints": [{"name": n, "uri": f"ckpt/{n}"} for n in ("a", "b", "c")],
        "objective": {
            "heldIn": [{"task": "x", "limit": 50}, {"task": "y", "weight": 3, "limit": 50}]
        },
        "search": {"maxTrials": 20, "seed": 7},
    },
}


def rec(rid: str, kind: str, fit: float, x: float, y: float, **kw: object) -> TrialRecord:
    return TrialRecord(
        id=rid,
        kind=kind,
        generation=-1 if kind == "baseline" else 0,
        weights={"a": 0.4, "b": 0.35, "c": 0.25},
        status="succeeded",
        held_in={"x": x, "y": y},
        fitness=fit,
        **kw,
    )


def test_records_survive_a_torn_last_line(tmp_path: Path) -> None:
    log = tmp_path / "trials.jsonl"
    first = rec("b-uniform", "baseline", 0.5, 0.5, 0.5)
    append_record(log, first)
    with log.open("a") as handle:
        handle.write('{"id": "g000-c0')  # killed mid-write
    assert read_records(log) == [first]


def test_engine_config_follows_the_spec() -> None:
    spec = parse_manifest(MANIFEST).spec
    config = engine_config(spec)
    assert config.checkpoints == ("a", "b", "c")
    assert [(t.name, t.weight) for t in config.tasks] == [("x", 1.0), ("y", 3.0)]
    assert config.seed == 7 and config.max_trials == 20


def test_engine_rules_name_the_spec_field() -> None:
    doc = copy.deepcopy(MANIFEST)
    doc["spec"]["search"]["maxTrials"] = 2  # fewer than the 5 baseline trials
    with pytest.raises(SpecError) as info:
        engine_config(parse_manifest(doc).spec)
    assert any(e.startswith("spec.search.maxTrials") for e in info.value.errors), info.value


def test_fingerprint_ignores_execution_but_not_objective() -> None:
    spec = parse_manifest(MANIFEST).spec
    doc = copy.deepcopy(MANIFEST)
    doc["spec"]["execution"] = {"parallelism": 9}
    assert spec_fingerprint(parse_manifest(doc).spec) == spec_fingerprint(spec)
    doc["spec"]["objective"]["heldIn"][0]["limit"] = 5
    assert spec_fingerprint(parse_manifest(doc).spec) != spec_fingerprint(spec)


def test_saved_state_under_another_spec_is_detected(tmp_path: Path) -> None:
    spec = parse_manifest(MANIFEST).spec
    paths = StatePaths(tmp_path)
    assert not saved_under_other_spec(paths, spec)  # nothing saved
    save_state(paths, spec, engine.init(engine_config(spec)))
    assert not saved_under_other_spec(paths, spec)
    doc = copy.deepcopy(MANIFEST)
    doc["spec"]["search"]["start"] = "best-baseline"
    other = parse_manifest(doc).spec
    assert saved_under_other_spec(paths, other)
    with pytest.raises(LocalInputError, match="different spec"):
        load_state(paths, other)


def test_fresh_if_changed_starts_over_only_for_another_spec(tmp_path: Path) -> None:
    manifest = parse_manifest(MANIFEST)
    paths = StatePaths(tmp_path)
    save_state(paths, manifest.spec, tell_first_baseline(engine.init(engine_config(manifest.spec))))
    kept = LocalSearch(
        manifest, tmp_path, state_dir=tmp_path, cache_dir=tmp_path, fresh_if_changed=True
    )
    assert kept.state.trials.succeeded == 1  # same spec: resumed
    doc = copy.deepcopy(MANIFEST)
    doc["spec"]["search"]["seed"] = 8
    other = parse_manifest(doc)
    with pytest.raises(LocalInputError, match="different spec"):
        LocalSearch(other, tmp_path, state_dir=tmp_path, cache_dir=tmp_path)
    fresh = LocalSearch(
        other, tmp_path, state_dir=tmp_path, cache_dir=tmp_path, fresh_if_changed=True
    )
    assert fresh.state.trials.succeeded == 0 and not paths.state.exists()


def tell_first_baseline(state: engine.EngineState) -> engine.EngineState:
    _, candidates = engine.ask(state)
    scores = {"x": 0.5, "y": 0.5}
    return engine.tell(state, [engine.Result(candidate_id=candidates[0].id, scores=scores)])


def test_spec_defaults_start_from_uniform_with_sigma_one() -> None:
    config = engine_config(parse_manifest(MANIFEST).spec)
    assert config.start == "uniform" and config.sigma0 is None
    assert config.step_size == 1.0
    doc = copy.deepcopy(MANIFEST)
    doc["spec"]["merge"] = {"parameterization": "unconstrained"}
    assert engine_config(parse_manifest(doc).spec).step_size == pytest.approx(0.5 / 3)
    doc["spec"]["search"].update(start="best-baseline", baselines=[])
    with pytest.raises(SpecError, match=r"spec\.search: start: best-baseline needs"):
        parse_manifest(doc)


def test_relative_locations_follow_the_manifest(tmp_path: Path) -> None:
    assert resolve_location("ckpt/a", tmp_path) == str(tmp_path / "ckpt" / "a")
    assert resolve_location("s3://b/a/", tmp_path) == "s3://b/a/"
    assert resolve_location("/abs/a", tmp_path) == "/abs/a"


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


def test_confirmation_picture(tmp_path: Path) -> None:
    records = [
        rec("b-uniform", "baseline", 0.52, 0.5, 0.52),
        rec("g000-c00", "search", 0.6, 0.6, 0.6),
        rec("c-g000-c00", "search", 0.51, 0.5, 0.52, subset="confirmation", source="g000-c00"),
    ]
    paths = draw_all(records, {"a": 0.5, "b": 0.5}, ["x", "y"], tmp_path)
    assert [p.name for p in paths][-1] == "confirmation.png"
    assert paths[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
