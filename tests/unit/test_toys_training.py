"""Training pieces: loss masking, padding, the schedule, and bit-for-bit repeatable runs."""

import itertools

import pytest

from mergerunner.toys.model import ModelSpec, new_model, parameter_count
from mergerunner.toys.tasks import TASKS, eval_split, training_stream
from mergerunner.toys.tokenizer import PAD_ID
from mergerunner.toys.training import IGNORE, Schedule, collate, train

pytestmark = pytest.mark.unit

TINY = ModelSpec(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)


def test_collate_pads_right_and_masks_padding_and_prompts() -> None:
    examples = eval_split(TASKS["toy_rev"], 8)
    batch = collate(examples)
    width = batch["input_ids"].shape[1]
    for row, example in enumerate(examples):
        length = len(example.prompt) + len(example.answer) + 3  # BOS, newline, EOS
        assert int(batch["attention_mask"][row].sum()) == length
        assert batch["input_ids"][row, length:].eq(PAD_ID).all()
        assert batch["labels"][row, length:].eq(IGNORE).all()
        assert int(batch["labels"][row].ne(IGNORE).sum()) == len(example.answer) + 2
    assert width == max(len(e.prompt) + len(e.answer) + 3 for e in examples)


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    schedule = Schedule(peak_lr=1.0, steps=100, warmup=10, floor=0.1)
    assert schedule.lr(0) == pytest.approx(0.1)
    assert schedule.lr(9) == pytest.approx(1.0)
    assert schedule.lr(55) < schedule.lr(20)
    assert schedule.lr(100) == pytest.approx(0.1)


def _run(seed: int) -> tuple[list[float], dict]:
    model = new_model(TINY, seed=1)
    stream = training_stream({"toy_add": 1.0, "toy_rev": 1.0}, seed=seed)
    losses = train(model, stream, Schedule(1e-2, 4, 1), batch_size=8)
    return losses, model.state_dict()


def test_training_is_repeatable_and_learns() -> None:
    losses, state = _run(seed=5)
    again, state_again = _run(seed=5)
    other, _ = _run(seed=6)
    assert losses == again
    assert all(state[k].equal(state_again[k]) for k in state)
    assert losses != other
    assert losses[-1] < losses[0]


def test_init_depends_only_on_the_seed() -> None:
    first, second = new_model(TINY, seed=3), new_model(TINY, seed=3)
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert all(a.equal(b) for a, b in pairs)
    assert parameter_count(first) > 0
    assert not first.config.tie_word_embeddings


def test_stream_batches_are_small_enough_for_the_position_budget() -> None:
    stream = training_stream({name: 1.0 for name in TASKS}, seed=0)
    batch = collate(list(itertools.islice(stream, 256)))
    assert batch["input_ids"].shape[1] <= ModelSpec().max_positions
