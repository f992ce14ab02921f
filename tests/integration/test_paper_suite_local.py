"""The paper's task suite in local mode, end to end: lm-eval's own gsm8k, mbpp (code allowed) and
the leaderboard_musr group held in, ifeval held out, a chat template and a system instruction,
toy checkpoints and a data bundle. The search reaches its end, and the exported model scored
with plain lm-eval (`simple_evaluate`, the bundle's data, the same examples) gives the
search's scores. Configuration errors exit 2 before any trial."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.paper_suite import EVALUATOR, HELD_IN, HELD_OUT, SYSTEM, with_chat_template
from support.taskdata import build_bundle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}


@pytest.fixture(scope="module")
def setup(toy_pool: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("paper")
    bundle = build_bundle(tmp / "bundle", tmp / "scratch")
    checkpoints = {}
    for name, path in toy_pool.checkpoints.items():
        checkpoints[name] = with_chat_template(path, tmp / "pool" / name)
    return {"tmp": tmp, "bundle": bundle, "checkpoints": checkpoints}


def manifest(setup: dict[str, Any], name: str, **objective: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mergesearch.io/v1alpha1",
        "kind": "MergeSearch",
        "metadata": {"name": name},
        "spec": {
            "checkpoints": [{"name": n, "uri": str(p)} for n, p in setup["checkpoints"].items()],
            "merge": {"dtype": "float32"},
            "objective": {
                "heldIn": HELD_IN,
                "heldOut": HELD_OUT,
                "datasets": {"uri": str(setup["bundle"])},
                "allowCodeExecution": True,
                "evaluator": EVALUATOR,
                **objective,
            },
            "search": {"maxTrials": 5, "populationSize": 4, "baselines": ["uniform"], "seed": 1},
            "output": {"uri": str(setup["tmp"] / name / "merged")},
        },
    }


def run(setup: dict[str, Any], doc: dict[str, Any]) -> tuple[subprocess.CompletedProcess, Path]:
    folder = setup["tmp"] / doc["metadata"]["name"]
    folder.mkdir(exist_ok=True)
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(doc))
    state = folder / "state"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "mergesearch", "run", str(path)),
            "--state-dir",
            str(state),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        check=False,
    )
    return proc, state


def test_the_paper_suite_runs_and_the_export_rescores_with_plain_lm_eval(
    setup: dict[str, Any],
) -> None:
    proc, state = run(setup, manifest(setup, "paper"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    engine = json.loads((state / "state.json").read_text())["engine"]
    lines = (state / "trials.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r.get("subset", "search") == "search"]
    assert len(records) == 5 and all(r["status"] == "succeeded" for r in records)
    final = json.loads((state / "final.json").read_text())
    best = next(r for r in records if r["id"] == final["best"])
    assert set(best["held_in"]) == {"gsm8k", "mbpp", "leaderboard_musr"}
    assert {k.rsplit("_", 2)[0] for k in best["subtasks"]} == {"leaderboard_musr"}
    assert len(best["subtasks"]) == 3  # the group's members, in the trial log only
    assert set(final["heldOut"]) == {"ifeval"}
    assert engine  # the state was written
    rescored = plain_lm_eval(Path(final["output"]["uri"]), setup["bundle"])
    for task, score in best["held_in"].items():
        assert rescored[task] == pytest.approx(score, abs=1e-12), task
    assert rescored["ifeval"] == pytest.approx(final["heldOut"]["ifeval"], abs=1e-12)


def plain_lm_eval(model_dir: Path, bundle: Path) -> dict[str, float]:
    """lm-eval's `simple_evaluate` on the exported model, outside MergeSearch's evaluator: the
    bundle's data, the examples the search used (its seeded subsets), the same instruct
    settings. Only the code metric is MergeSearch's sandboxed one (the Hub's cannot load
    offline)."""
    code = f"""
import json, sys
sys.path[:0] = {[str(Path(__file__).resolve().parents[2] / "runner")]!r}
from lm_eval.evaluator import simple_evaluate
from lm_eval.tasks import TaskManager
from mergerunner.bundle import activate
from mergerunner.codeexec import code_metrics
from mergerunner.evaluate import subset_indices
activate({str(bundle)!r})
manager = TaskManager()
entries = {json.dumps([*HELD_IN, *HELD_OUT])}
loaded = {{}}
with code_metrics(True):
    loaded = manager.load([e["task"] for e in entries])
samples = {{}}
for e in entries:
    leaves = [e["task"]] if e["task"] in loaded["tasks"] else [
        t.task_name for t in loaded["groups"][e["task"]].get_all_tasks()]
    for leaf in leaves:
        n = len(loaded["tasks"][leaf].eval_docs)
        samples[leaf] = subset_indices(leaf, n, e["limit"], 1234) or list(range(n))
with code_metrics(True):
    out = simple_evaluate(
        model="hf",
        model_args={{"pretrained": {str(model_dir)!r}, "dtype": "float32", "device": "cpu"}},
        tasks=[e["task"] for e in entries],
        num_fewshot=0,
        batch_size=4,
        samples=samples,
        bootstrap_iters=0,
        apply_chat_template=True,
        system_instruction={SYSTEM!r},
        fewshot_as_multiturn=True,
        gen_kwargs={{"max_gen_toks": 4}},
        confirm_run_unsafe_code=True,
        task_manager=manager,
    )
keys = {{"gsm8k": "exact_match,strict-match", "mbpp": "pass_at_1,none",
        "leaderboard_musr": "acc_norm,none", "ifeval": "prompt_level_strict_acc,none"}}
print(json.dumps({{t: out["results"][t][k] for t, k in keys.items()}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"allowCodeExecution": False}, ["mbpp", "allowCodeExecution"]),
        ({"heldOut": [{"task": "arc_easy"}]}, ["arc_easy", "allenai/ai2_arc"]),
        ({"heldOut": [{"task": "leaderboard_musrr", "metric": "acc_norm"}]}, ["leaderboard_musrr"]),
        ({"heldOut": [{"task": "ifeval", "metric": "exact_match"}]}, ["ifeval", "exact_match"]),
        ({"evaluator": {"fewshotAsMultiturn": True}}, ["fewshotAsMultiturn", "applyChatTemplate"]),
    ],
)
def test_configuration_errors_exit_2_before_any_trial(
    setup: dict[str, Any], change: dict[str, Any], words: list[str]
) -> None:
    name = "bad-" + hashlib.sha256(json.dumps(change, sort_keys=True).encode()).hexdigest()[:8]
    proc, state = run(setup, manifest(setup, name, **change))
    assert proc.returncode == 2, proc.stderr[-3000:]
    for word in words:
        assert word in proc.stderr, proc.stderr[-3000:]
    assert not (state / "trials.jsonl").exists()
