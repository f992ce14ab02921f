"""`python -m mergerunner` is the same as the `mergerunner` command."""

from mergerunner.cli import run_and_exit

run_and_exit()
