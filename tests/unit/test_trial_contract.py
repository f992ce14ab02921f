"""The trial contract between the operator and the runner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mergerunner.trial import (
    FailureKind,
    TrialDocument,
    TrialError,
    TrialResult,
    failure_kind_of,
    fitness_of,
    held_in_weights,
    parse_result_message,
    parse_trial,
)

pytestmark = pytest.mark.unit

DOC = {
    "id": "demo-g000-c00",
    "checkpoints": [{"name": "a", "uri": "/x/a"}, {"name": "b", "uri": "s3://b/b/"}],
    "weights": {"b": 0.75, "a": 0.25},
    "heldIn": [{"task": "add", "metric": "exact_match", "weight": 3}, {"task": "rev"}],
    "heldOut": [{"task": "copy"}],
}


def test_weights_follow_checkpoint_order() -> None:
    doc = parse_trial(json.dumps(DOC))
    assert doc.weight_vector() == [0.25, 0.75]
    assert doc.evaluator.trust_remote_code is False


def test_round_trip_is_camel_case() -> None:
    doc = parse_trial(json.dumps(DOC))
    wire = doc.to_wire()
    assert "heldIn" in wire and "apiVersion" in wire
    assert TrialDocument.model_validate(wire) == doc


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weights": {"a": 1.0}}, "missing: ['b']"),
        ({"weights": {"a": 1.0, "b": float("nan")}}, "not finite: b"),
        ({"heldOut": [{"task": "add"}]}, "more than once"),
        ({"heldIn": [], "heldOut": []}, "at least one task"),
        ({"output": {"saveModel": True}}, "output.saveModel needs output.uri"),
        ({"apiVersion": "mergerunner.mergesearch.io/v9"}, "apiVersion"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_documents_are_rejected(change: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        TrialDocument.model_validate(DOC | change)
    assert message in str(info.value)


def test_fitness_is_the_weighted_held_in_mean() -> None:
    doc = parse_trial(json.dumps(DOC))
    weights = held_in_weights(doc.held_in)
    assert fitness_of({"add": 0.5, "rev": 1.0, "copy": 0.0}, weights) == pytest.approx(
        (3 * 0.5 + 1.0) / 4
    )


def test_termination_message_fits_and_stays_json() -> None:
    many = {f"task-{i:03d}": i / 1000 for i in range(150)}
    result = TrialResult(
        id="x", status="succeeded", held_in=many, held_out=many, fitness=0.5, error="e" * 5000
    )
    message = result.termination_message()
    assert len(message.encode()) <= 4000
    parsed = parse_result_message(message)
    assert parsed.truncated is True
    assert parsed.held_in == many


def test_small_result_is_not_truncated() -> None:
    result = TrialResult(id="x", status="succeeded", held_in={"a": 1.0}, fitness=1.0)
    assert json.loads(result.termination_message())["truncated"] is False


def test_contract_imports_without_torch() -> None:
    code = "import sys, mergerunner.trial, mergerunner.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_bad_input_exits_2_and_reports(tmp_path: Path) -> None:
    trial = tmp_path / "trial.json"
    trial.write_text(json.dumps(DOC | {"weights": {"a": 1}}))
    result_file = tmp_path / "out" / "result.json"
    term = tmp_path / "termination-log"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "mergerunner", "run", "--trial", str(trial)),
            *("--result", str(result_file), "--termination-log", str(term)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    for text in (proc.stdout, result_file.read_text(), term.read_text()):
        report = json.loads(text)
        assert report["status"] == "failed"
        assert report["failedStep"] == "input"
        assert "weights" in report["error"]


def test_failure_kinds_come_from_the_exception_type_never_its_message() -> None:
    from mergerunner.checkpoint import CheckpointError, CheckpointMismatch
    from mergerunner.storage import FetchError

    assert failure_kind_of(TrialError("x", kind=FailureKind.CONFIG)) is FailureKind.CONFIG
    assert failure_kind_of(CheckpointError("x")) is FailureKind.CHECKPOINT_INVALID
    assert failure_kind_of(CheckpointMismatch("x")) is FailureKind.CHECKPOINTS_INCOMPATIBLE
    assert failure_kind_of(FetchError("s3://b/a/", "not-found", "x")) is (
        FailureKind.CHECKPOINT_UNAVAILABLE
    )
    assert failure_kind_of(FetchError("s3://b/a/", "unreachable", "x")) is (
        FailureKind.STORAGE_UNAVAILABLE
    )
    assert failure_kind_of(MemoryError()) is FailureKind.OUT_OF_MEMORY
    assert failure_kind_of(TimeoutError()) is FailureKind.TIMEOUT
    assert failure_kind_of(RuntimeError("unknown task: CUDA out of memory")) is (
        FailureKind.INTERNAL
    )


def test_the_error_kind_travels_in_the_result() -> None:
    result = TrialResult(
        id="t", status="failed", failed_step="fetch", error_kind=FailureKind.STORAGE_UNAVAILABLE
    )
    wire = json.loads(result.termination_message())
    assert wire["errorKind"] == "storage-unavailable"
    assert TrialResult.model_validate(wire).error_kind is FailureKind.STORAGE_UNAVAILABLE
