"""`mergesearch status NAME`, `mergesearch report --name NAME`: a cluster search, for people.

The resource is read with `kubectl get -o json`, not with an API client of our own: kubectl
already speaks every authentication a user's kubeconfig may use (exec plugins, OIDC, cloud
helpers), and this command is also shipped as the kubectl plugin `kubectl mergesearch`, where
kubectl is by definition at hand. Everything after the read is pure and unit-tested.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergerunner.contract import ExitCode
from mergesearch.local.records import TrialRecord
from mergesearch.local.summary import baseline_label


class ClusterReadError(Exception):
    """kubectl could not read the resource; the message is kubectl's."""


def read_search(name: str, namespace: str | None, kubectl: str = "kubectl") -> dict[str, Any]:
    cmd = [kubectl, "get", "mergesearches.mergesearch.io", name, "-o", "json"]
    if namespace:
        cmd += ["-n", namespace]
    if shutil.which(cmd[0]) is None:
        raise ClusterReadError(f"{kubectl!r} not found on PATH (set $KUBECTL)")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ClusterReadError(proc.stderr.strip() or f"kubectl exited {proc.returncode}")
    return json.loads(proc.stdout)


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def status_lines(obj: Mapping[str, Any]) -> list[str]:
    """The header block: phase, progress, best, why it stopped (plain text, pure)."""
    meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}), obj.get("status") or {}
    trials = status.get("trials") or {}
    budget = (spec.get("search") or {}).get("maxTrials", "?")
    sigma = _fmt((status.get("search") or {}).get("sigma"))
    lines = [
        f"{meta.get('namespace', '?')}/{meta.get('name', '?')}: {status.get('phase', 'Pending')}"
        + (" (suspended)" if spec.get("suspend") else ""),
        f"iteration {status.get('iteration', 0)}, trials {trials.get('finished', 0)}/{budget} "
        f"finished ({trials.get('succeeded', 0)} succeeded, {trials.get('failed', 0)} failed, "
        f"{trials.get('running', 0)} running), sigma {sigma}",
    ]
    best = status.get("best")
    if best:
        lines.append(f"best: {best.get('trial')} fitness {_fmt(best.get('fitness'))}")
    winner = status.get("winner")
    if winner:
        lines.append(
            f"confirmed winner: {winner.get('trial')} fitness {_fmt(winner.get('fitness'))} "
            f"on unseen examples ({_fmt(winner.get('searchFitness'))} on the search's)"
        )
    for cond in status.get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") != "Ready":
            lines.append(f"{cond['type']}: {cond.get('reason', '')} {cond.get('message', '')}")
    output = status.get("output") or {}
    if output.get("uri"):
        lines.append(f"merged model: {output['uri']} {output.get('digest', '')}".rstrip())
    return lines


Row = tuple[str, dict[str, float], Any, Any]


def score_rows(obj: Mapping[str, Any]) -> tuple[list[str], list[Row]]:
    """Held-in tasks and one row per baseline, for the best and for the confirmed winner:
    (label, scores, fitness on the search's examples, fitness on unseen ones or None)."""
    spec, status = obj.get("spec", {}), obj.get("status") or {}
    tasks = [t["task"] for t in (spec.get("objective") or {}).get("heldIn", [])]
    confirmed = {
        c["trial"]: c.get("fitness")
        for c in status.get("confirmation") or []
        if c.get("status") == "succeeded"
    }
    rows: list[Row] = [
        (baseline_label(b["id"]), b.get("scores") or {}, b.get("fitness"), confirmed.get(b["id"]))
        for b in status.get("baselines") or []
        if b.get("status") == "succeeded"
    ]
    best = status.get("best")
    if best:
        label, trial = f"best ({best['trial']})", best["trial"]
        rows.append((label, best.get("scores") or {}, best.get("fitness"), confirmed.get(trial)))
    winner = status.get("winner")
    if winner:
        rows.append(
            (
                f"confirmed winner ({winner['trial']})",
                winner.get("searchScores") or {},
                winner.get("searchFitness"),
                winner.get("fitness"),
            )
        )
    return tasks, rows


def chosen_entry(status: Mapping[str, Any]) -> Mapping[str, Any]:
    """What the search hands over: the confirmed winner, else the best."""
    return status.get("winner") or status.get("best") or {}


