"""The trial contract at its limits: many scores, deep nesting, loosely typed values."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from mergerunner.trial import (
    TERMINATION_MESSAGE_LIMIT,
    TrialDocument,
    TrialResult,
    parse_result_message,
    parse_trial,
    unpack_result,
)

pytestmark = pytest.mark.unit

MMLU_BBH = [f"mmlu_high_school_subject_{i:02d}" for i in range(57)] + [
    f"bbh_cot_fewshot_logical_deduction_{i:02d}" for i in range(27)
]


def _doc(tasks: list[str], **extra: object) -> dict:
    return {
        "id": "demo-g000-c00",
        "checkpoints": [{"name": "a", "uri": "/x/a"}, {"name": "b", "uri": "/x/b"}],
        "weights": {"a": 0.25, "b": 0.75},
        "heldIn": [{"task": t} for t in tasks],
        "evaluator": {"backend": "analytic"},
        **extra,
    }


def _run_cli(tmp_path: Path, document: str) -> tuple[int, str, str, str]:
    trial = tmp_path / "trial.json"
    trial.write_text(document)
    result, term = tmp_path / "result.json", tmp_path / "termination-log"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "mergerunner", "run", "--trial", str(trial)),
            *("--result", str(result), "--termination-log", str(term)),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    return proc.returncode, proc.stdout, result.read_text(), term.read_text()


def test_a_success_with_84_held_in_scores_writes_its_termination_message(tmp_path: Path) -> None:
    """MMLU plus BBH subtasks: the scores do not fit 4 KiB as JSON; the message packs them."""
    code, stdout, result_file, message = _run_cli(tmp_path, json.dumps(_doc(MMLU_BBH)))
    assert code == 0
    full = TrialResult.model_validate(json.loads(stdout))
    assert len(full.to_json()) > TERMINATION_MESSAGE_LIMIT
    assert TrialResult.model_validate(json.loads(result_file)) == full
    assert len(message.encode()) <= TERMINATION_MESSAGE_LIMIT
    read = parse_result_message(message)
    assert read.truncated
    assert read.held_in == full.held_in and read.fitness == full.fitness
    assert read.digest == full.digest


def test_the_termination_message_is_written_whatever_the_result() -> None:
    rng = random.Random(1)
    huge = {f"task-{i:04d}-{rng.random()}": rng.random() for i in range(3000)}
    result = TrialResult(
        id="x" * 253, status="succeeded", held_in=huge, fitness=0.5, digest="blake3:" + "a" * 64
    )
    message = result.termination_message()
    assert len(message.encode()) <= TERMINATION_MESSAGE_LIMIT
    compact = parse_result_message(message)
    assert compact.truncated and compact.held_in == {} and compact.fitness == 0.5


def test_validation_refuses_held_in_scores_that_could_never_fit() -> None:
    tasks = [
        f"a_rather_long_task_name_that_does_not_compress_{i:04d}_{i * 7919 % 10007}"
        for i in range(400)
    ]
    with pytest.raises(ValidationError, match=r"termination message \(limit 4000\) even packed"):
        parse_trial(json.dumps(_doc(tasks)))
    parse_trial(json.dumps(_doc(MMLU_BBH)))  # the realistic case is accepted


def test_a_packed_message_cannot_inflate_without_bound() -> None:
    import base64
    import zlib

    bomb = base64.b64encode(zlib.compress(b"[" + b" " * (4 << 20) + b"]")).decode()
    with pytest.raises(ValueError, match="inflates beyond"):
        unpack_result({"packed": bomb})


@pytest.mark.parametrize("depth", [2000, 100_000])
def test_a_deeply_nested_document_is_bad_input_with_a_result(tmp_path: Path, depth: int) -> None:
    document = json.dumps(_doc(["t"]))[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}"
    code, stdout, result_file, message = _run_cli(tmp_path, document)
    assert code == 2
    for text in (stdout, result_file, message):
        report = json.loads(text)
        assert report["status"] == "failed" and report["errorKind"] == "invalid-input"
        assert "nested too deeply" in report["error"]


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"weights": {"a": "0.5", "b": 0.5}}, "weights.a"),
        ({"weights": {"a": True, "b": 0.5}}, "weights.a"),
        ({"heldIn": [{"task": "t", "weight": "2"}]}, "heldIn.0.weight"),
        ({"heldIn": [{"task": "t", "limit": 2.5}]}, "heldIn.0.limit"),
        ({"heldIn": [{"task": "t", "limit": "10"}]}, "heldIn.0.limit"),
        ({"evaluator": {"seed": "1"}}, "evaluator.seed"),
        ({"evaluator": {"trustRemoteCode": "false"}}, "evaluator.trustRemoteCode"),
        ({"output": {"uri": "/o", "saveModel": 1}}, "output.saveModel"),
        ({"checkpoints": [{"name": "a", "uri": 5}, {"name": "b", "uri": "/x/b"}]}, "uri"),
    ],
)
def test_values_of_the_wrong_json_type_are_refused(change: dict, where: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_trial(json.dumps(_doc(["t"]) | change))
    locations = [".".join(str(p) for p in e["loc"]) for e in info.value.errors(include_url=False)]
    assert any(where in loc or loc.endswith(where.split(".")[-1]) for loc in locations), locations


def test_json_integers_stay_valid_numbers() -> None:
    doc = parse_trial(json.dumps(_doc(["t"]) | {"weights": {"a": 1, "b": 0}}))
    assert doc.weight_vector() == [1.0, 0.0]


def test_weights_beyond_float32_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"also in float32"):
        TrialDocument.model_validate(_doc(["t"]) | {"weights": {"a": 1e39, "b": 0.5}})


def test_held_out_scores_count_too_since_a_final_trial_reports_them() -> None:
    tasks = [
        f"a_rather_long_task_name_that_does_not_compress_{i:04d}_{i * 7919 % 10007}"
        for i in range(400)
    ]
    doc = _doc(["t"]) | {"heldOut": [{"task": t} for t in tasks]}
    with pytest.raises(ValidationError, match="even packed"):
        parse_trial(json.dumps(doc))


def test_a_mergesearch_spec_whose_scores_cannot_fit_is_refused_naming_the_field() -> None:
    from mergesearch.spec import SpecError, parse_manifest

    tasks = [
        f"a_rather_long_task_name_that_does_not_compress_{i:04d}_{i * 7919 % 10007}"
        for i in range(400)
    ]
    manifest = {
        "apiVersion": "mergesearch.io/v1alpha1",
        "kind": "MergeSearch",
        "metadata": {"name": "demo"},
        "spec": {
            "checkpoints": [{"name": "a", "uri": "/x/a"}, {"name": "b", "uri": "/x/b"}],
            "objective": {"heldIn": [{"task": t} for t in tasks]},
        },
    }
    with pytest.raises(SpecError) as info:
        parse_manifest(manifest)
    assert any("heldIn: the scores of 400 tasks" in e for e in info.value.errors)
    manifest["spec"]["objective"]["heldIn"] = [{"task": t, "limit": 100} for t in MMLU_BBH]
    parse_manifest(manifest)
