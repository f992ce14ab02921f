"""Spec and contract fields for data bundles, code execution and instruct evaluation."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from mergerunner.bundle import BUNDLE_MANIFEST, DatasetRef, TaskNeeds, missing_for, read_manifest
from mergerunner.fetch import FetchError, plan_tree
from mergerunner.trial import EvaluatorSpec, TrialResult
from mergesearch.operator import jobs as jobspec
from mergesearch.operator.jobs import JobSettings
from mergesearch.spec import SpecError, parse_spec

pytestmark = pytest.mark.unit


def spec(**objective: object) -> object:
    return parse_spec(
        {
            "checkpoints": [{"name": "a", "uri": "s3://c/a/"}, {"name": "b", "uri": "s3://c/b/"}],
            "objective": {"heldIn": [{"task": "gsm8k", "limit": 250}], **objective},
        }
    )


def test_fewshot_as_multiturn_needs_a_chat_template() -> None:
    with pytest.raises(SpecError) as caught:
        spec(evaluator={"fewshotAsMultiturn": True})
    assert any(
        "spec.objective.evaluator" in e and "applyChatTemplate" in e for e in caught.value.errors
    )
    assert EvaluatorSpec(apply_chat_template=True).multiturn is True  # the CLI's default
    assert (
        EvaluatorSpec(apply_chat_template="tool_use", fewshot_as_multiturn=False).multiturn is False
    )
    assert EvaluatorSpec().multiturn is False


def test_gen_kwargs_take_scalars_only() -> None:
    assert EvaluatorSpec(gen_kwargs={"max_gen_toks": 8, "until": ["\n"]}).gen_kwargs
    with pytest.raises(ValidationError):
        EvaluatorSpec(gen_kwargs={"max_gen_toks": {"nested": 1}})


def test_the_trial_document_carries_bundle_and_code_execution() -> None:
    parsed = spec(datasets={"uri": "s3://data/paper/"}, allowCodeExecution=True)
    doc = jobspec.trial_document(parsed, "job", {"a": 0.5, "b": 0.5}, JobSettings())
    wire = doc.to_wire()
    assert wire["datasetsUri"] == "s3://data/paper/"
    assert wire["allowCodeExecution"] is True
    plain = jobspec.trial_document(spec(), "job", {"a": 0.5, "b": 0.5}, JobSettings())
    assert "datasetsUri" not in plain.to_wire() and plain.allow_code_execution is False


def test_subtask_scores_stay_out_of_the_termination_message() -> None:
    result = TrialResult(
        id="t",
        status="succeeded",
        held_in={"leaderboard_musr": 0.5},
        subtasks={f"leaderboard_musr_{i}": 0.5 for i in range(3)},
        prompt=EvaluatorSpec(
            apply_chat_template=True, system_instruction="Be brief."
        ).prompt_settings(),
        fitness=0.5,
    )
    message = json.loads(result.termination_message())
    assert "subtasks" not in message and message["prompt"]["systemInstruction"] == "Be brief."
    assert json.loads(result.to_json())["subtasks"]  # the result file keeps them


def test_a_bundle_listing_keeps_names_inside_and_needs_the_manifest() -> None:
    names = [BUNDLE_MANIFEST, "datasets/openai___gsm8k/main/0.0.0/h/gsm8k-test.arrow", ".x"]
    assert plan_tree("s3://b/p/", names, BUNDLE_MANIFEST) == sorted(names[:2])
    with pytest.raises(FetchError, match="not a plain path"):
        plan_tree("s3://b/p/", [BUNDLE_MANIFEST, "datasets/../../etc"], BUNDLE_MANIFEST)
    with pytest.raises(FetchError, match="not a data bundle"):
        plan_tree("s3://b/p/", ["datasets/a"], BUNDLE_MANIFEST)


def test_missing_data_is_named_per_task(tmp_path: object) -> None:
    from pathlib import Path

    root = Path(str(tmp_path))
    (root / BUNDLE_MANIFEST).write_text(
        json.dumps({"version": 1, "datasets": [{"path": "openai/gsm8k", "name": "main"}]})
    )
    (root / "datasets" / "openai___gsm8k").mkdir(parents=True)
    manifest = read_manifest(root)
    ok = TaskNeeds("gsm8k", ("gsm8k",), (DatasetRef("openai/gsm8k", "main"),))
    assert missing_for(ok, manifest, root) == []
    needs = TaskNeeds(
        "ifeval", ("ifeval",), (DatasetRef("google/IFEval"),), ("tokenizers/punkt_tab",)
    )
    problems = missing_for(needs, manifest, root)
    assert len(problems) == 2 and all("'ifeval'" in p for p in problems)
    assert "google/IFEval" in problems[0] and "punkt_tab" in problems[1]
