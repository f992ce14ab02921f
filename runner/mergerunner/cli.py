"""`mergerunner`: the command every trial pod runs.

Exit codes are part of the contract: 0 the trial succeeded, 1 a step failed (the result says
which), 2 the trial document itself is bad. A result is written in every case, to stdout, to
the result file and to the termination-message path, so that the operator never has to parse
logs to learn what happened.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from mergerunner.contract import (
    ENV_CACHE,
    ENV_EVALUATOR_NAME,
    ENV_EVALUATOR_TOKEN_FILE,
    ENV_EVALUATOR_URL,
    ENV_RESULT,
    ENV_TERMINATION_LOG,
    ENV_TRIAL,
    TERMINATION_LOG,
    ExitCode,
)
from mergerunner.shutdown import run_then_exit
from mergerunner.trial import TrialDocument, TrialResult, parse_trial

EXIT_OK, EXIT_STEP_FAILED, EXIT_BAD_INPUT = ExitCode.OK, ExitCode.FAILED, ExitCode.BAD_INPUT
DEFAULT_TERMINATION_LOG = Path(TERMINATION_LOG)


def _read_document(args: argparse.Namespace) -> str:
    if args.trial:
        return Path(args.trial).read_text()
    text = os.environ.get(ENV_TRIAL)
    if not text:
        raise ValueError("no trial document: pass --trial FILE or set MERGERUNNER_TRIAL")
    return text


def _input_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(document)'}: {err['msg']}"
            for err in exc.errors()
        )
    return str(exc)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout meanwhile to stderr, at the file-descriptor level.

    stdout carries exactly one thing, the result's JSON: libraries print to it (lm-eval's
    batch-size messages, native code writing to fd 1), and a line of theirs before the result
    would make the output unparseable for whoever reads it.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _emit(result: TrialResult, args: argparse.Namespace) -> None:
    text = result.to_json()
    print(text, flush=True)
    if args.result:
        Path(args.result).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result).write_text(text + "\n")
    termination = Path(args.termination_log) if args.termination_log else None
    if termination is None and DEFAULT_TERMINATION_LOG.exists():
        termination = DEFAULT_TERMINATION_LOG  # the kubelet mounts it in every container
    if termination is not None:
        try:
            termination.write_text(result.termination_message())
        except OSError as exc:
            logging.warning("could not write the termination message to %s: %s", termination, exc)


def _read_trial(args: argparse.Namespace) -> TrialDocument | None:
    """The trial document of `run` and `preflight`; None when it cannot be read or is
    refused, after emitting that result (a bad input: exit code 2)."""
    try:
        return parse_trial(_read_document(args))
    except (OSError, ValueError, ValidationError) as exc:
        _emit(TrialResult.rejected(_input_error(exc)), args)
        return None


def _finish(result: TrialResult, args: argparse.Namespace) -> int:
    _emit(result, args)
    return EXIT_OK if result.status == "succeeded" else EXIT_STEP_FAILED


def _cmd_run(args: argparse.Namespace) -> int:
    doc = _read_trial(args)
    if doc is None:
        return EXIT_BAD_INPUT
    from mergerunner.run import run_trial

    with stdout_to_stderr():
        result = run_trial(doc, cache_dir=_cache_dir(args), work_dir=_work_dir(args))
    return _finish(result, args)


def _cmd_preflight(args: argparse.Namespace) -> int:
    """The search's preflight (mergerunner.preflight), reported as a trial result."""
    doc = _read_trial(args)
    if doc is None:
        return EXIT_BAD_INPUT
    from mergerunner.preflight import run_preflight
    from mergerunner.run import custom_tasks_dir

    with stdout_to_stderr():
        result, _ = run_preflight(doc, cache_dir=_cache_dir(args), custom=custom_tasks_dir(doc))
    return _finish(result, args)


