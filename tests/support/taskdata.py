"""Tiny local copies of the data lm-eval's own registry tasks read, in the real schemas.

No hub is reachable here, so tests write a few rows per split with the columns the real
datasets have (openai/gsm8k `main`: question/answer with `#### N`; google-research-datasets/mbpp
`full`: task_id/text/code/test_list/...; google/IFEval: key/prompt/instruction_id_list/kwargs;
TAUR-Lab/MuSR: narrative/question/choices/answer_index/answer_choice, one split per subtask),
laid out as on the hub (`[CONFIG/]SPLIT.jsonl`), and an NLTK `punkt_tab` in NLTK's own format.
lm-eval's task YAMLs are used as installed, never copied.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

GSM8K = "openai/gsm8k"
MBPP = "google-research-datasets/mbpp"
IFEVAL = "google/IFEval"
MUSR = "TAUR-Lab/MuSR"
PAPER_TASKS = ("gsm8k", "mbpp", "ifeval", "leaderboard_musr")
BUNDLE_ENV_KEYS = (
    "HF_HOME",
    "HF_DATASETS_CACHE",
    "NLTK_DATA",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
)


@pytest.fixture(scope="module")
def restored_env() -> Iterator[None]:
    """Activating a bundle points this process's HF/NLTK variables at it; put them back."""
    with pytest.MonkeyPatch.context() as patch:
        for key in BUNDLE_ENV_KEYS:
            if key in os.environ:
                patch.setenv(key, os.environ[key])
            else:
                patch.delenv(key, raising=False)
        yield


def _write(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def gsm8k_rows(n: int, offset: int = 0) -> list[dict[str, Any]]:
    rows = []
    for i in range(offset, offset + n):
        a, b = i + 2, 2 * i + 3
        rows.append(
            {
                "question": f"Ann has {a} apples and buys {b} more. How many apples has she?",
                "answer": f"She has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
            }
        )
    return rows


def mbpp_rows(n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        k = i + 1
        rows.append(
            {
                "task_id": 11 + i,
                "text": f"Write a function to add {k} to a number.",
                "code": f"def add_{k}(x):\r\n  return x + {k}",
                "test_list": [
                    f"assert add_{k}(1) == {1 + k}",
                    f"assert add_{k}(0) == {k}",
                    f"assert add_{k}(-{k}) == 0",
                ],
                "test_setup_code": "",
                "challenge_test_list": [],
            }
        )
    return rows


def ifeval_rows(n: int) -> list[dict[str, Any]]:
    empty = {"num_words": None, "relation": None, "num_highlights": None, "language": None}
    rows = []
    for i in range(n):
        rows.append(
            {
                "key": 1000 + i,
                "prompt": f"Write about the number {i} in lowercase letters only.",
                "instruction_id_list": [
                    "change_case:english_lowercase",
                    "length_constraints:number_words",
                ],
                "kwargs": [dict(empty), {**empty, "num_words": 2, "relation": "at least"}],
            }
        )
    return rows


def musr_rows(n: int, kind: str) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        choices = [f"{kind} suspect {j}" for j in range(2 + i % 2)]
        answer = i % len(choices)
        rows.append(
            {
                "narrative": f"A short story about {kind} number {i}.",
                "question": "Who is it?",
                "choices": repr(choices),
                "answer_index": answer,
                "answer_choice": choices[answer],
            }
        )
    return rows


def write_sources(root: Path, n: int = 4) -> dict[str, Path]:
    """Hub-shaped local copies of the four datasets; returns dataset path -> folder."""
    sources = {
        GSM8K: root / "gsm8k",
        MBPP: root / "mbpp",
        IFEVAL: root / "ifeval",
        MUSR: root / "musr",
    }
    _write(sources[GSM8K] / "main" / "train.jsonl", gsm8k_rows(n, offset=100))
    _write(sources[GSM8K] / "main" / "test.jsonl", gsm8k_rows(n))
    _write(sources[MBPP] / "full" / "test.jsonl", mbpp_rows(n))
    _write(sources[IFEVAL] / "train.jsonl", ifeval_rows(n))
    for kind in ("murder_mysteries", "object_placements", "team_allocation"):
        _write(sources[MUSR] / f"{kind}.jsonl", musr_rows(n, kind))
    return sources


def write_punkt_tab(nltk_root: Path) -> Path:
    """An English `punkt_tab` in NLTK's format (parameters learned from nothing: it splits
    sentences at every period), enough for ifeval's tokenisation."""
    english = nltk_root / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True, exist_ok=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (english / name).write_text("")
    return nltk_root


def source_args(sources: dict[str, Path]) -> list[str]:
    return [arg for path, folder in sources.items() for arg in ("--source", f"{path}={folder}")]


def build_bundle(out: Path, scratch: Path, tasks: Iterable[str] = PAPER_TASKS) -> Path:
    """`mergesearch datasets pack TASKS -o OUT` from local copies written under `scratch`."""
    from mergesearch.cli.main import main

    sources = write_sources(scratch / "sources")
    nltk = write_punkt_tab(scratch / "nltk")
    args = ["datasets", "pack", *tasks, "-o", str(out), *source_args(sources)]
    if main([*args, "--nltk-source", str(nltk)]) != 0:
        raise RuntimeError(f"packing {list(tasks)} failed")
    return out
