"""`mergesearch status NAME`, `mergesearch report --name NAME`: a cluster search, for people.

The resource is read with the official `kubernetes` client and its kubeconfig loading, so the
command authenticates as kubectl would without kubectl installed: `$KUBECONFIG` (several files
merged) or `~/.kube/config`, its current context or `--context`, the context's namespace, client
certificates, tokens, exec credential plugins (cloud helpers, OIDC login tools), and the pod's
service account when it runs inside the cluster. The same code serves the kubectl plugin
`kubectl mergesearch`. Everything after the read is pure and unit-tested.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergerunner.contract import ExitCode
from mergesearch.crd import PLURAL
from mergesearch.local.records import TrialLogEntry
from mergesearch.local.summary import baseline_label
from mergesearch.operator.status import MergeSearchStatus, Phase
from mergesearch.spec import API_GROUP, API_VERSION

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

READ_TIMEOUT_S = 30.0
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class ClusterReadError(Exception):
    """The resource could not be read: no configuration, refused, absent or unreachable."""


def _kubeconfig_paths() -> list[Path]:
    """`$KUBECONFIG` (a list, as kubectl reads it), else `~/.kube/config`."""
    value = os.environ.get("KUBECONFIG", "")
    if value:
        return [Path(p).expanduser() for p in value.split(os.pathsep) if p]
    return [Path("~/.kube/config").expanduser()]


def _context_namespace(context: Mapping[str, Any] | None) -> str | None:
    return ((context or {}).get("context") or {}).get("namespace") or None


def api_client(context: str | None = None) -> tuple[ApiClient, str]:
    """An `ApiClient` for the kubeconfig's context (or the pod's service account) and the
    namespace that context names ("default" when it names none), as kubectl would pick."""
    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
    except ImportError as exc:
        raise ClusterReadError(
            "reading the cluster needs the kubernetes package: pip install 'mergesearch[cluster]'"
        ) from exc

    paths = _kubeconfig_paths()
    in_cluster = not any(p.exists() for p in paths) and "KUBERNETES_SERVICE_HOST" in os.environ
    configuration = client.Configuration()
    try:
        if in_cluster:
            config.load_incluster_config(client_configuration=configuration)
            namespace = IN_CLUSTER_NAMESPACE.read_text().strip() or "default"
        else:
            config_file = os.pathsep.join(str(p) for p in paths)
            contexts, active = config.list_kube_config_contexts(config_file)
            if context is not None:
                active = next((c for c in contexts if c.get("name") == context), None)
                if active is None:
                    raise ClusterReadError(f"context {context!r} not found in {config_file}")
            config.load_kube_config(
                config_file=config_file,
                context=context,
                client_configuration=configuration,
                persist_config=False,  # a read-only command never rewrites the user's file
            )
            namespace = _context_namespace(active) or "default"
    except (ConfigException, OSError) as exc:
        where = "in-cluster service account" if in_cluster else os.pathsep.join(map(str, paths))
        raise ClusterReadError(f"no usable Kubernetes configuration ({where}): {exc}") from exc
    # One attempt, as kubectl makes: a refused connection is reported, not retried (and
    # urllib3's retry warnings would bury the one line that says what is wrong).
    configuration.retries = 0
    return client.ApiClient(configuration), namespace


def _server_said(exc: Any) -> str:
    """kubectl's wording: `Error from server (NotFound): <the server's message>`."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    body = body if isinstance(body, dict) else {}
    reason = body.get("reason") or exc.reason or f"HTTP {exc.status}"
    return f"Error from server ({reason}): {body.get('message') or exc.body or exc.reason}"


def read_search(name: str, namespace: str | None, context: str | None = None) -> dict[str, Any]:
    """The MergeSearch as the API server has it now (a dict, as `kubectl get -o json` prints)."""
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    api, default_namespace = api_client(context)
    with api:
        host = api.configuration.host
        try:
            obj = CustomObjectsApi(api).get_namespaced_custom_object(
                API_GROUP,
                API_VERSION,
                namespace or default_namespace,
                PLURAL,
                name,
                _request_timeout=READ_TIMEOUT_S,
            )
        except ApiException as exc:
            raise ClusterReadError(_server_said(exc)) from exc
        except HTTPError as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ClusterReadError(f"cannot reach the Kubernetes API at {host}: {reason}") from exc
    return dict(obj)


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def _status(obj: Mapping[str, Any]) -> MergeSearchStatus:
    return MergeSearchStatus.read(obj.get("status"))


def status_lines(obj: Mapping[str, Any]) -> list[str]:
    """The header block: phase, progress, best, why it stopped (plain text, pure)."""
    meta, spec, status = obj.get("metadata", {}), obj.get("spec", {}), _status(obj)
    trials = status.trials
    budget = (spec.get("search") or {}).get("maxTrials", "?")
    sigma = _fmt(status.search.sigma if status.search else None)
    counts = (
        f"trials {trials.finished}/{budget} finished ({trials.succeeded} succeeded, "
        f"{trials.failed} failed, {trials.running} running)"
        if trials
        else f"trials 0/{budget} finished (0 succeeded, 0 failed, 0 running)"
    )
    lines = [
        f"{meta.get('namespace', '?')}/{meta.get('name', '?')}: {status.phase or Phase.PENDING}"
        + (" (suspended)" if spec.get("suspend") else ""),
        f"iteration {status.iteration or 0}, {counts}, sigma {sigma}",
    ]
    best, winner = status.best, status.winner
    if best:
        lines.append(f"best: {best.trial} fitness {_fmt(best.fitness)}")
    if winner:
        lines.append(
            f"confirmed winner: {winner.trial} fitness {_fmt(winner.fitness)} "
            f"on unseen examples ({_fmt(winner.search_fitness)} on the search's)"
        )
    for cond in status.conditions or ():
        if cond.holds and cond.type != "Ready":
            lines.append(f"{cond.type}: {cond.reason or ''} {cond.message or ''}")
    output = status.output
    if output and output.uri:
        lines.append(f"merged model: {output.uri} {output.digest or ''}".rstrip())
    return lines


Row = tuple[str, dict[str, float], Any, Any]


def score_rows(obj: Mapping[str, Any]) -> tuple[list[str], list[Row]]:
    """Held-in tasks and one row per baseline, for the best and for the confirmed winner:
    (label, scores, fitness on the search's examples, fitness on unseen ones or None)."""
    spec, status = obj.get("spec", {}), _status(obj)
    tasks = [t["task"] for t in (spec.get("objective") or {}).get("heldIn", [])]
    confirmed = {c.trial: c.fitness for c in status.confirmation or () if c.outcome == "succeeded"}
    rows: list[Row] = [
        (baseline_label(b.id), b.scores or {}, b.fitness, confirmed.get(b.id))
        for b in status.baselines or ()
        if b.outcome == "succeeded"
    ]
    best, winner = status.best, status.winner
    if best:
        label = f"best ({best.trial})"
        rows.append((label, best.scores, best.fitness, confirmed.get(best.trial)))
    if winner:
        label = f"confirmed winner ({winner.trial})"
        rows.append((label, winner.search_scores, winner.search_fitness, winner.fitness))
    return tasks, rows


def records_from_status(obj: Mapping[str, Any]) -> list[TrialLogEntry]:
    """What a resource's (bounded) status still holds as trial records: the baselines, the
    Pareto front and the best. The per-trial history of a local run is not kept there."""
    status = _status(obj)
    out: dict[str, TrialLogEntry] = {}
    for b in status.baselines or ():
        if b.outcome == "succeeded":
            out[b.id] = TrialLogEntry(
                id=b.id,
                kind="baseline",
                generation=-1,
                weights={},
                status="succeeded",
                held_in=b.scores or {},
                fitness=b.fitness,
            )
    for t in [*(status.pareto_front or ()), status.best]:
        if t and t.trial not in out:
            out[t.trial] = TrialLogEntry(
                id=t.trial,
                kind=t.kind,
                generation=t.generation or 0,
                weights=t.weights,
                status="succeeded",
                held_in=t.scores,
                fitness=t.fitness,
            )
    for c in status.confirmation or ():
        # a finalist not among the records above still shows beside its confirmation
        out.setdefault(
            c.trial,
            TrialLogEntry(
                id=c.trial,
                kind=c.kind,
                generation=-1 if c.kind == "baseline" else 0,
                weights={},
                status="succeeded",
                fitness=c.search_fitness,
            ),
        )
    confirmations = [
        TrialLogEntry(
            id="c-" + c.trial,
            kind=c.kind,
            generation=-1,
            weights={},
            status=c.outcome,
            fitness=c.fitness,
            subset="confirmation",
            source=c.trial,
        )
        for c in status.confirmation or ()
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
    best = _status(obj).chosen()
    if best is not None and best.weights:
        weights = ", ".join(f"{k} {v:.3f}" for k, v in best.weights.items())
        console.print(f"best weights: {weights}", highlight=False)
    if best is not None and best.held_out:
        held_out = ", ".join(f"{k} {v:.3f}" for k, v in best.held_out.items())
        console.print(f"best held-out: {held_out}", highlight=False)


def add_commands(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="show a MergeSearch on the cluster")
    status.add_argument("name")
    status.add_argument("-n", "--namespace", help="default: the context's namespace")
    status.add_argument("--context", help="the kubeconfig context (default: the current one)")
    status.add_argument("-o", "--output", choices=["text", "json"], default="text")
    status.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        obj = read_search(args.name, args.namespace, args.context)
    except ClusterReadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    if args.output == "json":
        print(json.dumps(obj.get("status") or {}, indent=2, sort_keys=True))
    else:
        print_status(obj)
    return ExitCode.FAILED if _status(obj).phase is Phase.FAILED else ExitCode.OK


def report_from_cluster(
    name: str, namespace: str | None, out: Path, context: str | None = None
) -> list[Path]:
    from mergesearch.local.report import draw_all

    obj = read_search(name, namespace, context)
    best = _status(obj).chosen()
    if best is None:
        raise ClusterReadError(f"{name}: no finished trial to draw yet")
    tasks = [t["task"] for t in obj["spec"]["objective"]["heldIn"]]
    return draw_all(records_from_status(obj), best.weights, tasks, out)
