"""Prism's block estimation in Triton (CUDA path; the PyTorch functions in :mod:`spotattn.methods.prism`
are the reference and the CPU path).

:func:`prism_selection` is the whole prefill estimate in three launches and no host synchronisation:

1. ``_pool_kernel``: one program per (block, batch x head) of the queries and the keys together. It
   averages the block's valid tokens (absolute-position blocks, left padding and partial blocks left
   out, as :func:`~spotattn.methods.prism.mean_pool` does) into float32 pooled vectors and, for the
   energy calibration, writes each pooled vector's squared norm over the whole head and over each band.
2. ``_band_probs_kernel``: one program per (16 query blocks, batch x head, band). It reduces those norms
   to the band's RMS ratios and logit scale (:func:`~spotattn.methods.prism.band_scales`; every program
   of a head repeats this small sum instead of a separate launch), applies the band by zeroing the
   query's other dims (a band costs one full-width dot), runs an online softmax over the causal key
   blocks, then writes the probabilities (causal part only).
3. ``_topp_union_kernel``: one program per (query block, batch x kv-head). For every head of the group
   and every band it finds the top-p set of the row by bisection on a probability threshold (the set
   ``{p >= t}`` with the largest ``t`` whose mass reaches the target: the sorted nucleus without a
   sort) over every allowed block, as Prism ranks them, then adds the sink and diagonal blocks (the
   rule of :func:`~spotattn.methods.prism.band_topp`), and writes the union over heads and bands as the
   ascending block list of the row (a prefix sum places each kept block), padded with -1 to the static
   width ``NB``, and its count. No sort and no maximum count on the host: the width is known upfront.

:func:`prism_block_mask` runs kernels 2 and 3 on given pooled inputs and scales and returns the block
mask instead (the kernels' test against :func:`~spotattn.methods.prism.pooled_block_mask`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton.common import HEAD_DIMS, LOG2E, last_dim_contiguous, next_pow2, require

BLOCK_R = 16  # query blocks per program (tl.dot needs at least 16 rows)
BLOCK_N = 64  # key blocks per inner step
BISECT_STEPS = 40  # threshold resolution 2**-40 on probabilities in [0, 1]
MAX_KEY_BLOCKS = 8192  # one row of key blocks lives in registers in the top-p kernel
POOL_TOKENS = 32  # tokens per step of the pooling loop
RED_BLOCK = 256  # pooled blocks per step of the calibration sums
TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny
LOG2E_C = tl.constexpr(LOG2E)  # kernels read only constexpr globals

# How the probability kernel gets each band's logit scale.
SCALE_GIVEN, SCALE_PLAIN, SCALE_CALIBRATED = 0, 1, 2


@triton.jit
def _pool_one(
    X,
    sxt,
    tok0,
    Out,
    Stats,
    stat_stride,
    BandMask,
    lo,
    hi,
    live,
    NBANDS: tl.constexpr,
    CALIBRATE: tl.constexpr,
    D: tl.constexpr,
    TOKENS: tl.constexpr,
):
    """Mean of the tokens at positions ``lo..hi-1`` (row ``pos - tok0`` of ``X``) into ``Out``, and the
    squared norms of that mean (per band, then over the head) into ``Stats``."""
    offs_t = tl.arange(0, TOKENS)
    offs_d = tl.arange(0, D)
    acc = tl.zeros([TOKENS, D], dtype=tl.float32)
    for t0 in range(lo, hi, TOKENS):
        t = t0 + offs_t
        rows = (t - tok0).to(tl.int64) * sxt
        acc += tl.load(X + rows[:, None] + offs_d[None, :], mask=(t < hi)[:, None], other=0.0).to(tl.float32)
    mean = tl.sum(acc, 0) / tl.maximum(hi - lo, 1).to(tl.float32)
    tl.store(Out + offs_d, mean, mask=live & (offs_d < D))
    if CALIBRATE:
        sq = mean * mean
        for z in tl.static_range(NBANDS):
            tl.store(Stats + z * stat_stride, tl.sum(sq * tl.load(BandMask + z * D + offs_d), 0), mask=live)
        tl.store(Stats + NBANDS * stat_stride, tl.sum(sq, 0), mask=live)


@triton.jit
def _pool_kernel(
    Q,
    K,
    QPooled,
    KPooled,
    QStats,
    KStats,
    BandMask,
    Start,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    B,
    Hq,
    Hkv,
    Lq,
    Lk,
    R,
    NB,
    first_row,
    HAS_START: tl.constexpr,
    NBANDS: tl.constexpr,
    CALIBRATE: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    TOKENS: tl.constexpr,
):
    # Pooled: (B * H, blocks, D). Stats: (NBANDS + 1, B * H, blocks), the bands' squared norms then the head's.
    i = tl.program_id(0)
    pid = tl.program_id(1)
    if pid < B * Hq:  # a query head: block i is absolute block first_row + i; token t sits at Lk - Lq + t
        b = pid // Hq
        h = pid % Hq
        offset = Lk - Lq
        lo = tl.maximum((first_row + i) * BS, offset)
        hi = tl.minimum((first_row + i) * BS + BS, Lk)
        if HAS_START:
            lo = tl.maximum(lo, tl.load(Start + b).to(tl.int32))
        live = i < R
        hi = tl.where(live, tl.maximum(hi, lo), lo)
        _pool_one(
            Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh, sqt, offset, QPooled + (pid.to(tl.int64) * R + i) * D,
            QStats + pid * R + i, B * Hq * R, BandMask, lo, hi, live, NBANDS, CALIBRATE, D, TOKENS,
        )
    else:  # a key head: block i, token t at t
        kid = pid - B * Hq
        b = kid // Hkv
        h = kid % Hkv
        lo = i * BS
        hi = tl.minimum(lo + BS, Lk)
        if HAS_START:
            lo = tl.maximum(lo, tl.load(Start + b).to(tl.int32))
        hi = tl.maximum(hi, lo)
        _pool_one(
            K + b.to(tl.int64) * skb + h.to(tl.int64) * skh, skt, 0, KPooled + (kid.to(tl.int64) * NB + i) * D,
            KStats + kid * NB + i, B * Hkv * NB, BandMask, lo, hi, i < NB, NBANDS, CALIBRATE, D, TOKENS,
        )


@triton.jit
def _sum_rows(Stats, base, n, RED: tl.constexpr):
    offs = tl.arange(0, RED)
    acc = tl.zeros([RED], dtype=tl.float32)
    for i0 in range(0, n, RED):
        acc += tl.load(Stats + base + i0 + offs, mask=i0 + offs < n, other=0.0)
    return tl.sum(acc, 0)


@triton.jit
def _calibrated_scale(
    QStats,
    KStats,
    BandMask,
    band,
    bh,
    bkv,
    B,
    Hq,
    Hkv,
    R,
    NB,
    NBANDS: tl.constexpr,
    D: tl.constexpr,
    RED: tl.constexpr,
):
    """``1 / (sqrt(d_z) * tau_z)`` from the pooled blocks' squared norms, as ``band_scales`` computes it."""
    dz = tl.sum(tl.load(BandMask + band * D + tl.arange(0, D)), 0)
    q_band = _sum_rows(QStats, (band * B * Hq + bh).to(tl.int64) * R, R, RED)
    q_all = _sum_rows(QStats, (NBANDS * B * Hq + bh).to(tl.int64) * R, R, RED)
    k_band = _sum_rows(KStats, (band * B * Hkv + bkv).to(tl.int64) * NB, NB, RED)
    k_all = _sum_rows(KStats, (NBANDS * B * Hkv + bkv).to(tl.int64) * NB, NB, RED)
    q_ratio = tl.sqrt_rn(q_band / (R * dz)) / tl.maximum(tl.sqrt_rn(q_all / (R * D)), TINY)
    k_ratio = tl.sqrt_rn(k_band / (NB * dz)) / tl.maximum(tl.sqrt_rn(k_all / (NB * D)), TINY)
    tau = tl.sqrt_rn(dz / D) * q_ratio * k_ratio
    return 1.0 / tl.maximum(tl.sqrt_rn(dz) * tau, TINY)


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
    QStats,
    KStats,
    Start,
    Out,
    B,
    Hq,
    Hkv,
    R,
    NB,
    first_row,
    HAS_START: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    NBANDS: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    RED: tl.constexpr,
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
    band_mask = tl.load(BandMask + band * D + offs_d)
    if SCALE_MODE == 0:  # given per (batch, head, band)
        scale = tl.load(Scale + bh * NBANDS + band)
    elif SCALE_MODE == 1:  # no calibration: 1 / sqrt(d_z)
        scale = 1.0 / tl.maximum(tl.sqrt_rn(tl.sum(band_mask, 0)), TINY)
    else:
        scale = _calibrated_scale(QStats, KStats, BandMask, band, bh, b * Hkv + hk, B, Hq, Hkv, R, NB, NBANDS, D, RED)
    q_ptr = Qb + (bh.to(tl.int64) * R + offs_r[:, None]) * D + offs_d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None], other=0.0)
    # Zero the dims outside the band and fold the band's scale (times log2 e, for exp2) into the query.
    q = q * band_mask[None, :] * (scale * LOG2E_C)
    row_blk = first_row + offs_r
    if HAS_START:
        start = tl.load(Start + b).to(tl.int32)
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
    Ids,
    Counts,
    B,
    Hq,
    Hkv,
    R,
    NB,
    first_row,
    p_keep,
    HAS_START: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    WRITE_IDS: tl.constexpr,
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
        start = tl.load(Start + b).to(tl.int32)
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
            p = p / tl.maximum(tl.sum(p, 0), TINY)
            lo = 0.0
            hi = 1.0
            for _ in range(STEPS):
                mid = (lo + hi) * 0.5
                reached = tl.sum(tl.where(p >= mid, p, 0.0), 0) >= target
                lo = tl.where(reached, mid, lo)
                hi = tl.where(reached, hi, mid)
            keep = keep | (allowed & (p >= lo))
    row = (b * Hkv + hk).to(tl.int64) * R + r
    if WRITE_MASK:
        tl.store(Mask + row * NB + offs_j, keep.to(tl.int8), mask=offs_j < NB)
    if WRITE_IDS:
        # Ascending list: kept block j goes to slot (kept blocks before j); the slots after the count get -1.
        kept = keep.to(tl.int32)
        slot = tl.cumsum(kept, 0) - 1
        count = tl.sum(kept, 0)
        tl.store(Ids + row * NB + slot, offs_j, mask=keep)
        tl.store(Ids + row * NB + offs_j, tl.full([BLOCK_NB], -1, tl.int32), mask=(offs_j >= count) & (offs_j < NB))
        tl.store(Counts + row, count)


