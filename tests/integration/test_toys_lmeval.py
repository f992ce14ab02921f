"""The cached mini pool, loaded the way users load it and scored by lm-eval, offline."""

import os

import pytest

from mergerunner.toys import Pool
from mergerunner.toys.evaluate import evaluate_pool, load_checkpoint, pick_scores

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMIT = 100


@pytest.fixture(scope="module")
def scores(toy_pool: Pool) -> dict[str, dict[str, float]]:
    return evaluate_pool(toy_pool, limit=LIMIT)


def test_checkpoint_loads_with_auto_classes_and_answers(toy_pool: Pool) -> None:
    import torch

    model, tokenizer = load_checkpoint(toy_pool.checkpoints["sft-sort"])
    assert type(model).__name__ == "LlamaForCausalLM"
    inputs = tokenizer(["sort 8312="], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.split("\n")[0] == "1238"


def test_specialists_beat_the_base_on_their_own_task(
    toy_pool: Pool, scores: dict[str, dict[str, float]]
) -> None:
    stages = {c["name"]: c for c in toy_pool.manifest()["checkpoints"]}
    checked = 0
    for name, stage in stages.items():
        own = [task for task, weight in stage["mixture"].items() if weight > 0.5]
        if stage["parent"] is None or not own:
            continue
        assert scores[name][own[0]] > scores["base"][own[0]] + 0.1, (name, scores)
        checked += 1
    assert checked >= 2


def test_checkpoints_trade_tasks_off(toy_pool: Pool, scores: dict[str, dict[str, float]]) -> None:
    rows = {name: tuple(row[t] for t in toy_pool.tasks) for name, row in scores.items()}
    assert len(set(rows.values())) == len(rows), rows
    best = {task: max(scores, key=lambda n, t=task: scores[n][t]) for task in toy_pool.heldin}
    assert len(set(best.values())) > 1, f"one checkpoint wins every held-in task: {best}"
    for name, row in scores.items():
        assert all(0.0 <= value <= 1.0 for value in row.values()), name


def test_task_manager_with_default_tasks_agrees(
    toy_pool: Pool, scores: dict[str, dict[str, float]]
) -> None:
    """The YAMLs also work next to lm-eval's built-in tasks (include_path, defaults on)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = load_checkpoint(toy_pool.checkpoints["base"])
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=32)
    output = simple_evaluate(
        model=lm,
        tasks=list(toy_pool.tasks),
        task_manager=TaskManager(include_path=str(toy_pool.tasks_dir)),
        limit=LIMIT,
        bootstrap_iters=0,
    )
    assert output is not None
    assert pick_scores(output["results"], toy_pool.tasks) == pytest.approx(scores["base"])
