"""The toy checkpoint pool, built once per machine and cached outside the clone.

The cache lives at `${MERGESEARCH_CACHE:-~/.cache/mergesearch}/toys/<preset>-<key>`, where the
key changes with the generator version and the recipe, so a stale pool is never reused. An
fcntl lock next to it makes parallel test processes wait for one build instead of racing.
mergerunner.toys is imported inside the fixtures: this plugin loads for every test run, and
most runs never need torch.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mergerunner.toys import Pool


def cache_root() -> Path:
    return Path(os.environ.get("MERGESEARCH_CACHE", "~/.cache/mergesearch")).expanduser()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, released when the block ends or the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pool_dir(preset: str) -> Path:
    from mergerunner.toys import get_preset

    return cache_root() / "toys" / f"{preset}-{get_preset(preset).key()}"


def cached_pool(preset: str) -> Pool:
    """Build the preset's pool unless it is cached; one builder at a time per machine."""
    from mergerunner.toys import build_pool

    target = pool_dir(preset)
    with file_lock(target.parent / f".{target.name}.lock"):
        return build_pool(target, preset)


@pytest.fixture(scope="session")
def toy_pool() -> Pool:
    """The mini pool: a base and three specialists on two held-in tasks and one held-out."""
    return cached_pool("mini")


@pytest.fixture(scope="session")
def paper_pool() -> Pool:
    """The paper-like pool: nine checkpoints, three held-in tasks, two held-out."""
    return cached_pool("paper")
