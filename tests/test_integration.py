"""sparsify/unsparsify on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

import spotattn
from spotattn import OracleConfig, SparseCache, TopK, TopP
from spotattn.cache import MetaEntry
from spotattn.integration import STATE_ATTR, output_cache

UNLIMITED = OracleConfig(budget=TopK(1 << 20), block_size=16)


def left_padded_batch(vocab=97, length=75, pad=(0, 19), seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = torch.randint(1, vocab, (len(pad), length), generator=gen)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pad):
        mask[row, :n] = 0
    return ids, mask


def valid_logits(logits, mask):
    return logits[mask.bool()]


def test_unlimited_budget_equals_dense_logits(family_model):
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = family_model(ids, attention_mask=mask).logits
        spotattn.sparsify(family_model, UNLIMITED)
        out = family_model(ids, attention_mask=mask)
    assert isinstance(output_cache(out), SparseCache)
    assert torch.allclose(valid_logits(out.logits, mask), valid_logits(ref, mask), atol=1e-4)
    report = spotattn.density(family_model)
    assert report.per_layer.shape == (2, 2) and abs(report.mean - 1.0) < 1e-9


def test_unlimited_budget_generate_token_for_token(family_model):
    ids, mask = left_padded_batch(length=40, pad=(0, 9))
    kwargs = dict(attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    with torch.no_grad():
        greedy = family_model.generate(ids, do_sample=False, **kwargs)
        torch.manual_seed(3)
        sampled = family_model.generate(ids, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, **kwargs)
        spotattn.sparsify(family_model, UNLIMITED)
        assert torch.equal(family_model.generate(ids, do_sample=False, **kwargs), greedy)
        torch.manual_seed(3)
        again = family_model.generate(ids, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, **kwargs)
    assert torch.equal(again, sampled)
    assert spotattn.density(family_model, "decode").tokens_read > 0


def test_sparse_budget_reads_less_and_matches_reference_kernel():
    model = tiny_model("llama", seed=0)
    ids, mask = left_padded_batch(length=200, pad=(0, 30), seed=1)
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        spotattn.sparsify(model, OracleConfig(budget=TopP(0.5), block_size=16))
        sparse = model(ids, attention_mask=mask).logits
    report = spotattn.density(model, "prefill")
    assert 0.1 < report.mean < 0.95
    assert not torch.allclose(valid_logits(sparse, mask), valid_logits(dense, mask), atol=1e-3)
    assert torch.isfinite(sparse).all()
    spotattn.reset_density(model)
    assert spotattn.density(model).tokens_available == 0


def test_unsparsify_restores_model():
    model = tiny_model("qwen3", seed=0)
    before = model.config._attn_implementation
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        spotattn.sparsify(model, OracleConfig(budget=TopK(32), block_size=16))
        spotattn.unsparsify(model)
        out = model(ids, attention_mask=mask).logits
    assert model.config._attn_implementation == before
    assert not any(hasattr(m, STATE_ATTR) for m in model.modules())
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="not sparsified"):
        spotattn.unsparsify(model)


def _snapshot(model):
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    return model.config._attn_implementation, hooks, any(hasattr(m, STATE_ATTR) for m in model.modules())


def test_unsupported_model_is_named_and_untouched():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    before = _snapshot(model)
    with pytest.raises(ValueError, match="does not support model type 'gpt2'.*llama, mistral, qwen2, qwen3"):
        spotattn.sparsify(model, UNLIMITED)
    assert _snapshot(model) == before


def test_config_that_does_not_fit_leaves_model_unchanged():
    model = tiny_model("llama")
    model.config.max_position_embeddings = 1000  # not a multiple of 16
    before = _snapshot(model)
    with pytest.raises(ValueError, match="block_size=16 does not divide the model's context window"):
        spotattn.sparsify(model, UNLIMITED)
    assert _snapshot(model) == before


def test_failure_midway_is_rolled_back(monkeypatch):
    model = tiny_model("mistral")
    before = _snapshot(model)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(model, "set_attn_implementation", broken)
    with pytest.raises(RuntimeError, match="boom"):
        spotattn.sparsify(model, UNLIMITED)
    assert _snapshot(model) == before
    assert not hasattr(model, "_spotattn")


def test_double_sparsify_and_bad_arguments():
    model = tiny_model("qwen2")
    with pytest.raises(TypeError, match="MethodConfig or a method name"):
        spotattn.sparsify(model, 0.5)
    with pytest.raises(ValueError, match="unknown method"):
        spotattn.sparsify(model, "quantum")
    spotattn.sparsify(model, "dense")
    with pytest.raises(ValueError, match="already sparsified"):
        spotattn.sparsify(model, "dense")
    with pytest.raises(ValueError, match="phase must be one of"):
        spotattn.density(model, "both")


def test_padding_inside_sequence_is_rejected():
    model = tiny_model("llama")
    spotattn.sparsify(model, UNLIMITED)
    ids = torch.randint(1, 97, (1, 20))
    mask = torch.ones_like(ids)
    mask[0, 5] = 0
    with pytest.raises(ValueError, match="left padding"):
        model(ids, attention_mask=mask)


def test_cache_metadata_follows_crop_and_reorder():
    cache = SparseCache()
    keys = torch.randn(3, 2, 40, 8)
    cache.update(keys, keys.clone(), 0)
    meta = cache.meta(0)
    meta["per_token"] = MetaEntry(torch.arange(3 * 40).view(3, 1, 40, 1).float())
    meta["per_block"] = MetaEntry(torch.arange(3 * 3).view(3, 1, 3, 1).float(), tokens_per_entry=16)
    cache.crop(-9)  # 31 tokens left: 31 per-token rows, 2 blocks
    assert meta["per_token"].tensor.shape[2] == 31 and meta["per_block"].tensor.shape[2] == 2
    cache.batch_select_indices(torch.tensor([2, 0]))
    assert meta["per_token"].tensor[:, 0, 0, 0].tolist() == [80.0, 0.0]
    cache.batch_repeat_interleave(2)
    assert meta["per_block"].tensor.shape[0] == 4 and cache.layers[0].keys.shape[0] == 4
    cache.reorder_cache(torch.tensor([3, 2, 1, 0]))
    assert meta["per_token"].tensor[:, 0, 0, 0].tolist() == [0.0, 0.0, 80.0, 80.0]


def test_compose_runs_each_phase_with_its_own_method():
    from spotattn import ComposeConfig, DenseConfig

    model = tiny_model("llama", seed=0)
    ids, mask = left_padded_batch(length=160, pad=(0, 21), seed=2)
    config = ComposeConfig(prefill=OracleConfig(budget=TopP(0.5), block_size=16), decode=DenseConfig())
    with torch.no_grad():
        spotattn.sparsify(model, config)
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert spotattn.density(model, "prefill").mean < 0.95
    assert abs(spotattn.density(model, "decode").mean - 1.0) < 1e-9
    spotattn.unsparsify(model)
    unlimited = ComposeConfig(prefill=UNLIMITED, decode=UNLIMITED)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        spotattn.sparsify(model, unlimited)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
