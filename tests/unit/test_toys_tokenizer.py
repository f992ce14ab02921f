"""The character-level tokenizer: loads with the Auto classes and agrees with training."""

import json
import random
from pathlib import Path

import pytest

from mergerunner.toys.tasks import ALPHABET, TASKS, eval_split, sample_sort, training_text
from mergerunner.toys.tokenizer import BOS_ID, EOS_ID, PAD_ID, build_tokenizer, save_tokenizer
from mergerunner.toys.training import encode_chars, encode_example

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(build_tokenizer(64), out)
    return out


def test_loads_with_auto_and_fast_classes(saved: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    for tokenizer in (
        AutoTokenizer.from_pretrained(saved),
        PreTrainedTokenizerFast.from_pretrained(saved),
    ):
        assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
            "<s>",
            "</s>",
            "<pad>",
        )
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
            BOS_ID,
            EOS_ID,
            PAD_ID,
        )
        assert tokenizer.model_max_length == 64
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert json.loads((saved / "special_tokens_map.json").read_text())["eos_token"] == "</s>"


def test_one_token_per_character_with_bos(saved: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(saved)
    text = ALPHABET + "rev abc=cba\n"
    ids = tokenizer(text)["input_ids"]
    assert ids == [BOS_ID, *encode_chars(text)]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(set(encode_chars(ALPHABET))) == len(ALPHABET)


def test_training_encoding_matches_the_tokenizer(saved: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(saved)
    for name in sorted(TASKS):
        for example in eval_split(TASKS[name], 20):
            prompt, completion = training_text(example)
            ids, labels = encode_example(example)
            assert ids == [*tokenizer(prompt + completion)["input_ids"], EOS_ID]
            assert labels[: len(prompt) + 1] == [-100] * (len(prompt) + 1)
            assert labels[len(prompt) + 1 :] == ids[len(prompt) + 1 :]


def test_left_padding_for_generation(saved: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(saved)
    tokenizer.padding_side = "left"
    prompts = [sample_sort(random.Random(seed)).prompt for seed in range(4)]
    batch = tokenizer(prompts, padding="longest")
    for ids, mask, prompt in zip(batch["input_ids"], batch["attention_mask"], prompts, strict=True):
        kept = [i for i, m in zip(ids, mask, strict=True) if m]
        assert kept == [BOS_ID, *encode_chars(prompt)]
        assert all(i == PAD_ID for i, m in zip(ids, mask, strict=True) if not m)
