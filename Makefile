# The README's commands. Each one sets up what it needs first (scripts/env.sh is idempotent and
# reuses the environment built for the same lock file), so each works on a fresh machine.
SHELL := /bin/bash
VENV = $(shell scripts/env.sh)
PYTEST_ARGS ?=

.PHONY: env demo test test-fast lint format bench-merge bench-search bench-operator bench-evaluator

env:
	@scripts/env.sh

demo:
	@v=$$(scripts/env.sh) && scripts/demo.sh "$$v"

# System packages (Prometheus) are installed and the control plane's binaries are built (once per machine, cached) before pytest starts, so
# a cold Go build never runs inside a test's timeout.
test:
	@v=$$(scripts/env.sh) && "$$v/bin/ruff" check . && "$$v/bin/ruff" format --check . \
		&& scripts/install-system-deps.sh && scripts/build-testbin.sh >/dev/null \
		&& "$$v/bin/python" -m pytest $(PYTEST_ARGS)

test-fast:
	@v=$$(scripts/env.sh) && "$$v/bin/python" -m pytest -m "unit and not slow" $(PYTEST_ARGS)

lint:
	@v=$$(scripts/env.sh) && "$$v/bin/ruff" check . && "$$v/bin/ruff" format --check .

format:
	@v=$$(scripts/env.sh) && "$$v/bin/ruff" check --fix . && "$$v/bin/ruff" format .

bench-merge:
	@v=$$(scripts/env.sh) && "$$v/bin/python" -P bench/merge.py

bench-search:
	@v=$$(scripts/env.sh) && "$$v/bin/python" -P bench/search.py --seeds 20 \
		--methods 'cmaes,random,optuna_cmaes,cmaes[sigma0=0.5]'

bench-evaluator:
	@v=$$(scripts/env.sh) && nice -n 10 "$$v/bin/python" -P bench/evaluator.py

bench-operator:
	@v=$$(scripts/env.sh) && scripts/build-testbin.sh >/dev/null && "$$v/bin/python" -P bench/operator_bench.py
