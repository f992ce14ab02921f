"""Local mode's saved state (mergesearch/local/search.py): the spec fingerprint it is saved under,
resuming only the same spec, and locations relative to the manifest."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from mergesearch import engine
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
from mergesearch.searchconfig import engine_config
from mergesearch.spec import parse_manifest
from support.local_inputs import three_checkpoint_manifest

pytestmark = pytest.mark.unit

MANIFEST = three_checkpoint_manifest(
    [{"task": "x", "limit": 50}, {"task": "y", "weight": 3, "limit": 50}],
    {"maxTrials": 20, "seed": 7},
)


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


def test_relative_locations_follow_the_manifest(tmp_path: Path) -> None:
    assert resolve_location("ckpt/a", tmp_path) == str(tmp_path / "ckpt" / "a")
    assert resolve_location("s3://b/a/", tmp_path) == "s3://b/a/"
    assert resolve_location("/abs/a", tmp_path) == "/abs/a"
