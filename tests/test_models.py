"""load_model: random shapes, the offline alias, and clear errors."""

from __future__ import annotations

import pytest
import torch

import spotattn
from spotattn.models import RANDOM_SHAPES, cache_dir


def test_random_shape_has_the_real_geometry():
    model, tokenizer = spotattn.load_model("random:qwen3-8b", device="meta", num_layers=2)
    config = model.config
    assert tokenizer is None and config.model_type == "qwen3"
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 128)
    assert config.hidden_size == 4096 and config.num_hidden_layers == 2
    small, _ = spotattn.load_model("random:smollm2-135m", device="cpu", num_layers=1)
    ids = torch.randint(0, 100, (1, 12))
    spotattn.sparsify(small, "dense")
    assert small(ids).logits.shape == (1, 12, RANDOM_SHAPES["smollm2-135m"]["vocab_size"])


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="unknown random shape 'qwen9'; available"):
        spotattn.load_model("random:qwen9")
    with pytest.raises(ValueError, match="num_layers applies only to random"):
        spotattn.load_model("smollm2-135m", num_layers=2)
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        spotattn.load_model("/nonexistent/model.gguf")
    with pytest.raises(ValueError, match="dtype must be one of"):
        spotattn.load_model("random:smollm2-135m", dtype="float8")


@pytest.mark.slow
def test_offline_alias_is_cached_and_answers(smollm2):
    model, tokenizer = smollm2
    assert (cache_dir() / "smollm2-135m" / "model.safetensors").exists()
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 3
    from spotattn.cli import encode_prompt

    ids = encode_prompt(tokenizer, "What is the capital of France?", chat=True)
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
