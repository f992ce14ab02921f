"""The spec's search settings as the engine's configuration (mergesearch/searchconfig.py)."""

from __future__ import annotations

import copy

import pytest

from mergesearch.searchconfig import engine_config
from mergesearch.spec import SpecError, parse_manifest
from support.local_inputs import three_checkpoint_manifest

pytestmark = pytest.mark.unit

MANIFEST = three_checkpoint_manifest(
    [{"task": "x", "limit": 50}, {"task": "y", "weight": 3, "limit": 50}],
    {"maxTrials": 20, "seed": 7},
)


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
