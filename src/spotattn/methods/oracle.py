"""``oracle``: keeps the blocks that the exact attention scores rank highest.

It pays for a full attention-score pass, so it is never fast: it is the accuracy upper bound of every
block-sparse method at a given budget, and the yardstick for attention recall.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..selection import block_sums, mask_to_selection, rows_for_decode, rows_for_prefill, select_blocks
from ..types import Budget, DualTopP, Selection, TopK, TopP
from .base import AttentionCall, Method, MethodConfig, register_method

GRANULARITIES = ("group", "shared")


@dataclass
class OracleConfig(MethodConfig):
    budget: Budget = field(default_factory=lambda: TopP(0.9))
    granularity: Literal["group", "shared"] = "group"
    sparse_prefill: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.budget, (TopK, TopP, DualTopP)):
            raise ValueError(f"OracleConfig.budget must be TopK, TopP or DualTopP, got {self.budget!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"OracleConfig.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")


def _block_probs(
    query: torch.Tensor, key: torch.Tensor, scale: float, block_size: int, q_pos: torch.Tensor, start
) -> torch.Tensor:
    """Exact attention of ``(B, Hkv, M, D)`` queries at positions ``q_pos`` (M,), summed into key blocks."""
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    key_pos = torch.arange(key.shape[2], device=query.device)
    allowed = (key_pos <= q_pos.unsqueeze(-1)) & (key_pos >= start)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return block_sums(probs, block_size)


def exact_block_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    block_size: int,
    row_of_query: torch.Tensor,
    num_rows: int,
    seq_start: torch.Tensor | None,
    shared: bool,
    chunk: int = 512,
) -> torch.Tensor:
    """Exact attention mass of each key block, for each row: the largest share any of the row's queries
    (and the heads that share the row's list) gives that block.

    The maximum, not the mean, so that a block one query needs is not voted down by the others.
    ``row_of_query`` ``(Lq,)`` maps each query to its row. Returns ``(B, G, R, NB)``, G = Hkv or 1.
    Works in query chunks, so memory stays linear in length.
    """
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    group = hq // hkv
    offset = lk - lq
    num_blocks = -(-lk // block_size)
    start = seq_start.view(b, 1, 1, 1) if seq_start is not None else 0
    out = torch.zeros(b, hkv, num_rows, num_blocks, device=query.device)
    for a in range(0, lq, chunk):
        e = min(lq, a + chunk)
        qc = query[:, :, a:e].reshape(b, hkv, group * (e - a), d)
        q_pos = (torch.arange(a, e, device=query.device) + offset).repeat(group)
        mass = _block_probs(qc, key, scale, block_size, q_pos, start)
        mass = mass.view(b, hkv, group, e - a, num_blocks).amax(dim=2)
        rows = row_of_query[a:e].view(1, 1, -1, 1).expand_as(mass)
        out.scatter_reduce_(2, rows, mass, reduce="amax")
    return out.amax(dim=1, keepdim=True) if shared else out


def per_head_nucleus(call: AttentionCall, budget: Budget, block_size: int) -> Selection:
    """Decode selection for a kv-group: the union of every query head's own nucleus.

    Each head then reads at least ``p`` of its own attention, which a single ranking of the group's
    pooled mass does not promise. For 1..T decode queries the union stays small.
    """
    q, k = call.query, call.key
    b, hq, t, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    start = call.seq_start.view(b, 1, 1, 1) if call.seq_start is not None else 0
    q_pos = (torch.arange(t, device=q.device) + lk - t).repeat(hq // hkv)
    mass = _block_probs(q.reshape(b, hkv, -1, d), k, call.scale, block_size, q_pos, start)  # (B, Hkv, g*T, NB)
    nb = mass.shape[-1]
    first, last = rows_for_decode(t, lk, block_size, q.device)
    per_head = select_blocks(mass.reshape(b, -1, 1, nb), budget, block_size, row_first_block=first,
                             row_last_block=last, seq_start=call.seq_start)
    live = torch.arange(per_head.block_ids.shape[-1], device=q.device) < per_head.counts.unsqueeze(-1)
    keep = torch.zeros(b, per_head.block_ids.shape[1], 1, nb + 1, dtype=torch.bool, device=q.device)
    keep.scatter_(-1, torch.where(live, per_head.block_ids.long(), nb), True)
    keep = keep[..., :nb].view(b, hkv, -1, nb).any(dim=2, keepdim=True)
    return mask_to_selection(keep, block_size)


@register_method("oracle")
class Oracle(Method):
    Config = OracleConfig

    def prefill(self, call: AttentionCall) -> Selection | None:
        if not self.config.sparse_prefill:
            return None
        bs = self.config.block_size
        first, rows = rows_for_prefill(call.num_queries, call.num_keys, bs, call.query.device)
        positions = torch.arange(call.num_keys - call.num_queries, call.num_keys, device=call.query.device)
        mass = exact_block_mass(
            call.query, call.key, call.scale, bs, positions // bs - first, len(rows), call.seq_start,
            self.config.granularity == "shared",
        )
        return select_blocks(
            mass, self.config.budget, bs, row_first_block=rows, row_last_block=rows,
            seq_start=call.seq_start, first_row=first,
        )

    def decode(self, call: AttentionCall) -> Selection | None:
        bs = self.config.block_size
        if self.config.granularity == "group" and not isinstance(self.config.budget, TopK):
            return per_head_nucleus(call, self.config.budget, bs)
        first, last = rows_for_decode(call.num_queries, call.num_keys, bs, call.query.device)
        row_of_query = torch.zeros(call.num_queries, dtype=torch.long, device=call.query.device)
        mass = exact_block_mass(
            call.query, call.key, call.scale, bs, row_of_query, 1, call.seq_start,
            self.config.granularity == "shared",
        )
        return select_blocks(
            mass, self.config.budget, bs, row_first_block=first, row_last_block=last, seq_start=call.seq_start
        )
