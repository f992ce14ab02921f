"""`mergesearch`: the command line for people.

Exit codes: 0 done, 1 the search (or a step of it) failed, 2 bad input (an invalid manifest,
an unreachable checkpoint, an unknown task), so scripts can tell "fix your file" from "retry".
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from mergerunner.contract import ExitCode


def _cmd_crd(args: argparse.Namespace) -> int:
    from mergesearch.admission import crds_yaml
    from mergesearch.crd import crd_yaml

    text = crds_yaml() if args.admission else crd_yaml()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergesearch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    crd = sub.add_parser("crd", help="print the MergeSearch CustomResourceDefinition")
    crd.add_argument("-o", "--output", help="write to this file instead of stdout")
    crd.add_argument(
        "--admission",
        action="store_true",
        help="the ValidatingAdmissionPolicy that goes with it (crds/mergesearch-admission.yaml)",
    )
    crd.set_defaults(func=_cmd_crd)
    from mergesearch.cli import cluster, datasets, local

    local.add_commands(sub)
    cluster.add_commands(sub)
    datasets.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("MERGESEARCH_LOG_LEVEL", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    args = build_parser().parse_args(argv)
    return int(args.func(args))


def kubectl_plugin() -> int:
    """`kubectl mergesearch status NAME`: kubectl finds `kubectl-mergesearch` on PATH."""
    return main(sys.argv[1:])


def run_and_exit(argv: list[str] | None = None) -> NoReturn:
    """The `mergesearch` entry point: `main`, then exit without interpreter finalization.

    Local mode and `datasets pack` fetch and upload through obstore; `mergerunner.shutdown`
    says why such a process must not finalize.
    """
    from mergerunner.shutdown import run_then_exit

    run_then_exit(lambda: main(argv))


if __name__ == "__main__":
    run_and_exit()
