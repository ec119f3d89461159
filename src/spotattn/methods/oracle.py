"""``oracle``: keeps the blocks that the exact attention scores rank highest.

It pays for a full attention-score pass, so it is never fast: it is the accuracy upper bound of every
block-sparse method at a given budget, and the yardstick for attention recall.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..selection import block_sums, rows_for_decode, rows_for_prefill, select_blocks
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
    key_pos = torch.arange(lk, device=query.device)
    start = seq_start.view(b, 1, 1, 1) if seq_start is not None else 0
    out = torch.zeros(b, hkv, num_rows, num_blocks, device=query.device)
    for a in range(0, lq, chunk):
        e = min(lq, a + chunk)
        qc = query[:, :, a:e].reshape(b, hkv, group * (e - a), d).float()
        scores = torch.matmul(qc, key.float().transpose(-1, -2)) * scale
        qpos = (torch.arange(a, e, device=query.device) + offset).repeat(group)
        allowed = (key_pos <= qpos.unsqueeze(-1)) & (key_pos >= start)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
        mass = block_sums(probs, block_size).view(b, hkv, group, e - a, num_blocks).amax(dim=2)
        rows = row_of_query[a:e].view(1, 1, -1, 1).expand_as(mass)
        out.scatter_reduce_(2, rows, mass, reduce="amax")
    return out.amax(dim=1, keepdim=True) if shared else out


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
        first, last = rows_for_decode(call.num_queries, call.num_keys, bs, call.query.device)
        row_of_query = torch.zeros(call.num_queries, dtype=torch.long, device=call.query.device)
        mass = exact_block_mass(
            call.query, call.key, call.scale, bs, row_of_query, 1, call.seq_start,
            self.config.granularity == "shared",
        )
        return select_blocks(
            mass, self.config.budget, bs, row_first_block=first, row_last_block=last, seq_start=call.seq_start
        )
