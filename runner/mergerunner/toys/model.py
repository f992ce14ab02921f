"""The toy architecture: a small Llama, so merges and evaluation run through stock transformers."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from mergerunner.toys.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM


@dataclass(frozen=True)
class ModelSpec:
    """The few knobs of the architecture that a preset chooses."""

    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 64

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def llama_config(spec: ModelSpec) -> LlamaConfig:
    """Untied embeddings so every tensor is stored on its own, as mergers expect of big models."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        attention_dropout=0.0,
    )


def new_model(spec: ModelSpec, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model; the init depends only on `seed` (the shared lineage)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(spec))
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    return model


def parameter_count(model: LlamaForCausalLM) -> int:
    return sum(p.numel() for p in model.parameters())
