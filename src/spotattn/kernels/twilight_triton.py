"""Quest's and Twilight's decode selection in Triton (CUDA path of :mod:`spotattn.runtime.quest_twilight`).

One decode query per sequence, pages of ``BS`` tokens, one selection per kv-group (``granularity="group"``).
The PyTorch functions of :mod:`spotattn.methods.quest` and :mod:`spotattn.methods.twilight` are the
reference; the three kernels compute the same quantities without a host sync, on static buffers:

1. ``_decode_meta_kernel``: the cache metadata a new token changes, written in place: the min/max of
   the page holding it (its tokens up to the new one) and, for Twilight, the token's per-token min-max
   quantised key (codes packed ``8 / BITS`` to a byte, minimum and step in float32; the division is
   IEEE-rounded and the rounding half-to-even, as in :func:`~spotattn.methods.twilight.quantize_keys`).
2. ``_quest_bound_kernel``: every page's Quest bound summed over the group's query heads. The bound is
   linear in the clamped query (``q+ . max + q- . min``), so the group sum is one pass with the summed
   clamped queries.
3. ``_candidate_lse_kernel``: for every candidate page and query head, the log-sum-exp over the page's
   tokens of the estimated logits from dequantised keys (masked past the sequence and in left padding).
   A softmax over these page LSEs is the reference's softmax over candidate tokens summed per page.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton.common import next_pow2

BLOCK_P = 32  # pages per program of the bound kernel (two fp32 tiles of 32 x D in registers)
PAGES = 8  # candidate pages per program of the estimate kernel


@triton.jit
def _round_half_even(y):
    # torch.round rounds halves to even; floor(y + 0.5) would not (and may round up y just below 0.5).
    f = tl.floor(y)
    d = y - f
    odd = (f.to(tl.int32) & 1) == 1
    return f + tl.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)


@triton.jit
def _decode_meta_kernel(
    K,
    skb,
    skh,
    skn,
    Kmin,
    Kmax,
    smb,
    smh,
    smp,
    SeqLen,
    s_len,
    Codes,
    scb,
    sch,
    scn,
    Low,
    Step,
    slb,
    slh,
    sln,
    Hkv,
    levels,
    QUANT: tl.constexpr,
    BITS: tl.constexpr,
    PER: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // Hkv).to(tl.int64)
    h = pid % Hkv
    pos = tl.load(SeqLen + b * s_len).to(tl.int32) - 1
    page = pos // BS
    t = page * BS + tl.arange(0, BS)
    d = tl.arange(0, D)
    ok = (t <= pos)[:, None]
    k = tl.load(K + b * skb + h * skh + t[:, None] * skn + d[None, :], mask=ok, other=0.0).to(tl.float32)
    kmin = tl.min(tl.where(ok, k, float("inf")), 0)
    kmax = tl.max(tl.where(ok, k, float("-inf")), 0)
    meta = b * smb + h * smh + page * smp + d
    tl.store(Kmin + meta, kmin.to(Kmin.dtype.element_ty))
    tl.store(Kmax + meta, kmax.to(Kmax.dtype.element_ty))
    if QUANT:
        byte = tl.arange(0, D // PER)
        i = tl.arange(0, PER)
        x = tl.load(K + b * skb + h * skh + pos * skn + byte[:, None] * PER + i[None, :]).to(tl.float32)
        lo = tl.min(tl.min(x, 1), 0)
        step = tl.math.div_rn(tl.max(tl.max(x, 1), 0) - lo, levels)
        # div_rn: IEEE rounding, as PyTorch divides (`/` may compile to an approximate division).
        y = tl.math.div_rn(x - lo, tl.where(step > 0, step, 1.0))
        code = _round_half_even(y).to(tl.int32)
        packed = tl.sum(code << (i * BITS)[None, :], 1)
        tl.store(Codes + b * scb + h * sch + pos * scn + byte, packed.to(tl.uint8))
        tl.store(Low + b * slb + h * slh + pos * sln, lo)
        tl.store(Step + b * slb + h * slh + pos * sln, step)


@triton.jit
def _quest_bound_kernel(
    Q,
    sqb,
    sqh,
    Kmin,
    Kmax,
    smb,
    smh,
    smp,
    Out,
    Hkv,
    NP,
    G,
    GP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    c = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // Hkv).to(tl.int64)
    hk = pid % Hkv
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + (hk * G + g)[:, None] * sqh + d[None, :], mask=(g < G)[:, None], other=0.0)
    q = q.to(tl.float32)
    q_pos = tl.sum(tl.maximum(q, 0.0), 0)
    q_neg = tl.sum(tl.minimum(q, 0.0), 0)
    pages = c * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = (pages < NP)[:, None]
    offs = b * smb + hk * smh + pages[:, None] * smp + d[None, :]
    kmax = tl.load(Kmax + offs, mask=ok, other=0.0).to(tl.float32)
    kmin = tl.load(Kmin + offs, mask=ok, other=0.0).to(tl.float32)
    bound = tl.sum(kmax * q_pos[None, :] + kmin * q_neg[None, :], 1)
    tl.store(Out + pid.to(tl.int64) * NP + pages, bound, mask=pages < NP)


@triton.jit
def _candidate_lse_kernel(
    Q,
    sqb,
    sqh,
    Ids,
    sib,
    sig,
    Codes,
    scb,
    sch,
    scn,
    Low,
    Step,
    slb,
    slh,
    sln,
    SeqLen,
    s_len,
    Start,
    Out,
    Hkv,
    W,
    G,
    scale,
    HAS_START: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BITS: tl.constexpr,
    PER: tl.constexpr,
    PAGES: tl.constexpr,
):
    c = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // Hkv).to(tl.int64)
    hk = pid % Hkv
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + (hk * G + g)[:, None] * sqh + d[None, :], mask=(g < G)[:, None], other=0.0)
    q = q.to(tl.float32)
    seq_len = tl.load(SeqLen + b * s_len).to(tl.int32)
    if HAS_START:
        start = tl.load(Start + b).to(tl.int32)
    else:
        start = 0
    shift = (d % PER) * BITS
    for i in tl.static_range(PAGES):
        w = c * PAGES + i
        page = tl.load(Ids + b * sib + hk * sig + w, mask=w < W, other=-1)
        t = page * BS + tl.arange(0, BS)
        ok = (page >= 0) & (t < seq_len) & (t >= start)
        tt = tl.where(ok, t, 0)
        raw = tl.load(Codes + b * scb + hk * sch + tt[:, None] * scn + (d // PER)[None, :], mask=ok[:, None], other=0)
        code = (raw.to(tl.int32) >> shift[None, :]) & ((1 << BITS) - 1)
        low = tl.load(Low + b * slb + hk * slh + tt * sln, mask=ok, other=0.0)
        step = tl.load(Step + b * slb + hk * slh + tt * sln, mask=ok, other=0.0)
        k = low[:, None] + code.to(tl.float32) * step[:, None]  # (BS, D), as dequantize_keys
        logits = tl.sum(q[:, None, :] * k[None, :, :], 2) * scale  # (GP, BS)
        logits = tl.where(ok[None, :], logits, float("-inf"))
        m = tl.max(logits, 1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        s = tl.sum(tl.exp(logits - m_safe[:, None]), 1)
        lse = tl.where(s > 0, m_safe + tl.log(tl.where(s > 0, s, 1.0)), float("-inf"))
        tl.store(Out + ((b * Hkv + hk) * G + g) * W + w, lse, mask=(g < G) & (w < W))


def _check(q: torch.Tensor, hkv: int) -> tuple[int, int, int]:
    b, hq, t, d = q.shape
    if t != 1:
        raise ValueError(f"the Quest/Twilight decode kernels take one query per sequence, got {t}")
    if hq % hkv or d != next_pow2(d):
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}; head dim {d} a power of two")
    return b, hq // hkv, d


def _lengths(seq_len: torch.Tensor, b: int) -> tuple[torch.Tensor, int]:
    rows = seq_len.reshape(-1)
    if rows.numel() not in (1, b):
        raise ValueError(f"seq_len must hold 1 or {b} lengths, got {rows.numel()}")
    return rows, 0 if rows.numel() == 1 else 1


def update_decode_meta(
    keys: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    seq_len: torch.Tensor,
    block_size: int,
    quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    bits: int = 4,
) -> None:
    """In place: the bounds of the page holding token ``seq_len - 1`` of ``keys`` ``(B, Hkv, C, D)``
    (``kmin``/``kmax`` ``(B, Hkv, C / block_size, D)``) and, given ``quantized`` = (codes, low, step)
    buffers ``(B, Hkv, C, D * bits / 8)``, ``(B, Hkv, C, 1)`` x 2, that token's quantised key."""
    b, hkv, _, d = keys.shape
    rows, s_len = _lengths(seq_len, b)
    codes, low, step = quantized if quantized is not None else (kmin, kmin, kmin)
    for x in (keys, kmin, kmax, codes):
        if x.stride(-1) != 1:
            raise ValueError("update_decode_meta: buffers must be contiguous in their last dim")
    _decode_meta_kernel[(b * hkv,)](
        keys, keys.stride(0), keys.stride(1), keys.stride(2),
        kmin, kmax, kmin.stride(0), kmin.stride(1), kmin.stride(2),
        rows, s_len,
        codes, codes.stride(0), codes.stride(1), codes.stride(2),
        low, step, low.stride(0), low.stride(1), low.stride(2),
        hkv, float((1 << bits) - 1),
        QUANT=quantized is not None, BITS=bits, PER=8 // bits, D=d, BS=block_size,
        num_warps=4,
    )  # fmt: skip


