"""A trial command that misbehaves for some candidates and runs `mergerunner run` for the others.

Used as MERGESEARCH_RUNNER_COMMAND (`python tests/support/crashing_runner.py CANDIDATE …`) by
the operator's failure tests. A file in the tree rather than one in a temporary directory,
because the node agent rewrites command arguments under a pod's mount paths (/tmp is one).

- `CANDIDATE` (`g000-c01`, `final`): that candidate's trial, every attempt of it (`…-final-r1`),
  crashes: an exit code of 3 with no result, what an OOM kill or a segfault looks like to the
  operator, an ordinary trial failure rather than a step the runner reported;
- `empty:CANDIDATE`: that trial exits 0 without writing any result (a Job that completes
  without a usable result).
"""

from __future__ import annotations

import json
import os
import re
import sys


def _is(trial_id: str, candidate: str) -> bool:
    return re.search(rf"-{re.escape(candidate)}(-r\d+)?$", trial_id) is not None


def main(argv: list[str]) -> int:
    doc = json.loads(os.environ["MERGERUNNER_TRIAL"])
    for arg in argv:
        silent = arg.startswith("empty:")
        if _is(doc["id"], arg.removeprefix("empty:")):
            print(f"deliberate {'exit without a result' if silent else 'crash'} of {doc['id']}")
            return 0 if silent else 3
    os.execvp("mergerunner", ["mergerunner", "run"])  # noqa: S606 - the runner on PATH


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
