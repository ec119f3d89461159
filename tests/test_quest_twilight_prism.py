"""Quest and Twilight (decode), Prism and meanpool (prefill): bounds, metadata, estimates, bands,
calibration, forced blocks, equality with dense at an unlimited budget, and parameter errors."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import spotattn
from spotattn import SparseCache, TopK, make_config
from spotattn.integration import cache_kwargs
from spotattn.kernels.reference import block_sparse_prefill_ref
from spotattn.methods import AttentionCall
from spotattn.methods._masks import selection_mask
from spotattn.methods.prism import (
    MeanPool,
    MeanPoolConfig,
    Prism,
    PrismConfig,
    band_indices,
    band_probabilities,
    band_scales,
    band_topp,
    mean_pool,
    pooled_block_mask,
)
from spotattn.methods.quest import (
    META_MAX,
    META_MIN,
    Quest,
    QuestConfig,
    page_upper_bounds,
    update_page_bounds,
)
from spotattn.methods.twilight import (
    META_CODES,
    META_LOW,
    META_STEP,
    Twilight,
    TwilightConfig,
    dequantize_keys,
    estimated_page_mass,
    logit_error_bound,
    quantize_keys,
    update_quantized_keys,
)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _gen(seed: int | None = None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,))))
    return g


def _call(q, k, scale=None, seq_start=None, cache_state=None, layer_idx=0) -> AttentionCall:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return AttentionCall(q, k, torch.randn_like(k), scale, layer_idx, seq_start, cache_state=cache_state)


# ---------------------------------------------------------------------------------------------- Quest
@pytest.mark.parametrize("length", [16, 100, 257])
def test_quest_bound_is_an_upper_bound_of_every_score_in_the_page(length: int) -> None:
    g = _gen()
    b, hq, hkv, d, page = 2, 4, 2, 16, 16
    k = torch.randn(b, hkv, length, d, generator=g) * 2
    q = torch.randn(b, hq, 3, d, generator=g)
    kmin, kmax = update_page_bounds(k, length, page, None)
    bound = page_upper_bounds(q, kmin, kmax)  # (B, Hq, T, NP)
    scores = torch.einsum("bhtd,bhld->bhtl", q, k.repeat_interleave(hq // hkv, dim=1))
    pad = (-length) % page
    per_page_max = (
        torch.nn.functional.pad(scores, (0, pad), value=float("-inf")).unflatten(-1, (-1, page)).amax(-1)
    )
    assert bound.shape == per_page_max.shape
    assert bool((bound >= per_page_max - 1e-4).all())
    # The bound is attained when one key holds every coordinate's extreme: a one-key page is exact.
    one = update_page_bounds(k[:, :, :1], 1, page, None)
    exact = torch.einsum("bhtd,bhd->bht", q, k[:, :, 0].repeat_interleave(hq // hkv, dim=1))
    assert torch.allclose(page_upper_bounds(q, *one)[..., 0], exact, atol=1e-4)


def test_quest_page_bounds_incremental_equal_recomputation_also_after_crop() -> None:
    g = _gen()
    b, hkv, d, page = 2, 2, 8, 16
    keys = torch.randn(b, hkv, 200, d, generator=g)
    cache = SparseCache()
    meta = cache.meta(0)
    length = 37
    cache.update(keys[:, :, :length], keys[:, :, :length], 0)
    update_page_bounds(keys[:, :, :length], length, page, meta)
    # New tokens one at a time and in chunks, as decode and speculative verify deliver them.
    for step in (1, 1, 5, 1, 16, 3, 1):
        new = keys[:, :, length : length + step]
        cache.update(new, new, 0)
        length += step
        update_page_bounds(cache.layers[0].keys, step, page, meta)
        fresh = update_page_bounds(cache.layers[0].keys, length, page, None)
        assert torch.equal(meta[META_MIN].tensor, fresh[0]) and torch.equal(meta[META_MAX].tensor, fresh[1])
    # Crop into the middle of a page, then append different keys: the cut page must be refreshed.
    cache.crop(-9)
    length -= 9
    assert meta[META_MIN].tensor.shape[2] == math.ceil(length / page)
    other = torch.randn(b, hkv, 4, d, generator=g) * 5
    cache.update(other, other, 0)
    length += 4
    kmin, kmax = update_page_bounds(cache.layers[0].keys, 4, page, meta)
    fresh = update_page_bounds(cache.layers[0].keys, length, page, None)
    assert torch.equal(kmin, fresh[0]) and torch.equal(kmax, fresh[1])
    # Tokens cached without a call (another method ran that chunk), then a decode step: the partly
    # seen page must not be reused.
    unseen = torch.randn(b, hkv, 20, d, generator=g) * 5
    cache.update(unseen, unseen, 0)
    step = keys[:, :, :1]
    cache.update(step, step, 0)
    length += 21
    kmin, kmax = update_page_bounds(cache.layers[0].keys, 1, page, meta)
    fresh = update_page_bounds(cache.layers[0].keys, length, page, None)
    assert torch.equal(kmin, fresh[0]) and torch.equal(kmax, fresh[1])


def test_quest_selection_respects_budget_and_forces_sink_and_last_page() -> None:
    g = _gen()
    b, hq, hkv, d, page, length = 2, 4, 2, 16, 16, 300
    k = torch.randn(b, hkv, length, d, generator=g)
    q = torch.randn(b, hq, 1, d, generator=g)
    seq_start = torch.tensor([0, 40])
    for granularity in ("group", "head"):
        cfg = QuestConfig(budget=TopK(64), granularity=granularity, dense_layers=0)
        sel = Quest(cfg, None, 0).decode(_call(q, k, seq_start=seq_start))
        mask = selection_mask(sel, math.ceil(length / page))[:, :, 0]
        assert mask[0, :, 0].all() and mask[1, :, 40 // page].all(), "sink page missing"
        assert mask[:, :, -1].all(), "last page missing"
        assert not mask[1, :, : 40 // page].any(), "a page wholly in padding was read"
        limit = 4 if granularity == "group" else 4 * (hq // hkv)
        assert int(sel.counts.max()) <= limit
    # Per kv-group, Quest keeps the pages with the largest summed bounds.
    cfg = QuestConfig(budget=TopK(16 * 6), dense_layers=0)
    sel = Quest(cfg, None, 0).decode(_call(q, k))
    kmin, kmax = update_page_bounds(k, length, page, None)
    bound = page_upper_bounds(q, kmin, kmax).view(b, hkv, hq // hkv, -1).sum(2)
    inner = bound[..., 1:-1]
    chosen = selection_mask(sel, bound.shape[-1])[:, :, 0, 1:-1]
    weakest_kept = torch.where(chosen, inner, float("inf")).amin(-1)
    strongest_dropped = torch.where(chosen, float("-inf"), inner).amax(-1)
    assert bool((weakest_kept >= strongest_dropped).all())


# ------------------------------------------------------------------------------------------- Twilight
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_twilight_quantisation_roundtrip_and_element_error(bits: int) -> None:
    k = torch.randn(2, 3, 50, 16, generator=_gen()) * 3
    packed, low, step = quantize_keys(k, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 16 * bits // 8
    k_hat = dequantize_keys(packed, low, step, bits)
    assert bool(((k_hat - k).abs() <= step / 2 + 1e-5).all())
    # Every code is used up to the top: each token's extremes are reproduced exactly.
    assert torch.allclose(k_hat.amax(-1), k.amax(-1), atol=1e-5)
    assert torch.allclose(k_hat.amin(-1), k.amin(-1), atol=1e-6)


def test_twilight_estimate_error_within_its_bound() -> None:
    g = _gen()
    b, hq, hkv, d, page, length = 1, 4, 2, 32, 16, 160
    k = torch.randn(b, hkv, length, d, generator=g) * 2
    q = torch.randn(b, hq, 1, d, generator=g) * 2
    scale = d**-0.5
    packed, low, step = quantize_keys(k, 4)
    k_hat = dequantize_keys(packed, low, step, 4)
    kg = k.repeat_interleave(2, dim=1)
    err = (torch.einsum("bhtd,bhld->bhtl", q, k_hat.repeat_interleave(2, dim=1) - kg) * scale).abs()
    bound = logit_error_bound(q, step.repeat_interleave(2, dim=1), scale)
    assert bound.shape == err.shape
    assert bool((err <= bound + 1e-5).all())
    assert float(err.max()) > 0.05 * float(bound.max()), "bound vacuous or error suspiciously zero"
    # Logits off by at most eps move each page's softmax mass by a factor within exp(+-2 eps).
    candidates = torch.ones(b, hkv, 1, length // page, dtype=torch.bool)
    est = estimated_page_mass(_call(q, k, scale), candidates, (packed, low, step), 4, page)[:, :, 0]
    exact = torch.softmax(torch.einsum("bhtd,bhld->bhtl", q, kg) * scale, -1)[:, :, 0]
    exact = exact.unflatten(-1, (-1, page)).sum(-1)
    eps = bound.amax(-1)
    assert bool((est <= exact * torch.exp(2 * eps) + 1e-6).all())
    assert bool((est >= exact * torch.exp(-2 * eps) - 1e-6).all())


def test_twilight_quantised_keys_incremental_after_crop() -> None:
    g = _gen()
    keys = torch.randn(1, 2, 80, 16, generator=g)
    cache = SparseCache()
    meta = cache.meta(0)
    cache.update(keys[:, :, :50], keys[:, :, :50], 0)
    update_quantized_keys(cache.layers[0].keys, 50, 4, meta)
    cache.crop(-7)
    new = keys[:, :, 60:63]
    cache.update(new, new, 0)
    got = update_quantized_keys(cache.layers[0].keys, 3, 4, meta)
    want = quantize_keys(cache.layers[0].keys, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert (
        meta[META_CODES].tensor.shape[2]
        == meta[META_LOW].tensor.shape[2]
        == meta[META_STEP].tensor.shape[2]
        == 46
    )


def test_twilight_prunes_to_candidates_and_keeps_forced_pages() -> None:
    g = _gen()
    b, hq, hkv, d, length = 2, 4, 2, 32, 400
    k = torch.randn(b, hkv, length, d, generator=g)
    q = torch.randn(b, hq, 2, d, generator=g) * 3
    call = _call(q, k, seq_start=torch.tensor([0, 20]))
    cfg = TwilightConfig(candidates=TopK(128), p=0.5, dense_layers=0)
    quest = Quest(QuestConfig(budget=TopK(128), dense_layers=0), None, 0).decode(call)
    sel = Twilight(cfg, None, 0).decode(call)
    nb = math.ceil(length / 16)
    mask, cand = selection_mask(sel, nb), selection_mask(quest, nb)
    assert bool((mask <= cand).all()), "Twilight read a page Quest did not propose"
    assert mask[0, :, 0, 0].all() and mask[1, :, 0, 1].all() and mask[:, :, 0, -1].all()
    assert int(sel.counts.sum()) < int(quest.counts.sum())


# ---------------------------------------------------------------------------------------------- Prism
def test_prism_band_slicing_by_hand() -> None:
    assert band_indices(8, 4, high=True).tolist() == [0, 1, 4, 5]
    assert band_indices(8, 4, high=False).tolist() == [2, 3, 6, 7]
    assert band_indices(8, 2, high=False).tolist() == [3, 7]
    high = band_indices(128, 64, high=True).tolist()
    low = band_indices(128, 96, high=False).tolist()
    assert high == list(range(0, 32)) + list(range(64, 96))
    assert low == list(range(16, 64)) + list(range(80, 128))
    assert PrismConfig().band_widths(128) == (64, 96)
    assert PrismConfig().band_widths(64) == (32, 48)  # SmolLM2: the same fractions of the head
    assert band_indices(64, 32, True).tolist() == list(range(16)) + list(range(32, 48))
    assert band_indices(64, 48, False).tolist() == list(range(8, 32)) + list(range(40, 64))


def test_prism_calibration_by_hand() -> None:
    # d = 4; high band = dims {0, 2}, low band = dims {1, 3}; two pooled blocks per head.
    qbar = torch.tensor([[[[3.0, 1.0, 4.0, 1.0], [1.0, 0.0, 1.0, 2.0]]]])
    kbar = torch.tensor([[[[1.0, 2.0, 1.0, 2.0], [0.0, 1.0, 2.0, 0.0]]]])
    bands = [band_indices(4, 2, True), band_indices(4, 2, False)]
    assert [b.tolist() for b in bands] == [[0, 2], [1, 3]]
    rms_q = math.sqrt((9 + 1 + 16 + 1 + 1 + 0 + 1 + 4) / 8)
    rms_qh, rms_ql = math.sqrt((9 + 16 + 1 + 1) / 4), math.sqrt((1 + 1 + 0 + 4) / 4)
    rms_k = math.sqrt((1 + 4 + 1 + 4 + 0 + 1 + 4 + 0) / 8)
    rms_kh, rms_kl = math.sqrt((1 + 1 + 0 + 4) / 4), math.sqrt((4 + 4 + 1 + 0) / 4)
    tau_h = math.sqrt(2 / 4) * rms_qh / rms_q * rms_kh / rms_k
    tau_l = math.sqrt(2 / 4) * rms_ql / rms_q * rms_kl / rms_k
    got = band_scales(qbar, kbar, bands, calibrate=True)[0, 0]
    assert torch.allclose(
        got, torch.tensor([1 / (math.sqrt(2) * tau_h), 1 / (math.sqrt(2) * tau_l)]), rtol=1e-6
    )
    off = band_scales(qbar, kbar, bands, calibrate=False)[0, 0]
    assert torch.allclose(off, torch.full((2,), 1 / math.sqrt(2)))
    # A full-width band is its own reference: tau = 1 whatever the data.
    full = band_scales(qbar, kbar, [torch.arange(4)], calibrate=True)[0, 0]
    assert torch.allclose(full, torch.tensor([0.5]))


def test_mean_pool_aligns_blocks_to_absolute_positions_and_skips_padding() -> None:
    x = torch.arange(2 * 1 * 10 * 1, dtype=torch.float32).view(2, 1, 10, 1)
    # Tokens at absolute positions 6..15, blocks of 4: [6, 7], [8..11], [12..15].
    pooled = mean_pool(x, 4, offset=6)
    assert pooled[0, 0, :, 0].tolist() == [0.5, 3.5, 7.5]
    padded = mean_pool(x, 4, offset=0, seq_start=torch.tensor([0, 3]))
    assert padded[1, 0, :, 0].tolist() == [13.0, 15.5, 18.5]  # (x[3]), mean(x[4..7]), mean(x[8..9])


@pytest.mark.parametrize("cls", [Prism, MeanPool])
def test_prism_forced_blocks_always_present_and_kernel_accepts_the_selection(cls) -> None:
    g = _gen()
    b, hq, hkv, d, bs, lk, lq = 2, 4, 2, 32, 16, 200, 150  # chunked prefill starting mid-block
    q = torch.randn(b, hq, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    seq_start = torch.tensor([0, 35])
    call = _call(q, k, seq_start=seq_start)
    sel = cls(cls.Config(block_size=bs, p=0.05), None, 0).prefill(call)
    first = (lk - lq) // bs
    assert sel.first_row == first
    mask = selection_mask(sel, math.ceil(lk / bs))
    rows = torch.arange(first, math.ceil(lk / bs))
    r = torch.arange(len(rows))
    assert mask[:, :, r, rows].all(), "diagonal block missing"
    assert mask[0, :, :, 0].all() and mask[1, :, :, 35 // bs].all(), "sink block missing"
    assert not mask[1, :, :, : 35 // bs].any()
    assert not (mask & (torch.arange(mask.shape[-1]) > rows.view(-1, 1))).any(), "future block selected"
    assert mask.float().mean() < 0.9
    out, _ = block_sparse_prefill_ref(q, k, call.value, sel.block_ids, sel.counts, bs, seq_start=seq_start)
    assert torch.isfinite(out).all()


def test_prism_torch_estimator_is_top_p_per_band() -> None:
    g = _gen()
    b, hq, hkv, d, bs, length = 1, 2, 1, 16, 16, 320
    q, k = torch.randn(b, hq, length, d, generator=g), torch.randn(b, hkv, length, d, generator=g)
    qbar, kbar = mean_pool(q, bs), mean_pool(k, bs)
    bands = [band_indices(d, 8, True), band_indices(d, 12, False)]
    inv = band_scales(qbar, kbar, bands, True)
    union = pooled_block_mask(qbar, kbar, bands, inv, 0.6, bs, 0, None)
    singles = [
        pooled_block_mask(qbar, kbar, [bz], inv[..., z : z + 1], 0.6, bs, 0, None)
        for z, bz in enumerate(bands)
    ]
    assert torch.equal(union, singles[0] | singles[1])
    assert not torch.equal(singles[0], singles[1]), "the two bands should disagree somewhere on random data"


def test_prism_band_topp_ranks_every_block_then_adds_the_forced_ones_by_hand() -> None:
    # One row of five causal blocks; the sink (block 0) and the diagonal (block 4) are forced.
    probs = torch.tensor([[[[0.05, 0.45, 0.30, 0.05, 0.15]]]])
    allowed = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    forced = torch.tensor([True, False, False, False, True]).view(1, 1, 1, 5)
    # Paper: ranked 0.45, 0.30 (mass before it 0.45 < 0.7), 0.15 (0.75: stop); then sink and diagonal.
    assert band_topp(probs, 0.7, allowed, forced)[0, 0, 0].tolist() == [True, True, True, False, True]
    # A rule that counted the forced mass (0.2) towards p would stop after 0.45 and drop block 2.
    # The nucleus may hold a forced block: then nothing else is needed beyond it.
    probs = torch.tensor([[[[0.80, 0.10, 0.05, 0.03, 0.02]]]])
    assert band_topp(probs, 0.75, allowed, forced)[0, 0, 0].tolist() == [True, False, False, False, True]
    # Ties at the threshold are all kept; blocks outside ``allowed`` never are.
    probs = torch.tensor([[[[0.4, 0.3, 0.3, 0.0, 0.0]]]])
    allowed = torch.tensor([True, True, True, False, False]).view(1, 1, 1, 5)
    forced = torch.tensor([True, False, False, False, False]).view(1, 1, 1, 5)
    assert band_topp(probs, 0.6, allowed, forced)[0, 0, 0].tolist() == [True, True, True, False, False]
    assert band_topp(probs, 0.3, allowed, forced)[0, 0, 0].tolist() == [True, False, False, False, False]


def test_prism_pooled_mask_is_the_band_nucleus_plus_sink_and_diagonal() -> None:
    g = _gen(7)
    b, hq, hkv, d, bs, length, p = 1, 2, 1, 16, 16, 16 * 12, 0.8
    q, k = torch.randn(b, hq, length, d, generator=g), torch.randn(b, hkv, length, d, generator=g)
    qbar, kbar = mean_pool(q, bs), mean_pool(k, bs)
    bands = [band_indices(d, 8, True), band_indices(d, 12, False)]
    inv = band_scales(qbar, kbar, bands, True)
    got = pooled_block_mask(qbar, kbar, bands, inv, p, bs, 0, None)
    rows = torch.arange(length // bs)
    allowed = rows.view(1, 1, -1, 1) >= rows.view(1, 1, 1, -1)
    want = torch.zeros(b, hq, len(rows), len(rows), dtype=torch.bool)
    for z, idx in enumerate(bands):
        probs = band_probabilities(qbar, kbar, idx, inv[..., z], allowed)
        for h in range(hq):
            for r in rows.tolist():
                row = probs[0, h, r, : r + 1]
                order = row.argsort(descending=True).tolist()
                mass = 0.0
                for j in order:  # keep while the mass ranked above is below p
                    if mass >= p - 1e-7:
                        break
                    want[0, h, r, j] = True
                    mass += float(row[j])
                want[0, h, r, 0] = want[0, h, r, r] = True
    assert torch.equal(got, want.any(dim=1, keepdim=True))


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PrismConfig(p=0.0), "PrismConfig.p must be a probability in (0, 1], got 0.0"),
        (lambda: PrismConfig(p=1.5), "PrismConfig.p must be a probability in (0, 1], got 1.5"),
        (lambda: MeanPoolConfig(p=-0.1), "MeanPoolConfig.p must be a probability in (0, 1], got -0.1"),
        (lambda: TwilightConfig(p=2), "TwilightConfig.p must be a probability in (0, 1], got 2"),
        (
            lambda: QuestConfig(budget=TopK(8)),
            "QuestConfig.budget.tokens=8 is below one page; allowed: at least",
        ),
        (
            lambda: QuestConfig(block_size=64, budget=TopK(32)),
            "below one page; allowed: at least block_size=64",
        ),
        (
            lambda: TwilightConfig(candidates=TopK(15)),
            "TwilightConfig.candidates.tokens=15 is below one page",
        ),
        (lambda: PrismConfig(d_high=160).band_widths(128), "PrismConfig.d_high=160 is wider than the head"),
        (lambda: PrismConfig(d_low=66).band_widths(64), "allowed: an even number in [2, 64]"),
        (lambda: PrismConfig(d_high=33), "PrismConfig.d_high must be an even integer >= 2 or None, got 33"),
        (
            lambda: QuestConfig(granularity="token"),
            "QuestConfig.granularity must be one of ('group', 'head')",
        ),
        (lambda: TwilightConfig(quant_bits=3), "TwilightConfig.quant_bits must be one of (2, 4, 8), got 3"),
        (lambda: QuestConfig(dense_layers=-1), "QuestConfig.dense_layers must be a non-negative integer"),
        (lambda: make_config("prism", p=1.01), "PrismConfig.p must be a probability in (0, 1]"),
    ],
)
def test_bad_parameters_get_clear_errors(make, message: str) -> None:
    with pytest.raises(ValueError) as err:
        make()
    assert message in str(err.value)


def test_band_wider_than_the_model_head_is_refused_by_sparsify(tiny_model) -> None:
    before = tiny_model.config._attn_implementation
    with pytest.raises(ValueError, match=r"d_low=24 is wider than the head \(head_dim=16\)"):
        spotattn.sparsify(tiny_model, PrismConfig(block_size=16, d_low=24))
    assert tiny_model.config._attn_implementation == before


def test_configs_round_trip_through_json() -> None:
    for cfg in (
        QuestConfig(budget=TopK(256)),
        TwilightConfig(p=0.8),
        PrismConfig(d_high=32),
        MeanPoolConfig(),
    ):
        assert spotattn.MethodConfig.from_json(cfg.to_json()) == cfg


# ------------------------------------------------------------------------- models: dense equality
@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(cfg).eval()


def _prefill_then_decode(
    model, ids: torch.Tensor, prompt: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of a prefill of ``prompt`` tokens, then one forward per remaining token (decode path)."""
    cache = SparseCache(model.config)
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": mask[:, :prompt]}
        parts = [model(ids[:, :prompt], **cache_kwargs(cache), **kw).logits]
        for t in range(prompt, ids.shape[1]):
            kw = {} if mask is None else {"attention_mask": mask[:, : t + 1]}
            parts.append(model(ids[:, t : t + 1], **cache_kwargs(cache), **kw).logits)
    return torch.cat(parts, dim=1)


