"""Prism's block estimation in Triton (CUDA path; :func:`spotattn.methods.prism.pooled_block_mask` is the
PyTorch reference and the CPU path).

Input: mean-pooled queries ``(B, Hq, R, D)`` and keys ``(B, Hkv, NB, D)`` in float32, the band dims and
each band's logit scale per (batch, head). Two kernels:

1. ``_band_probs_kernel``: one program per (16 query blocks, batch x head, band). The band is applied by
   zeroing the query's other dims, so a band costs one full-width dot. Pass one runs an online softmax
   over the causal key blocks, pass two writes the probabilities (causal part only).
2. ``_topp_union_kernel``: one program per (query block, batch x kv-head). For every head of the group
   and every band it finds the top-p set of the row by bisection on a probability threshold (the set
   ``{p >= t}`` with the largest ``t`` whose mass reaches the target: the sorted nucleus without a
   sort) over every allowed block, as Prism ranks them, then adds the sink and diagonal blocks (the
   rule of :func:`spotattn.methods.prism.band_topp`), and writes the union over heads and bands as a
   byte mask.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton.common import HEAD_DIMS, LOG2E, next_pow2, require

BLOCK_R = 16  # query blocks per program (tl.dot needs at least 16 rows)
BLOCK_N = 64  # key blocks per inner step
BISECT_STEPS = 40  # threshold resolution 2**-40 on probabilities in [0, 1]
MAX_KEY_BLOCKS = 8192  # one row of key blocks lives in registers in the top-p kernel


@triton.jit
def _band_logits(
    q, Kb, kv_base, j0, NB, row_blk, start, D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr
):
    offs_j = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = tl.load(Kb + kv_base + offs_j[None, :] * D + offs_d[:, None], mask=(offs_j < NB)[None, :], other=0.0)
    s = tl.dot(q, k, input_precision="ieee")
    ok = (offs_j[None, :] <= row_blk[:, None]) & ((offs_j[None, :] + 1) * BS > start) & (offs_j < NB)[None, :]
    return tl.where(ok, s, float("-inf")), offs_j


@triton.jit
def _band_probs_kernel(
    Qb,
    Kb,
    BandMask,
    Scale,
    Start,
    Out,
    B,
    Hq,
    Hkv,
    R,
    NB,
    first_row,
    HAS_START: tl.constexpr,
    NBANDS: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    r0 = tl.program_id(0) * BLOCK_R
    bh = tl.program_id(1)
    band = tl.program_id(2)
    b = bh // Hq
    h = bh % Hq
    hk = h // (Hq // Hkv)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, D)
    row_ok = offs_r < R
    q_ptr = Qb + (bh.to(tl.int64) * R + offs_r[:, None]) * D + offs_d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None], other=0.0)
    # Zero the dims outside the band and fold the band's scale (times log2 e, for exp2) into the query.
    q = q * tl.load(BandMask + band * D + offs_d)[None, :] * tl.load(Scale + bh * NBANDS + band)
    row_blk = first_row + offs_r
    if HAS_START:
        start = tl.load(Start + b)
    else:
        start = 0
    kv_base = (b * Hkv + hk).to(tl.int64) * NB * D
    hi = tl.minimum(NB, first_row + r0 + BLOCK_R)  # no row of this program sees a block past hi
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    lsum = tl.zeros([BLOCK_R], dtype=tl.float32)
    for j0 in range(0, hi, BLOCK_N):
        s, _ = _band_logits(q, Kb, kv_base, j0, NB, row_blk, start, D, BS, BLOCK_N)
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        lsum = lsum * tl.math.exp2(m - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    inv_l = tl.where(lsum > 0, 1.0 / tl.where(lsum > 0, lsum, 1.0), 0.0)
    out_base = ((band * B + b) * Hq + h).to(tl.int64) * R * NB
    for j0 in range(0, hi, BLOCK_N):
        s, offs_j = _band_logits(q, Kb, kv_base, j0, NB, row_blk, start, D, BS, BLOCK_N)
        p = tl.math.exp2(s - m_safe[:, None]) * inv_l[:, None]
        tl.store(
            Out + out_base + offs_r[:, None] * NB + offs_j[None, :],
            p,
            mask=row_ok[:, None] & (offs_j < NB)[None, :],
        )


@triton.jit
def _topp_union_kernel(
    Probs,
    Start,
    Mask,
    B,
    Hq,
    Hkv,
    R,
    NB,
    first_row,
    p_keep,
    HAS_START: tl.constexpr,
    NBANDS: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_NB: tl.constexpr,
    STEPS: tl.constexpr,
):
    r = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // Hkv
    hk = pid % Hkv
    group = Hq // Hkv
    row_blk = first_row + r
    offs_j = tl.arange(0, BLOCK_NB)
    if HAS_START:
        start = tl.load(Start + b)
    else:
        start = 0
    allowed = (offs_j <= row_blk) & ((offs_j + 1) * BS > start) & (offs_j < NB)
    sink = start // BS
    forced = allowed & ((offs_j == sink) | (offs_j == row_blk))
    keep = forced
    target = p_keep - 1e-7  # the nucleus over every allowed block; the forced ones are added after it
    for g in range(0, group):
        h = hk * group + g
        for band in tl.static_range(NBANDS):
            base = (((band * B + b) * Hq + h).to(tl.int64) * R + r) * NB
            p = tl.load(Probs + base + offs_j, mask=allowed, other=0.0)
            p = p / tl.maximum(tl.sum(p, 0), 1.1754943508222875e-38)
            lo = 0.0
            hi = 1.0
            for _ in range(STEPS):
                mid = (lo + hi) * 0.5
                reached = tl.sum(tl.where(p >= mid, p, 0.0), 0) >= target
                lo = tl.where(reached, mid, lo)
                hi = tl.where(reached, hi, mid)
            keep = keep | (allowed & (p >= lo))
    tl.store(Mask + ((b * Hkv + hk).to(tl.int64) * R + r) * NB + offs_j, keep.to(tl.int8), mask=offs_j < NB)


def prism_block_mask(
    qbar: torch.Tensor,
    kbar: torch.Tensor,
    bands: list[torch.Tensor],
    inv_scale: torch.Tensor,
    p: float,
    block_size: int,
    first_row: int,
    seq_start: torch.Tensor | None,
) -> torch.Tensor:
    """Bool ``(B, Hkv, R, NB)`` block mask, as :func:`spotattn.methods.prism.pooled_block_mask` builds it."""
    b, hq, r, d = qbar.shape
    hkv, nb = kbar.shape[1], kbar.shape[2]
    require("prism_block_mask", "head_dim", d, HEAD_DIMS)
    require("prism_block_mask", "number of bands", len(bands), (1, 2))
    if nb > MAX_KEY_BLOCKS:
        raise ValueError(
            f"prism_block_mask: {nb} key blocks; the Triton kernel takes at most {MAX_KEY_BLOCKS} "
            "(use a larger block_size)"
        )
    if first_row + r != nb:
        raise ValueError(
            f"prism_block_mask: query blocks {first_row}..{first_row + r - 1} must end at the last key "
            f"block {nb - 1}"
        )
    device = qbar.device
    qbar = qbar.float().contiguous()
    kbar = kbar.float().contiguous()
    band_mask = torch.zeros(len(bands), d, device=device)
    for z, idx in enumerate(bands):
        band_mask[z, idx.to(device)] = 1.0
    scale = (inv_scale.float() * LOG2E).contiguous()
    probs = torch.empty(len(bands), b, hq, r, nb, device=device, dtype=torch.float32)
    mask = torch.empty(b, hkv, r, nb, device=device, dtype=torch.int8)
    start = seq_start.to(torch.int32).contiguous() if seq_start is not None else mask
    _band_probs_kernel[(math.ceil(r / BLOCK_R), b * hq, len(bands))](
        qbar, kbar, band_mask, scale, start, probs, b, hq, hkv, r, nb, first_row,
        HAS_START=seq_start is not None, NBANDS=len(bands), D=d, BS=block_size, BLOCK_R=BLOCK_R,
        BLOCK_N=BLOCK_N, num_warps=4,
    )
    block_nb = max(16, next_pow2(nb))
    _topp_union_kernel[(r, b * hkv)](
        probs, start, mask, b, hq, hkv, r, nb, first_row, float(p),
        HAS_START=seq_start is not None, NBANDS=len(bands), BS=block_size, BLOCK_NB=block_nb,
        STEPS=BISECT_STEPS, num_warps=4 if block_nb <= 1024 else 8,
    )
    return mask.bool()

