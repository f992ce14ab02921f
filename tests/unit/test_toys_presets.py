"""The pool recipes: shapes the brief asks for, lineage checks, and a cache key that moves."""

import dataclasses

import pytest

from mergerunner.toys import presets
from mergerunner.toys.presets import PRESETS, Stage, get_preset, validate
from mergerunner.toys.tasks import TASKS

pytestmark = pytest.mark.unit


def test_mini_is_a_base_and_three_specialists() -> None:
    mini = get_preset("mini")
    assert [stage.parent for stage in mini.stages] == [None, "base", "base", "base"]
    assert 2 <= len(mini.tasks) <= 3
    assert mini.heldout


def test_paper_has_enough_checkpoints_tasks_and_stages() -> None:
    paper = get_preset("paper")
    assert len(paper.stages) >= 8
    assert len(paper.heldin) >= 3 and len(paper.heldout) >= 1
    parents = {stage.parent for stage in paper.stages}
    assert parents - {None, "base"}, "expected at least one stage-2 checkpoint"
    assert len({stage.lr for stage in paper.stages}) >= 3
    assert len({stage.steps for stage in paper.stages}) >= 3


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_score_a_multiple_choice_task(name: str) -> None:
    preset = get_preset(name)
    validate(preset)
    assert any(TASKS[task].output_type == "multiple_choice" for task in preset.tasks)
    assert sum(stage.parent is None for stage in preset.stages) == 1
    for stage in preset.stages[1:]:
        assert not set(stage.mixture) & set(preset.heldout)


def test_key_is_stable_and_follows_the_recipe() -> None:
    mini = get_preset("mini")
    assert mini.key() == get_preset("mini").key()
    assert mini.key() != get_preset("paper").key()
    longer = dataclasses.replace(
        mini, stages=(dataclasses.replace(mini.stages[0], steps=1), *mini.stages[1:])
    )
    assert longer.key() != mini.key()


def test_key_follows_the_generator_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = get_preset("mini").key()
    monkeypatch.setattr(presets, "GENERATOR_VERSION", presets.GENERATOR_VERSION + "-next")
    assert get_preset("mini").key() != before


def _stage(name: str, parent: str | None, mixture: dict[str, float]) -> Stage:
    return Stage(name, parent, mixture, steps=1, lr=1e-3, seed=0, description="t")


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ((_stage("a", None, {"toy_add": 1}), _stage("a", "a", {"toy_add": 1})), "duplicate"),
        ((_stage("b", "a", {"toy_add": 1}), _stage("a", None, {"toy_add": 1})), "earlier"),
        ((_stage("a", None, {"toy_add": 1}), _stage("b", "a", {"toy_max": 1})), "held-out"),
        ((_stage("a", None, {"toy_copy": 1}),), "outside"),
    ],
)
def test_validate_rejects_broken_recipes(stages: tuple[Stage, ...], message: str) -> None:
    preset = dataclasses.replace(
        get_preset("mini"), heldin=("toy_add",), heldout=("toy_max",), stages=stages
    )
    with pytest.raises(ValueError, match=message):
        validate(preset)


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ValueError, match="mini"):
        get_preset("huge")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_recipe_round_trips_through_json(name: str) -> None:
    """The build process receives its recipe as JSON: the same recipe, the same key."""
    preset = get_preset(name)
    again = presets.Preset.from_json(preset.to_json())
    assert again == preset and again.key() == preset.key()


def test_build_refuses_unpinned_numerics() -> None:
    """This test process has torch's per-CPU kernels: training here would depend on the CPU."""
    from mergerunner.toys.repro import pin_torch

    with pytest.raises(RuntimeError, match="ATEN_CPU_CAPABILITY"):
        pin_torch()


def test_the_demo_searches_under_the_pool_s_pinned_numerics() -> None:
    """scripts/demo.sh exports every pinned setting, so its table is the same on any CPU."""
    from pathlib import Path

    from mergerunner.toys.repro import PINNED_ENV

    demo = (Path(__file__).parents[2] / "scripts" / "demo.sh").read_text()
    exports = next(line for line in demo.splitlines() if line.startswith("export ATEN"))
    assert set(exports.removeprefix("export ").split()) == {
        f"{k}={v}" for k, v in PINNED_ENV.items()
    }
