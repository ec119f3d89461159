"""``twilight``: select, then prune (Twilight, Lin et al. 2025), for decode.

1. Quest picks candidate pages under a generous token budget (8192 by default).
2. The attention over the candidates is estimated from 4-bit keys, quantised per token with min-max
   scaling (codes packed two to a byte, kept in the cache beside the keys, updated incrementally).
3. Top-p over the estimated page mass (p = 0.85 by default) keeps the smallest set of candidate pages
   that holds that share of the estimated attention; sparse decode reads only those.

The estimate's error is bounded: each dequantised key element is within half a quantisation step of
the true one, so a query's logit is off by at most ``scale * step / 2 * ||q||_1``
(:func:`logit_error_bound`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..cache import MetaEntry
from ..kernels.reference import _selected_tokens
from ..selection import mask_to_selection, rows_for_decode, select_blocks
from ..types import Selection, TopK, TopP
from ._masks import (
    GRANULARITIES,
    check_choice,
    check_nonneg_int,
    check_probability,
    group_union,
    selection_mask,
)
from .base import AttentionCall, Method, MethodConfig, register_method
from .prism import head_dim_of
from .quest import quest_candidates, update_page_bounds

META_CODES = "twilight.codes"
META_LOW = "twilight.low"
META_STEP = "twilight.step"
QUANT_BITS = (2, 4, 8)


@dataclass
class TwilightConfig(MethodConfig):
    """``block_size``: page size. ``candidates``: Quest's token budget for the candidate pages. ``p``:
    share of the estimated attention mass kept. ``quant_bits``: bits per key element of the estimate.
    ``granularity``: ``group`` (Quest bound and estimated mass summed over a kv-group's query heads) or
    ``head`` (each query head selects, the kv-group reads the union). ``dense_layers``: leading layers
    run dense (two, as in Twilight)."""

    block_size: int = 16
    candidates: TopK = field(default_factory=lambda: TopK(8192))
    p: float = 0.85
    quant_bits: int = 4
    granularity: Literal["group", "head"] = "group"
    dense_layers: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if not isinstance(self.candidates, TopK):
            raise ValueError(f"{name}.candidates must be a TopK token budget, got {self.candidates!r}")
        if self.candidates.tokens < self.block_size:
            raise ValueError(
                f"{name}.candidates.tokens={self.candidates.tokens} is below one page; allowed: at least "
                f"block_size={self.block_size} tokens"
            )
        check_probability(name, "p", self.p)
        check_choice(name, "quant_bits", self.quant_bits, QUANT_BITS)
        check_choice(name, "granularity", self.granularity, GRANULARITIES)
        check_nonneg_int(name, "dense_layers", self.dense_layers)

    def check_model(self, model_config) -> None:
        super().check_model(model_config)
        head_dim = head_dim_of(model_config)
        per_byte = 8 // self.quant_bits
        if head_dim % per_byte:
            raise ValueError(
                f"{type(self).__name__}.quant_bits={self.quant_bits} packs {per_byte} codes per byte, which "
                f"does not divide head_dim={head_dim}; allowed: quant_bits in {QUANT_BITS} dividing it"
            )


def quantize_keys(key: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token min-max quantisation of ``key`` ``(..., D)``: packed uint8 codes ``(..., D * bits / 8)``,
    the token's minimum and step ``(..., 1)`` in float32 (so the error bound holds exactly)."""
    k = key.float()
    low = k.amin(-1, keepdim=True)
    step = (k.amax(-1, keepdim=True) - low) / (2**bits - 1)
    codes = torch.round((k - low) / torch.where(step > 0, step, 1.0)).to(torch.uint8)
    per = 8 // bits
    shifts = torch.arange(per, device=key.device, dtype=torch.int32) * bits
    packed = (codes.unflatten(-1, (-1, per)).to(torch.int32) << shifts).sum(-1).to(torch.uint8)
    return packed, low, step


def dequantize_keys(packed: torch.Tensor, low: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`quantize_keys` (float32)."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return low + codes.flatten(-2).float() * step


def logit_error_bound(query: torch.Tensor, step: torch.Tensor, scale: float) -> torch.Tensor:
    """Largest possible ``|scale * q.(k_hat - k)|``, ``(..., T, N)``, for queries ``(..., T, D)`` and
    per-token steps ``(..., N, 1)``: every element is off by at most half a step."""
    return scale * query.float().abs().sum(-1, keepdim=True) * (step.squeeze(-1).unsqueeze(-2) / 2)


def update_quantized_keys(
    key: torch.Tensor, num_new: int, bits: int, state: dict[str, MetaEntry] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantised keys for the whole cache, quantising only the ``num_new`` newest tokens when the
    layer's metadata already holds the older ones (it follows crops, so it is never stale)."""
    b, h, lk, _ = key.shape
    old = lk - num_new
    entries = [state.get(n) for n in (META_CODES, META_LOW, META_STEP)] if state is not None else [None]
    usable = all(e is not None for e in entries) and all(
        e.tensor.shape[:2] == (b, h) and e.tensor.shape[2] >= old for e in entries
    )
    if not usable:
        old = 0
    packed, low, step = quantize_keys(key[:, :, old:], bits)
    if old:
        fresh = (packed, low, step)
        packed, low, step = (
            torch.cat([e.tensor[:, :, :old], x], dim=2) for e, x in zip(entries, fresh, strict=True)
        )
    if state is not None:
        for name, tensor in zip((META_CODES, META_LOW, META_STEP), (packed, low, step), strict=True):
            state[name] = MetaEntry(tensor, tokens_per_entry=1, axis=2)
    return packed, low, step


def estimated_page_mass(
    call: AttentionCall,
    candidates: torch.Tensor,
    quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    bits: int,
    page: int,
) -> torch.Tensor:
    """Estimated attention mass ``(B, Hq, 1, NP)`` of each candidate page, per query head.

    ``candidates`` ``(B, Hkv, 1, NP)``; each head's softmax runs over the candidate tokens it may see
    (causal, not padding), from dequantised keys; masses are summed over the decode queries.
    """
    q = call.query
    b, hq, t, d = q.shape
    hkv, lk, npages = call.key.shape[1], call.num_keys, candidates.shape[-1]
    chosen = mask_to_selection(candidates, page)
    # Candidate token positions (B, Hkv, N) and whether each is a real token of a chosen page.
    tokens, valid = _selected_tokens(chosen.block_ids[:, :, 0], chosen.counts[:, :, 0], page, lk)
    packed, low, step = quantized
    k_hat = dequantize_keys(
        torch.gather(packed, 2, tokens.unsqueeze(-1).expand(-1, -1, -1, packed.shape[-1])),
        torch.gather(low, 2, tokens.unsqueeze(-1)),
        torch.gather(step, 2, tokens.unsqueeze(-1)),
        bits,
    )
    logits = q.float().reshape(b, hkv, hq // hkv * t, d) @ k_hat.transpose(-1, -2) * call.scale
    qpos = (torch.arange(t, device=q.device) + lk - t).repeat(hq // hkv)
    ok = valid.unsqueeze(2) & (tokens.unsqueeze(2) <= qpos.view(1, 1, -1, 1))
    if call.seq_start is not None:
        ok = ok & (tokens.unsqueeze(2) >= call.seq_start.view(b, 1, 1, 1))
    probs = torch.softmax(logits.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
    per_head = probs.view(b, hq, t, -1).sum(2)  # (B, Hq, N)
    per_page = per_head.unflatten(-1, (-1, page)).sum(-1)  # (B, Hq, K)
    ids = chosen.block_ids[:, :, 0].long().clamp(min=0).repeat_interleave(hq // hkv, dim=1)
    mass = torch.zeros(b, hq, npages, device=q.device).scatter_add_(-1, ids, per_page)
    return mass.unsqueeze(2)


@register_method("twilight")
class Twilight(Method):
    Config = TwilightConfig

    def _metadata(self, call: AttentionCall):
        cfg, n = self.config, call.num_queries
        bounds = update_page_bounds(call.key, n, cfg.block_size, call.cache_state)
        quantized = update_quantized_keys(call.key, n, cfg.quant_bits, call.cache_state)
        return bounds, quantized

    def prefill(self, call: AttentionCall) -> Selection | None:
        # Dense prefill; the metadata is built here so that every decode step updates it incrementally.
        if self.layer_idx >= self.config.dense_layers and call.cache_state is not None:
            self._metadata(call)
        return None

    def decode(self, call: AttentionCall) -> Selection | None:
        cfg = self.config
        if self.layer_idx < cfg.dense_layers:
            return None
        (kmin, kmax), quantized = self._metadata(call)
        candidates = quest_candidates(call, kmin, kmax, cfg.candidates, cfg.block_size, cfg.granularity)
        return mask_to_selection(prune_candidates(call, candidates, quantized, cfg), cfg.block_size)


def prune_candidates(
    call: AttentionCall,
    candidates: torch.Tensor,
    quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cfg: TwilightConfig,
) -> torch.Tensor:
    """Bool ``(B, Hkv, 1, NP)``: the Quest ``candidates`` that hold ``cfg.p`` of the estimated attention
    mass (steps 2 and 3), the sink and newest pages kept."""
    if cfg.p >= 1.0:  # nothing to prune (and no page lost to a softmax that underflows to zero)
        return candidates
    mass = estimated_page_mass(call, candidates, quantized, cfg.quant_bits, cfg.block_size)
    hkv = call.key.shape[1]
    if cfg.granularity == "group":
        b, hq, _, n = mass.shape
        mass = mass.view(b, hkv, hq // hkv, 1, n).sum(2)
    first, last = rows_for_decode(call.num_queries, call.num_keys, cfg.block_size, call.query.device)
    pruned = select_blocks(
        mass, TopP(cfg.p), cfg.block_size, row_first_block=first, row_last_block=last, seq_start=call.seq_start,
    )
    keep = selection_mask(pruned, mass.shape[-1])
    if cfg.granularity == "head":
        keep = group_union(keep, hkv)
    # Forced pages are Quest candidates too, so the intersection keeps them.
    return keep & candidates