def band_mask(head_dim: int, bands: list[torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """Float32 ``(Z, D)``: 1 on the dims of each band. Built on the host, copied once: callers that run
    every layer keep it (``MeanPool`` caches it per head dim and device)."""
    mask = torch.zeros(len(bands), head_dim)
    for z, idx in enumerate(bands):
        mask[z, idx.cpu()] = 1.0
    return mask.to(device)


def _check(kernel: str, d: int, num_bands: int, nb: int) -> None:
    require(kernel, "head_dim", d, HEAD_DIMS)
    require(kernel, "number of bands", num_bands, (1, 2))
    if nb > MAX_KEY_BLOCKS:
        raise ValueError(
            f"{kernel}: {nb} key blocks; the Triton kernel takes at most {MAX_KEY_BLOCKS} (use a larger block_size)"
        )


def estimate_from_pooled(
    qbar: torch.Tensor,
    kbar: torch.Tensor,
    masks: torch.Tensor,
    scale_mode: int,
    scale: torch.Tensor | None,
    stats: tuple[torch.Tensor, torch.Tensor] | None,
    p: float,
    block_size: int,
    first_row: int,
    seq_start: torch.Tensor | None,
    write_mask: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Kernels 2 and 3 on contiguous float32 pooled inputs: the int8 mask (write_mask) or the block
    lists ``(B, Hkv, R, NB)`` and counts ``(B, Hkv, R)``; None for the outputs not asked for.

    ``scale_mode``: ``SCALE_GIVEN`` reads ``scale`` ``(B, Hq, Z)``; ``SCALE_PLAIN`` uses ``1 / sqrt(d_z)``;
    ``SCALE_CALIBRATED`` computes the calibrated scale from ``stats`` (:func:`pool_blocks`).
    """
    if (scale_mode == SCALE_GIVEN and scale is None) or (scale_mode == SCALE_CALIBRATED and stats is None):
        raise ValueError("estimate_from_pooled: SCALE_GIVEN needs scale and SCALE_CALIBRATED needs stats")
    b, hq, r, d = qbar.shape
    hkv, nb = kbar.shape[1], kbar.shape[2]
    nbands = masks.shape[0]
    device = qbar.device
    probs = torch.empty(nbands, b, hq, r, nb, device=device, dtype=torch.float32)
    mask = ids = counts = None
    if write_mask:
        mask = torch.empty(b, hkv, r, nb, device=device, dtype=torch.int8)
    else:
        ids = torch.empty(b, hkv, r, nb, device=device, dtype=torch.int32)
        counts = torch.empty(b, hkv, r, device=device, dtype=torch.int32)
    start = seq_start.contiguous() if seq_start is not None else probs  # placeholders, never read
    q_stats, k_stats = stats if stats is not None else (probs, probs)
    _band_probs_kernel[(math.ceil(r / BLOCK_R), b * hq, nbands)](
        qbar, kbar, masks, scale if scale is not None else probs, q_stats, k_stats, start, probs,
        b, hq, hkv, r, nb, first_row,
        HAS_START=seq_start is not None, SCALE_MODE=scale_mode, NBANDS=nbands, D=d, BS=block_size,
        BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, RED=RED_BLOCK, num_warps=4,
    )
    block_nb = max(16, next_pow2(nb))
    _topp_union_kernel[(r, b * hkv)](
        probs, start, probs if mask is None else mask, probs if ids is None else ids,
        probs if counts is None else counts, b, hq, hkv, r, nb, first_row, float(p),
        HAS_START=seq_start is not None, WRITE_MASK=write_mask, WRITE_IDS=not write_mask, NBANDS=nbands,
        BS=block_size, BLOCK_NB=block_nb, STEPS=BISECT_STEPS, num_warps=4 if block_nb <= 1024 else 8,
    )
    return mask, ids, counts


def pool_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    seq_start: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Mean-pooled queries ``(B, Hq, R, D)`` and keys ``(B, Hkv, NB, D)`` in float32, as
    :func:`~spotattn.methods.prism.mean_pool` pools them (the queries are the last ``Lq`` positions of the
    keys), in one launch. With ``masks`` (:func:`band_mask`) also each pooled vector's squared norm over
    each band, then over the head, for the calibration: ``(Z + 1, B * Hq, R)`` and ``(Z + 1, B * Hkv, NB)``.
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    first_row = (lk - lq) // block_size
    nb = math.ceil(lk / block_size)
    r = nb - first_row
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    # One allocation each for the pooled vectors and the norms; the query and key parts are views.
    pooled = torch.empty(b * hq * r * d + b * hkv * nb * d, device=q.device, dtype=torch.float32)
    qbar = pooled[: b * hq * r * d].view(b, hq, r, d)
    kbar = pooled[b * hq * r * d :].view(b, hkv, nb, d)
    stats = None
    if masks is not None:
        z = masks.shape[0] + 1
        flat = torch.empty(z * (b * hq * r + b * hkv * nb), device=q.device, dtype=torch.float32)
        stats = flat[: z * b * hq * r].view(z, b * hq, r), flat[z * b * hq * r :].view(z, b * hkv, nb)
    q_stats, k_stats = stats if stats is not None else (pooled, pooled)  # placeholders, never read
    _pool_kernel[(nb, b * (hq + hkv))](
        q, k, qbar, kbar, q_stats, k_stats, masks if masks is not None else pooled,
        seq_start.contiguous() if seq_start is not None else pooled,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        b, hq, hkv, lq, lk, r, nb, first_row,
        HAS_START=seq_start is not None, NBANDS=masks.shape[0] if masks is not None else 1,
        CALIBRATE=masks is not None, D=d, BS=block_size, TOKENS=POOL_TOKENS, num_warps=4,
    )
    return qbar, kbar, stats


def prism_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    masks: torch.Tensor,
    calibrate: bool,
    p: float,
    block_size: int,
    seq_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole prefill estimate of ``prism`` / ``meanpool`` from post-RoPE ``q`` ``(B, Hq, Lq, D)`` and
    ``k`` ``(B, Hkv, Lk, D)``: pooling, calibration (``calibrate``: each band's energy calibration, else
    ``1 / sqrt(d_z)``), band probabilities, top-p and the kv-group union, in three launches and no host
    synchronisation. ``masks``: the bands (:func:`band_mask`, on ``q``'s device).

    Returns int32 block lists ``(B, Hkv, R, NB)``, ascending and padded with -1 (the width is the number
    of key blocks, so it needs no look at the counts), and counts ``(B, Hkv, R)``: the rows of a
    :class:`~spotattn.types.Selection` whose first row is ``(Lk - Lq) // block_size``.
    """
    b, hq, lq, d = q.shape
    nb = math.ceil(k.shape[2] / block_size)
    _check("prism_selection", d, masks.shape[0], nb)
    qbar, kbar, stats = pool_blocks(q, k, block_size, seq_start, masks if calibrate else None)
    first_row = (k.shape[2] - lq) // block_size
    mode = SCALE_CALIBRATED if calibrate else SCALE_PLAIN
    _, ids, counts = estimate_from_pooled(
        qbar, kbar, masks, mode, None, stats, p, block_size, first_row, seq_start, write_mask=False
    )
    assert ids is not None and counts is not None
    return ids, counts


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
    """Bool ``(B, Hkv, R, NB)`` block mask, as :func:`spotattn.methods.prism.pooled_block_mask` builds it,
    from given pooled inputs and logit scales ``inv_scale`` ``(B, Hq, Z)``."""
    b, hq, r, d = qbar.shape
    nb = kbar.shape[2]
    _check("prism_block_mask", d, len(bands), nb)
    if first_row + r != nb:
        raise ValueError(
            f"prism_block_mask: query blocks {first_row}..{first_row + r - 1} must end at the last key "
            f"block {nb - 1}"
        )
    masks = band_mask(d, bands, qbar.device)
    scale = inv_scale.float().contiguous()
    qbar, kbar = qbar.float().contiguous(), kbar.float().contiguous()
    mask, _, _ = estimate_from_pooled(
        qbar, kbar, masks, SCALE_GIVEN, scale, None, p, block_size, first_row, seq_start, write_mask=True
    )
    assert mask is not None
    return mask.bool()