def _cmd_evaluator(args: argparse.Namespace) -> int:
    """A warm evaluator: lease candidates from the operator until the search is done."""
    from mergerunner.evaluator import EXIT_CONFIG, WarmTrials, serve

    missing = [
        flag
        for flag, value in (("--endpoint", args.endpoint), ("--token-file", args.token_file))
        if not value
    ]
    if missing:
        logging.error("evaluator: %s not set (nor their environment variables)", missing)
        return EXIT_CONFIG
    try:
        token = Path(args.token_file).read_text().strip()
    except OSError as exc:
        logging.error("evaluator: cannot read the token file: %s", exc)
        return EXIT_CONFIG
    trials = WarmTrials(cache_dir=_cache_dir(args), work_dir=_work_dir(args))
    return serve(args.endpoint, args.name, token, trials)


def _cache_dir(args: argparse.Namespace) -> Path:
    return Path(
        args.cache_dir or os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "mergerunner"
    )


def _work_dir(args: argparse.Namespace) -> Path | None:
    return Path(args.work_dir) if args.work_dir else None


def _cmd_schema(args: argparse.Namespace) -> int:
    model = TrialDocument if args.which == "trial" else TrialResult
    print(json.dumps(model.model_json_schema(by_alias=True), indent=2, sort_keys=True))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergerunner", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one trial document")
    run.add_argument("--trial", help="trial document (JSON); default: $MERGERUNNER_TRIAL")
    run.add_argument("--result", default=os.environ.get(ENV_RESULT), help="result file")
    run.add_argument(
        "--termination-log",
        default=os.environ.get(ENV_TERMINATION_LOG),
        help="termination-message path (default: /dev/termination-log when it exists)",
    )
    run.add_argument("--cache-dir", help="checkpoint cache (default: $MERGERUNNER_CACHE_DIR)")
    run.add_argument("--work-dir", help="scratch space for the merged model (default: $TMPDIR)")
    run.set_defaults(func=_cmd_run)
    preflight = sub.add_parser(
        "preflight",
        help="check a search's checkpoints (headers only), backend, tasks, data and metrics",
    )
    preflight.add_argument("--trial", help="trial document (JSON); default: $MERGERUNNER_TRIAL")
    preflight.add_argument("--result", default=os.environ.get(ENV_RESULT))
    preflight.add_argument("--termination-log", default=os.environ.get(ENV_TERMINATION_LOG))
    preflight.add_argument("--cache-dir", help="cache (default: $MERGERUNNER_CACHE_DIR)")
    preflight.set_defaults(func=_cmd_preflight)
    warm = sub.add_parser("evaluator", help="a warm evaluator: lease and run many trials")
    warm.add_argument(
        "--endpoint",
        default=os.environ.get(ENV_EVALUATOR_URL),
        help="the operator's lease URL (default: $MERGESEARCH_EVALUATOR_URL)",
    )
    warm.add_argument(
        "--token-file",
        default=os.environ.get(ENV_EVALUATOR_TOKEN_FILE),
        help="the search's bearer token (default: $MERGESEARCH_EVALUATOR_TOKEN_FILE)",
    )
    warm.add_argument(
        "--name",
        default=os.environ.get(ENV_EVALUATOR_NAME) or os.uname().nodename,
        help="this evaluator's name, its pod's (default: $MERGESEARCH_EVALUATOR_NAME)",
    )
    warm.add_argument("--cache-dir", help="checkpoint cache (default: $MERGERUNNER_CACHE_DIR)")
    warm.add_argument("--work-dir", help="scratch space for an export (default: $TMPDIR)")
    warm.set_defaults(func=_cmd_evaluator)
    schema = sub.add_parser("schema", help="print the JSON schema of the trial contract")
    schema.add_argument("which", choices=["trial", "result"])
    schema.set_defaults(func=_cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("MERGERUNNER_LOG_LEVEL", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    args = build_parser().parse_args(argv)
    return int(args.func(args))


def run_and_exit(argv: list[str] | None = None) -> NoReturn:
    """The command's entry point: `main`, then exit without interpreter finalization.

    By the time `main` returns, the result and the termination message are written and
    flushed; `mergerunner.shutdown` says why finalization is skipped (obstore's runtime).
    """
    run_then_exit(lambda: main(argv))


if __name__ == "__main__":
    run_and_exit()
