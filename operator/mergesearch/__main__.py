"""`python -m mergesearch` is the same as the `mergesearch` command."""

from mergesearch.cli.main import run_and_exit

run_and_exit()
