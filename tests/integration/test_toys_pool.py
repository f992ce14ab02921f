"""Building pools for real: layout, manifest, caching, relocation and repeatability.

These use a tiny recipe of their own so that they train for seconds, not minutes.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml

from mergerunner.toys import Pool, build_pool, get_preset, load_pool
from mergerunner.toys.model import ModelSpec
from mergerunner.toys.pool import pool_digest
from mergerunner.toys.presets import COMMITTED_DIGESTS, Preset, Stage

pytestmark = pytest.mark.integration

MICRO = Preset(
    name="micro",
    heldin=("toy_rev", "toy_sort"),
    heldout=("toy_max",),
    model=ModelSpec(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
    batch_size=8,
    eval_examples=20,
    stages=(
        Stage("base", None, {"toy_rev": 1, "toy_sort": 1, "toy_max": 1}, 4, 1e-2, 1, "b", 1),
        Stage("sft-rev", "base", {"toy_rev": 1.0}, 3, 1e-2, 2, "r", 1),
        Stage("sft-rev-s2", "sft-rev", {"toy_sort": 1.0}, 3, 1e-2, 3, "s", 1),
    ),
)

CHECKPOINT_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
}


@pytest.fixture(scope="module")
def micro_pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("micro") / "pool"
    build_pool(out, MICRO)
    return out


def test_layout_and_manifest(micro_pool_dir: Path) -> None:
    pool = load_pool(micro_pool_dir)
    assert pool.names == ["base", "sft-rev", "sft-rev-s2"]
    assert pool.heldin == {"toy_rev": "exact_match,none", "toy_sort": "exact_match,none"}
    assert pool.heldout == {"toy_max": "acc,none"}
    for path in pool.checkpoints.values():
        assert {p.name for p in path.iterdir()} >= CHECKPOINT_FILES
    assert sorted(p.name for p in pool.tasks_dir.iterdir()) == [
        f"{t}.{ext}" for t in sorted(pool.tasks) for ext in ("jsonl", "yaml")
    ]
    manifest = pool.manifest()
    assert manifest["key"] == MICRO.key() and manifest["preset"] == "micro"
    stage2 = manifest["checkpoints"][2]
    assert stage2["parent"] == "sft-rev" and stage2["path"] == "checkpoints/sft-rev-s2"
    assert stage2["mixture"] == {"toy_sort": 1.0} and stage2["steps"] == 3
    assert manifest["model"]["parameters"] > 0
    config = yaml.safe_load((pool.tasks_dir / "toy_rev.yaml").read_text())
    jsonl = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert jsonl == pool.tasks_dir / "toy_rev.jsonl" and jsonl.is_file()
    assert not list(micro_pool_dir.parent.glob(".pool.*")), "staging folders left behind"


def test_second_build_reuses_the_pool(micro_pool_dir: Path) -> None:
    manifest = micro_pool_dir / "pool.json"
    before = manifest.stat().st_mtime_ns
    weights = micro_pool_dir / "checkpoints" / "base" / "model.safetensors"
    weights_before = weights.stat().st_mtime_ns
    pool = build_pool(micro_pool_dir, MICRO)
    assert pool.root == micro_pool_dir
    assert manifest.stat().st_mtime_ns == before
    assert weights.stat().st_mtime_ns == weights_before


def test_builds_are_bit_for_bit_repeatable(micro_pool_dir: Path, tmp_path: Path) -> None:
    again = build_pool(tmp_path / "again", MICRO)
    for name, path in again.checkpoints.items():
        original = micro_pool_dir / "checkpoints" / name / "model.safetensors"
        assert (path / "model.safetensors").read_bytes() == original.read_bytes()


# pool_digest of MICRO as built under the pinned numerics (mergerunner.toys.repro). It must not
# change with the machine: a failure here on another x86-64 CPU means the pins do not hold.
MICRO_DIGEST = "aa4494a21bf144841a07307b6aedfd948d430b86467cbc343296c68153976d62"


def test_build_matches_the_committed_digest(micro_pool_dir: Path) -> None:
    pool = load_pool(micro_pool_dir)
    assert pool.digest == pool_digest(micro_pool_dir) == MICRO_DIGEST


def test_build_ignores_the_callers_threads_and_cpu_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller with other thread settings, and glibc told the CPU lacks AVX2, FMA and AVX-512
    (so its math functions take their baseline variants), still builds the same bytes."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MKL_NUM_THREADS", "2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX2,-FMA,-AVX512F,-AVX512VL")
    assert build_pool(tmp_path / "masked", MICRO).digest == MICRO_DIGEST


def test_moved_pool_repoints_its_task_files(micro_pool_dir: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(micro_pool_dir, moved)
    pool = build_pool(moved, MICRO)  # still complete: reused, not rebuilt
    config = yaml.safe_load((pool.tasks_dir / "toy_sort.yaml").read_text())
    assert config["dataset_kwargs"]["data_files"]["test"] == str(moved / "tasks/toy_sort.jsonl")


def test_stale_pool_is_replaced_and_foreign_dirs_are_refused(tmp_path: Path) -> None:
    stale = tmp_path / "stale"
    build_pool(stale, MICRO)
    changed = dataclasses.replace(MICRO, stages=MICRO.stages[:2])
    pool = build_pool(stale, changed)
    assert pool.names == ["base", "sft-rev"]
    assert json.loads((stale / "pool.json").read_text())["key"] == changed.key()
    assert not (stale / "checkpoints" / "sft-rev-s2").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_pool(foreign, MICRO)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_named_presets_resolve() -> None:
    assert get_preset("mini").name == "mini"
    with pytest.raises(ValueError):
        build_pool(Path("/nonexistent/never"), "nope")


def test_mini_pool_is_the_committed_one(toy_pool: Pool) -> None:
    assert toy_pool.digest == pool_digest(toy_pool.root) == COMMITTED_DIGESTS["mini"]


@pytest.mark.slow
def test_paper_pool_is_the_committed_one(paper_pool: Pool) -> None:
    """The demo's pool: the README's table holds for every user only if this holds."""
    assert paper_pool.digest == pool_digest(paper_pool.root) == COMMITTED_DIGESTS["paper"]
