"""Quest and Twilight on a :class:`StaticSparseCache`: static metadata buffers, selection without a host sync.

The algorithm is the one of :mod:`spotattn.methods.quest` and :mod:`spotattn.methods.twilight`
(``granularity="group"``, one decode query per step); only the bookkeeping differs:

- the metadata (page min/max, Twilight's 4-bit keys) lives in static buffers of the cache, under the
  method's names, so a prefilled :class:`~spotattn.cache.SparseCache` brings it along through
  ``StaticSparseCache.from_cache``; a cache without it gets it built once from the whole key buffer
  (first call, before any graph capture). Each step rewrites, in place, the bounds of the page holding
  the new token and that token's quantised key;
- lengths come from the device counter: Quest bounds are computed for every page of the buffer and the
  selection allows only the live ones;
- Twilight prunes in candidate space: the top-p runs over the ``W`` candidate pages (ids ascending, so
  the sink page is the first and the newest page the last of each row), not over all pages. That is the
  reference's rule, since a page outside the candidates has no estimated mass and is never kept.

On CUDA (:mod:`spotattn.kernels.twilight_triton`): one kernel for the metadata, one for the bounds, the
fused selection kernel for the candidates, one kernel for the per-page LSE of the estimate, a softmax,
the fused selection kernel again (in candidate space) and a gather back to page ids. On CPU the
PyTorch functions of the methods run on the live prefix (host reads of the length are free there); both
paths return id lists of the same static width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..types import Budget, Selection, TopK, TopP
from .decode_path import DecodeContext, register_static_decoder
from .select import _cap_blocks, _forced_counts, select_decode_static


@dataclass
class PageMeta:
    """One layer's static metadata: page bounds ``(B, Hkv, C / page, D)`` and, for Twilight, the
    quantised keys ``(codes, low, step)`` ``(B, Hkv, C, D * bits / 8)``, ``(B, Hkv, C, 1)`` x 2."""

    kmin: torch.Tensor
    kmax: torch.Tensor
    quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def build_meta(keys: torch.Tensor, page: int, bits: int | None) -> PageMeta:
    """Metadata of a whole key buffer ``(B, Hkv, C, D)`` (pages past the sequence are never selected, and the
    page holding the newest token is rebuilt by :func:`update_meta`)."""
    from ..methods.quest import update_page_bounds  # noqa: PLC0415 (methods import the integration)
    from ..methods.twilight import quantize_keys  # noqa: PLC0415

    kmin, kmax = update_page_bounds(keys, keys.shape[2], page, None)
    return PageMeta(kmin, kmax, quantize_keys(keys, bits) if bits else None)


def static_meta(cache, layer_idx: int, page: int, bits: int | None) -> PageMeta:
    """The layer's metadata buffers in ``cache``, built from its key buffer when absent or of another page size."""
    from ..methods.quest import META_MAX, META_MIN  # noqa: PLC0415
    from ..methods.twilight import META_CODES, META_LOW, META_STEP  # noqa: PLC0415

    meta = cache.meta(layer_idx)
    names = [(META_MIN, page), (META_MAX, page)] + ([(META_CODES, 1), (META_LOW, 1), (META_STEP, 1)] if bits else [])
    codes = meta.get(META_CODES)
    stale = any(meta.get(n) is None or meta[n].tokens_per_entry != tpe for n, tpe in names) or (
        bits is not None and codes.tensor.shape[-1] * 8 != bits * cache.layers[layer_idx].keys.shape[-1]
    )
    if stale:
        built = build_meta(cache.layers[layer_idx].keys, page, bits)
        tensors = [built.kmin, built.kmax, *(built.quantized or ())]
        for (name, tpe), tensor in zip(names, tensors, strict=True):
            cache.allocate_meta(layer_idx, name, tensor, tpe, axis=2).tensor.copy_(tensor)
    quantized = tuple(meta[n].tensor for n, _ in names[2:]) if bits else None
    return PageMeta(meta[META_MIN].tensor, meta[META_MAX].tensor, quantized)


def triton_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from ..kernels import twilight_triton  # noqa: F401, PLC0415 (needs triton)
    except ImportError:
        return False
    return True


