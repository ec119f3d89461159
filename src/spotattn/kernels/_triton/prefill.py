"""Block-sparse causal prefill attention.

One program computes one query block (``block_size`` queries, the block's own rows of the selection)
for one query head, streaming the selected key blocks of its kv-group in ``BLOCK_N``-key tiles with an
online softmax in fp32. The grid runs the heads of one row side by side, so the query heads of a
kv-group (which share the block list) read the same key blocks at the same time and hit in L2; rows
are launched last-first, as the late rows hold the most blocks (less tail at the end of the grid).
Masks are only built for tiles that need them: the diagonal, the last partial block, left padding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..checks import check_attention_inputs, num_query_blocks
from ..reference import _check_selection
from .common import HEAD_DIMS, LOG2E, as_int32, dot_precision, interpreting, last_dim_contiguous, mm, require

PREFILL_BLOCK_SIZES = (64, 128)


def _configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
    shapes = [(64, 4, 3), (64, 8, 3), (64, 8, 4), (64, 4, 2), (128, 8, 3), (128, 8, 2), (32, 8, 2)]
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    bs, d = kwargs["BS"], kwargs["HEAD_DIM"]
    if kwargs["PREC"] == "ieee":  # fp32 tiles are twice the bytes: the narrow tile fits shared memory
        return [c for c in configs if c.kwargs["BLOCK_N"] == 32]
    keep = [c for c in configs if 64 <= c.kwargs["BLOCK_N"] <= bs]
    if d <= 64:  # small heads: 4 warps are enough
        keep = [c for c in keep if c.num_warps == 4] or keep
    return keep or configs[:1]


@triton.autotune(
    configs=_configs(),
    key=["BS", "HEAD_DIM", "PREC"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _prefill_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    Ids,
    Counts,
    Start,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    svb,
    svh,
    svt,
    sob,
    soh,
    sot,
    sib,
    sig,
    sir,
    scb,
    scg,
    scr,
    Hq,
    Lq,
    Lk,
    R,
    first_row,
    group,
    qk_scale,
    HAS_START: tl.constexpr,
    SHARED: tl.constexpr,
    BS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_h = tl.program_id(0)
    r = R - 1 - tl.program_id(1)
    b = (pid_h // Hq).to(tl.int64)
    h = pid_h % Hq
    hk = h // group
    if SHARED:
        g = 0
    else:
        g = hk
    if HAS_START:
        start = tl.load(Start + b)
    else:
        start = 0
    offset = Lk - Lq
    row_abs = first_row + r
    offs_m = row_abs * BS + tl.arange(0, BS)
    offs_d = tl.arange(0, HEAD_DIM)
    q_valid = (offs_m >= offset) & (offs_m < Lk)
    q_ptrs = Q + b * sqb + h * sqh + (offs_m - offset)[:, None] * sqt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_valid[:, None], other=0.0)
    q_lo = tl.maximum(row_abs * BS, offset)

    m_i = tl.full([BS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BS], dtype=tl.float32)
    acc = tl.zeros([BS, HEAD_DIM], dtype=tl.float32)
    cnt = tl.load(Counts + b * scb + g * scg + r * scr)
    id_base = Ids + b * sib + g * sig + r * sir
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    SUB: tl.constexpr = BS // BLOCK_N
    for it in range(0, cnt * SUB):
        blk = tl.load(id_base + it // SUB)
        kstart = blk * BS + (it % SUB) * BLOCK_N
        offs_n = kstart + tl.arange(0, BLOCK_N)
        k_ok = offs_n < Lk
        k = tl.load(k_base + offs_n[None, :] * skt + offs_d[:, None], mask=k_ok[None, :], other=0.0)
        qk = mm(q, k, PREC, UPCAST) * qk_scale
        # Only tiles reaching the row's first query (diagonal, end of sequence) or left padding need a mask.
        if (kstart + BLOCK_N - 1 > q_lo) | (kstart < start):
            ok = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= start)
            qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptrs = Out + b * sob + h * soh + (offs_m - offset)[:, None] * sot + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_valid[:, None])
    tl.store(Lse + (b * Hq + h) * Lq + (offs_m - offset), lse, mask=q_valid)


def _launch_prefill(q, k, v, block_ids, counts, block_size: int, scale: float, seq_start):
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    rows = block_ids.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    if lq == 0 or rows == 0:
        return out, lse.fill_(float("-inf"))
    first = (lk - lq) // block_size
    start = seq_start if seq_start is not None else counts  # placeholder pointer, never read
    grid = (b * hq, rows)
    _prefill_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        block_ids,
        counts,
        start,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        block_ids.stride(0),
        block_ids.stride(1),
        block_ids.stride(2),
        counts.stride(0),
        counts.stride(1),
        counts.stride(2),
        hq,
        lq,
        lk,
        rows,
        first,
        hq // hkv,
        scale * LOG2E,
        HAS_START=seq_start is not None,
        SHARED=block_ids.shape[1] == 1,
        BS=block_size,
        HEAD_DIM=d,
        PREC=dot_precision(q.dtype),
        UPCAST=interpreting(),
    )
    return out, lse


@torch.library.custom_op(
    "spotattn::block_sparse_prefill",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor block_ids, Tensor counts, int block_size, float scale, "
    "Tensor? seq_start) -> (Tensor, Tensor)",
)
def _prefill_op(q, k, v, block_ids, counts, block_size, scale, seq_start):
    return _launch_prefill(q, k, v, block_ids, counts, block_size, scale, seq_start)


@_prefill_op.register_fake
def _prefill_fake(q, k, v, block_ids, counts, block_size, scale, seq_start):
    b, hq, lq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, hq, lq), dtype=torch.float32)


def block_sparse_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_ids: torch.Tensor,
    counts: torch.Tensor,
    block_size: int,
    *,
    scale: float | None = None,
    seq_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton block-sparse causal prefill; same contract as ``reference.block_sparse_prefill_ref``.

    Supports ``block_size`` in (64, 128) and ``head_dim`` in (32, 64, 128); anything else raises.
    """
    b, hq, lq, d = check_attention_inputs(q, k, v, seq_start)
    require("block_sparse_prefill", "block_size", block_size, PREFILL_BLOCK_SIZES)
    require("block_sparse_prefill", "head_dim", d, HEAD_DIMS)
    hkv, lk = k.shape[1], k.shape[2]
    _check_selection(block_ids, counts, b, hkv, num_query_blocks(lq, lk, block_size))
    scale = d**-0.5 if scale is None else float(scale)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    start = seq_start.to(torch.int32).contiguous() if seq_start is not None else None
    # Eager calls skip the custom-op layer (its dispatch costs microseconds); tracing goes through it.
    op = _prefill_op if torch.compiler.is_compiling() else _launch_prefill
    return op(q, k, v, as_int32(block_ids), as_int32(counts), block_size, scale, start)
