"""Synthetic tasks the toy models learn: pure, seeded example generators.

Every prompt starts with a short keyword so that one character-level model can tell the tasks
apart, ends with "=" (no trailing space: lm-eval moves trailing spaces into the continuation),
and has a single short answer, so greedy decoding can be scored by exact match. Answers are
terminated by a newline in training; the lm-eval tasks stop generating there.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

# The characters every task draws from; the tokenizer's vocabulary is built from this.
ALPHABET = string.digits + string.ascii_lowercase + " +=\n"
END = "\n"


@dataclass(frozen=True)
class Example:
    """One prompt and its answer; `choices`/`label` are set for multiple-choice tasks."""

    prompt: str
    answer: str
    choices: tuple[str, ...] = ()
    label: int = -1

    def to_json(self) -> dict[str, object]:
        """The JSONL row lm-eval reads (fields named in the task YAML)."""
        row: dict[str, object] = {"prompt": self.prompt, "answer": self.answer}
        if self.choices:
            row["choices"] = list(self.choices)
            row["label"] = self.label
        return row


Sampler = Callable[[random.Random], Example]


@dataclass(frozen=True)
class Task:
    """A synthetic task: its name, how to sample it, and how lm-eval should score it."""

    name: str
    description: str
    sample: Sampler
    output_type: str  # "generate_until" or "multiple_choice"
    max_gen_toks: int = 8

    @property
    def metric(self) -> str:
        """The key of the score in lm-eval's results for this task."""
        if self.output_type == "multiple_choice":
            return "acc,none"
        return "exact_match,none"


def _digits(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(lo, hi)))


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def sample_add(rng: random.Random) -> Example:
    """A two-digit plus a one-digit number: carries make it the hardest task for a tiny model."""
    a, b = rng.randint(10, 99), rng.randint(0, 9)
    return Example(f"{a}+{b}=", str(a + b))


def sample_rev(rng: random.Random) -> Example:
    """Reverse a lowercase word of 4 to 8 letters."""
    word = _letters(rng, 4, 8)
    return Example(f"rev {word}=", word[::-1])


def sample_sort(rng: random.Random) -> Example:
    """Sort 4 to 8 digits ascending."""
    digits = _digits(rng, 4, 8)
    return Example(f"sort {digits}=", "".join(sorted(digits)))


def sample_copy(rng: random.Random) -> Example:
    """Copy a lowercase word of 4 to 8 letters: close to `rev`, so it shows how far that drifts."""
    word = _letters(rng, 4, 8)
    return Example(f"copy {word}=", word)


def sample_max(rng: random.Random) -> Example:
    """The larger of two distinct two-digit numbers; scored as a two-way multiple choice."""
    a, b = rng.sample(range(10, 100), 2)
    label = 0 if a > b else 1
    return Example(f"max {a} {b}=", str(max(a, b)), choices=(str(a), str(b)), label=label)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "toy_add",
            "two-digit plus one-digit addition",
            sample_add,
            "generate_until",
            max_gen_toks=5,
        ),
        Task("toy_rev", "reverse a 4-8 letter word", sample_rev, "generate_until", max_gen_toks=10),
        Task("toy_sort", "sort 4-8 digits", sample_sort, "generate_until", max_gen_toks=10),
        Task("toy_copy", "copy a 4-8 letter word", sample_copy, "generate_until", max_gen_toks=10),
        Task("toy_max", "larger of two numbers (multiple choice)", sample_max, "multiple_choice"),
    )
}


def task_seed(name: str, salt: str) -> int:
    """A stable per-task seed (Python's hash() is salted per process, crc32 is not)."""
    return zlib.crc32(f"{name}/{salt}".encode())


def eval_split(task: Task, n: int) -> list[Example]:
    """The fixed evaluation examples of a task: distinct prompts, same for every build."""
    rng = random.Random(task_seed(task.name, "test"))
    seen: set[str] = set()
    examples: list[Example] = []
    while len(examples) < n:
        example = task.sample(rng)
        if example.prompt not in seen:
            seen.add(example.prompt)
            examples.append(example)
    return examples


def training_text(example: Example) -> tuple[str, str]:
    """(prompt, completion) as the model is trained on them; the loss covers the completion."""
    return example.prompt, example.answer + END


def training_stream(
    weights: dict[str, float], seed: int, exclude: Iterable[str] = ()
) -> Iterator[Example]:
    """An endless, deterministic stream drawn from a task mixture, never yielding test prompts.

    Keeping the test prompts out of training makes the scores measure skill, not memory.
    """
    names = sorted(name for name, weight in weights.items() if weight > 0)
    if not names:
        raise ValueError("a data mixture needs at least one task with positive weight")
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks in mixture: {unknown}")
    mixture = [weights[name] for name in names]
    banned = set(exclude)
    rng = random.Random(seed)
    while True:
        task = TASKS[rng.choices(names, weights=mixture)[0]]
        example = task.sample(rng)
        if example.prompt not in banned:
            yield example