def update_meta(
    keys: torch.Tensor, meta: PageMeta, seq_len: torch.Tensor, page: int, bits: int | None, use_triton: bool
) -> None:
    """Rewrite, in place, the bounds of the page holding token ``seq_len - 1`` and (``bits`` given) that
    token's quantised key."""
    quantized = meta.quantized if bits else None
    if use_triton:
        from ..kernels.twilight_triton import update_decode_meta  # noqa: PLC0415

        update_decode_meta(keys, meta.kmin, meta.kmax, seq_len, page, quantized, bits or 4)
        return
    from ..methods.twilight import quantize_keys  # noqa: PLC0415

    n = int(seq_len.reshape(-1)[0])
    p = (n - 1) // page
    meta.kmin[:, :, p] = keys[:, :, p * page : n].amin(2)
    meta.kmax[:, :, p] = keys[:, :, p * page : n].amax(2)
    if quantized is not None:
        for buffer, part in zip(quantized, quantize_keys(keys[:, :, n - 1 : n], bits), strict=True):
            buffer[:, :, n - 1 : n] = part


def _call(q: torch.Tensor, keys: torch.Tensor, seq_len: torch.Tensor, scale: float, seq_start):
    from ..methods.base import AttentionCall  # noqa: PLC0415

    live = keys[:, :, : int(seq_len.reshape(-1)[0])]
    return AttentionCall(q, live, live, scale, 0, seq_start)


def quest_select(
    q: torch.Tensor,
    keys: torch.Tensor,
    meta: PageMeta,
    seq_len: torch.Tensor,
    budget: TopK,
    page: int,
    seq_start: torch.Tensor | None = None,
    use_triton: bool = False,
) -> Selection:
    """Quest's pages for one decode query ``q`` ``(B, Hq, 1, D)`` (per kv-group, sink and newest page forced).

    Triton path: static width ``3 + budget pages``, ``-1`` padded. CPU path: the method's own functions.
    """
    if not use_triton:
        from ..methods.quest import quest_candidates  # noqa: PLC0415
        from ..selection import mask_to_selection  # noqa: PLC0415

        call = _call(q, keys, seq_len, 1.0, seq_start)
        pages = math.ceil(call.num_keys / page)
        mask = quest_candidates(call, meta.kmin[:, :, :pages], meta.kmax[:, :, :pages], budget, page, "group")
        return _padded(mask_to_selection(mask, page), _width(budget, page, meta.kmin.shape[2]))
    from ..kernels.twilight_triton import quest_group_bounds  # noqa: PLC0415

    bound = quest_group_bounds(q, meta.kmin, meta.kmax)  # (B, Hkv, NP), every page of the buffer
    nb = bound.shape[-1]
    live = torch.arange(nb, device=q.device) < (seq_len.reshape(-1, 1, 1) + page - 1) // page
    # As quest_candidates: a shift by the smallest live bound makes the scores non-negative, same ranking.
    mass = bound - torch.where(live, bound, float("inf")).amin(-1, keepdim=True) + 1.0
    return _select(mass, budget, page, _width(budget, page, nb), seq_len, seq_start)


