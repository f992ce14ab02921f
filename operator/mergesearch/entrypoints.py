"""The commands the container images provide, in one place.

The Dockerfile's ENTRYPOINTs, the Helm chart's Deployment and the trial Job builder each name a
command; if one of them drifts, pods start with "executable not found" on a real cluster, long
after every unit test passed. So they all come from here (the Job builder imports it; the
Dockerfile and the chart cannot import Python, and tests/unit/test_dockerfile.py and
tests/unit/test_chart.py fail when their text differs from these tuples), and the tests also
check that the installed distribution really provides each command.
"""

from __future__ import annotations

# The operator: `python -m mergesearch.operator` (operator/mergesearch/operator/__main__.py).
# A module rather than a console script: it needs no entry in [project.scripts], and `python`
# is the image's virtual environment's interpreter (first on PATH).
OPERATOR_MODULE = "mergesearch.operator"
OPERATOR_COMMAND: tuple[str, ...] = ("python", "-m", OPERATOR_MODULE)

# The trial program: the `mergerunner` console script ([project.scripts]) and its subcommand.
RUNNER_SCRIPT = "mergerunner"
RUNNER_COMMAND: tuple[str, ...] = (RUNNER_SCRIPT, "run")
# The search's preflight, once before any trial (mergerunner.preflight).
PREFLIGHT_COMMAND: tuple[str, ...] = (RUNNER_SCRIPT, "preflight")
# The warm evaluator (spec.execution.mode: warm): leases candidates from the operator.
EVALUATOR_COMMAND: tuple[str, ...] = (RUNNER_SCRIPT, "evaluator")

# The people's command line, also in the operator image (`mergesearch crd`, say).
CLI_SCRIPT = "mergesearch"

# Ports the operator listens on inside its pod (the chart's defaults and the image's EXPOSE).
LIVENESS_PORT = 8080
LIVENESS_PATH = "/healthz"
METRICS_PORT = 9090

# Console scripts the images rely on, for the test against pyproject's [project.scripts].
CONSOLE_SCRIPTS: tuple[str, ...] = (RUNNER_SCRIPT, CLI_SCRIPT)
