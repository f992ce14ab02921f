"""A warm evaluator whose trials take a while: `mergerunner evaluator`, each trial slowed.

Used as MERGESEARCH_EVALUATOR_COMMAND (`python tests/support/slow_evaluator.py SECONDS`) by the
warm-mode fault tests: benchmarking-mode trials finish at once, so without the pause an
evaluator would almost never be caught holding a lease when it is killed.
"""

from __future__ import annotations

import sys
import time

from mergerunner import cli
from mergerunner.evaluator import WarmTrials


def main(argv: list[str]) -> int:
    pause = float(argv[0])
    run = WarmTrials.run

    def slow(self: WarmTrials, doc, *args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(pause)
        return run(self, doc, *args, **kwargs)

    WarmTrials.run = slow  # type: ignore[method-assign]
    return cli.main(["evaluator"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
