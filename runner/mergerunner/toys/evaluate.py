"""Score toy checkpoints with lm-evaluation-harness on the pool's local task YAMLs, offline."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergerunner.toys.checkpoints import torch_threads
from mergerunner.toys.pool import Pool

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EVAL_THREADS = 2
EVAL_BATCH_SIZE = 64


def _offline() -> None:
    """Nothing here may reach a hub: the tasks and models are all local."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_checkpoint(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer through the Auto classes, as any user of the pool would load them."""
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer


def run_lm_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks_dir: Path,
    tasks: list[str],
    limit: int | None = None,
) -> dict[str, dict[str, Any]]:
    """lm-eval's per-task results for an in-memory model (e.g. a merge that was never saved)."""
    _offline()
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with torch_threads(EVAL_THREADS):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=EVAL_BATCH_SIZE, device="cpu")
        manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        output = simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
        )
    if output is None:
        raise RuntimeError("lm-eval returned no results")
    return output["results"]


def pick_scores(
    results: Mapping[str, Mapping[str, Any]], metrics: Mapping[str, str]
) -> dict[str, float]:
    """The one number per task that the pool names as its metric."""
    return {task: float(results[task][metric]) for task, metric in metrics.items()}


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pool: Pool,
    limit: int | None = None,
) -> dict[str, float]:
    results = run_lm_eval(model, tokenizer, pool.tasks_dir, list(pool.tasks), limit)
    return pick_scores(results, pool.tasks)


def evaluate_pool(pool: Pool, limit: int | None = None) -> dict[str, dict[str, float]]:
    """Score of every checkpoint on every task: {checkpoint: {task: score}}."""
    table: dict[str, dict[str, float]] = {}
    for name, path in pool.checkpoints.items():
        model, tokenizer = load_checkpoint(path)
        table[name] = evaluate_model(model, tokenizer, pool, limit)
    return table


def format_table(table: Mapping[str, Mapping[str, float]], pool: Pool) -> str:
    """A plain-text table; held-out columns are marked with '*'."""
    columns = [*pool.heldin, *(f"{task}*" for task in pool.heldout)]
    tasks = list(pool.tasks)
    width = max(len(name) for name in [*table, "checkpoint"])
    header = "checkpoint".ljust(width) + "".join(f"  {c:>10}" for c in columns)
    header += f"  {'heldin_avg':>10}"
    lines = [header, "-" * len(header)]
    for name, scores in table.items():
        heldin_avg = sum(scores[t] for t in pool.heldin) / len(pool.heldin)
        cells = "".join(f"  {scores[t]:>10.3f}" for t in tasks)
        lines.append(f"{name.ljust(width)}{cells}  {heldin_avg:>10.3f}")
    return "\n".join(lines)
