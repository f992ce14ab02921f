"""Names the operator (or local mode) and the runner must agree on, defined once.

`trial.py` holds the documents that cross between them (the trial, the result, the failure
kinds); this module holds the plain names around those documents: the environment a trial or
evaluator container reads, where the runner writes its termination message, the file names of
a checkpoint (read by the fetcher, the merge and local mode, written by the merge), and the
exit codes a Job's podFailurePolicy matches. It is separate from `trial.py` because it imports
nothing: every module of both packages, the operator's pure core and the torch-free CLI
included, can import it without pulling pydantic's models in, and it changes on its own rhythm
(a new variable does not touch the documents' schema or their apiVersion).
"""

from __future__ import annotations

from enum import IntEnum

# --------------------------------------------------------------------------- container environment
# Set by the operator's Job builders (mergesearch.operator.jobs, .warm), read by `mergerunner`.
ENV_TRIAL = "MERGERUNNER_TRIAL"  # the trial document, JSON
ENV_RESULT = "MERGERUNNER_RESULT"  # where to write the result document too (optional)
ENV_TERMINATION_LOG = "MERGERUNNER_TERMINATION_LOG"  # overrides TERMINATION_LOG
ENV_CACHE = "MERGERUNNER_CACHE_DIR"  # the checkpoint cache
ENV_CUSTOM_TASKS = "MERGERUNNER_CUSTOM_TASKS_DIR"  # the search's custom task YAMLs
ENV_CREDENTIALS = "MERGESEARCH_CREDENTIALS_DIR"  # the mounted storage Secret, one file a key
ENV_EVALUATOR_URL = "MERGESEARCH_EVALUATOR_URL"  # a warm evaluator's lease URL
ENV_EVALUATOR_NAME = "MERGESEARCH_EVALUATOR_NAME"  # its pod's name
ENV_EVALUATOR_TOKEN_FILE = "MERGESEARCH_EVALUATOR_TOKEN_FILE"  # noqa: S105 - a variable name

# Where the kubelet reads a container's termination message (the Job sets this path too).
TERMINATION_LOG = "/dev/termination-log"

# --------------------------------------------------------------------------- checkpoint files
WEIGHTS_FILE = "model.safetensors"  # a single-file checkpoint's weights
INDEX_FILE = "model.safetensors.index.json"  # a sharded checkpoint's index
CONFIG_FILE = "config.json"
# Either one makes a directory a model (a destination that holds one is not overwritten).
MODEL_FILES = (WEIGHTS_FILE, INDEX_FILE)


class ExitCode(IntEnum):
    """How every command of both packages exits, so scripts (and a Job's podFailurePolicy) can
    tell "fix your input" from "retry"."""

    OK = 0
    # The search, or a step of a trial, failed: the same input fails the same way again.
    FAILED = 1
    # The input is unusable (a manifest, a trial document, an evaluator's configuration, an
    # unreachable checkpoint): a replacement pod would fail alike.
    BAD_INPUT = 2
