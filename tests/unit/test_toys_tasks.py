"""The synthetic tasks: correct answers, a closed alphabet, fixed test splits, clean streams."""

import itertools
import random

import pytest

from mergerunner.toys.tasks import (
    ALPHABET,
    END,
    TASKS,
    eval_split,
    sample_add,
    sample_max,
    sample_rev,
    sample_sort,
    training_stream,
    training_text,
)

pytestmark = pytest.mark.unit


def test_answers_are_correct() -> None:
    rng = random.Random(0)
    for _ in range(200):
        add = sample_add(rng)
        left, right = add.prompt.removesuffix("=").split("+")
        assert int(add.answer) == int(left) + int(right)
        rev = sample_rev(rng)
        assert rev.answer == rev.prompt.removeprefix("rev ").removesuffix("=")[::-1]
        srt = sample_sort(rng)
        assert srt.answer == "".join(sorted(srt.prompt.removeprefix("sort ").removesuffix("=")))


def test_multiple_choice_label_points_at_the_answer() -> None:
    rng = random.Random(1)
    for _ in range(200):
        example = sample_max(rng)
        assert example.choices[example.label] == example.answer
        assert int(example.answer) == max(int(c) for c in example.choices)
        assert example.to_json()["label"] == example.label


@pytest.mark.parametrize("name", sorted(TASKS))
def test_examples_fit_the_tokenizer_and_the_generation_budget(name: str) -> None:
    task = TASKS[name]
    for example in eval_split(task, 200):
        assert set(example.prompt + example.answer + END) <= set(ALPHABET)
        assert example.prompt.endswith("=") and END not in example.prompt
        assert 0 < len(example.answer) <= task.max_gen_toks


@pytest.mark.parametrize("name", sorted(TASKS))
def test_eval_split_is_fixed_and_distinct(name: str) -> None:
    first = eval_split(TASKS[name], 200)
    assert first == eval_split(TASKS[name], 200)
    assert len({example.prompt for example in first}) == 200
    assert eval_split(TASKS[name], 50) == first[:50]


def test_metric_keys_follow_the_output_type() -> None:
    assert TASKS["toy_add"].metric == "exact_match,none"
    assert TASKS["toy_max"].metric == "acc,none"
    assert any(task.output_type == "multiple_choice" for task in TASKS.values())


def test_training_stream_is_deterministic_and_respects_the_mixture() -> None:
    mixture = {"toy_add": 3.0, "toy_rev": 1.0, "toy_sort": 0.0}
    first = list(itertools.islice(training_stream(mixture, seed=7), 400))
    again = list(itertools.islice(training_stream(mixture, seed=7), 400))
    other = list(itertools.islice(training_stream(mixture, seed=8), 400))
    assert first == again
    assert first != other
    adds = sum(example.prompt[0].isdigit() for example in first)
    revs = sum(example.prompt.startswith("rev ") for example in first)
    assert adds + revs == 400
    assert 250 < adds < 350  # about three quarters


def test_training_stream_never_yields_test_prompts() -> None:
    banned = {example.prompt for example in eval_split(TASKS["toy_add"], 200)}
    stream = training_stream({"toy_add": 1.0}, seed=3, exclude=banned)
    assert not any(next(stream).prompt in banned for _ in range(3000))


def test_training_stream_rejects_bad_mixtures() -> None:
    with pytest.raises(ValueError, match="positive weight"):
        next(training_stream({"toy_add": 0.0}, seed=0))
    with pytest.raises(ValueError, match="unknown"):
        next(training_stream({"toy_nope": 1.0}, seed=0))


def test_training_text_ends_answers_with_the_stop_string() -> None:
    prompt, completion = training_text(sample_rev(random.Random(2)))
    assert completion.endswith(END)
    assert not prompt.endswith(END)
