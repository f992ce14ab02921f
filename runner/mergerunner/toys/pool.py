"""Build a toy checkpoint pool into a directory, or reuse the complete one already there.

A pool is built in a temporary sibling folder and renamed into place, and its manifest
(pool.json) is written last, so a directory with a matching manifest is always complete; an
interrupted build leaves nothing that could be mistaken for a pool.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergerunner.toys.lmeval_tasks import write_task_yamls, write_tasks
from mergerunner.toys.presets import GENERATOR_VERSION, Preset, Stage, get_preset, validate
from mergerunner.toys.repro import worker_env
from mergerunner.toys.tasks import TASKS

MANIFEST = "pool.json"
CHECKPOINTS_DIR = "checkpoints"
TASKS_DIR = "tasks"
WEIGHTS_FILE = "model.safetensors"

Log = Callable[[str], None]


@dataclass(frozen=True)
class Pool:
    """A built pool: where its checkpoints and lm-eval tasks are, and how to score them.

    `heldin` and `heldout` map task names to the metric key in lm-eval's results; `digest`
    identifies what is scored (every checkpoint's weights and every task's examples).
    """

    root: Path
    preset: str
    key: str
    version: str
    checkpoints: dict[str, Path]
    heldin: dict[str, str]
    heldout: dict[str, str]
    digest: str

    @property
    def tasks_dir(self) -> Path:
        return self.root / TASKS_DIR

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def tasks(self) -> dict[str, str]:
        """Every task of the pool, held-in first, with its metric key."""
        return {**self.heldin, **self.heldout}

    @property
    def names(self) -> list[str]:
        return list(self.checkpoints)

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())


def build_pool(out_dir: Path, preset: str | Preset = "mini", log: Log | None = None) -> Pool:
    """The pool of `preset` in `out_dir`, built unless a complete one is already there.

    `preset` is a name from PRESETS or a Preset of one's own (tests use tiny ones).
    """
    recipe = get_preset(preset) if isinstance(preset, str) else preset
    validate(recipe)
    out_dir = Path(out_dir).expanduser().absolute()
    existing = _complete_pool(out_dir, recipe)
    if existing is not None:
        return existing
    _refuse_foreign_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.build-", dir=out_dir.parent))
    try:
        _build_in_child(staging, out_dir, recipe, log or _quiet)
        _install(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    pool = _complete_pool(out_dir, recipe)
    if pool is None:  # another process installed a different pool at the same moment
        raise RuntimeError(f"{out_dir} holds no complete {recipe.name!r} pool after building")
    return pool


def load_pool(root: Path) -> Pool:
    """Open a complete pool directory, re-pointing its task YAMLs if the directory has moved."""
    root = Path(root).expanduser().absolute()
    manifest = json.loads((root / MANIFEST).read_text())
    pool = _pool_from_manifest(root, manifest)
    missing = [n for n, path in pool.checkpoints.items() if not (path / WEIGHTS_FILE).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: checkpoints without weights: {missing}")
    write_task_yamls(list(pool.tasks), pool.tasks_dir)
    return pool


def _pool_from_manifest(root: Path, manifest: dict[str, Any]) -> Pool:
    return Pool(
        root=root,
        preset=manifest["preset"],
        key=manifest["key"],
        version=manifest["generator_version"],
        checkpoints={c["name"]: root / c["path"] for c in manifest["checkpoints"]},
        heldin={t["task"]: t["metric"] for t in manifest["heldin"]},
        heldout={t["task"]: t["metric"] for t in manifest["heldout"]},
        digest=manifest["digest"],
    )


def pool_digest(root: Path) -> str:
    """sha256 over every checkpoint's weights and every task's JSONL, in name order.

    Configs and task YAMLs stay out: they carry library versions and absolute paths, which
    change nothing that is merged or scored.
    """
    files = sorted(
        [*root.glob(f"{CHECKPOINTS_DIR}/*/{WEIGHTS_FILE}"), *root.glob(f"{TASKS_DIR}/*.jsonl")]
    )
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(root).as_posix()}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _complete_pool(root: Path, recipe: Preset) -> Pool | None:
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (
        manifest.get("generator_version") != GENERATOR_VERSION
        or manifest.get("preset") != recipe.name
        or manifest.get("key") != recipe.key()
    ):
        return None
    try:
        return load_pool(root)
    except (OSError, KeyError):
        return None


def _refuse_foreign_dir(out_dir: Path) -> None:
    """Only an empty folder or an older pool may be replaced: never someone's other files."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
        raise FileExistsError(f"{out_dir} exists, is not empty and holds no {MANIFEST}")


