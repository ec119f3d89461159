"""The static cache and its sync-free decode path (spotattn.runtime): same results as the ordinary path;
on CUDA, a graph-replayed decode step equals the eager one."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import spotattn
from spotattn.cache import SparseCache
from spotattn.integration import cache_kwargs, layer_states
from spotattn.methods.spot import SpotConfig
from spotattn.runtime import GraphDecoder, StaticSparseCache, prefill_to_static, select_decode_static
from spotattn.selection import select_blocks
from spotattn.spot import Selector, config_for_model, save_selector
from spotattn.spot.checkpoint import fingerprint
from spotattn.types import DualTopP, TopK, TopP


def tiny_llama(hidden: int = 64, heads: int = 4, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def random_selector(model, tmp_path) -> str:
    selector = Selector(config_for_model(model.config))
    torch.manual_seed(1)
    for p in selector.parameters():  # peaked, non-uniform scores so that budgets really choose
        torch.nn.init.normal_(p, std=0.3)
    path = tmp_path / "sel"
    save_selector(path, selector, base_model="tiny", model_fingerprint=fingerprint(model))
    return str(path)


@torch.no_grad()
def decode_both(model, ids: torch.Tensor, steps: int, capacity: int, layer: int = 1, overlap: bool = True):
    """Greedy decode on the ordinary SparseCache and, fed the same tokens, on a static cache (eager); with
    both logits, ``layer``'s selections. ``overlap``: the static cache's overlap_selection."""
    logits, static = prefill_to_static(model, ids, capacity=capacity)
    static.overlap_selection = overlap
    decoder = GraphDecoder(model, static)
    cache = SparseCache(model.config)
    first = model(ids, **cache_kwargs(cache), use_cache=True).logits[:, -1]
    torch.testing.assert_close(logits, first)
    token = first.argmax(-1)
    pairs = []
    for _ in range(steps):
        dynamic = model(token.view(-1, 1), **cache_kwargs(cache), use_cache=True).logits[:, -1]
        dyn_sel = layer_states(model)[layer].last_selection
        static_logits = decoder.step_eager(token)
        pairs.append((dynamic, static_logits.clone(), dyn_sel, layer_states(model)[layer].last_selection))
        token = dynamic.argmax(-1)
    return pairs


def test_dense_static_equals_dynamic():
    model = spotattn.sparsify(tiny_llama(), "dense")
    ids = torch.randint(0, 128, (2, 45))
    for dynamic, static, _, _ in decode_both(model, ids, steps=6, capacity=64):
        torch.testing.assert_close(static, dynamic, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_spot_static_equals_dynamic(tmp_path, fmt, overlap):
    model = tiny_llama()
    path = random_selector(model, tmp_path)
    ids = torch.randint(0, 128, (2, 150))
    dense = spotattn.sparsify(tiny_llama(), "dense")
    dense_pairs = decode_both(dense, ids, steps=1, capacity=200)
    for budget in (TopK(100_000), TopK(48), DualTopP(p=0.5, sink=16, recent=16, min_tokens=32, max_tokens=64)):
        spotattn.sparsify(model, SpotConfig(checkpoint=path, budget=budget, key_format=fmt))
        pairs = decode_both(model, ids, steps=8, capacity=200, overlap=overlap)
        for dynamic, static, dyn_sel, static_sel in pairs:
            torch.testing.assert_close(static, dynamic, rtol=1e-5, atol=1e-5)
            for b in range(2):
                got = static_sel.block_ids[b, 0, 0, : static_sel.counts[b, 0, 0]].tolist()
                want = dyn_sel.block_ids[b, 0, 0, : dyn_sel.counts[b, 0, 0]].tolist()
                assert got == sorted(want)
        sparse_first = pairs[0][0]
        if isinstance(budget, TopK) and budget.tokens > 1000:
            torch.testing.assert_close(sparse_first, dense_pairs[0][0], rtol=1e-5, atol=1e-5)
        else:  # a real budget reads less and changes the logits: the equality above is not vacuous
            assert int(pairs[0][3].counts.max()) < math.ceil(151 / 16)
            assert not torch.allclose(sparse_first, dense_pairs[0][0], atol=1e-4)
        spotattn.unsparsify(model)


def test_spot_dense_layers_static_equals_dynamic(tmp_path):
    model = tiny_llama(layers=4)
    spotattn.sparsify(model, SpotConfig(checkpoint=random_selector(model, tmp_path), budget=TopK(48), dense_layers=2))
    ids = torch.randint(0, 128, (2, 150))
    pairs = decode_both(model, ids, steps=6, capacity=200, layer=3)  # early selection, dense layers skip it
    for dynamic, static, dyn_sel, static_sel in pairs:
        torch.testing.assert_close(static, dynamic, rtol=1e-5, atol=1e-5)
        for b in range(2):
            got = static_sel.block_ids[b, 0, 0, : static_sel.counts[b, 0, 0]].tolist()
            assert got == sorted(dyn_sel.block_ids[b, 0, 0, : dyn_sel.counts[b, 0, 0]].tolist())
    assert int(pairs[0][3].counts.max()) < math.ceil(151 / 16)  # layer 3 really selects
    assert all(state.last_selection is None for state in layer_states(model)[:2])
    # The static path alone: dense layers read everything and hold no selector key buffers.
    _, cache = prefill_to_static(model, ids, capacity=200)
    spotattn.reset_density(model)
    GraphDecoder(model, cache).step_eager(ids[:, -1])
    decode = spotattn.density(model, "decode").per_layer
    assert (decode[:2] == 1).all() and (decode[2:] < 1).all()
    assert not cache.meta(0) and not cache.meta(1) and cache.meta(2) and cache.meta(3)
    spotattn.unsparsify(model)


@pytest.mark.parametrize(
    "budget",
    [TopK(64), TopK(8), TopP(0.7), DualTopP(p=0.8, sink=32, recent=48, min_tokens=64, max_tokens=160),
     DualTopP(p=0.3, sink=0, recent=0, min_tokens=16, max_tokens=32)],
)
@pytest.mark.parametrize("live", [1, 17, 40, 200, 311])
@pytest.mark.parametrize("queries", [1, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_static_selection_matches_select_blocks(budget, live, queries, padded):
    if queries > live:
        pytest.skip("more queries than keys")
    torch.manual_seed(live * 7 + queries)
    bs, b, g, capacity_blocks = 16, 3, 2, 24
    mass = torch.rand(b, g, 1, capacity_blocks) ** 4
    seq_start = torch.tensor([0, min(live - 1, 20), min(live - 1, 37)]) if padded else None
    got = select_decode_static(mass, budget, bs, torch.tensor(live), queries, seq_start)
    nb = math.ceil(live / bs)
    first = torch.tensor([(live - queries) // bs])
    last = torch.tensor([(live - 1) // bs])
    want = select_blocks(mass[..., :nb], budget, bs, row_first_block=first, row_last_block=last, seq_start=seq_start)
    for i in range(b):
        for j in range(g):
            ids = got.block_ids[i, j, 0, : got.counts[i, j, 0]].tolist()
            assert ids == want.block_ids[i, j, 0, : want.counts[i, j, 0]].tolist()
            assert (got.block_ids[i, j, 0, got.counts[i, j, 0]:] == -1).all()


def test_paged_view_is_the_buffer():
    model = tiny_llama()
    cache = StaticSparseCache(model.config, batch_size=3, capacity=300, device="cpu", dtype=torch.float32)
    assert cache.capacity == 512
    for bs in (16, 64):
        k_pages, v_pages, table = cache.paged(1, bs)
        keys, values = cache.layers[1].keys, cache.layers[1].values
        keys.normal_()
        values.normal_()
        for b in range(3):
            for j in (0, 5, cache.capacity // bs - 1):
                torch.testing.assert_close(k_pages[table[b, j]], keys[b, :, j * bs : (j + 1) * bs])
                torch.testing.assert_close(v_pages[table[b, j]], values[b, :, j * bs : (j + 1) * bs])


def test_static_cache_refuses_prefill_and_unknown_methods(tmp_path):
    model = spotattn.sparsify(tiny_llama(), "oracle")
    cache = StaticSparseCache(model.config, batch_size=1, capacity=64, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="prefill with a spotattn.SparseCache"):
        model(torch.randint(0, 128, (1, 20)), **cache_kwargs(cache))
    cache.set_length(10)
    with pytest.raises(NotImplementedError, match="no static"):
        model(torch.randint(0, 128, (1, 1)), position_ids=torch.tensor([[10]]), **cache_kwargs(cache))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["dense", "spot", "spot-late"])
def test_graph_replay_equals_eager_decode(tmp_path, method):
    model = tiny_llama(hidden=256, heads=4).cuda().to(torch.bfloat16)  # head_dim 64 (a Triton size)
    config = method
    if method.startswith("spot"):
        config = SpotConfig(checkpoint=random_selector(model, tmp_path), budget=TopK(64), key_format="int4")
    spotattn.sparsify(model, config)
    ids = torch.randint(0, 128, (2, 300), device="cuda")
    logits, cache = prefill_to_static(model, ids, capacity=400)
    # spot: its selection on a side stream beside the q/k/v projections, joined before attention; late: inline
    cache.overlap_selection = method != "spot-late"
    decoder = GraphDecoder(model, cache)
    length = int(cache.length())
    decoder.capture()
    token = logits.argmax(-1)
    reference = SparseCache(model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(reference), use_cache=True)
    for step in range(6):
        cache.set_length(length + step)
        eager = decoder.step_eager(token).clone()
        cache.set_length(length + step)
        replay = decoder.step(token).clone()
        torch.testing.assert_close(replay, eager, rtol=0, atol=0)
        with torch.no_grad():
            dynamic = model(token.view(-1, 1), **cache_kwargs(reference), use_cache=True).logits[:, -1]
        torch.testing.assert_close(replay.float(), dynamic.float(), rtol=0.05, atol=0.05)
        token = dynamic.argmax(-1)
    assert int(cache.length()) == length + 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_overlapped_selection_equals_inline(tmp_path):
    """The side stream changes when the selection runs, not what it computes: graph replays with and without
    the overlap give the same logits bit for bit, step after step, at batch 3 with left padding. Layer 0 is
    dense: its pre-hook forks the side stream with nothing to select, and the capture still joins it."""
    model = tiny_llama(hidden=256, heads=4, layers=3).cuda().to(torch.bfloat16)
    budget = DualTopP(p=0.6, sink=16, recent=32, min_tokens=64, max_tokens=128)
    config = SpotConfig(checkpoint=random_selector(model, tmp_path), budget=budget, key_format="int4", dense_layers=1)
    spotattn.sparsify(model, config)
    ids = torch.randint(0, 128, (3, 700), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    logits, cache = prefill_to_static(model, ids, capacity=800, attention_mask=mask)
    length = int(cache.length())
    runs = {}
    for overlap in (True, False):
        cache.overlap_selection = overlap
        decoder = GraphDecoder(model, cache)
        cache.set_length(length)
        decoder.capture()
        cache.set_length(length)
        token, steps = logits.argmax(-1), []
        for _ in range(5):
            steps.append(decoder.step(token).clone())
            token = steps[-1].argmax(-1)
        runs[overlap] = steps
        del decoder
    for overlapped, inline in zip(runs[True], runs[False], strict=True):
        torch.testing.assert_close(overlapped, inline, rtol=0, atol=0)
    spotattn.unsparsify(model)
