"""The sandbox that runs model-generated programs (mbpp, humaneval) when a search allows it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from mergerunner.codeexec import (
    CodeExecutionRefused,
    Limits,
    SandboxedCodeEval,
    code_metrics,
    estimate_pass_at_k,
    isolation,
    run_program,
)

pytestmark = pytest.mark.unit
NEEDS_LANDLOCK = pytest.mark.skipif(
    not isolation()["filesystem"], reason="this kernel has no Landlock"
)


def test_a_correct_program_passes_and_a_wrong_one_fails() -> None:
    assert run_program("def add(a, b):\n  return a + b\nassert add(2, 3) == 5").passed
    outcome = run_program("def add(a, b):\n  return a * b\nassert add(2, 3) == 5")
    assert not outcome.passed and outcome.result.startswith("failed")


def test_stdlib_works_inside_the_sandbox() -> None:
    program = "import re, heapq, math, collections\nassert heapq.nlargest(1, [1, 3]) == [3]"
    assert run_program(program).passed


def test_the_credentials_are_not_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("MERGESEARCH_CREDENTIALS_DIR", "/var/run/secrets/mergesearch/storage")
    program = "import os\nassert not any(k.startswith(('AWS', 'MERGESEARCH')) for k in os.environ)"
    assert run_program(program).passed


@NEEDS_LANDLOCK
def test_a_credentials_file_is_unreadable(tmp_path: Path) -> None:
    secret = tmp_path / "creds" / "AWS_SECRET_ACCESS_KEY"
    secret.parent.mkdir()
    secret.write_text("s3cr3t")
    assert secret.read_text() == "s3cr3t"  # readable by the runner itself
    reads = f"assert open({str(secret)!r}).read() == 's3cr3t'"
    assert not run_program(reads).passed
    # the file-system rule alone holds, whatever the audit hook does
    lists = f"import os\nos.listdir({str(secret.parent)!r})"
    assert not run_program(lists, require_landlock=True).passed


def test_opening_a_socket_fails() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        port = server.getsockname()[1]
        connect = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"
        assert not run_program(connect).passed
        server.settimeout(0.5)
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever arrived
    finally:
        server.close()


@pytest.mark.slow
def test_a_looping_program_is_killed_at_its_limit() -> None:
    outcome = run_program("while True:\n  pass", Limits(cpu_seconds=1, wall_seconds=3))
    assert not outcome.passed and outcome.result == "timed out"


def test_a_program_cannot_start_processes() -> None:
    assert not run_program("import subprocess\nsubprocess.run(['true'])").passed
    assert not run_program("import os\nos.system('true')").passed


def test_pass_at_k_is_the_unbiased_estimator() -> None:
    assert estimate_pass_at_k(1, 1, 1) == 1.0
    assert estimate_pass_at_k(1, 0, 1) == 0.0
    assert estimate_pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert estimate_pass_at_k(4, 1, 2) == pytest.approx(0.5)


def test_the_metric_has_code_eval_s_interface() -> None:
    scores, results = SandboxedCodeEval().compute(
        references=["assert add(2, 3) == 5", "assert sub(3, 2) == 1"],
        predictions=[["def add(a, b): return a + b"], ["def sub(a, b): return b - a"]],
        k=[1],
    )
    assert scores == {"pass@1": 0.5}
    assert results[0][0][1]["passed"] and not results[1][0][1]["passed"]


def test_code_eval_is_refused_unless_allowed_and_never_downloaded() -> None:
    import evaluate

    with code_metrics(False), pytest.raises(CodeExecutionRefused) as caught:
        evaluate.load("code_eval")
    assert "allowCodeExecution" in str(caught.value)
    assert caught.value.failure_kind == "config"
    with code_metrics(True):
        assert isinstance(evaluate.load("code_eval"), SandboxedCodeEval)
        assert os.environ["HF_ALLOW_CODE_EVAL"] == "1"
    assert "HF_ALLOW_CODE_EVAL" not in os.environ or os.environ["HF_ALLOW_CODE_EVAL"] != "1"
