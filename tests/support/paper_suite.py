"""The paper's task suite as the tests run it (gsm8k and mbpp with code allowed, the
leaderboard_musr group held in, ifeval held out, instruct evaluation), in local mode, on the
cluster and through the runner alone: the chat template and system instruction, the evaluator
settings and task lists, and the checkpoints made for it — an instruct copy (a chat template in
its tokenizer) and one whose embedding has another shape.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SYSTEM = "You are a careful solver."
EVALUATOR: dict[str, Any] = {
    "device": "cpu",
    "batchSize": 4,
    "applyChatTemplate": True,
    "systemInstruction": SYSTEM,
    "genKwargs": {"max_gen_toks": 4},
}
HELD_IN: list[dict[str, Any]] = [
    {"task": "gsm8k", "metric": "exact_match,strict-match", "limit": 2, "numFewshot": 0},
    {"task": "mbpp", "metric": "pass_at_1", "limit": 2, "numFewshot": 0},
    {"task": "leaderboard_musr", "metric": "acc_norm", "limit": 2},
]
HELD_OUT: list[dict[str, Any]] = [
    {"task": "ifeval", "metric": "prompt_level_strict_acc", "limit": 2}
]


def with_chat_template(source: Path, out: Path) -> Path:
    """A copy of the checkpoint whose tokenizer carries TEMPLATE, as instruct models' do."""
    shutil.copytree(source, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def wider(source: Path, target: Path) -> Path:
    """A copy of `source` whose embedding is one row longer: the header says so, and the file
    is sparse (its weights were never written), so only a header reader can get through it."""
    header_len = int.from_bytes((source / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((source / "model.safetensors").read_bytes()[8 : 8 + header_len])
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors"))
    offset = 0
    for name in sorted(k for k in header if k != "__metadata__"):
        entry = header[name]
        shape = list(entry["shape"])
        if name.endswith("embed_tokens.weight"):
            shape[0] += 1
        size = 4
        for d in shape:
            size *= d
        entry.update(shape=shape, dtype="F32", data_offsets=[offset, offset + size])
        offset += size
    raw = json.dumps(header).encode()
    with (target / "model.safetensors").open("wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        handle.truncate(8 + len(raw) + offset)
    return target