def _install(staging: Path, out_dir: Path) -> None:
    """Rename the finished build into place, setting an older pool aside first."""
    if out_dir.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        with contextlib.suppress(FileNotFoundError):  # someone else retired it first
            out_dir.rename(retired / "pool")
        shutil.rmtree(retired, ignore_errors=True)
    try:
        staging.rename(out_dir)
    except OSError:
        if not (out_dir / MANIFEST).exists():  # lost a race against a concurrent build
            raise


def _quiet(_: str) -> None:
    return None


def _build_in_child(staging: Path, final: Path, recipe: Preset, log: Log) -> None:
    """Run `build_into` in a process started with the pinned numerics of toys.repro."""
    job = {"recipe": recipe.to_json(), "staging": str(staging), "final": str(final)}
    with subprocess.Popen(
        [sys.executable, "-m", "mergerunner.toys.worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=worker_env(),
        text=True,
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(json.dumps(job))
        child.stdin.close()
        for line in child.stdout:
            log(line.rstrip("\n"))
    if child.returncode != 0:
        raise RuntimeError(f"toy pool build failed (exit {child.returncode}); see stderr above")


def build_into(staging: Path, final: Path, recipe: Preset, log: Log) -> None:
    """Train every stage and write the whole layout, the manifest last.

    Runs in the build process (mergerunner.toys.worker), whose numerics are pinned.
    """
    from mergerunner.toys.checkpoints import save_checkpoint, train_stages
    from mergerunner.toys.model import new_model, parameter_count
    from mergerunner.toys.tokenizer import build_tokenizer

    started = time.monotonic()
    write_tasks(list(recipe.tasks), staging / TASKS_DIR, final / TASKS_DIR, recipe.eval_examples)
    tokenizer = build_tokenizer(recipe.model.max_positions)
    records: list[dict[str, Any]] = []
    for stage, model, summary in train_stages(recipe, log):
        path = Path(CHECKPOINTS_DIR) / stage.name
        save_checkpoint(model, tokenizer, staging / path)
        records.append(_checkpoint_record(stage, path, summary))
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "preset": recipe.name,
        "key": recipe.key(),
        "tasks_dir": TASKS_DIR,
        "heldin": [_task_record(name) for name in recipe.heldin],
        "heldout": [_task_record(name) for name in recipe.heldout],
        "checkpoints": records,
        "digest": pool_digest(staging),
        "model": {
            **recipe.model.to_json(),
            "architecture": "LlamaForCausalLM",
            "parameters": parameter_count(new_model(recipe.model, recipe.init_seed)),
        },
        "training": {"batch_size": recipe.batch_size, "init_seed": recipe.init_seed},
        "eval_examples": recipe.eval_examples,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _task_record(name: str) -> dict[str, str]:
    task = TASKS[name]
    return {
        "task": name,
        "metric": task.metric,
        "output_type": task.output_type,
        "description": task.description,
    }


def _checkpoint_record(stage: Stage, path: Path, summary: dict[str, float]) -> dict[str, Any]:
    return {
        "name": stage.name,
        "path": path.as_posix(),
        "parent": stage.parent,
        "description": stage.description,
        "mixture": stage.mixture,
        "steps": stage.steps,
        "lr": stage.lr,
        "warmup": stage.warmup,
        "data_seed": stage.seed,
        **summary,
    }
