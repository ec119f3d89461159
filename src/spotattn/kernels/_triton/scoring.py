"""Selection kernels: block scores from one representative key per block, and top-k / top-p selection.

``block_scores`` estimates each key block's attention mass for a kv-group: every query of the group's
heads takes a softmax over the blocks it may see (causal, not in left padding) of ``q . rep_j * scale``,
and the probabilities are summed over heads and queries. Two Triton passes over ``NB``-chunks keep a
single sequence spread over the whole GPU: the first writes each chunk's max and sum-of-exponentials per
query, the second merges them into the log-sum-exp, recomputes the chunk's logits and writes the mass.

``select_blocks_device`` turns a mass into a :class:`Selection` with exactly the rules of
:func:`spotattn.selection.select_blocks`, with one difference: the width of ``block_ids`` is a static
bound computed from the budget and shapes (not ``counts.max()``), so nothing waits on the GPU and the
call can be captured in a CUDA graph. Extra columns are ``-1`` padding, which every kernel ignores.
Decode rows (``R == 1``) go to the fused selection kernel of ``select.py`` (no sort); prefill rows rank
with the device sort of PyTorch (a segmented radix sort).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...selection import allowed_blocks
from ...types import Budget, DualTopP, Selection, TopK, TopP
from .common import HEAD_DIMS, LOG2E, dot_precision, interpreting, last_dim_contiguous, mm, next_pow2, require
from .select import fused_select_supported, select_decode_fused

BLOCK_NB = 64


@triton.jit
def _score_logits(
    Q,
    Rep,
    b,
    hk,
    c,
    Start,
    sqb,
    sqh,
    sqt,
    srb,
    srh,
    srn,
    NB,
    T,
    group,
    num_keys,
    qk_scale,
    HAS_START: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_NB: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_j = c * BLOCK_NB + tl.arange(0, BLOCK_NB)
    row_ok = offs_m < group * T
    head = hk * group + offs_m // T
    t = offs_m % T
    qpos = num_keys - T + t
    q = tl.load(
        Q + b * sqb + head[:, None] * sqh + t[:, None] * sqt + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    rep = tl.load(
        Rep + b * srb + hk * srh + offs_j[None, :] * srn + offs_d[:, None],
        mask=(offs_j < NB)[None, :],
        other=0.0,
    )
    logits = mm(q, rep, PREC, UPCAST) * qk_scale
    if HAS_START:
        start = tl.load(Start + b)
    else:
        start = 0
    ok = (offs_j[None, :] * BS <= qpos[:, None]) & ((offs_j[None, :] + 1) * BS > start) & row_ok[:, None]
    return tl.where(ok, logits, float("-inf")), row_ok, offs_j


@triton.jit
def _score_stats_kernel(
    Q,
    Rep,
    Start,
    StatM,
    StatL,
    sqb,
    sqh,
    sqt,
    srb,
    srh,
    srn,
    Hkv,
    NB,
    T,
    group,
    num_keys,
    qk_scale,
    num_chunks,
    HAS_START: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_NB: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    c = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // Hkv).to(tl.int64)
    hk = pid % Hkv
    logits, row_ok, _ = _score_logits(
        Q,
        Rep,
        b,
        hk,
        c,
        Start,
        sqb,
        sqh,
        sqt,
        srb,
        srh,
        srn,
        NB,
        T,
        group,
        num_keys,
        qk_scale,
        HAS_START,
        BS,
        BLOCK_M,
        BLOCK_NB,
        HEAD_DIM,
        PREC,
        UPCAST,
    )
    m = tl.max(logits, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.math.exp2(logits - m_safe[:, None]), 1)
    offs_m = tl.arange(0, BLOCK_M)
    idx = (pid * num_chunks + c) * BLOCK_M + offs_m
    tl.store(StatM + idx, m)
    tl.store(StatL + idx, s)


@triton.jit
def _score_mass_kernel(
    Q,
    Rep,
    Start,
    StatM,
    StatL,
    Mass,
    sqb,
    sqh,
    sqt,
    srb,
    srh,
    srn,
    Hkv,
    NB,
    T,
    group,
    num_keys,
    qk_scale,
    num_chunks,
    HAS_START: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_NB: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    c = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // Hkv).to(tl.int64)
    hk = pid % Hkv
    offs_m = tl.arange(0, BLOCK_M)
    m_run = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([BLOCK_M], dtype=tl.float32)
    for cc in range(0, num_chunks):
        idx = (pid * num_chunks + cc) * BLOCK_M + offs_m
        m_c = tl.load(StatM + idx)
        l_c = tl.load(StatL + idx)
        m_new = tl.maximum(m_run, m_c)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_run = l_run * tl.math.exp2(m_run - m_safe) + l_c * tl.math.exp2(m_c - m_safe)
        m_run = m_new
    lse = tl.where(l_run > 0, m_run + tl.math.log2(tl.where(l_run > 0, l_run, 1.0)), 0.0)
    logits, row_ok, offs_j = _score_logits(
        Q,
        Rep,
        b,
        hk,
        c,
        Start,
        sqb,
        sqh,
        sqt,
        srb,
        srh,
        srn,
        NB,
        T,
        group,
        num_keys,
        qk_scale,
        HAS_START,
        BS,
        BLOCK_M,
        BLOCK_NB,
        HEAD_DIM,
        PREC,
        UPCAST,
    )
    p = tl.math.exp2(logits - lse[:, None])
    tl.store(Mass + pid * NB + offs_j, tl.sum(p, 0), mask=offs_j < NB)


def _launch_scores(q, rep, block_size, num_keys, scale, seq_start):
    b, hq, t, d = q.shape
    hkv, nb = rep.shape[1], rep.shape[2]
    group = hq // hkv
    block_m = max(16, next_pow2(group * t))
    chunks = max(1, math.ceil(nb / BLOCK_NB))
    stat_m = torch.empty(b * hkv * chunks * block_m, dtype=torch.float32, device=q.device)
    stat_l = torch.empty_like(stat_m)
    mass = torch.empty(b, hkv, nb, dtype=torch.float32, device=q.device)
    start = seq_start if seq_start is not None else stat_m
    common = (
        q.stride(0),
        q.stride(1),
        q.stride(2),
        rep.stride(0),
        rep.stride(1),
        rep.stride(2),
        hkv,
        nb,
        t,
        group,
        num_keys,
        scale * LOG2E,
        chunks,
    )
    meta = dict(
        HAS_START=seq_start is not None,
        BS=block_size,
        BLOCK_M=block_m,
        BLOCK_NB=BLOCK_NB,
        HEAD_DIM=d,
        PREC=dot_precision(q.dtype),
        UPCAST=interpreting(),
        num_warps=4,
    )
    _score_stats_kernel[(chunks, b * hkv)](q, rep, start, stat_m, stat_l, *common, **meta)
    _score_mass_kernel[(chunks, b * hkv)](q, rep, start, stat_m, stat_l, mass, *common, **meta)
    return mass


@torch.library.custom_op(
    "spotattn::block_scores",
    mutates_args=(),
    schema="(Tensor q, Tensor rep, int block_size, int num_keys, float scale, Tensor? seq_start) -> Tensor",
)
def _scores_op(q, rep, block_size, num_keys, scale, seq_start):
    return _launch_scores(q, rep, block_size, num_keys, scale, seq_start)


@_scores_op.register_fake
def _scores_fake(q, rep, block_size, num_keys, scale, seq_start):
    return rep.new_empty((rep.shape[0], rep.shape[1], rep.shape[2]), dtype=torch.float32)


def block_scores(
    q: torch.Tensor,
    rep: torch.Tensor,
    block_size: int,
    num_keys: int,
    *,
    scale: float | None = None,
    seq_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Estimated attention mass ``(B, Hkv, NB)`` (float32) of each key block for each kv-group.

    ``q``: ``(B, Hq, T, D)``, the last ``T`` of ``num_keys`` positions; ``rep``: ``(B, Hkv, NB, D)``, one
    representative key per block (a mean key, say). Each query's softmax over its visible blocks is
    summed over the group's heads and queries, so a group's masses add up to ``group * T``.
    """
    if q.dim() != 4 or rep.dim() != 4 or rep.shape[0] != q.shape[0] or rep.shape[3] != q.shape[3]:
        raise ValueError(
            f"block_scores: q (B, Hq, T, D) and rep (B, Hkv, NB, D) disagree: {tuple(q.shape)} and {tuple(rep.shape)}"
        )
    if q.shape[1] % rep.shape[1] != 0 or q.dtype != rep.dtype:
        raise ValueError(
            f"block_scores: query heads ({q.shape[1]}) must be a multiple of rep heads "
            f"({rep.shape[1]}) and dtypes must agree ({q.dtype}, {rep.dtype})"
        )
    require("block_scores", "head_dim", q.shape[3], HEAD_DIMS)
    if not 1 <= q.shape[1] // rep.shape[1] * q.shape[2] <= 128:
        raise ValueError(
            f"block_scores: query heads per group times queries must be in [1, 128], got "
            f"{q.shape[1] // rep.shape[1] * q.shape[2]}"
        )
    if rep.shape[2] != math.ceil(num_keys / block_size):
        raise ValueError(
            f"block_scores: rep has {rep.shape[2]} blocks; {num_keys} keys in blocks of "
            f"{block_size} need {math.ceil(num_keys / block_size)}"
        )
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    start = seq_start.to(torch.int32).contiguous() if seq_start is not None else None
    op = _scores_op if torch.compiler.is_compiling() else _launch_scores
    return op(last_dim_contiguous(q), last_dim_contiguous(rep), block_size, num_keys, scale, start)


