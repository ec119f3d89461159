"""``quest``: query-aware page selection for decode (Quest, Tang et al. 2024).

Each page of ``block_size`` keys (16 by default) keeps the element-wise minimum and maximum of its keys.
For a query ``q`` the largest score any key of the page can reach is bounded by
``sum_d max(q_d * min_d, q_d * max_d)``; the pages with the largest bounds are read, up to a token
budget. The bounds live in the :class:`~spotattn.cache.SparseCache` beside the keys and are updated
incrementally: a call recomputes only the pages its new tokens touch, so a crop (speculative decoding)
is followed by an exact refresh of the partly cut page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from ..cache import MetaEntry
from ..selection import mask_to_selection, rows_for_decode, select_blocks
from ..types import Selection, TopK
from ._masks import GRANULARITIES, check_choice, check_nonneg_int, group_union, selection_mask
from .base import AttentionCall, Method, MethodConfig, register_method

META_MIN = "quest.min"
META_MAX = "quest.max"
# A zero-byte per-token entry (B, L, 0): its length is the number of tokens the bounds cover. Crop
# shortens it with the keys, so a page is reused only when every one of its tokens was seen.
META_COVERED = "quest.covered"


@dataclass
class QuestConfig(MethodConfig):
    """``block_size``: page size in tokens. ``budget``: tokens read per decode step (whole pages, sink
    and last page included). ``granularity``: ``group`` ranks pages by the bound summed over the query
    heads of a kv-group; ``head`` lets every query head pick its own top pages and the kv-group reads
    their union. ``dense_layers``: the first layers run dense (Quest leaves the first two dense)."""

    block_size: int = 16
    budget: TopK = field(default_factory=lambda: TopK(4096))
    granularity: Literal["group", "head"] = "group"
    dense_layers: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if not isinstance(self.budget, TopK):
            raise ValueError(f"{name}.budget must be a TopK token budget, got {self.budget!r}")
        if self.budget.tokens < self.block_size:
            raise ValueError(
                f"{name}.budget.tokens={self.budget.tokens} is below one page; allowed: at least "
                f"block_size={self.block_size} tokens"
            )
        check_choice(name, "granularity", self.granularity, GRANULARITIES)
        check_nonneg_int(name, "dense_layers", self.dense_layers)


def update_page_bounds(
    key: torch.Tensor, num_new: int, page: int, state: dict[str, MetaEntry] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page key minimum and maximum ``(B, Hkv, NP, D)`` for ``key`` ``(B, Hkv, Lk, D)``.

    Pages before the first one touched by the ``num_new`` newest tokens are reused from ``state``
    (the layer's cache metadata) and the rest recomputed; the result is stored back. Without usable
    stored bounds (no cache, another method filled the prefill) everything is recomputed.
    """
    b, h, lk, d = key.shape
    state_or_empty = state if state is not None else {}
    stored_min, stored_max = state_or_empty.get(META_MIN), state_or_empty.get(META_MAX)
    covered = state_or_empty.get(META_COVERED)
    usable = (
        stored_min is not None
        and stored_max is not None
        and covered is not None
        and stored_min.tokens_per_entry == page
        and stored_min.tensor.shape[:2] == (b, h)
        and stored_min.tensor.shape[3] == d
        and stored_max.tensor.shape == stored_min.tensor.shape
    )
    # Reuse the pages that are complete in the stored bounds and untouched by the new tokens.
    first = min((lk - num_new) // page, covered.tensor.shape[1] // page) if usable else 0
    first = min(first, stored_min.tensor.shape[2]) if usable else 0
    tail = key[:, :, first * page :]
    pad = (-tail.shape[2]) % page
    # Padding with +inf / -inf leaves a partly filled page's min / max those of its real keys.
    new_min = F.pad(tail, (0, 0, 0, pad), value=float("inf")).unflatten(2, (-1, page)).amin(3)
    new_max = F.pad(tail, (0, 0, 0, pad), value=float("-inf")).unflatten(2, (-1, page)).amax(3)
    if first:
        new_min = torch.cat([stored_min.tensor[:, :, :first], new_min], dim=2)
        new_max = torch.cat([stored_max.tensor[:, :, :first], new_max], dim=2)
    if state is not None:
        state[META_MIN] = MetaEntry(new_min, tokens_per_entry=page, axis=2)
        state[META_MAX] = MetaEntry(new_max, tokens_per_entry=page, axis=2)
        marker = key.new_empty(b, lk, 0, dtype=torch.uint8)
        state[META_COVERED] = MetaEntry(marker, tokens_per_entry=1, axis=1)
    return new_min, new_max


def page_upper_bounds(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper bound of ``q . k`` over each page's keys: ``(B, Hq, T, NP)`` float32.

    ``max(q_d min_d, q_d max_d)`` is ``q_d max_d`` for positive ``q_d`` and ``q_d min_d`` otherwise, so the
    bound is two matmuls with the positive and negative parts of the query.
    """
    b, hq, t, d = query.shape
    hkv = kmin.shape[1]
    q = query.float().reshape(b, hkv, hq // hkv * t, d)
    bound = q.clamp(min=0) @ kmax.float().transpose(-1, -2) + q.clamp(max=0) @ kmin.float().transpose(-1, -2)
    return bound.view(b, hq, t, -1)


def quest_candidates(
    call: AttentionCall, kmin: torch.Tensor, kmax: torch.Tensor, budget: TopK, page: int, granularity: str
) -> torch.Tensor:
    """Bool ``(B, Hkv, 1, NP)``: the pages Quest reads for this decode call (sink and last page forced)."""
    hkv = call.key.shape[1]
    bound = page_upper_bounds(call.query, kmin, kmax).sum(2, keepdim=True)  # (B, Hq, 1, NP)
    if granularity == "group":
        b, hq, _, n = bound.shape
        bound = bound.view(b, hkv, hq // hkv, 1, n).sum(2)
    # select_blocks wants non-negative scores; a uniform shift keeps the ranking, which is all TopK uses.
    score = bound - bound.amin(-1, keepdim=True) + 1.0
    first, last = rows_for_decode(call.num_queries, call.num_keys, page, call.query.device)
    chosen = select_blocks(
        score, budget, page, row_first_block=first, row_last_block=last, seq_start=call.seq_start
    )
    mask = selection_mask(chosen, score.shape[-1])
    return group_union(mask, hkv) if granularity == "head" else mask


@register_method("quest")
class Quest(Method):
    Config = QuestConfig

    def prefill(self, call: AttentionCall) -> Selection | None:
        # Dense prefill; only the page bounds are built so that decode starts incremental.
        if self.layer_idx >= self.config.dense_layers and call.cache_state is not None:
            update_page_bounds(call.key, call.num_queries, self.config.block_size, call.cache_state)
        return None

    def decode(self, call: AttentionCall) -> Selection | None:
        if self.layer_idx < self.config.dense_layers:
            return None
        page = self.config.block_size
        kmin, kmax = update_page_bounds(call.key, call.num_queries, page, call.cache_state)
        mask = quest_candidates(call, kmin, kmax, self.config.budget, page, self.config.granularity)
        return mask_to_selection(mask, page)
