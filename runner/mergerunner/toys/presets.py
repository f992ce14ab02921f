"""The recipes of the toy pools: which checkpoints, trained from what, on which data mixture.

Like the checkpoints of a real training run, the specialists share one pretrained base and
differ in data mixture (each emphasises some held-in tasks), stage (a stage-2 checkpoint
continues from a specialist), learning rate and step count. None of them trains on a held-out
task: those measure what fine-tuning keeps of the base's skills. Step counts were calibrated
on single-checkpoint scores only (a base neither blank nor saturated, specialists that gain on
their tasks), before any merge was evaluated; nothing here is tuned to make merging look good.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from mergerunner.toys.model import ModelSpec
from mergerunner.toys.tasks import TASKS

# Bump whenever anything that changes the produced pool changes (tasks, tokenizer, training).
# 2: trained under pinned numerics (mergerunner.toys.repro), the same bytes on every x86-64 CPU.
GENERATOR_VERSION = "2"


@dataclass(frozen=True)
class Stage:
    """One checkpoint: trained from `parent` (None: from a fresh init) on `mixture`."""

    name: str
    parent: str | None
    mixture: dict[str, float]
    steps: int
    lr: float
    seed: int
    description: str
    warmup: int = 10

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Stage:
        return cls(**data)


@dataclass(frozen=True)
class Preset:
    """A whole pool: architecture, batch size, tasks and the ordered list of stages."""

    name: str
    heldin: tuple[str, ...]
    heldout: tuple[str, ...]
    stages: tuple[Stage, ...]
    model: ModelSpec = field(default_factory=ModelSpec)
    batch_size: int = 64
    init_seed: int = 1234
    eval_examples: int = 200

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.heldin + self.heldout

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "heldin": list(self.heldin),
            "heldout": list(self.heldout),
            "stages": [stage.to_json() for stage in self.stages],
            "model": self.model.to_json(),
            "batch_size": self.batch_size,
            "init_seed": self.init_seed,
            "eval_examples": self.eval_examples,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Preset:
        """The inverse of to_json (the build process receives its recipe this way)."""
        return cls(
            name=data["name"],
            heldin=tuple(data["heldin"]),
            heldout=tuple(data["heldout"]),
            stages=tuple(Stage.from_json(stage) for stage in data["stages"]),
            model=ModelSpec(**data["model"]),
            batch_size=data["batch_size"],
            init_seed=data["init_seed"],
            eval_examples=data["eval_examples"],
        )

    def key(self) -> str:
        """Identifies what this preset produces: a changed recipe never reuses a stale cache."""
        payload = json.dumps({"version": GENERATOR_VERSION, **self.to_json()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def validate(preset: Preset) -> None:
    """Parents come first, names are unique, mixtures avoid held-out tasks except the base's."""
    seen: set[str] = set()
    for stage in preset.stages:
        if stage.name in seen:
            raise ValueError(f"duplicate checkpoint name {stage.name!r}")
        if stage.parent is not None and stage.parent not in seen:
            raise ValueError(f"{stage.name!r}: parent {stage.parent!r} must come earlier")
        unknown = set(stage.mixture) - set(preset.tasks)
        if unknown:
            raise ValueError(f"{stage.name!r}: mixture names tasks outside the preset: {unknown}")
        if stage.parent is not None and set(stage.mixture) & set(preset.heldout):
            raise ValueError(f"{stage.name!r}: a fine-tune must not train on held-out tasks")
        seen.add(stage.name)
    missing = set(preset.tasks) - set(TASKS)
    if missing:
        raise ValueError(f"unknown tasks {missing}")


def _uniform(tasks: tuple[str, ...]) -> dict[str, float]:
    return dict.fromkeys(tasks, 1.0)


_MINI_HELDIN = ("toy_rev", "toy_sort")
_MINI_HELDOUT = ("toy_max",)

