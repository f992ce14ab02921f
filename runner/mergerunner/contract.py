"""Names the operator (or local mode) and the runner must agree on, defined once.

`trial.py` holds the documents that cross between them (the trial, the result, the failure
kinds); this module holds the plain names around those documents: exit codes a Job's
podFailurePolicy matches. It imports nothing, so every module of both packages, the operator's
pure core included, can import it without pulling anything in.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """How every command of both packages exits, so scripts (and a Job's podFailurePolicy) can
    tell "fix your input" from "retry"."""

    OK = 0
    # The search, or a step of a trial, failed: the same input fails the same way again.
    FAILED = 1
    # The input is unusable (a manifest, a trial document, an evaluator's configuration, an
    # unreachable checkpoint): a replacement pod would fail alike.
    BAD_INPUT = 2