def quest_group_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest bound of every page summed over each kv-group's query heads: ``(B, Hkv, NP)`` float32, for
    one query ``(B, Hq, 1, D)`` and page bounds ``(B, Hkv, NP, D)``."""
    hkv, npages = kmin.shape[1], kmin.shape[2]
    b, group, d = _check(q, hkv)
    if q.stride(-1) != 1 or kmin.stride() != kmax.stride() or kmin.stride(-1) != 1:
        raise ValueError("quest_group_bounds: q, kmin and kmax must be contiguous in their last dim, alike")
    out = torch.empty(b, hkv, npages, device=q.device, dtype=torch.float32)
    _quest_bound_kernel[(math.ceil(npages / BLOCK_P), b * hkv)](
        q, q.stride(0), q.stride(1), kmin, kmax, kmin.stride(0), kmin.stride(1), kmin.stride(2),
        out, hkv, npages, group, GP=next_pow2(group), D=d, BLOCK_P=BLOCK_P, num_warps=4,
    )  # fmt: skip
    return out


def candidate_page_lse(
    q: torch.Tensor,
    page_ids: torch.Tensor,
    quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    bits: int,
    block_size: int,
    seq_len: torch.Tensor,
    scale: float,
    seq_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, Hkv, G, W)`` float32: per query head (``G`` per kv-group) the natural-log LSE over each
    candidate page's tokens of ``scale * q . k_hat`` (``-inf`` for ``-1`` ids and pages with no visible
    token). ``page_ids`` ``(B, Hkv, W)`` or ``(B, Hkv, 1, W)``; ``quantized`` = (codes, low, step)."""
    if page_ids.dim() == 4:
        page_ids = page_ids[:, :, 0]
    codes, low, step = quantized
    hkv, width = page_ids.shape[1], page_ids.shape[2]
    b, group, d = _check(q, hkv)
    rows, s_len = _lengths(seq_len, b)
    ids = page_ids if page_ids.dtype == torch.int32 and page_ids.stride(-1) == 1 else page_ids.int().contiguous()
    if q.stride(-1) != 1 or codes.stride(-1) != 1 or low.stride() != step.stride():
        raise ValueError("candidate_page_lse: q and codes must be contiguous in their last dim; low, step alike")
    out = torch.empty(b, hkv, group, width, device=q.device, dtype=torch.float32)
    start = seq_start.to(torch.int32).contiguous() if seq_start is not None else rows
    _candidate_lse_kernel[(math.ceil(width / PAGES), b * hkv)](
        q, q.stride(0), q.stride(1), ids, ids.stride(0), ids.stride(1),
        codes, codes.stride(0), codes.stride(1), codes.stride(2),
        low, step, low.stride(0), low.stride(1), low.stride(2),
        rows, s_len, start, out, hkv, width, group, float(scale),
        HAS_START=seq_start is not None, GP=next_pow2(group), D=d, BS=block_size, BITS=bits, PER=8 // bits,
        PAGES=PAGES, num_warps=4,
    )  # fmt: skip
    return out
