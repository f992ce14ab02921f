"""`mergesearch run` and `mergesearch report`: local mode's commands."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mergerunner.contract import ExitCode


def default_cache() -> Path:
    root = os.environ.get("MERGESEARCH_CACHE") or Path.home() / ".cache" / "mergesearch"
    return Path(root) / "checkpoints"


def add_commands(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run a MergeSearch manifest on this machine")
    run.add_argument("manifest", type=Path)
    run.add_argument(
        "--state-dir",
        type=Path,
        help="where the search's state lives (default: .mergesearch/NAME beside the manifest); "
        "run again with the same directory to resume",
    )
    run.add_argument("--cache-dir", type=Path, help="checkpoint cache (default: ~/.cache)")
    run.add_argument("--fresh", action="store_true", help="discard saved state and start over")
    run.add_argument(
        "--fresh-if-changed",
        action="store_true",
        help="start over only if the saved state is of a different spec (else resume)",
    )
    run.add_argument(
        "--overwrite-output",
        action="store_true",
        help="let the export replace a model at spec.output.uri that this search did not write",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)
    report = sub.add_parser(
        "report", help="draw PNG pictures of a local search, or of one on a cluster (--name)"
    )
    report.add_argument("state_dir", type=Path, nargs="?", help="a local search's state")
    report.add_argument("--name", help="a MergeSearch on the cluster (read with kubectl)")
    report.add_argument("-n", "--namespace", help="its namespace")
    report.add_argument("-o", "--output", type=Path, help="folder for the PNGs (default: STATE)")
    report.set_defaults(func=cmd_report)


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from mergerunner.storage import FetchError
    from mergesearch.local.search import (
        FinalEvaluationFailed,
        LocalInputError,
        LocalSearch,
        quiet_libraries,
    )
    from mergesearch.spec import SpecError, load_manifest

    console = Console(stderr=True)
    try:
        manifest = load_manifest(args.manifest)
        base = args.manifest.resolve().parent
        state_dir = args.state_dir or base / ".mergesearch" / manifest.metadata.name
        search = LocalSearch(
            manifest,
            base,
            state_dir=state_dir,
            cache_dir=args.cache_dir or default_cache(),
            fresh=args.fresh,
            fresh_if_changed=args.fresh_if_changed,
            overwrite_output=args.overwrite_output,
        )
        with quiet_libraries():
            console.print(f"[bold]{manifest.metadata.name}[/]: preparing checkpoints and tasks…")
            search.prepare()
    except (SpecError, LocalInputError, OSError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return ExitCode.BAD_INPUT
    for line in start_lines(search, state_dir):
        console.print(line)
    with quiet_libraries():
        state = _run_with_progress(search, console, show=not args.no_progress)
        if search.fatal is not None:
            console.print(f"[red]search failed:[/] {search.fatal.message}")
            console.print(f"state: {state_dir}  (fix the cause and run again to resume)")
            return ExitCode.BAD_INPUT
        try:
            final = search.finish()
        except FinalEvaluationFailed as exc:
            console.print(f"[red]search failed:[/] {exc}")
            console.print(f"state: {state_dir}  (fix the cause and run again to resume)")
            return ExitCode.FAILED
        except (LocalInputError, FetchError, OSError) as exc:
            console.print(f"[red]export failed:[/] {exc}")
            return ExitCode.FAILED
    from mergesearch import engine

    status = engine.status(state)
    print_summary(search, status, final)
    console.print(f"state: {state_dir}  (pictures: mergesearch report {state_dir})")
    return ExitCode.OK if status.phase == "succeeded" else ExitCode.FAILED


def start_lines(search: Any, state_dir: Path) -> list[str]:
    """What a run says before its first trial: whether it resumes, where the model goes."""
    done, planned = search.trials_done(), search.trials_planned()
    of = f" of {planned}" if planned is not None else ""
    lines = [
        f"resuming: {done}{of} trials done, state in {state_dir}"
        if done or search.records
        else f"starting: {planned if planned is not None else 'up to the budget'} trials, "
        f"state in {state_dir}"
    ]
    if not search.spec.output.uri:
        lines.append("export: none (spec.output.uri is not set)")
        return lines
    where = f"export: the best merge goes to {search.output_uri}"
    own = search.own_export()
    if search.destination == "model":
        replaced = f"this search's earlier export ({own['digest']})" if own else "the model there"
        where += f", replacing {replaced}"
    lines.append(where)
    return lines


@contextlib.contextmanager
def logs_through_current_stderr() -> Iterator[None]:
    """Point the root logger's stream handlers at `sys.stderr` as it is now.

    `logging.basicConfig` bound them to the stderr of start-up; inside a live progress bar
    `sys.stderr` is rich's proxy, which prints each line above the bar, so a log line (a
    failed trial's warning, a library's) no longer lands in the middle of the bar.
    """
    handlers = [
        h
        for h in logging.getLogger().handlers
        if type(h) is logging.StreamHandler and h.stream is not sys.stderr
    ]
    previous = [h.setStream(sys.stderr) for h in handlers]
    try:
        yield
    finally:
        for handler, stream in zip(handlers, previous, strict=True):
            handler.setStream(stream)


def _run_with_progress(search: Any, console: Any, *, show: bool) -> Any:
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from mergesearch import engine

    columns = [
        TextColumn("[bold]trials"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("best {task.fields[best]}"),
        TextColumn("gen {task.fields[gen]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, disable=not show, transient=False) as bar:
        task = bar.add_task("search", total=search.trials_planned(), best="-", gen=0)

        def update(state: Any, record: Any) -> None:
            status = engine.status(state)
            best = status.best["fitness"] if status.best else None
            bar.update(
                task,
                # What has run, out of what will run: the plan shrinks to what ran when the
                # search stops early, and is not the nominal budget (docs: planned_trials).
                completed=engine.trials_told(state),
                total=engine.planned_trials(state),
                best=f"{best:.4f}" if best is not None else "-",
                gen=status.generation,
            )

        update(search.state, None)
        started = time.monotonic()
        with logs_through_current_stderr():
            state = search.run(progress=update)
        update(state, None)
    console.print(f"search finished in {time.monotonic() - started:.0f}s")
    return state


def print_summary(search: Any, status: Any, final: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from mergesearch.local.summary import check_claims, table_rows

    console = Console(width=None if sys.stdout.isatty() else 140)
    from mergesearch import engine

    records = list(search.records.values())
    best = engine.chosen(status)
    held_out = final.get("heldOut", {})
    held_in_tasks = [t.task for t in search.spec.objective.held_in]
    held_out_tasks = [t.task for t in search.spec.objective.held_out]
    table = Table(
        title=f"{search.manifest.metadata.name}: baselines against the chosen merge "
        "(held-in avg: the search's examples; confirmed avg: unseen ones)"
    )
    table.add_column("merge")
    for name in held_in_tasks:
        table.add_column(name, justify="right")
    table.add_column("held-in avg", justify="right", style="bold")
    rows = table_rows(records, best["id"] if best else None, held_out)
    confirming = any(row.confirmed is not None for row in rows)
    if confirming:
        table.add_column("confirmed avg", justify="right", style="bold green")
    for name in held_out_tasks:
        table.add_column(f"{name} (held-out)", justify="right", style="cyan")
    for row in rows:
        cells = [f"{row.held_in.get(t, float('nan')):.3f}" for t in held_in_tasks]
        outs = [f"{row.held_out[t]:.3f}" if t in row.held_out else "-" for t in held_out_tasks]
        confirmed = ["-" if row.confirmed is None else f"{row.confirmed:.4f}"]
        confirmed = confirmed if confirming else []
        table.add_row(row.label, *cells, f"{row.fitness:.4f}", *confirmed, *outs)
    console.print(table)
    console.print(f"stopped: {status.reason or status.phase}  ({status.message or ''})")
    if status.phase == "failed" and status.recent_failures:
        last = status.recent_failures[-1]
        console.print(f"last failure: trial {last['id']}: {last['reason']}")
    if best is None:
        return
    weights = ", ".join(f"{k} {v:.3f}" for k, v in best["weights"].items())
    console.print(f"best weights: {weights}")
    claims = check_claims(records, best["id"], best["weights"], held_out)
    console.print("the paper's claims, on this search:")
    for line in claims.lines():
        console.print(f"  {line}")
    if final.get("output"):
        console.print(f"best merged model: {final['output']['uri']} ({final['output']['digest']})")


def cmd_report(args: argparse.Namespace) -> int:
    if args.name:
        from mergesearch.cli.cluster import ClusterReadError, report_from_cluster

        try:
            paths = report_from_cluster(args.name, args.namespace, args.output or Path())
        except ClusterReadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return ExitCode.BAD_INPUT
        print("\n".join(str(p) for p in paths))
        return ExitCode.OK
    if args.state_dir is None:
        print("error: give a state directory or --name", file=sys.stderr)
        return ExitCode.BAD_INPUT
    from mergesearch import engine
    from mergesearch.local.records import read_records
    from mergesearch.local.report import draw_all
    from mergesearch.local.search import StatePaths

    paths = StatePaths(args.state_dir)
    if not paths.state.exists():
        print(f"error: no search state in {args.state_dir}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    data = json.loads(paths.state.read_text())
    state = engine.EngineState.from_json(json.dumps(data["engine"]))
    best = engine.chosen(engine.status(state))
    if best is None:
        print("error: no finished trial to draw yet", file=sys.stderr)
        return ExitCode.FAILED
    tasks = [t.name for t in state.config.tasks]
    out = args.output or args.state_dir
    for path in draw_all(read_records(paths.trials), best["weights"], tasks, out):
        print(path)
    return ExitCode.OK