def twilight_select(
    q: torch.Tensor,
    keys: torch.Tensor,
    meta: PageMeta,
    seq_len: torch.Tensor,
    cfg,
    scale: float,
    seq_start: torch.Tensor | None = None,
    use_triton: bool = False,
) -> Selection:
    """Twilight's pages (``cfg``: a :class:`~spotattn.methods.twilight.TwilightConfig`) for one decode query."""
    page = cfg.block_size
    candidates = quest_select(q, keys, meta, seq_len, cfg.candidates, page, seq_start, use_triton)
    if cfg.p >= 1.0:
        return candidates
    if not use_triton:
        from ..methods._masks import selection_mask  # noqa: PLC0415
        from ..methods.twilight import prune_candidates  # noqa: PLC0415
        from ..selection import mask_to_selection  # noqa: PLC0415

        call = _call(q, keys, seq_len, scale, seq_start)
        n = call.num_keys
        mask = selection_mask(candidates, math.ceil(n / page))
        quantized = tuple(x[:, :, :n] for x in meta.quantized)
        kept = mask_to_selection(prune_candidates(call, mask, quantized, cfg), page)
        return _padded(kept, candidates.block_ids.shape[-1])
    from ..kernels.twilight_triton import candidate_page_lse  # noqa: PLC0415

    ids = candidates.block_ids[:, :, 0]  # (B, Hkv, W), ascending, -1 padded
    lse = candidate_page_lse(q, ids, meta.quantized, cfg.quant_bits, page, seq_len, scale, seq_start)
    mass = torch.softmax(lse, dim=-1).sum(2)  # per head, softmax over candidate tokens summed per page
    # In candidate space (one-token "blocks"), a row of c candidates has its sink at 0 and newest page at
    # c - 1; every kv-group of a sequence has the same c (TopK's count depends only on the sequence).
    count = candidates.counts[:, 0, 0].contiguous()
    kept = _select(mass, TopP(cfg.p), 1, ids.shape[-1], count, None)
    local = kept.block_ids[:, :, 0]
    pages = torch.where(local >= 0, ids.gather(-1, local.clamp(min=0).long()), -1)
    return Selection(pages.unsqueeze(2), kept.counts, page)


def _padded(sel: Selection, width: int) -> Selection:
    """``sel`` with its id list padded by ``-1`` to ``width``: the same static shape as the Triton path."""
    ids = torch.nn.functional.pad(sel.block_ids, (0, width - sel.block_ids.shape[-1]), value=-1)
    return Selection(ids, sel.counts, sel.block_size)


def _width(budget: Budget, block_size: int, num_blocks: int) -> int:
    n_sink, n_recent = _forced_counts(budget, block_size)  # the width select_decode_static uses
    return n_sink + max(n_recent, 2) + _cap_blocks(budget, block_size, num_blocks)


def _select(
    mass: torch.Tensor, budget: Budget, block_size: int, width: int, seq_len: torch.Tensor, seq_start
) -> Selection:
    """One decode row per (batch, group) from non-negative ``mass`` ``(B, G, NB)``; ``seq_len`` 0-dim or ``(B,)``."""
    from ..kernels._triton.select import fused_select_supported, select_decode_fused  # noqa: PLC0415

    if fused_select_supported(mass.shape[-1]):
        return select_decode_fused(mass, budget, block_size, width, logits=False, seq_len=seq_len, seq_start=seq_start)
    if seq_len.numel() != 1:
        raise ValueError(f"{mass.shape[-1]} candidates per row: too many for the fused selection kernel")
    return select_decode_static(mass.unsqueeze(2), budget, block_size, seq_len, 1, seq_start)


# ------------------------------------------------------------------------------------ static decoders


def _decode(ctx: DecodeContext, twilight: bool) -> Selection | None:
    cfg = ctx.state.method.config
    if ctx.layer_idx < cfg.dense_layers:
        return None
    q = ctx.query
    if cfg.granularity != "group" or q.shape[2] != 1:
        raise NotImplementedError(
            f"{cfg.method}'s static (CUDA-graph) decode path takes granularity='group' and one query per "
            f"step, got granularity={cfg.granularity!r} and {q.shape[2]} queries; decode with a "
            "spotattn.SparseCache instead"
        )
    bits = cfg.quant_bits if twilight else None
    meta = static_meta(ctx.cache, ctx.layer_idx, cfg.block_size, bits)
    keys = ctx.cache.layers[ctx.layer_idx].keys
    use_triton = triton_available(q.device)
    update_meta(keys, meta, ctx.seq_len, cfg.block_size, bits, use_triton)
    if twilight:
        scale = ctx.scale if ctx.scale is not None else q.shape[-1] ** -0.5
        return twilight_select(q, keys, meta, ctx.seq_len, cfg, scale, ctx.seq_start, use_triton)
    return quest_select(q, keys, meta, ctx.seq_len, cfg.budget, cfg.block_size, ctx.seq_start, use_triton)


@register_static_decoder("quest")
def _quest(ctx: DecodeContext) -> Selection | None:
    return _decode(ctx, twilight=False)


@register_static_decoder("twilight")
def _twilight(ctx: DecodeContext) -> Selection | None:
    return _decode(ctx, twilight=True)
