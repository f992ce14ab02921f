"""`mergesearch run` on the toy pool: a real search with lm-eval, killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}


def manifest(pool: Any, name: str, **search: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mergesearch.io/v1alpha1",
        "kind": "MergeSearch",
        "metadata": {"name": name},
        "spec": {
            "checkpoints": [{"name": n, "uri": str(p)} for n, p in pool.checkpoints.items()],
            "merge": {"dtype": "float32"},
            "objective": {
                "heldIn": [{"task": t, "metric": m, "limit": 16} for t, m in pool.heldin.items()],
                "heldOut": [{"task": t, "metric": m, "limit": 16} for t, m in pool.heldout.items()],
                "customTasks": {"path": str(pool.tasks_dir)},
                "evaluator": {"batchSize": 32},
            },
            "search": {"maxTrials": 14, "seed": 3, **search},
        },
    }


def write(tmp: Path, doc: dict[str, Any], name: str = "search.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(doc))
    return path


def run(path: Path, state: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mergesearch", "run", str(path), "--state-dir", str(state)]
    return subprocess.run(
        [*cmd, "--no-progress", *extra], capture_output=True, text=True, env=ENV, check=False
    )


def final_state(state: Path) -> dict[str, Any]:
    return json.loads((state / "state.json").read_text())["engine"]


def trial_ids(state: Path) -> list[str]:
    return [json.loads(line)["id"] for line in (state / "trials.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(toy_pool: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("ref")
    path = write(tmp, manifest(toy_pool, "ref") | {})
    proc = run(path, tmp / "state")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "state": tmp / "state", "stdout": proc.stdout, "path": path}


def test_search_ends_with_the_table_and_exports(reference: dict[str, Any], toy_pool: Any) -> None:
    out = reference["stdout"]
    assert "baselines against the chosen merge" in out and "confirmed avg" in out
    for name in toy_pool.checkpoints:
        assert name in out
    assert "uniform" in out and "merge-best" in out
    assert "(a) on unseen (confirmation) examples, beats the best single checkpoint" in out
    ids = trial_ids(reference["state"])
    searched = [i for i in ids if not i.startswith("c-")]
    assert len(ids) == len(set(ids)) and len(searched) == 14
    assert ids[0].startswith("b-each-")
    # after the search: the 5 best search trials and every baseline on unseen examples
    engine = final_state(reference["state"])
    confirmed = [c["source"] for c in engine["confirmations"]]
    assert ids[14:] == ["c-" + c for c in confirmed]
    assert [c["kind"] for c in engine["confirmations"]].count("search") == 5
    records = [json.loads(line) for line in (reference["state"] / "trials.jsonl").open()]
    assert all(r["subset"] == "confirmation" for r in records[14:])
    # scored on other examples: the same model gets other held-in scores
    by_id = {r["id"]: r for r in records}
    assert any(by_id["c-" + c]["held_in"] != by_id[c]["held_in"] for c in confirmed)
    final = json.loads((reference["state"] / "final.json").read_text())
    winner = max(
        (c for c in engine["confirmations"] if c["status"] == "succeeded"),
        key=lambda c: c["fitness"],
    )
    assert final["best"] == winner["source"]
    assert set(final["heldOut"]) == set(toy_pool.heldout)


def test_resume_after_kill_gives_the_same_result(
    reference: dict[str, Any], toy_pool: Any, tmp_path: Path
) -> None:
    path = write(tmp_path, manifest(toy_pool, "ref"))
    state = tmp_path / "state"
    cmd = [sys.executable, "-m", "mergesearch", "run", str(path), "--state-dir", str(state)]
    proc = subprocess.Popen([*cmd, "--no-progress"], env=ENV, stdout=subprocess.DEVNULL)
    log = state / "trials.jsonl"
    wait_for(
        lambda: log.exists() and len(log.read_text().splitlines()) >= 17,
        600,
        "17 trial records",
        interval_s=0.2,
    )
    proc.send_signal(signal.SIGKILL)  # during the confirmation (trials 15 and on)
    proc.wait()
    done_before = trial_ids(state)
    total = len(trial_ids(reference["state"]))
    assert 17 <= len(done_before) < total
    resumed = run(path, state)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ids = trial_ids(state)
    assert ids[: len(done_before)] == done_before  # nothing evaluated twice
    assert len(ids) == len(set(ids)) == total
    ours, ref = final_state(state), final_state(reference["state"])
    assert ours == ref


def test_a_second_run_evaluates_nothing(reference: dict[str, Any]) -> None:
    before = trial_ids(reference["state"])
    again = run(reference["path"], reference["state"])
    assert again.returncode == 0
    assert trial_ids(reference["state"]) == before


def test_bad_input_fails_before_the_search(toy_pool: Any, tmp_path: Path) -> None:
    doc = manifest(toy_pool, "bad")
    doc["spec"]["search"]["sigma0"] = -1
    proc = run(write(tmp_path, doc, "a.yaml"), tmp_path / "a")
    assert proc.returncode == 2 and "spec.search.sigma0: must be > 0" in proc.stderr

    doc = manifest(toy_pool, "missing")
    doc["spec"]["checkpoints"][1]["uri"] = str(tmp_path / "nowhere")
    proc = run(write(tmp_path, doc, "b.yaml"), tmp_path / "b")
    assert proc.returncode == 2
    assert "checkpoint" in proc.stderr and "nowhere" in proc.stderr

    doc = manifest(toy_pool, "unknown-task")
    doc["spec"]["objective"]["heldIn"][0]["task"] = "toy_nonesuch"
    proc = run(write(tmp_path, doc, "c.yaml"), tmp_path / "c")
    assert proc.returncode == 2 and "toy_nonesuch" in proc.stderr
    assert not (tmp_path / "c" / "trials.jsonl").exists()

    doc = manifest(toy_pool, "no-unseen")  # the search would use every example
    doc["spec"]["objective"]["heldIn"][1]["limit"] = toy_pool.manifest()["eval_examples"]
    proc = run(write(tmp_path, doc, "d.yaml"), tmp_path / "d")
    assert proc.returncode == 2 and "no examples left for confirmation" in proc.stderr
    assert not (tmp_path / "d" / "trials.jsonl").exists()


def test_a_wrong_metric_fails_before_the_first_trial(toy_pool: Any, tmp_path: Path) -> None:
    doc = manifest(toy_pool, "wrong-metric")
    doc["spec"]["objective"]["heldIn"][0]["metric"] = "acc"  # a generate_until task
    task = doc["spec"]["objective"]["heldIn"][0]["task"]
    proc = run(write(tmp_path, doc), tmp_path / "state")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert task in proc.stderr and "'acc'" in proc.stderr and "exact_match" in proc.stderr
    assert not (tmp_path / "state" / "trials.jsonl").exists()


def test_a_bad_output_uri_fails_before_the_first_trial(toy_pool: Any, tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file, not a directory")
    doc = manifest(toy_pool, "bad-output")
    doc["spec"]["output"] = {"uri": "taken"}  # relative to the manifest
    proc = run(write(tmp_path, doc), tmp_path / "state")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "spec.output.uri" in proc.stderr and "taken" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "state" / "trials.jsonl").exists()


def test_a_name_outside_kubernetes_rules_is_refused(toy_pool: Any, tmp_path: Path) -> None:
    doc = manifest(toy_pool, "../../escape")
    path = write(tmp_path, doc)
    cmd = [sys.executable, "-m", "mergesearch", "run", str(path), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, check=False)
    assert proc.returncode == 2 and "metadata.name" in proc.stderr
    assert (
        not (tmp_path / ".mergesearch").exists()
        and not (tmp_path.parent.parent / "escape").exists()
    )
