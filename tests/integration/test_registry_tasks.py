"""lm-eval's own registry tasks (gsm8k, mbpp, ifeval, the leaderboard_musr group), offline, from a
data bundle built by `mergesearch datasets pack` from local copies in the real schemas.

The task definitions are lm-eval's installed YAMLs and Python; only the rows are ours
(tests/support/taskdata.py). Models are the toy pool's checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from support.paper_suite import SYSTEM, with_chat_template
from support.taskdata import (
    GSM8K,
    PAPER_TASKS,
    source_args,
    write_punkt_tab,
    write_sources,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sources")
    return {"datasets": write_sources(root), "nltk": write_punkt_tab(root / "nltk")}


def pack(out: Path, sources: dict[str, Any], *tasks: str, extra: tuple[str, ...] = ()) -> int:
    from mergesearch.cli.main import main

    return main(
        [
            *("datasets", "pack", *tasks, "-o", str(out)),
            *source_args(sources["datasets"]),
            *("--nltk-source", str(sources["nltk"])),
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def bundle(
    tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Any], restored_env: None
) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "paper"
    assert pack(out, sources, *PAPER_TASKS) == 0
    return out


@pytest.fixture(scope="module")
def chat_checkpoint(toy_pool: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy checkpoint whose tokenizer carries a chat template, as instruct models' do."""
    target = tmp_path_factory.mktemp("chat") / "base"
    return with_chat_template(next(iter(toy_pool.checkpoints.values())), target)


def specs(limit: int = 3) -> list[Any]:
    from mergerunner.trial import TaskSpec

    return [
        TaskSpec(task="gsm8k", metric="exact_match,strict-match", limit=limit, num_fewshot=1),
        TaskSpec(task="mbpp", metric="pass_at_1", limit=limit, num_fewshot=0),
        TaskSpec(task="ifeval", metric="prompt_level_strict_acc", limit=limit),
        TaskSpec(task="leaderboard_musr", metric="acc_norm", limit=limit),
    ]


def test_pack_writes_the_datasets_cache_layout_lm_eval_reads_offline(bundle: Path) -> None:
    from mergerunner.bundle import activate, read_manifest

    manifest = read_manifest(bundle)
    assert sorted(manifest.tasks) == sorted(PAPER_TASKS)
    assert {(d.path, d.name) for d in manifest.datasets} == {
        ("openai/gsm8k", "main"),
        ("google-research-datasets/mbpp", "full"),
        ("google/IFEval", None),
        ("TAUR-Lab/MuSR", None),
    }
    assert manifest.nltk == ["tokenizers/punkt_tab"]
    gsm = list((bundle / "datasets" / "openai___gsm8k" / "main" / "0.0.0").iterdir())
    assert len(gsm) == 1 and (gsm[0] / "gsm8k-test.arrow").is_file()
    activate(bundle)
    import datasets

    rows = datasets.load_dataset(GSM8K, "main", split="test")  # offline: from the bundle only
    assert rows.column_names == ["answer", "question"]
    assert rows[0]["answer"].endswith("#### 5")


