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
    query_blocks: list[tuple[int, int]],
    seq_start: torch.Tensor | None,
    shared: bool,
) -> torch.Tensor:
    """Exact attention mass of each key block, averaged over each row's queries and heads.

    ``query_blocks`` lists each row's query span as indices into ``query``. Returns ``(B, G, R, NB)``
    with G = Hkv (or 1 when ``shared``). Computed one row at a time: memory stays linear in length.
    """
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    group = hq // hkv
    offset = lk - lq
    key_pos = torch.arange(lk, device=query.device)
    start = seq_start.view(b, 1, 1, 1) if seq_start is not None else 0
    rows = []
    for qa, qe in query_blocks:
        qc = query[:, :, qa:qe].reshape(b, hkv, group * (qe - qa), d).float()
        scores = torch.matmul(qc, key.float().transpose(-1, -2)) * scale
        qpos = (torch.arange(qa, qe, device=query.device) + offset).repeat(group)
        allowed = (key_pos <= qpos.unsqueeze(-1)) & (key_pos >= start)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
        mass = probs.mean(dim=2, keepdim=True)  # over the group's heads and the row's queries
        rows.append(block_sums(mass, block_size))
    mass = torch.cat(rows, dim=2)
    return mass.mean(dim=1, keepdim=True) if shared else mass


@register_method("oracle")
class Oracle(Method):
    Config = OracleConfig

    def prefill(self, call: AttentionCall) -> Selection | None:
        if not self.config.sparse_prefill:
            return None
        bs = self.config.block_size
        first, rows = rows_for_prefill(call.num_queries, call.num_keys, bs, call.query.device)
        offset = call.num_keys - call.num_queries
        spans = [
            (max(offset, int(r) * bs) - offset, min(call.num_keys, (int(r) + 1) * bs) - offset) for r in rows
        ]
        mass = exact_block_mass(
            call.query, call.key, call.scale, bs, spans, call.seq_start, self.config.granularity == "shared"
        )
        return select_blocks(
            mass, self.config.budget, bs, row_first_block=rows, row_last_block=rows,
            seq_start=call.seq_start, first_row=first,
        )

    def decode(self, call: AttentionCall) -> Selection | None:
        bs = self.config.block_size
        first, last = rows_for_decode(call.num_queries, call.num_keys, bs, call.query.device)
        mass = exact_block_mass(
            call.query, call.key, call.scale, bs, [(0, call.num_queries)], call.seq_start,
            self.config.granularity == "shared",
        )
        return select_blocks(
            mass, self.config.budget, bs, row_first_block=first, row_last_block=last, seq_start=call.seq_start
        )
