"""The preflight on real parts: toy checkpoints on a real S3 server (headers by ranged reads),
lm-eval's own tasks against a data bundle, and every configuration error named with its kind
before any trial runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support.paper_suite import wider
from support.search_inputs import upload_checkpoints, upload_tree
from support.taskdata import build_bundle

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, restored_env: None) -> Path:
    scratch = tmp_path_factory.mktemp("bundle")
    return build_bundle(scratch / "paper", scratch, ("gsm8k", "mbpp", "leaderboard_musr"))


@pytest.fixture(scope="module")
def bucket(s3_server: Any, toy_pool: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    name = s3_server.create_bucket()
    first = Path(next(iter(toy_pool.checkpoints.values())))
    odd = wider(first, tmp_path_factory.mktemp("odd") / "odd")
    upload_checkpoints(s3_server, name, {**toy_pool.checkpoints, "odd": odd})
    return name


@pytest.fixture
def s3_env(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)


def doc(toy_pool: Any, bucket: str, **changes: Any) -> Any:
    from mergerunner.trial import TrialDocument

    names = list(toy_pool.checkpoints)
    data: dict[str, Any] = {
        "id": "preflight",
        "checkpoints": [{"name": n, "uri": f"s3://{bucket}/pool/{n}/"} for n in names],
        "weights": {n: 1 / len(names) for n in names},
        "heldIn": [
            {"task": "gsm8k", "metric": "exact_match,strict-match", "limit": 2},
            {"task": "leaderboard_musr", "metric": "acc_norm", "limit": 2},
        ],
        "evaluator": {"device": "cpu"},
    }
    data.update(changes)
    return TrialDocument.model_validate(data)


def test_headers_by_ranged_reads_over_s3(s3_env: None, toy_pool: Any, bucket: str) -> None:
    from mergerunner.preflight import check_checkpoints

    names = list(toy_pool.checkpoints)
    plan, stats = check_checkpoints([f"s3://{bucket}/pool/{n}/" for n in names])
    assert "model.embed_tokens.weight" in plan.names
    assert stats.checkpoint_bytes > 4 * 10**6
    assert stats.bytes_read < stats.checkpoint_bytes * 0.1  # headers and configs only


def test_a_preflight_of_a_good_search_succeeds(
    s3_env: None, toy_pool: Any, bucket: str, bundle: Path, tmp_path: Path
) -> None:
    from mergerunner.preflight import run_preflight

    result, report = run_preflight(
        doc(toy_pool, bucket, datasetsUri=str(bundle)), cache_dir=tmp_path
    )
    assert result.status == "succeeded", result.error
    assert report is not None and "leaderboard_musr_team_allocation" in report.tasks


@pytest.mark.parametrize(
    ("case", "kind", "words"),
    [
        ("shapes", "checkpoints-incompatible", ["embed_tokens", "shape"]),
        ("missing", "checkpoint-unavailable", ["no-such-checkpoint", "no objects"]),
        ("missing-data", "data-missing", ["ifeval", "google/IFEval"]),
        ("mbpp", "config", ["mbpp", "allowCodeExecution"]),
        ("metric", "unknown-metric", ["leaderboard_musr", "exact_match"]),
        ("group-typo", "unknown-task", ["leaderboard_musrr"]),
        ("backend", "config", ["vllm"]),
        ("output", "config", ["output destination", "is a file"]),
    ],
)
def test_each_configuration_error_is_named_with_its_kind(
    s3_env: None,
    toy_pool: Any,
    bucket: str,
    bundle: Path,
    tmp_path: Path,
    case: str,
    kind: str,
    words: list[str],
) -> None:
    from mergerunner.preflight import run_preflight

    base = doc(toy_pool, bucket, datasetsUri=str(bundle)).to_wire()
    held = base["heldIn"]
    changes: dict[str, Any] = {
        "shapes": {
            "checkpoints": [
                *base["checkpoints"],
                {"name": "odd", "uri": f"s3://{bucket}/pool/odd/"},
            ],
            "weights": {**base["weights"], "odd": 0.0},
        },
        "missing": {
            "checkpoints": [
                *base["checkpoints"][1:],
                {"name": "gone", "uri": f"s3://{bucket}/pool/no-such-checkpoint/"},
            ],
            "weights": {**{c["name"]: 0.5 for c in base["checkpoints"][1:]}, "gone": 0.5},
        },
        "missing-data": {
            "heldIn": [*held, {"task": "ifeval", "metric": "prompt_level_strict_acc"}]
        },
        "mbpp": {"heldIn": [*held, {"task": "mbpp", "metric": "pass_at_1"}]},
        "metric": {"heldIn": [held[0], {"task": "leaderboard_musr", "metric": "exact_match"}]},
        "group-typo": {"heldIn": [held[0], {"task": "leaderboard_musrr", "metric": "acc_norm"}]},
        "backend": {"evaluator": {"backend": "vllm"}},
        "output": {"output": {"uri": str(tmp_path / "taken")}},
    }[case]
    (tmp_path / "taken").write_text("a file where the export would go")
    if case == "backend" and __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    result, report = run_preflight(doc(toy_pool, bucket, **{**base, **changes}), cache_dir=tmp_path)
    assert result.status == "failed" and report is None
    assert result.failed_step == "preflight"
    assert result.error_kind == kind, result.error
    for word in words:
        assert word in (result.error or ""), result.error


def test_the_preflight_command_reports_like_a_trial(
    s3_server: Any, toy_pool: Any, bucket: str, bundle: Path, tmp_path: Path
) -> None:
    bad = doc(toy_pool, bucket, datasetsUri=str(bundle)).to_wire()
    bad["heldIn"] = [{"task": "mbpp", "metric": "pass_at_1"}]
    (tmp_path / "trial.json").write_text(json.dumps(bad))
    term = tmp_path / "termination-log"
    proc = subprocess.run(
        [
            *(
                sys.executable,
                "-m",
                "mergerunner",
                "preflight",
                "--trial",
                str(tmp_path / "trial.json"),
            ),
            *("--termination-log", str(term), "--cache-dir", str(tmp_path / "cache")),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **s3_server.env()},
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    result = json.loads(term.read_text())
    assert result["failedStep"] == "preflight" and result["errorKind"] == "config", result
    assert "allowCodeExecution" in result["error"]


def test_a_trial_reads_the_bundle_from_s3_and_reports_group_members(
    s3_server: Any, s3_env: None, toy_pool: Any, bucket: str, bundle: Path, tmp_path: Path
) -> None:
    """`run_trial` with the bundle in the real S3 server: fetched once into the verified
    cache (a second fetch transfers nothing), a group's members reported in `subtasks` (not in
    the termination message), the instruct settings in `prompt`."""
    from mergerunner.bundle import BUNDLE_MANIFEST
    from mergerunner.fetch import fetch_tree
    from mergerunner.run import run_trial

    uri = upload_tree(s3_server, bucket, bundle, "bundle")
    trial = doc(
        toy_pool,
        bucket,
        datasetsUri=uri,
        dtype="float32",
        heldIn=[
            {"task": "gsm8k", "metric": "exact_match,strict-match", "limit": 2, "numFewshot": 0},
            {"task": "leaderboard_musr", "metric": "acc_norm", "limit": 2},
        ],
        evaluator={
            "device": "cpu",
            "systemInstruction": "Be brief.",
            "genKwargs": {"max_gen_toks": 2},
        },
    )
    result = run_trial(trial, cache_dir=tmp_path / "cache", work_dir=tmp_path)
    assert result.status == "succeeded", result.error
    assert set(result.held_in) == {"gsm8k", "leaderboard_musr"}
    assert set(result.subtasks or {}) == {
        "leaderboard_musr_murder_mysteries",
        "leaderboard_musr_object_placements",
        "leaderboard_musr_team_allocation",
    }
    assert result.prompt is not None and result.prompt["systemInstruction"] == "Be brief."
    assert "subtasks" not in json.loads(result.termination_message())
    again = fetch_tree(uri, tmp_path / "cache", required=BUNDLE_MANIFEST)
    assert again.downloaded == () and BUNDLE_MANIFEST in again.reused
