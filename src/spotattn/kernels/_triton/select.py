"""Fused decode-row selection: block scores -> probabilities -> budget rule -> ascending id list, one launch.

One program per (batch, group) row keeps the whole row of ``NB`` block scores in registers and applies
the rules of :func:`spotattn.selection.select_blocks` without sorting:

- probabilities: a softmax over the allowed blocks (causal, not wholly in left padding) from logits, or
  non-negative masses renormalised over them (the reference's arithmetic);
- forced blocks: ``n_sink`` blocks from the first valid block, and the recent blocks ending at the current
  block (at least the row's own blocks);
- the budget: a count (``TopK``, the ``DualTopP`` floor and cap) or a nucleus over the residual blocks
  (``TopP``, ``DualTopP``). Both become a threshold on the residual probabilities, found by bisection
  on their float bits (non-negative floats order like their bit patterns as integers, so about 31
  integer steps land on the exact value, no sort needed);
- the kept blocks are compacted with a prefix sum into a static-width, ascending, ``-1`` padded list.

Agreement with ``select_blocks``: identical ids and counts when the residual probabilities have no exact
ties, up to float rounding in the sums (the reference sums the nucleus in sorted order with a cumulative
sum, the kernel with tree reductions; a result differs only if a running sum lands within rounding
distance of the ``p`` target). With exact ties, the counts follow the reference's rule and the kernel keeps
the lowest-numbered of the tied blocks (deterministic), where the reference's sort may keep any of them.
From logits, probabilities are computed here in float32 and may differ from a PyTorch softmax by an ulp.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...types import Budget, DualTopP, Selection, TopK, TopP
from .common import next_pow2

MAX_FUSED_BLOCKS = 32768  # the row lives in registers; longer rows use the sorting path
_INF_BITS = tl.constexpr(0x7F800000)  # bit pattern of +inf: above every probability


@triton.jit
def _select_row_kernel(
    X,
    sxb,
    sxg,
    Rows,
    s_rows,
    Start,
    Ids,
    sib,
    sig,
    Counts,
    scb,
    G,
    NB,
    W,
    num_queries,
    p_keep,
    k_blocks,
    floor_blocks,
    RULE: tl.constexpr,  # 0 TopK, 1 TopP, 2 DualTopP
    HAS_CAP: tl.constexpr,
    LOGITS: tl.constexpr,
    FROM_LEN: tl.constexpr,  # Rows holds seq_len per batch (else row_first_block, row_last_block)
    HAS_START: tl.constexpr,
    BS: tl.constexpr,
    N_SINK: tl.constexpr,
    N_RECENT: tl.constexpr,
    BLOCK: tl.constexpr,
    WBLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // G
    g = pid % G
    j = tl.arange(0, BLOCK)

    if FROM_LEN:
        seq_len = tl.load(Rows + b * s_rows).to(tl.int32)
        last = (seq_len - 1) // BS
        first_q = (seq_len - num_queries) // BS
    else:
        first_q = tl.load(Rows).to(tl.int32)
        last = tl.load(Rows + 1).to(tl.int32)
    if HAS_START:
        start = tl.load(Start + b).to(tl.int32)
    else:
        start = 0
    sink0 = start // BS
    allowed = (j <= last) & ((j + 1) * BS > start) & (j < NB)
    first_recent = tl.minimum(first_q, last - N_RECENT + 1)
    in_sink = (j >= sink0) & (j < sink0 + N_SINK)
    forced = (in_sink | ((j >= first_recent) & (j <= last))) & allowed
    residual = allowed & (~forced)

    x = tl.load(X + b.to(tl.int64) * sxb + g * sxg + j, mask=j < NB, other=0.0).to(tl.float32)
    if LOGITS:
        logit = tl.where(allowed, x, float("-inf"))
        m = tl.max(logit, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        e = tl.where(allowed, tl.exp(logit - m_safe), 0.0)
    else:
        e = tl.where(allowed, tl.maximum(x, 0.0), 0.0)
    total = tl.sum(e, 0)
    p = e / tl.maximum(total, 1.1754943508222875e-38)  # the reference clamps the total at float32 tiny

    # Residual probabilities as integer keys; -1 marks blocks outside the residual set (never selected
    # by a threshold >= 0). -0.0 and +0.0 both become 0.
    bits = tl.where(residual, tl.where(p > 0.0, p.to(tl.int32, bitcast=True), 0), -1)
    pres = tl.where(residual, p, 0.0)
    n_forced = tl.sum(forced.to(tl.int32), 0)
    n_res = tl.sum(residual.to(tl.int32), 0)

    vstar = 0
    c_ge_v = 0
    if RULE == 0:
        take = tl.maximum(k_blocks - n_forced, 0)
    else:
        if RULE == 1:
            target = p_keep - tl.sum(tl.where(forced, p, 0.0), 0)
        else:
            target = p_keep * tl.sum(pres, 0)
        t_eps = target - 1e-7
        # Nucleus: block i (in descending order) is taken iff the mass ranked above it is < target - eps.
        # That mass only grows as the value falls, so the taken set is {p >= v*} with
        # v* = min{v : mass(p > v) < target - eps}; bisect v on the bits.
        a0 = tl.sum(tl.where(bits > 0, pres, 0.0), 0)
        hi = tl.where(a0 < t_eps, 0, _INF_BITS)
        lo = hi * 0
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            below = tl.sum(tl.where(bits > mid, pres, 0.0), 0) < t_eps
            hi = tl.where(below, mid, hi)
            lo = tl.where(below, lo, mid)
        vstar = hi
        a_gt = tl.sum(tl.where(bits > vstar, pres, 0.0), 0)
        c_gt = tl.sum((bits > vstar).to(tl.int32), 0)
        c_eq = tl.sum((bits == vstar).to(tl.int32), 0)
        c_ge_v = c_gt + c_eq
        # Tied blocks at v*: the reference takes them while its running sum stays under the target.
        v = vstar.to(tl.float32, bitcast=True)
        n_eq = tl.minimum(tl.ceil((t_eps - a_gt) / tl.maximum(v, 1e-38)), c_eq.to(tl.float32)).to(tl.int32)
        take = tl.where(vstar == 0, n_res, c_gt + n_eq)
        take = tl.where(target > 1e-7, take, 0)
        if RULE == 2:
            take = tl.maximum(take, floor_blocks - n_forced)
            if HAS_CAP:
                take = tl.minimum(take, tl.maximum(k_blocks - n_forced, 0))
    take = tl.minimum(tl.maximum(take, 0), n_res)

    # The `take` largest residual blocks: threshold u = min{v : count(p > v) < take}, then the
    # lowest-numbered blocks equal to u fill up to `take`.
    c0 = tl.sum((bits > 0).to(tl.int32), 0)
    hi = tl.where(take == 0, _INF_BITS, tl.where(c0 < take, 0, _INF_BITS))
    lo = tl.where(take == 0, _INF_BITS - 1, tl.where(c0 < take, -1, 0))
    if RULE != 0:
        same = take == c_ge_v  # the nucleus threshold already holds exactly `take` blocks
        hi = tl.where(same, vstar, hi)
        lo = tl.where(same, vstar - 1, lo)
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        fits = tl.sum((bits > mid).to(tl.int32), 0) < take
        hi = tl.where(fits, mid, hi)
        lo = tl.where(fits, lo, mid)
    u = hi
    need = take - tl.sum((bits > u).to(tl.int32), 0)
    eq = (bits == u).to(tl.int32)
    eq_rank = tl.cumsum(eq, 0) - eq
    keep = (bits > u) | ((eq > 0) & (eq_rank < need)) | forced

    # Prefix-sum compaction: ascending ids, the lowest W when a row keeps more than W.
    keep_i = keep.to(tl.int32)
    pos = tl.cumsum(keep_i, 0) - keep_i
    count = tl.minimum(tl.sum(keep_i, 0), W)
    base = Ids + b.to(tl.int64) * sib + g * sig
    tl.store(base + pos, j, mask=keep & (pos < W))
    w = tl.arange(0, WBLOCK)
    tl.store(base + w, tl.full([WBLOCK], -1, tl.int32), mask=(w >= count) & (w < W))
    tl.store(Counts + b * scb + g, count)


def _budget_args(budget: Budget, block_size: int) -> tuple[int, bool, float, int, int, int, int]:
    """(rule, has_cap, p, k_blocks, floor_blocks, n_sink, n_recent) as the kernel takes them."""
    if isinstance(budget, TopK):
        return 0, False, 0.0, budget.max_blocks(block_size), 0, 1, 1
    if isinstance(budget, TopP):
        return 1, False, float(budget.p), 0, 0, 1, 1
    if isinstance(budget, DualTopP):
        cap = budget.max_tokens
        return (
            2,
            cap is not None,
            float(budget.p),
            math.ceil(cap / block_size) if cap is not None else 0,
            math.ceil(budget.min_tokens / block_size),
            max(1, math.ceil(budget.sink / block_size)),
            max(1, math.ceil(budget.recent / block_size)),
        )
    raise TypeError(f"unknown budget {budget!r}")


def fused_select_supported(num_blocks: int) -> bool:
    return 1 <= num_blocks <= MAX_FUSED_BLOCKS


def select_decode_fused(
    scores: torch.Tensor,
    budget: Budget,
    block_size: int,
    width: int,
    *,
    logits: bool,
    seq_len: torch.Tensor | None = None,
    num_queries: int = 1,
    row_first_block: torch.Tensor | None = None,
    row_last_block: torch.Tensor | None = None,
    seq_start: torch.Tensor | None = None,
    first_row: int = 0,
) -> Selection:
    """One decode row's :class:`Selection` ``(B, G, 1, width)`` from ``scores`` ``(B, G, 1, NB)`` or ``(B, G, NB)``.

    ``logits=True``: scores are log-masses (a softmax over the allowed blocks is taken here); else
    non-negative masses. The row is given either by ``seq_len`` (keys that exist, the ``num_queries`` new
    ones included; a 0-dim, ``(1,)`` or ``(B,)`` device tensor, so the call is CUDA-graph safe) or by the
    ``(1,)`` tensors ``row_first_block``/``row_last_block``. Nothing is read back to the host.
    """
    if scores.dim() == 4:
        if scores.shape[2] != 1:
            raise ValueError(f"select_decode_fused takes one decode row, got {scores.shape[2]}")
        scores = scores[:, :, 0]
    b, g, nb = scores.shape
    if not fused_select_supported(nb):
        raise ValueError(f"select_decode_fused: at most {MAX_FUSED_BLOCKS} blocks per row, got {nb}")
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    rule, has_cap, p, k_blocks, floor_blocks, n_sink, n_recent = _budget_args(budget, block_size)
    dev = scores.device
    if seq_len is not None:
        rows = seq_len.reshape(-1)
        s_rows = 0 if rows.numel() == 1 else 1
        if rows.numel() not in (1, b):
            raise ValueError(f"seq_len must hold 1 or {b} lengths, got {rows.numel()}")
    else:
        if row_first_block is None or row_last_block is None:
            raise ValueError("pass seq_len, or row_first_block and row_last_block")
        rows = torch.cat([row_first_block.reshape(1), row_last_block.reshape(1)])
        s_rows = 0
    ids = torch.empty(b, g, 1, width, dtype=torch.int32, device=dev)
    counts = torch.empty(b, g, 1, dtype=torch.int32, device=dev)
    start = seq_start.reshape(b) if seq_start is not None else rows
    block = max(16, next_pow2(nb))
    _select_row_kernel[(b * g,)](
        scores,
        scores.stride(0),
        scores.stride(1),
        rows,
        s_rows,
        start,
        ids,
        ids.stride(0),
        ids.stride(1),
        counts,
        counts.stride(0),
        g,
        nb,
        width,
        num_queries,
        p,
        k_blocks,
        floor_blocks,
        RULE=rule,
        HAS_CAP=has_cap,
        LOGITS=logits,
        FROM_LEN=seq_len is not None,
        HAS_START=seq_start is not None,
        BS=block_size,
        N_SINK=n_sink,
        N_RECENT=n_recent,
        BLOCK=block,
        WBLOCK=max(16, next_pow2(width)),
        num_warps=min(16, max(4, block // 512)),
    )
    return Selection(ids, counts, block_size, first_row)
