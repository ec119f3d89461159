"""Shared fixtures: tiny random models of every supported family, and the real offline SmolLM2."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_model(family: str, *, heads: int = 4, kv_heads: int = 2, layers: int = 2, seed: int | None = None):
    """A small random model of ``family`` (float32, eval mode)."""
    if seed is not None:
        torch.manual_seed(seed)
    extra = {"sliding_window": None} if family == "mistral" else {}
    config = AutoConfig.for_model(
        family, vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64 // heads,
        max_position_embeddings=1024, **extra,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(params=FAMILIES)
def family_model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct and its tokenizer (converted once, then cached)."""
    import spotattn

    return spotattn.load_model("smollm2-135m", device="cpu")