def records_from_status(obj: Mapping[str, Any]) -> list[TrialRecord]:
    """What a resource's (bounded) status still holds as trial records: the baselines, the
    Pareto front and the best. The per-trial history of a local run is not kept there."""
    status = obj.get("status") or {}
    out: dict[str, TrialRecord] = {}
    for b in status.get("baselines") or []:
        if b.get("status") == "succeeded":
            out[b["id"]] = TrialRecord(
                id=b["id"],
                kind="baseline",
                generation=-1,
                weights={},
                status="succeeded",
                held_in=b.get("scores") or {},
                fitness=b.get("fitness"),
            )
    for t in [*(status.get("paretoFront") or []), status.get("best") or None]:
        if t and t["trial"] not in out:
            out[t["trial"]] = TrialRecord(
                id=t["trial"],
                kind=t.get("kind", "search"),
                generation=t.get("generation") or 0,
                weights=t.get("weights") or {},
                status="succeeded",
                held_in=t.get("scores") or {},
                fitness=t.get("fitness"),
            )
    for c in status.get("confirmation") or []:
        # a finalist not among the records above still shows beside its confirmation
        out.setdefault(
            c["trial"],
            TrialRecord(
                id=c["trial"],
                kind=c["kind"],
                generation=-1 if c["kind"] == "baseline" else 0,
                weights={},
                status="succeeded",
                fitness=c.get("searchFitness"),
            ),
        )
    confirmations = [
        TrialRecord(
            id="c-" + c["trial"],
            kind=c["kind"],
            generation=-1,
            weights={},
            status=c["status"],
            fitness=c.get("fitness"),
            subset="confirmation",
            source=c["trial"],
        )
        for c in status.get("confirmation") or []
    ]
    searched = sorted(out.values(), key=lambda r: (r.kind != "baseline", r.generation, r.id))
    return searched + confirmations


def print_status(obj: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    for line in status_lines(obj):
        console.print(line, highlight=False)
    tasks, rows = score_rows(obj)
    if rows:
        table = Table(title="held-in scores: baselines against the best")
        table.add_column("merge")
        for task in tasks:
            table.add_column(task, justify="right")
        table.add_column("fitness", justify="right", style="bold")
        confirming = any(row[3] is not None for row in rows)
        if confirming:
            table.add_column("confirmed", justify="right", style="bold green")
        for label, scores, fitness, confirmed in rows:
            cells = [_fmt(scores.get(t), 3) for t in tasks] + [_fmt(fitness)]
            table.add_row(label, *cells, *([_fmt(confirmed)] if confirming else []))
        console.print(table)
    best = chosen_entry(obj.get("status") or {})
    if best.get("weights"):
        weights = ", ".join(f"{k} {v:.3f}" for k, v in best["weights"].items())
        console.print(f"best weights: {weights}", highlight=False)
    if best.get("heldOut"):
        held_out = ", ".join(f"{k} {v:.3f}" for k, v in best["heldOut"].items())
        console.print(f"best held-out: {held_out}", highlight=False)


def add_commands(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="show a MergeSearch on the cluster")
    status.add_argument("name")
    status.add_argument("-n", "--namespace")
    status.add_argument("-o", "--output", choices=["text", "json"], default="text")
    status.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        obj = read_search(args.name, args.namespace, os.environ.get("KUBECTL", "kubectl"))
    except ClusterReadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    if args.output == "json":
        print(json.dumps(obj.get("status") or {}, indent=2, sort_keys=True))
    else:
        print_status(obj)
    return ExitCode.FAILED if (obj.get("status") or {}).get("phase") == "Failed" else ExitCode.OK


def report_from_cluster(name: str, namespace: str | None, out: Path) -> list[Path]:
    from mergesearch.local.report import draw_all

    obj = read_search(name, namespace, os.environ.get("KUBECTL", "kubectl"))
    best = chosen_entry(obj.get("status") or {})
    if not best:
        raise ClusterReadError(f"{name}: no finished trial to draw yet")
    tasks = [t["task"] for t in obj["spec"]["objective"]["heldIn"]]
    return draw_all(records_from_status(obj), best["weights"], tasks, out)