UNLIMITED = [
    ("quest", dict(budget=TopK(10**6), dense_layers=0)),
    ("quest", dict(budget=TopK(10**6), dense_layers=0, granularity="head")),
    ("twilight", dict(candidates=TopK(10**6), p=1.0, dense_layers=0)),
    ("prism", dict(block_size=16, p=1.0)),
    ("meanpool", dict(block_size=16, p=1.0)),
]


@pytest.mark.parametrize(("name", "options"), UNLIMITED)
def test_unlimited_budget_equals_dense(tiny_model, name: str, options: dict) -> None:
    ids = torch.randint(0, 128, (2, 110), generator=_gen())
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # left padding in the second row
    dense = _prefill_then_decode(tiny_model, ids, 100, mask)
    spotattn.sparsify(tiny_model, make_config(name, **options))
    try:
        got = _prefill_then_decode(tiny_model, ids, 100, mask)
        phase = "prefill" if name in ("prism", "meanpool") else "decode"
        report = spotattn.density(tiny_model, phase)
    finally:
        spotattn.unsparsify(tiny_model)
    assert report.tokens_available > 0 and report.mean == pytest.approx(1.0)
    valid = mask.bool()
    assert torch.allclose(got[valid], dense[valid], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("quest", dict(budget=TopK(32), dense_layers=1)),
        ("twilight", dict(candidates=TopK(64), p=0.6, dense_layers=1)),
        ("prism", dict(block_size=16, p=0.5)),
        ("meanpool", dict(block_size=16, p=0.5)),
    ],
)
def test_small_budgets_read_less_and_decode_metadata_stays_exact(
    tiny_model, name: str, options: dict
) -> None:
    ids = torch.randint(0, 128, (2, 140), generator=_gen())
    spotattn.sparsify(tiny_model, make_config(name, **options))
    try:
        cache = SparseCache(tiny_model.config)
        with torch.no_grad():
            logits = tiny_model(ids[:, :130], **cache_kwargs(cache)).logits
            for t in range(130, 140):
                logits = tiny_model(ids[:, t : t + 1], **cache_kwargs(cache)).logits
        phase = "prefill" if name in ("prism", "meanpool") else "decode"
        report = spotattn.density(tiny_model, phase)
    finally:
        spotattn.unsparsify(tiny_model)
    assert torch.isfinite(logits).all()
    assert report.mean < 0.95
    if name in ("quest", "twilight"):
        assert math.isnan(float(report.per_layer[0].mean())) or float(report.per_layer[0].mean()) == 1.0
        layer = cache.layers[2]
        fresh = update_page_bounds(layer.keys, layer.keys.shape[2], 16, None)
        assert torch.equal(layer.meta[META_MIN].tensor, fresh[0])
        assert torch.equal(layer.meta[META_MAX].tensor, fresh[1])
        assert META_MIN not in cache.layers[0].meta  # dense layers keep no metadata


