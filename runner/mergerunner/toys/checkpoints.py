"""Train a preset's stages in lineage order and save each as a Hugging Face checkpoint."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from mergerunner.toys.model import new_model
from mergerunner.toys.presets import Preset, Stage
from mergerunner.toys.tasks import TASKS, eval_split, training_stream
from mergerunner.toys.tokenizer import save_tokenizer
from mergerunner.toys.training import Schedule, train

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

# One thread: single-threaded CPU kernels make a build bit-for-bit repeatable, and on a shared
# two-core machine a second OpenMP thread mostly spins while waiting for a busy core.
TRAIN_THREADS = 1


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Limit torch's intra-op threads, restoring the caller's setting afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def excluded_prompts(recipe: Preset) -> set[str]:
    """Every evaluation prompt of the preset's tasks, kept out of all training data."""
    return {
        example.prompt
        for name in recipe.tasks
        for example in eval_split(TASKS[name], recipe.eval_examples)
    }


def train_stages(
    recipe: Preset, log: Callable[[str], None]
) -> Iterator[tuple[Stage, LlamaForCausalLM, dict[str, float]]]:
    """Yield (stage, trained model, summary) in order; parents are kept in memory (tiny)."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    exclude = excluded_prompts(recipe)
    with torch_threads(TRAIN_THREADS):
        for stage in recipe.stages:
            started = time.monotonic()
            model = new_model(recipe.model, recipe.init_seed)
            if stage.parent is not None:
                model.load_state_dict(states[stage.parent])
            stream = training_stream(stage.mixture, stage.seed, exclude)
            schedule = Schedule(stage.lr, stage.steps, stage.warmup)
            losses = train(model, stream, schedule, recipe.batch_size)
            states[stage.name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            tail = losses[-20:]
            summary = {
                "final_loss": round(sum(tail) / len(tail), 4),
                "train_seconds": round(time.monotonic() - started, 1),
            }
            log(f"trained {stage.name}: {stage.steps} steps, loss {summary['final_loss']}")
            yield stage, model, summary


def save_checkpoint(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, out_dir: Path
) -> None:
    """config.json, generation_config.json, model.safetensors and the tokenizer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir)