MINI = Preset(
    name="mini",
    heldin=_MINI_HELDIN,
    heldout=_MINI_HELDOUT,
    model=ModelSpec(hidden_size=128, num_layers=2),
    stages=(
        Stage(
            "base",
            None,
            _uniform(_MINI_HELDIN + _MINI_HELDOUT),
            steps=150,
            lr=3e-3,
            seed=10,
            warmup=15,
            description="pretrained from scratch on a uniform mixture of all tasks",
        ),
        Stage(
            "sft-rev",
            "base",
            {"toy_rev": 1.0},
            steps=80,
            lr=2e-3,
            seed=11,
            description="fine-tuned from base on reversal only",
        ),
        Stage(
            "sft-sort",
            "base",
            {"toy_sort": 1.0},
            steps=80,
            lr=2e-3,
            seed=12,
            description="fine-tuned from base on sorting only",
        ),
        Stage(
            "sft-mix-lowlr",
            "base",
            {"toy_rev": 0.5, "toy_sort": 0.5},
            steps=80,
            lr=5e-4,
            seed=13,
            description="fine-tuned from base on a balanced mixture at a low learning rate",
        ),
    ),
)

_PAPER_HELDIN = ("toy_add", "toy_rev", "toy_sort")
_PAPER_HELDOUT = ("toy_copy", "toy_max")

PAPER = Preset(
    name="paper",
    heldin=_PAPER_HELDIN,
    heldout=_PAPER_HELDOUT,
    model=ModelSpec(hidden_size=128, num_layers=2),
    stages=(
        Stage(
            "base",
            None,
            _uniform(_PAPER_HELDIN + _PAPER_HELDOUT),
            steps=300,
            lr=3e-3,
            seed=20,
            warmup=30,
            description="pretrained from scratch on a uniform mixture of all five tasks",
        ),
        Stage(
            "sft-add",
            "base",
            {"toy_add": 0.7, "toy_rev": 0.15, "toy_sort": 0.15},
            steps=150,
            lr=1e-3,
            seed=21,
            description="stage 1 from base: 70% addition, 15% reversal, 15% sorting",
        ),
        Stage(
            "sft-rev",
            "base",
            {"toy_rev": 0.7, "toy_add": 0.15, "toy_sort": 0.15},
            steps=100,
            lr=1e-3,
            seed=22,
            description="stage 1 from base: 70% reversal, 15% addition, 15% sorting",
        ),
        Stage(
            "sft-sort",
            "base",
            {"toy_sort": 0.7, "toy_add": 0.15, "toy_rev": 0.15},
            steps=100,
            lr=1e-3,
            seed=23,
            description="stage 1 from base: 70% sorting, 15% addition, 15% reversal",
        ),
        Stage(
            "sft-add-sort",
            "base",
            {"toy_add": 0.5, "toy_sort": 0.5},
            steps=150,
            lr=1e-3,
            seed=24,
            description="stage 1 from base: half addition, half sorting",
        ),
        Stage(
            "sft-rev-lowlr",
            "base",
            {"toy_rev": 1.0},
            steps=100,
            lr=3e-4,
            seed=25,
            description="stage 1 from base: reversal only at a low learning rate",
        ),
        Stage(
            "sft-balanced-long",
            "base",
            _uniform(_PAPER_HELDIN),
            steps=200,
            lr=1e-3,
            seed=26,
            description="stage 1 from base: uniform over the held-in tasks, more steps",
        ),
        Stage(
            "sft-add-s2",
            "sft-add",
            {"toy_rev": 0.6, "toy_add": 0.4},
            steps=80,
            lr=5e-4,
            seed=27,
            description="stage 2 from sft-add: 60% reversal, 40% addition, lower learning rate",
        ),
        Stage(
            "sft-sort-hot",
            "base",
            {"toy_sort": 0.7, "toy_rev": 0.3},
            steps=100,
            lr=5e-3,
            seed=28,
            description="stage 1 from base: 70% sorting, 30% reversal, high learning rate",
        ),
    ),
)

PRESETS: dict[str, Preset] = {preset.name: preset for preset in (MINI, PAPER)}

# What build_pool produces for each named preset (Pool.digest: every checkpoint's weights and
# every task's examples), on any x86-64 machine; tests/integration/test_toys_pool.py checks it.
COMMITTED_DIGESTS: dict[str, str] = {
    "mini": "41999ce7792f899d404c2082ca8aff516d9d8ab769cb712b3d29158254612f5c",
    "paper": "7e15f0659aae8aa71d03d993644538f46acdb3149ec39ea2020b32f4d74db074",
}


def get_preset(name: str) -> Preset:
    try:
        preset = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
    validate(preset)
    return preset
