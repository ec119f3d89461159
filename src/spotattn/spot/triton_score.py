"""Fused dequantise-and-score Triton kernel for the selector key cache (decode, one query per sequence).

Each program reads a tile of ``BLOCK_N`` cached keys once (bf16, or packed 4-bit codes plus their
group scales), dequantises them in registers, scores them against the ``H`` selector query heads with
one tensor-core dot (heads padded to 16), applies ReLU and the per-group head weights, masks padding
and the future, and reduces each 16-token block to its log-sum-exp. Only block logits reach memory:
``NB = L / 16`` floats per group instead of ``L`` token scores or ``L * d`` dequantised values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant import GROUP, check_format

_FMT_ID = {"bf16": 0, "int4": 1, "mxfp4": 2, "nvfp4": 3}


@triton.jit
def _e2m1(codes):
    # E2M1 (sign in bit 3) built as float32 bits, exactly: magnitude m = 2e + f is 0.5 f for e = 0, else
    # 2**(e - 1) (1 + f / 2), i.e. exponent field e + 126 and mantissa bit f (no exp2, no conversion).
    mag = codes & 7
    e = mag >> 1
    bits = tl.where(e == 0, tl.where(mag == 1, 126 << 23, 0), ((e + 126) << 23) | ((mag & 1) << 22))
    return (bits | ((codes & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3(bits):
    # FP8 E4M3 (finite values only: scales are positive and well inside range).
    e = ((bits >> 3) & 15).to(tl.float32)
    m = (bits & 7).to(tl.float32)
    return tl.where(e == 0.0, m * 0.125 * 0.015625, (1.0 + m * 0.125) * tl.exp2(e - 7.0))


@triton.jit
def _dequant(codes, scale, FMT: tl.constexpr, N: tl.constexpr, C: tl.constexpr, GC: tl.constexpr):
    """(N, C) 4-bit codes -> float32 values times their group scale (GC columns per group)."""
    if FMT == 1:
        # code - 8, exactly, without an int->float conversion: 2**23 + code as float bits, minus 2**23 + 8.
        vals = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    else:
        vals = _e2m1(codes)
    return (vals.reshape(N, C // GC, GC) * scale[:, :, None]).reshape(N, C)


@triton.jit
def _score_kernel(
    Q,
    W,
    K,
    S,
    Start,
    Out,
    sqb,
    sqh,
    swb,
    swg,
    skb,
    skn,
    ssb,
    ssn,
    sob,
    sog,
    num_keys,
    NB,
    H: tl.constexpr,
    HP: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    FMT: tl.constexpr,
    GS: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_START: tl.constexpr,
):
    b = tl.program_id(0)
    tile = tl.program_id(1)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_h = tl.arange(0, HP)
    in_n = offs_n < num_keys

    if FMT == 0:
        k = tl.load(K + b * skb + offs_n[:, None] * skn + offs_d[None, :], mask=in_n[:, None], other=0.0)
        k = k.to(tl.float32)
        q = tl.load(Q + b * sqb + offs_h[:, None] * sqh + offs_d[None, :], mask=(offs_h < H)[:, None], other=0.0)
        dots = tl.dot(k, tl.trans(q.to(tl.float32)))  # (BLOCK_N, HP)
    else:
        # Byte i holds elements 2i (low nibble) and 2i+1 (high nibble): score the even and the odd halves
        # with one dot each instead of interleaving them (a join/reshape would force the dequantised tile
        # through shared memory before the tensor-core dot).
        offs_p = tl.arange(0, D // 2)
        packed = tl.load(K + b * skb + offs_n[:, None] * skn + offs_p[None, :], mask=in_n[:, None], other=0)
        packed = packed.to(tl.int32)
        offs_g = tl.arange(0, D // GS)
        sraw = tl.load(S + b * ssb + offs_n[:, None] * ssn + offs_g[None, :], mask=in_n[:, None], other=0)
        if FMT == 1:
            scale = sraw.to(tl.float32)
        elif FMT == 2:
            scale = tl.exp2(sraw.to(tl.float32) - 127.0)
        else:
            scale = _e4m3(sraw.to(tl.int32))
        k_even = _dequant(packed & 15, scale, FMT, BLOCK_N, D // 2, GS // 2)
        k_odd = _dequant(packed >> 4, scale, FMT, BLOCK_N, D // 2, GS // 2)
        q_rows = Q + b * sqb + offs_h[:, None] * sqh + 2 * offs_p[None, :]
        q_even = tl.load(q_rows, mask=(offs_h < H)[:, None], other=0.0).to(tl.float32)
        q_odd = tl.load(q_rows + 1, mask=(offs_h < H)[:, None], other=0.0).to(tl.float32)
        dots = tl.dot(k_even, tl.trans(q_even))
        dots = tl.dot(k_odd, tl.trans(q_odd), dots)  # (BLOCK_N, HP)

    relu = tl.maximum(dots, 0.0)

    valid = in_n
    if HAS_START:
        valid = valid & (offs_n >= tl.load(Start + b))
    offs_blk = tile * (BLOCK_N // BS) + tl.arange(0, BLOCK_N // BS)
    for g in tl.static_range(G):
        wg = tl.load(W + b * swb + g * swg + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
        s = tl.sum(relu * wg[None, :], axis=1)
        s = tl.where(valid, s, float("-inf")).reshape(BLOCK_N // BS, BS)
        m = tl.max(s, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        lse = m_safe + tl.log(tl.sum(tl.exp(s - m_safe[:, None]), axis=1))
        tl.store(Out + b * sob + g * sog + offs_blk, lse, mask=offs_blk < NB)


def score_blocks_triton(
    q: torch.Tensor,
    w: torch.Tensor,
    parts: dict[str, torch.Tensor],
    fmt: str,
    num_keys: int,
    block_size: int,
    seq_start: torch.Tensor | None = None,
    block_n: int = 128,  # fastest of 64-256 on an H100 at 2K-8K blocks, B = 1 and 4
    num_warps: int = 4,
) -> torch.Tensor:
    """Block logits ``(B, G, 1, NB)`` of one query per sequence over the first ``num_keys`` cached keys.

    ``q`` ``(B, H, 1, d)`` (already scaled), ``w`` ``(B, G, H, 1)``; ``parts`` as from ``quantize``.
    ``block_n`` keys per program and ``num_warps`` set the tiling (benchmarks; results do not depend on it).
    """
    check_format(fmt)
    b, h, lq, d = q.shape
    if lq != 1:
        raise ValueError(f"the fused scoring kernel takes one query per sequence, got {lq}")
    g = w.shape[1]
    k = parts["k"]
    s = parts.get("s", k)
    nb = -(-num_keys // block_size)
    out = torch.empty(b, g, 1, nb, device=q.device, dtype=torch.float32)
    qf = q[:, :, 0].contiguous().float()
    wf = w[..., 0].contiguous().float()
    start = seq_start.to(torch.int32).contiguous() if seq_start is not None else qf
    grid = (b, triton.cdiv(num_keys, block_n))
    _score_kernel[grid](
        qf,
        wf,
        k,
        s,
        start,
        out,
        qf.stride(0),
        qf.stride(1),
        wf.stride(0),
        wf.stride(1),
        k.stride(0),
        k.stride(1),
        s.stride(0),
        s.stride(1),
        out.stride(0),
        out.stride(1),
        num_keys,
        nb,
        H=h,
        HP=max(16, triton.next_power_of_2(h)),
        G=g,
        D=d,
        FMT=_FMT_ID[fmt],
        GS=GROUP.get(fmt, 1),
        BS=block_size,
        BLOCK_N=block_n,
        HAS_START=seq_start is not None,
        num_warps=num_warps,
    )
    return out
