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
) -> Any:
    """Polls until `condition()` returns something truthy, and returns that value; raises
    TimeoutError naming `what` once `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what or condition}")