# ------------------------------------------------------------- Triton estimator in the interpreter
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_prism_triton_estimator_matches_pytorch_in_interpreter() -> None:
    from _interpreter import require_working_interpreter

    require_working_interpreter()
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 3
    for name, mismatch in results.items():
        assert mismatch == 0, f"{name}: {mismatch} blocks differ between Triton and PyTorch"


def _interpreter_worker() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from spotattn.kernels.prism_triton import prism_block_mask

    g = _gen(1234)
    cases = {
        "prism-gqa": dict(b=1, hq=4, hkv=2, d=32, lk=260, lq=260, bs=32, start=None, widths=(16, 24), p=0.9),
        "prism-pad-chunk": dict(
            b=2, hq=2, hkv=1, d=32, lk=300, lq=170, bs=32, start=[0, 45], widths=(16, 24), p=0.7
        ),
        "meanpool": dict(b=1, hq=2, hkv=2, d=64, lk=200, lq=200, bs=16, start=None, widths=None, p=0.93),
    }
    out = {}
    for name, c in cases.items():
        q = torch.randn(c["b"], c["hq"], c["lq"], c["d"], generator=g)
        k = torch.randn(c["b"], c["hkv"], c["lk"], c["d"], generator=g)
        start = torch.tensor(c["start"]) if c["start"] else None
        offset = c["lk"] - c["lq"]
        qbar, kbar = mean_pool(q, c["bs"], offset, start), mean_pool(k, c["bs"], 0, start)
        if c["widths"]:
            bands = [band_indices(c["d"], c["widths"][0], True), band_indices(c["d"], c["widths"][1], False)]
        else:
            bands = [torch.arange(c["d"])]
        inv = band_scales(qbar, kbar, bands, True)
        first = offset // c["bs"]
        got = prism_block_mask(qbar, kbar, bands, inv, c["p"], c["bs"], first, start)
        want = pooled_block_mask(qbar, kbar, bands, inv, c["p"], c["bs"], first, start)
        out[name] = int((got != want).sum()) if got.shape == want.shape else -1
    print(json.dumps(out))


if __name__ == "__main__":
    _interpreter_worker()
