"""`python -m mergesearch.operator --namespace NS` (or `--all-namespaces`): run the operator.

Credentials: $KUBECONFIG when set, else the pod's service account, else ~/.kube/config.
Peering is off (`standalone`): run one replica (the Deployment's strategy is Recreate).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mergesearch.operator", description="Run the MergeSearch operator."
    )
    scope = parser.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "--namespace", "-n", action="append", help="serve this namespace (repeatable)"
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="serve every namespace")
    parser.add_argument(
        "--liveness",
        default=os.environ.get("MERGESEARCH_LIVENESS", DEFAULT_LIVENESS),
        help=f"liveness endpoint URL, or 'off' (default {DEFAULT_LIVENESS})",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("MERGESEARCH_METRICS_PORT", "0")) or None,
        help="serve Prometheus metrics on this port ($MERGESEARCH_METRICS_PORT; off when unset)",
    )
    parser.add_argument(
        "--evaluator-port",
        type=int,
        default=int(os.environ.get("MERGESEARCH_EVALUATOR_PORT", "0")) or None,
        help="serve warm evaluators on this port ($MERGESEARCH_EVALUATOR_PORT; needs "
        "$MERGESEARCH_EVALUATOR_URL and $MERGESEARCH_EVALUATOR_KEY_FILE)",
    )
    parser.add_argument("--runner-image", help="default trial image ($MERGESEARCH_RUNNER_IMAGE)")
    parser.add_argument(
        "--poll-seconds", type=float, default=30.0, help="reconcile at least this often"
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:  # one line per watch event otherwise
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    import dataclasses

    import kopf

    from mergesearch.operator import handlers  # registers the handlers with kopf

    jobs = handlers.JobSettings.from_env()
    if args.runner_image:
        jobs = dataclasses.replace(jobs, default_image=args.runner_image)
    settings = handlers.ShellSettings(
        jobs=jobs, poll_s=args.poll_seconds, evaluator_port=args.evaluator_port
    )
    runtime = handlers.Runtime(settings=settings)
    if args.metrics_port:
        from mergesearch.operator import metrics

        metrics.install(runtime)
        metrics.serve(args.metrics_port)
    kopf.run(
        standalone=True,
        clusterwide=bool(args.all_namespaces),
        namespaces=args.namespace or (),
        liveness_endpoint=None if args.liveness == "off" else args.liveness,
        memo=kopf.Memo(runtime=runtime),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
