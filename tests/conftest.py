"""Shared fixtures: a real tokenizer (SmolLM2's, from the embedded model) and tiny Llama models built from a
config, so unit tests run in seconds on a CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from rltk.models import DEFAULT_MODEL, load_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2-135M-Instruct's tokenizer (with its chat template), from the rltk model cache."""
    return load_tokenizer(DEFAULT_MODEL)


def make_tiny_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """A 2-layer Llama with SmolLM2's vocabulary, random weights, fp32, eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    return model


@pytest.fixture
def tiny_model(tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A fresh tiny model per test (seeded, so identical across tests)."""
    return make_tiny_model(tokenizer)
