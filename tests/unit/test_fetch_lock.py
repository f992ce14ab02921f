"""The cache lock's wait: unbounded while the holder makes progress, bounded when it stalls."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mergerunner import fetch
from mergerunner.fetch import FetchError, _file_lock, allocated_bytes

pytestmark = pytest.mark.unit


def hold(lock: Path, seconds: float, grow: Path | None, started: threading.Event) -> None:
    """Hold the lock for `seconds`, appending to `grow` every 50 ms when given."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    started.set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if grow is not None:
            with grow.open("ab") as handle:
                handle.write(os.urandom(8192))
                handle.flush()
                os.fsync(handle.fileno())
        time.sleep(0.05)
    os.close(fd)


def wait_for_lock(lock: Path, entry: Path, timeout_s: float) -> float:
    async def main() -> float:
        start = time.monotonic()
        async with _file_lock(lock, "s3://b/x/", timeout_s, lambda: allocated_bytes(entry)):
            return time.monotonic() - start

    return asyncio.run(main())


@pytest.fixture
def entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache entry directory, its lock's progress checked every 0.1 s."""
    monkeypatch.setattr(fetch, "PROGRESS_CHECK_S", 0.1)
    entry = tmp_path / "entry"
    entry.mkdir()
    return entry


@contextmanager
def held(lock: Path, seconds: float, grow: Path | None) -> Iterator[None]:
    """The lock held by another thread (see `hold`) from entry until it lets go at exit."""
    started = threading.Event()
    holder = threading.Thread(target=hold, args=(lock, seconds, grow, started))
    holder.start()
    started.wait()
    try:
        yield
    finally:
        holder.join()


def test_a_waiter_outlasts_its_timeout_while_the_holder_makes_progress(
    tmp_path: Path, entry: Path
) -> None:
    with held(tmp_path / "e.lock", 3.0, entry / ".f.part-1"):
        waited = wait_for_lock(tmp_path / "e.lock", entry, timeout_s=1.0)
    assert waited >= 2.5  # three times its timeout: the holder kept writing


def test_a_stalled_holder_times_the_waiter_out_naming_the_entry(
    tmp_path: Path, entry: Path
) -> None:
    with (
        held(tmp_path / "e.lock", 3.0, None),
        pytest.raises(FetchError, match="without progress") as info,
    ):
        wait_for_lock(tmp_path / "e.lock", entry, timeout_s=0.5)
    assert "e.lock" in str(info.value)
