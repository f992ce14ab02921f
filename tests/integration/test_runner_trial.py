"""`mergerunner run`, the trial program, on real parts: S3 server, toy checkpoints, lm-eval.

It runs as a separate process, as in a pod: credentials only from the environment, the trial
document from a file, the result on stdout, in the result file and in the termination message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from support.runner_process import run_runner, task_specs, toy_trial
from support.search_inputs import upload_checkpoints

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMIT = 12


@pytest.fixture(scope="module")
def bucket(s3_server: Any, toy_pool: Any) -> str:
    name = s3_server.create_bucket()
    upload_checkpoints(s3_server, name, toy_pool.checkpoints)
    return name


def trial(toy_pool: Any, bucket: str, **changes: Any) -> dict[str, Any]:
    names = list(toy_pool.checkpoints)
    doc = toy_trial(
        toy_pool,
        id="t-g000-c00",
        checkpoints=[{"name": n, "uri": f"s3://{bucket}/pool/{n}/"} for n in names],
        weights={n: round(1 / len(names), 6) for n in names},
        dtype="float32",
        heldIn=task_specs(toy_pool.heldin, LIMIT),
        heldOut=task_specs(toy_pool.heldout, LIMIT),
        evaluator={"batchSize": 32, "device": "cpu"},
        output={"uri": f"s3://{bucket}/merged/t-g000-c00/", "saveModel": True},
    )
    doc.update(changes)
    return doc


def run_trial(
    tmp: Path, doc: dict[str, Any], env: dict[str, str]
) -> tuple[int, dict[str, Any], Path]:
    term = tmp / "termination-log"
    proc = run_runner(
        doc,
        tmp,
        *("--result", str(tmp / "result.json"), "--termination-log", str(term)),
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env},
    )
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}:\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads((tmp / "result.json").read_text()) == result
    assert json.loads(term.read_text())["status"] == result["status"]
    assert len(term.read_bytes()) < 4096
    return proc.returncode, result, term


def test_trial_fetches_merges_scores_and_uploads(
    s3_server: Any, toy_pool: Any, bucket: str, tmp_path: Path
) -> None:
    from mergerunner.resident import ResidentEvaluator
    from mergerunner.trial import EvaluatorSpec, TaskSpec

    code, result, _ = run_trial(tmp_path, trial(toy_pool, bucket), s3_server.env())
    assert code == 0, result
    assert result["status"] == "succeeded"
    assert set(result["heldIn"]) == set(toy_pool.heldin)
    assert set(result["heldOut"]) == set(toy_pool.heldout)
    mean = sum(result["heldIn"].values()) / len(result["heldIn"])
    assert result["fitness"] == pytest.approx(mean)
    assert result["digest"].startswith("blake3:")
    assert result["timings"]["fetchS"] > 0 and result["timings"]["evaluateS"] > 0
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="merged/t-g000-c00/")
    keys = {o["Key"].rsplit("/", 1)[-1] for o in listed.get("Contents", [])}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= keys

    # The in-process path of local mode scores the same merge identically.
    resident = ResidentEvaluator(
        list(toy_pool.checkpoints.values()),
        held_in=[TaskSpec(task=t, metric=m, limit=LIMIT) for t, m in toy_pool.heldin.items()],
        evaluator=EvaluatorSpec(batch_size=32, device="cpu"),
        custom_tasks_dir=toy_pool.tasks_dir,
        dtype="float32",
    )
    n = len(toy_pool.checkpoints)
    scores = resident.score([1 / n] * n)
    assert scores.held_in == result["heldIn"]


def test_second_trial_reuses_the_cache(
    s3_server: Any, toy_pool: Any, bucket: str, tmp_path: Path
) -> None:
    doc = trial(toy_pool, bucket, output={})
    first = run_trial(tmp_path, doc, s3_server.env())[1]
    second = run_trial(tmp_path, doc, s3_server.env())[1]
    assert first["digest"] == second["digest"]
    assert second["timings"]["fetchS"] < max(first["timings"]["fetchS"], 0.5)


@pytest.mark.parametrize(
    ("change", "step", "kind", "words"),
    [
        (
            {"checkpoints": "missing"},
            "fetch",
            "checkpoint-unavailable",
            ["s3://", "not-there", "not found"],
        ),
        ({"heldIn": [{"task": "toy_nonesuch"}]}, "evaluate", "unknown-task", ["toy_nonesuch"]),
        ({"secret": "wrong"}, "fetch", "checkpoint-unavailable", ["denied"]),
    ],
)
def test_failures_name_the_step_and_the_cause(
    s3_server: Any,
    toy_pool: Any,
    bucket: str,
    tmp_path: Path,
    change: dict[str, Any],
    step: str,
    kind: str,
    words: list[str],
) -> None:
    env = s3_server.env()
    doc = trial(toy_pool, bucket, output={})
    if change.get("checkpoints") == "missing":
        doc["checkpoints"][0]["uri"] = f"s3://{bucket}/pool/not-there/"
    elif change.get("secret"):
        env["AWS_SECRET_ACCESS_KEY"] = "wrong-secret"
    else:
        doc.update(change)
    code, result, _ = run_trial(tmp_path, doc, env)
    assert code == 1
    assert result["failedStep"] == step
    assert result["errorKind"] == kind
    for word in words:
        assert word.lower() in result["error"].lower(), result["error"]
    assert env["AWS_SECRET_ACCESS_KEY"] not in result["error"]
