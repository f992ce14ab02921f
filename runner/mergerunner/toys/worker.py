"""The child process that trains a pool: `python -m mergerunner.toys.worker` < job JSON.

The job is {"recipe": Preset.to_json(), "staging": path, "final": path}; progress lines go to
stdout, one per trained stage. See mergerunner.toys.repro for why this is a separate process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mergerunner.toys.presets import Preset
from mergerunner.toys.repro import pin_torch


def _log(message: str) -> None:
    print(message, flush=True)


def main() -> int:
    job = json.loads(sys.stdin.read())
    pin_torch()
    from mergerunner.toys.pool import build_into

    build_into(Path(job["staging"]), Path(job["final"]), Preset.from_json(job["recipe"]), _log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
