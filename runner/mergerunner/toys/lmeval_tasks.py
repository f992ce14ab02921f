"""lm-eval task definitions for the toy tasks: one YAML and one JSONL test split per task.

lm-eval hands `data_files` to `datasets.load_dataset` unchanged, which resolves relative paths
against the process's working directory, not the YAML's folder. So the YAMLs name their JSONL by
absolute path, and `write_task_yamls` can re-point them when a pool directory has moved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mergerunner.toys.tasks import END, TASKS, Task, eval_split

TASK_VERSION = 1.0


class _Dumper(yaml.SafeDumper):
    """Writes strings holding control characters double-quoted ("\\n"), readable by people."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if any(char in value for char in "\n\t\r") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def dump_yaml(config: dict[str, Any]) -> str:
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def task_config(task: Task, jsonl_path: Path) -> dict[str, Any]:
    """The lm-eval config of one task, zero-shot, scored on the whole local test split."""
    config: dict[str, Any] = {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(jsonl_path)}},
        "test_split": "test",
        "output_type": task.output_type,
        "doc_to_text": "{{prompt}}",
        "target_delimiter": "",
        "num_fewshot": 0,
    }
    if task.output_type == "multiple_choice":
        config |= {
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
    else:
        config |= {
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {
                "until": [END],
                "do_sample": False,
                "temperature": 0.0,
                "max_gen_toks": task.max_gen_toks,
            },
            "metric_list": [
                {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}
            ],
        }
    config["metadata"] = {"version": TASK_VERSION, "description": task.description}
    return config


def write_task_split(task: Task, tasks_dir: Path, n_examples: int) -> Path:
    """The fixed test split as JSONL, one example per line."""
    path = tasks_dir / f"{task.name}.jsonl"
    rows = (
        json.dumps(example.to_json(), sort_keys=True) for example in eval_split(task, n_examples)
    )
    path.write_text("".join(f"{row}\n" for row in rows))
    return path


def write_task_yaml(task: Task, tasks_dir: Path, jsonl_path: Path) -> Path:
    path = tasks_dir / f"{task.name}.yaml"
    path.write_text(dump_yaml(task_config(task, jsonl_path)))
    return path


def write_tasks(task_names: list[str], tasks_dir: Path, final_dir: Path, n_examples: int) -> None:
    """Write JSONL splits into `tasks_dir` and YAMLs that point at them under `final_dir`.

    `final_dir` differs from `tasks_dir` while a pool is built in a temporary folder that is
    renamed into place at the end.
    """
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for name in task_names:
        task = TASKS[name]
        write_task_split(task, tasks_dir, n_examples)
        write_task_yaml(task, tasks_dir, final_dir.resolve() / f"{name}.jsonl")


def write_task_yamls(task_names: list[str], tasks_dir: Path) -> bool:
    """Re-point the YAMLs at the JSONL files in `tasks_dir`; True when any had to change."""
    changed = False
    for name in task_names:
        task = TASKS[name]
        jsonl = tasks_dir.resolve() / f"{name}.jsonl"
        path = tasks_dir / f"{name}.yaml"
        wanted = dump_yaml(task_config(task, jsonl))
        if not path.exists() or path.read_text() != wanted:
            path.write_text(wanted)
            changed = True
    return changed
