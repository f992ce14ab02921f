"""Plain-torch training of the toy models on CPU: encoding, batching, the optimisation loop.

The loss covers only the answer (and its terminator): the prompts are random by construction,
and learning to predict them would spend the tiny budget on noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mergerunner.toys.tasks import Example, training_text
from mergerunner.toys.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM

IGNORE = -100


def encode_chars(text: str) -> list[int]:
    """Character ids without specials; must agree with the saved tokenizer (tested)."""
    return [VOCAB[char] for char in text]


def encode_example(example: Example) -> tuple[list[int], list[int]]:
    """(input ids, labels): BOS + prompt + completion + EOS, labels only on the completion."""
    prompt, completion = training_text(example)
    prompt_ids = [BOS_ID, *encode_chars(prompt)]
    completion_ids = [*encode_chars(completion), EOS_ID]
    labels = [IGNORE] * len(prompt_ids) + completion_ids
    return prompt_ids + completion_ids, labels


def collate(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Right-padded tensors for a causal LM; padding is masked out of attention and loss."""
    import torch

    pairs = [encode_example(example) for example in examples]
    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(pairs):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up, then cosine decay to `floor` of the peak learning rate."""

    peak_lr: float
    steps: int
    warmup: int
    floor: float = 0.1

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.peak_lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return self.peak_lr * (self.floor + (1.0 - self.floor) * cosine)


def train(
    model: LlamaForCausalLM,
    stream: Iterator[Example],
    schedule: Schedule,
    batch_size: int,
) -> list[float]:
    """Run the loop in place on `model`; returns the loss of every step.

    AdamW starts fresh at every stage, as a new fine-tuning run would.
    """
    import torch

    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=schedule.peak_lr, betas=(0.9, 0.98), weight_decay=0.01
    )
    losses: list[float] = []
    for step in range(schedule.steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(step)
        batch = collate([next(stream) for _ in range(batch_size)])
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