def block_scores_ref(
    q: torch.Tensor,
    rep: torch.Tensor,
    block_size: int,
    num_keys: int,
    *,
    scale: float | None = None,
    seq_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch reference for :func:`block_scores`."""
    b, hq, t, d = q.shape
    hkv, nb = rep.shape[1], rep.shape[2]
    scale = d**-0.5 if scale is None else scale
    qg = q.float().reshape(b, hkv, hq // hkv * t, d)
    logits = torch.matmul(qg, rep.float().transpose(-1, -2)) * scale
    qpos = (torch.arange(t, device=q.device) + num_keys - t).repeat(hq // hkv)
    j = torch.arange(nb, device=q.device)
    ok = (j * block_size <= qpos.view(-1, 1)).expand(b, 1, -1, -1)
    if seq_start is not None:
        ok = ok & ((j + 1) * block_size > seq_start.view(b, 1, 1, 1))
    probs = torch.softmax(logits.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
    return probs.sum(2)


def _budget_blocks(budget: Budget, block_size: int) -> tuple[int, int]:
    if isinstance(budget, DualTopP):
        return max(1, math.ceil(budget.sink / block_size)), max(1, math.ceil(budget.recent / block_size))
    return 1, 1


def selection_width(budget: Budget, block_size: int, num_blocks: int, max_row_span: int = 2) -> int:
    """Static upper bound on the blocks a row selects under ``budget`` (the width of ``block_ids``)."""
    n_sink, n_recent = _budget_blocks(budget, block_size)
    forced = n_sink + max(n_recent, max_row_span)
    if isinstance(budget, TopK):
        cap = max(budget.max_blocks(block_size), forced)
    elif isinstance(budget, DualTopP) and budget.max_tokens is not None:
        cap = max(math.ceil(budget.max_tokens / block_size), forced)
    else:
        cap = num_blocks
    return max(1, min(num_blocks, cap))


def select_blocks_device(
    mass: torch.Tensor,
    budget: Budget,
    block_size: int,
    *,
    row_first_block: torch.Tensor,
    row_last_block: torch.Tensor,
    seq_start: torch.Tensor | None = None,
    first_row: int = 0,
    width: int | None = None,
) -> Selection:
    """:func:`spotattn.selection.select_blocks` without host synchronisation (static output width).

    ``width`` defaults to :func:`selection_width` with the rows' span known from their shapes; rows that
    would select more blocks than ``width`` keep the ``width`` lowest-numbered ones, so pass a larger
    width if you override the default bound.
    """
    b, g, r, nb = mass.shape
    if width is None:
        span = 2 if r == 1 else nb  # a decode row spans at most 2 blocks (T <= block size)
        width = selection_width(budget, block_size, nb, span)
    if r == 1 and fused_select_supported(nb):  # decode: one fused kernel, no sort
        return select_decode_fused(
            mass,
            budget,
            block_size,
            width,
            logits=False,
            row_first_block=row_first_block,
            row_last_block=row_last_block,
            seq_start=seq_start,
            first_row=first_row,
        )
    allowed = allowed_blocks(nb, row_last_block, block_size, seq_start, b).expand(b, g, r, nb)
    sink_block = (
        seq_start.long() // block_size
        if seq_start is not None
        else torch.zeros(b, dtype=torch.long, device=mass.device)
    )
    n_sink, n_recent = _budget_blocks(budget, block_size)
    j = torch.arange(nb, device=mass.device)
    sink = (j >= sink_block.view(-1, 1, 1, 1)) & (j < sink_block.view(-1, 1, 1, 1) + n_sink)
    first_recent = torch.minimum(row_first_block, row_last_block - n_recent + 1).view(1, 1, -1, 1)
    forced = (sink | ((j >= first_recent) & (j <= row_last_block.view(1, 1, -1, 1)))) & allowed
    residual = allowed & ~forced

    mass = torch.where(allowed, mass.float().clamp(min=0), 0.0)
    mass = mass / mass.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    sorted_mass, order = torch.where(residual, mass, -1.0).sort(dim=-1, descending=True)
    sorted_mass = sorted_mass.clamp(min=0)
    n_forced = forced.sum(-1)
    if isinstance(budget, TopK):
        take = (budget.max_blocks(block_size) - n_forced).clamp(min=0)
    elif isinstance(budget, TopP):
        take = _nucleus(sorted_mass, budget.p - (mass * forced).sum(-1))
    else:
        take = _nucleus(sorted_mass, budget.p * sorted_mass.sum(-1))
        take = torch.maximum(take, math.ceil(budget.min_tokens / block_size) - n_forced)
        if budget.max_tokens is not None:
            take = torch.minimum(take, (math.ceil(budget.max_tokens / block_size) - n_forced).clamp(min=0))
    take = torch.minimum(take.clamp(min=0), residual.sum(-1))
    keep_sorted = j < take.unsqueeze(-1)
    keep = torch.zeros_like(residual).scatter(-1, order, keep_sorted) | forced
    key = torch.where(keep, j, nb + j)
    ids = key.sort(dim=-1).values[..., :width]
    counts = keep.sum(-1).clamp(max=width).to(torch.int32)
    ids = torch.where(ids < nb, ids, -1).to(torch.int32)
    return Selection(ids.contiguous(), counts, block_size, first_row)


def _nucleus(sorted_mass: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smallest prefix of ``sorted_mass`` whose sum reaches ``target`` (0 when target <= 0)."""
    before = sorted_mass.cumsum(-1) - sorted_mass
    count = (before < target.unsqueeze(-1) - 1e-7).sum(-1)
    return torch.where(target > 1e-7, count, torch.zeros_like(count))
