"""The one polling helper of tests and benchmarks (tests/support/polling.py)."""

from __future__ import annotations

import pytest

from support.polling import wait_for

pytestmark = pytest.mark.unit


def test_the_first_truthy_value_is_returned() -> None:
    answers = iter([None, 0, [], {"phase": "Running"}])
    assert wait_for(lambda: next(answers), 5, "a phase", interval_s=0.001) == {"phase": "Running"}


def test_a_timeout_names_what_was_awaited() -> None:
    with pytest.raises(TimeoutError, match="timed out after 0 s waiting for the sleeper pod"):
        wait_for(lambda: False, 0.05, "the sleeper pod", interval_s=0.01)


def test_a_timeout_raises_the_callers_error_made_at_that_moment() -> None:
    log = ["starting"]

    def not_ready() -> Exception:
        return RuntimeError("\n".join(log))

    def ready() -> bool:
        log.append("still not ready")
        return False

    with pytest.raises(RuntimeError, match="still not ready"):
        wait_for(ready, 0.05, "the server", interval_s=0.01, failure=not_ready)


def test_a_condition_that_raises_ends_the_wait_at_once() -> None:
    def exited() -> bool:
        raise RuntimeError("the server exited")

    with pytest.raises(RuntimeError, match="the server exited"):
        wait_for(exited, 60, "the server")
