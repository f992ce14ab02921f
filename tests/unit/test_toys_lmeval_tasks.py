"""The lm-eval task files: the fields lm-eval reads, and YAMLs that follow a moved pool."""

import json
from pathlib import Path

import pytest
import yaml

from mergerunner.toys.lmeval_tasks import task_config, write_task_yamls, write_tasks
from mergerunner.toys.tasks import TASKS

pytestmark = pytest.mark.unit


def test_generation_task_config() -> None:
    config = task_config(TASKS["toy_add"], Path("/pool/tasks/toy_add.jsonl"))
    assert config["output_type"] == "generate_until"
    assert config["target_delimiter"] == ""
    assert config["dataset_path"] == "json"
    assert config["dataset_kwargs"]["data_files"]["test"] == "/pool/tasks/toy_add.jsonl"
    kwargs = config["generation_kwargs"]
    assert kwargs["until"] == ["\n"] and kwargs["do_sample"] is False
    assert kwargs["max_gen_toks"] == TASKS["toy_add"].max_gen_toks
    assert config["metric_list"][0]["metric"] == "exact_match"


def test_multiple_choice_task_config() -> None:
    config = task_config(TASKS["toy_max"], Path("/p/toy_max.jsonl"))
    assert config["output_type"] == "multiple_choice"
    assert (config["doc_to_choice"], config["doc_to_target"]) == ("choices", "label")
    assert config["metric_list"][0]["metric"] == "acc"
    assert "generation_kwargs" not in config


def test_written_files_and_relocation(tmp_path: Path) -> None:
    names = ["toy_rev", "toy_max"]
    staging, final = tmp_path / "staging" / "tasks", tmp_path / "final" / "tasks"
    write_tasks(names, staging, final, n_examples=30)
    rows = [json.loads(line) for line in (staging / "toy_max.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and {"prompt", "answer", "choices", "label"} <= set(rows[0])
    config = yaml.safe_load((staging / "toy_rev.yaml").read_text())
    assert config["dataset_kwargs"]["data_files"]["test"] == str(final / "toy_rev.jsonl")
    assert '"\\n"' in (staging / "toy_rev.yaml").read_text()  # readable stop string

    assert write_task_yamls(names, staging) is True
    config = yaml.safe_load((staging / "toy_rev.yaml").read_text())
    assert config["dataset_kwargs"]["data_files"]["test"] == str(staging / "toy_rev.jsonl")
    assert write_task_yamls(names, staging) is False