def test_paper_suite_scores_with_chat_template_and_system_instruction(
    bundle: Path, chat_checkpoint: Path
) -> None:
    """gsm8k, mbpp (code allowed), ifeval and a group, with lm-eval's own definitions: every
    prompt the model sees carries the template's markers and the system instruction."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergerunner.evaluate import TaskSuite, make_lm
    from mergerunner.trial import EvaluatorSpec

    spec = EvaluatorSpec(
        device="cpu",
        batch_size=8,
        apply_chat_template=True,
        system_instruction=SYSTEM,
        gen_kwargs={"max_gen_toks": 4},
    )
    suite = TaskSuite(specs(), bundle=bundle, evaluator=spec, allow_code_execution=True)
    assert sorted(suite.leaves_of("leaderboard_musr")) == [
        "leaderboard_musr_murder_mysteries",
        "leaderboard_musr_object_placements",
        "leaderboard_musr_team_allocation",
    ]
    model = AutoModelForCausalLM.from_pretrained(chat_checkpoint).eval()
    lm = make_lm(model, AutoTokenizer.from_pretrained(chat_checkpoint), spec)
    prompts: list[str] = []
    for method in ("generate_until", "loglikelihood"):
        original = getattr(lm, method)

        def spy(requests: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            prompts.extend(r.args[0] for r in requests)
            return _original(requests, *args, **kwargs)

        setattr(lm, method, spy)
    result = suite.score_detailed(lm)
    assert set(result.scores) == {"gsm8k", "mbpp", "ifeval", "leaderboard_musr"}
    assert all(0.0 <= v <= 1.0 for v in result.scores.values())
    assert set(result.subtasks) == set(suite.leaves_of("leaderboard_musr"))
    assert prompts
    for prompt in prompts:
        assert prompt.startswith(f"<|system|>{SYSTEM}<|end|><|user|>"), prompt[:120]
        assert "<|assistant|>" in prompt
    # few-shot as multi-turn (the CLI's default with a chat template): gsm8k's one example is
    # a user turn and an assistant turn before the question
    assert any(p.count("<|user|>") == 2 for p in prompts)


def test_mbpp_pass_at_1_runs_sandboxed_programs_offline(bundle: Path) -> None:
    """lm-eval's own mbpp metric (utils.pass_at_1) scores through the sandboxed code_eval: no
    metric download; a correct program passes, a wrong one fails."""
    from mergerunner.codeexec import code_metrics
    from mergerunner.evaluate import TaskSuite
    from mergerunner.trial import TaskSpec

    suite = TaskSuite(
        [TaskSpec(task="mbpp", metric="pass_at_1", limit=2)],
        bundle=bundle,
        allow_code_execution=True,
    )
    task = suite._tasks["mbpp"]
    doc = task.eval_docs[0]
    reference = task.doc_to_target(doc)
    with code_metrics(True):
        right = task.process_results(doc, ["def add_1(x):\n  return x + 1"])
        wrong = task.process_results(doc, ["def add_1(x):\n  return x - 1"])
    assert right == {"pass_at_1": 1.0}, reference
    assert wrong == {"pass_at_1": 0.0}


@pytest.mark.parametrize(
    ("entry", "kind", "words"),
    [
        ({"task": "mbpp", "metric": "pass_at_1"}, "config", ["mbpp", "allowCodeExecution"]),
        ({"task": "leaderboard_musrr"}, "unknown-task", ["leaderboard_musrr", "leaderboard_musr"]),
        ({"task": "arc_easy"}, "data-missing", ["arc_easy", "allenai/ai2_arc", "not in the"]),
    ],
)
def test_configuration_errors_name_the_cause_before_any_model(
    bundle: Path, entry: dict[str, Any], kind: str, words: list[str]
) -> None:
    from mergerunner.evaluate import EvaluationError, TaskSuite
    from mergerunner.trial import TaskSpec

    with pytest.raises(EvaluationError) as caught:
        TaskSuite([TaskSpec(**entry)], bundle=bundle)
    assert caught.value.failure_kind == kind
    for word in words:
        assert word in str(caught.value)


def test_a_registry_task_without_a_bundle_is_data_missing(restored_env: None) -> None:
    from mergerunner.evaluate import EvaluationError, TaskSuite
    from mergerunner.trial import TaskSpec

    with pytest.raises(EvaluationError) as caught:
        TaskSuite([TaskSpec(task="gsm8k", metric="exact_match,strict-match")])
    assert caught.value.failure_kind == "data-missing"
    assert "spec.objective.datasets.uri" in str(caught.value)


def test_pack_from_manifest_takes_its_tasks(
    sources: dict[str, Any], tmp_path: Path, restored_env: None
) -> None:
    import yaml

    from mergerunner.bundle import read_manifest

    manifest = {
        "apiVersion": "mergesearch.io/v1alpha1",
        "kind": "MergeSearch",
        "metadata": {"name": "m"},
        "spec": {
            "checkpoints": [{"name": "a", "uri": "/a"}, {"name": "b", "uri": "/b"}],
            "objective": {
                "heldIn": [{"task": "gsm8k", "limit": 2}],
                "heldOut": [{"task": "leaderboard_musr", "metric": "acc_norm"}],
            },
        },
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(manifest))
    out = tmp_path / "bundle"
    assert pack(out, sources, extra=("--from-manifest", str(path))) == 0
    assert sorted(read_manifest(out).tasks) == ["gsm8k", "leaderboard_musr"]
    assert pack(tmp_path / "x", sources, "no_such_task_zz") == 2


def test_the_readme_manifest_is_valid_and_its_bundle_packs(
    sources: dict[str, Any], tmp_path: Path, restored_env: None
) -> None:
    """The README's example manifest, as written: the schema takes it, and the documented
    bundle step (`datasets pack --from-manifest`) packs every task it names."""
    import re

    import yaml

    from mergerunner.bundle import read_manifest
    from mergesearch.spec import parse_manifest

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "MergeSearch" in b)
    manifest = parse_manifest(yaml.safe_load(block), "README.md")
    assert manifest.spec.objective.datasets is not None
    assert manifest.spec.objective.allow_code_execution
    path = tmp_path / "my-search.yaml"
    path.write_text(block)
    out = tmp_path / "bundle"
    assert pack(out, sources, extra=("--from-manifest", str(path))) == 0
    named = {t.task for t in (*manifest.spec.objective.held_in, *manifest.spec.objective.held_out)}
    assert set(read_manifest(out).tasks) == named


def test_the_bundle_is_only_read(bundle: Path, tmp_path: Path) -> None:
    """Loading every paper task writes nothing into the bundle (the datasets library's lock
    files and module cache go to a scratch mirror), so a bundle on a read-only volume or
    shared by concurrent pods works, and the verified cache stays as fetched."""
    import shutil

    from mergerunner.evaluate import TaskSuite

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)

    def tree() -> dict[str, tuple[int, int]]:
        return {
            str(p.relative_to(copy)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(copy.rglob("*"))
        }

    before = tree()
    suite = TaskSuite(specs(), bundle=copy, allow_code_execution=True)
    assert set(suite.task_names) == {"gsm8k", "mbpp", "ifeval", "leaderboard_musr"}
    assert tree() == before
