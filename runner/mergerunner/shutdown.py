"""Ending a process that may have used obstore, without interpreter finalization.

obstore runs its requests on a Tokio runtime whose worker threads are never told to stop at
normal exit. When `Py_Finalize` tears down interpreter state while one of them is still
running, the thread panics with no Python frame to catch it and Rust aborts the process:
SIGABRT after a complete, successful run (seen in our test suite: 1 of ~1,000 runs of three
concurrent fetching processes). A Job counts that exit as a crash and a script sees a failure,
so every entry point that may fetch or upload ends here instead: results and logs are flushed,
then the process exits with its code and skips finalization.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn


def exit_without_finalization(code: int) -> NoReturn:
    """Flush logging and the standard streams, then `os._exit(code)`."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing to write
            stream.flush()
    os._exit(code)


def run_then_exit(main: Callable[[], int]) -> NoReturn:
    """Run an entry point's `main`, then exit without finalization.

    An exception from `main` propagates with its traceback (normal exit path, code 1).
    """
    exit_without_finalization(int(main()))
