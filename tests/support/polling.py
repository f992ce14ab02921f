"""The one way tests and benchmarks wait for something: poll a condition until it holds.

Every wait on the cluster, the operator, a server or a file goes through `wait_for`, so a
timeout always reads the same (`timed out after N s waiting for WHAT`) and names what was awaited.
A condition may raise to stop the wait early (a server process that exited, say).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(
    condition: Callable[[], Any],
    timeout_s: float = 60.0,
    what: str = "",
    *,
    interval_s: float = 0.25,
    failure: Callable[[], BaseException] | None = None,
) -> Any:
    """Polls until `condition()` returns something truthy, and returns that value. Once
    `timeout_s` has passed it raises `failure()` (made then, so that it can carry a server's
    log as it is at that moment), by default a TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    if failure is not None:
        raise failure()
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what or condition}")
