"""`python -m mergerunner.toys build OUT_DIR [--preset mini|paper] [--evaluate]`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mergerunner.toys.pool import build_pool
from mergerunner.toys.presets import COMMITTED_DIGESTS, PRESETS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mergerunner.toys", description="Build the toy checkpoint pool."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (or reuse) a pool in OUT_DIR")
    build.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    build.add_argument("--preset", choices=sorted(PRESETS), default="mini")
    build.add_argument(
        "--evaluate", action="store_true", help="score every checkpoint with lm-eval"
    )
    build.add_argument(
        "--limit", type=int, default=None, help="examples per task when evaluating (default all)"
    )
    return parser


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _digest_note(digest: str, committed: str | None) -> str:
    """Says whether this pool is the one every other machine builds (and the README shows)."""
    if committed is None:
        return f"pool digest {digest}"
    if digest == committed:
        return f"pool digest {digest[:12]}: the committed one, that the README's figures come from"
    return (
        f"WARNING: pool digest {digest[:12]} differs from the committed {committed[:12]}: "
        "results will not match the README"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.monotonic()
    pool = build_pool(args.out_dir, args.preset, log=_log)
    _log(
        f"pool {pool.preset} ({pool.key}) ready in {pool.root} after "
        f"{time.monotonic() - started:.1f}s: {', '.join(pool.names)}"
    )
    _log(_digest_note(pool.digest, COMMITTED_DIGESTS.get(pool.preset)))
    if args.evaluate:
        from mergerunner.toys.evaluate import evaluate_pool, format_table

        print(format_table(evaluate_pool(pool, args.limit), pool))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
