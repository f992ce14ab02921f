"""Entry points end without interpreter finalization, yet lose no output and keep their code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import sys
from mergerunner.shutdown import run_then_exit
def main():
    sys.stdout.write("result on stdout, unflushed")
    sys.stderr.write("log on stderr")
    return 3
run_then_exit(main)
print("never reached")
"""


@pytest.mark.unit
def test_exit_keeps_the_code_and_flushes_both_streams() -> None:
    child = subprocess.run(
        [sys.executable, "-c", CHILD],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "runner")},
        check=False,
        timeout=60,
    )
    assert child.returncode == 3
    assert child.stdout == "result on stdout, unflushed"
    assert child.stderr == "log on stderr"


@pytest.mark.unit
def test_both_commands_use_it() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'mergesearch = "mergesearch.cli.main:run_and_exit"' in text
    assert 'mergerunner = "mergerunner.cli:run_and_exit"' in text
