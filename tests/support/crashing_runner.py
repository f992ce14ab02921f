"""A trial command that crashes for one candidate and runs `mergerunner run` for the others.

Used as MERGESEARCH_RUNNER_COMMAND (`python tests/support/crashing_runner.py CANDIDATE`) by the
operator's failure-policy test. A file in the tree rather than one in a temporary directory,
because the node agent rewrites command arguments under a pod's mount paths (/tmp is one).
The crash is an exit code of 3 with no result: what an OOM kill or a segfault looks like to the
operator, an ordinary trial failure rather than a step the runner reported.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    doc = json.loads(os.environ["MERGERUNNER_TRIAL"])
    if any(doc["id"].endswith(f"-{candidate}") for candidate in argv):
        print(f"deliberate crash of {doc['id']}", file=sys.stderr)
        return 3
    os.execvp("mergerunner", ["mergerunner", "run"])  # noqa: S606 - the runner on PATH


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
