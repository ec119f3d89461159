"""Fused dequantise-and-score Triton kernels for the selector key cache (decode, one query per sequence).

Both kernels read each cached key once (bf16, or packed 4-bit codes plus their group scales), dequantise in
registers, score it against the ``H`` selector query heads, apply ReLU and the per-group head weights, mask
padding and the future, and reduce each 16-token block to its log-sum-exp. Only block logits reach memory:
``NB = L / 16`` floats per group instead of ``L`` token scores or ``L * d`` dequantised values.

- ``_score_kernel`` (``programs_per_sm=0, math="tf32"``): one program per ``BLOCK_N``-key tile, one load
  then the math, scored with fp32 operands through ``tl.dot`` (TF32 on the GPU), heads padded to 16.
- ``_score_loop_kernel``: a persistent grid (``programs_per_sm`` x the SM count, spread over the batch);
  each program walks tiles ``pid, pid + P, ...`` in a ``tl.range`` loop with ``num_stages`` so that the
  next tiles' loads are issued under the current tile's math. ``math`` picks the scoring: ``"tf32"`` (as
  above), ``"bf16"`` (tensor-core dot of the 4-bit codes, exact in bf16, against the query split into a
  bf16 high and low part, with its own output columns per scale group so the scales are applied to the fp32
  partial sums: about fp32 accuracy) or ``"fma"`` (no tensor cores: dequantised keys times each head's
  query, summed in fp32).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..kernels._triton.common import interpreting, sm_count
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
def _scales(sraw, FMT: tl.constexpr):
    """Raw group scales -> float32: fp16 (int4), E8M0 exponent (mxfp4) or FP8 E4M3 (nvfp4)."""
    if FMT == 1:
        return sraw.to(tl.float32)
    elif FMT == 2:
        return tl.exp2(sraw.to(tl.float32) - 127.0)
    else:
        return _e4m3(sraw.to(tl.int32))


@triton.jit
def _store_block_lse(relu, wg, valid, out, offs_blk, NB, BLOCK_N: tl.constexpr, BS: tl.constexpr):
    """Token scores (head-weighted ReLU dots) -> each 16-token block's log-sum-exp, stored at ``out``."""
    sc = tl.sum(relu * wg[None, :], axis=1)
    sc = tl.where(valid, sc, float("-inf")).reshape(BLOCK_N // BS, BS)
    m = tl.max(sc, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    lse = m_safe + tl.log(tl.sum(tl.exp(sc - m_safe[:, None]), axis=1))
    tl.store(out + offs_blk, lse, mask=offs_blk < NB)


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
        scale = _scales(sraw, FMT)
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
        _store_block_lse(relu, wg, valid, Out + b * sob + g * sog, offs_blk, NB, BLOCK_N, BS)


@triton.jit
def _codes(c, FMT: tl.constexpr):
    """4-bit codes (int32) -> their unscaled float32 values (int4: code - 8; else E2M1), exactly."""
    if FMT == 1:
        return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    else:
        return _e2m1(c)


@triton.jit
def _dot16(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` for 16-bit operands; ``UPCAST`` (interpreter only) feeds them as fp32, since Triton
    3.6's CPU interpreter multiplies the raw bits of bfloat16 operands."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _round_bf16(x):
    # float32 -> nearest bfloat16 value (ties to even), still as float32: done on the bits, since the
    # interpreter's own conversion truncates.
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _query_split(Q, rows, cols, mask):
    """Query values at ``rows``/``cols`` offsets, split into bf16 high and low parts (q ~ hi + lo to ~2^-17)."""
    qv = tl.load(Q + rows + cols, mask=mask, other=0.0)
    hi = _round_bf16(qv)
    return hi.to(tl.bfloat16), _round_bf16(qv - hi).to(tl.bfloat16)


@triton.jit
def _score_loop_kernel(
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
    sob,
    sog,
    num_keys,
    NB,
    H: tl.constexpr,
    HO: tl.constexpr,
    HC: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    FMT: tl.constexpr,
    GS: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_START: tl.constexpr,
    MATH: tl.constexpr,
    STAGES: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # HO: width of the per-key head axis after scoring; HC: the dot's output columns per scale group
    # (MATH 1: HO high parts then HO low parts, padded so that the dot is at least 16 wide).
    # Scales are (B, L, D // GS) with tokens contiguous (the row stride is the constexpr D // GS), so their
    # loads vectorise and can be pipelined like the codes.
    b = tl.program_id(0)
    pid = tl.program_id(1)
    nprog = tl.num_programs(1)
    NG: tl.constexpr = D // GS
    NC: tl.constexpr = HC if FMT == 0 else NG * HC
    offs_h = tl.arange(0, HO)
    qb = Q + b * sqb

    # Everything per sequence is loaded once, before the loop.
    if HAS_START:
        start = tl.load(Start + b)
    else:
        start = 0
    offs_gw = tl.arange(0, GP)
    w_all = tl.load(
        W + b * swb + offs_gw[:, None] * swg + offs_h[None, :],
        mask=(offs_gw < G)[:, None] & (offs_h < H)[None, :],
        other=0.0,
    )
    if MATH == 1:
        offs_c = tl.arange(0, NC)
        col_h = offs_c % HO
        col_lo = (offs_c % HC) >= HO  # the low part's columns
        col_ok = (col_h < H) & ((offs_c % HC) < 2 * HO)
        if FMT == 0:
            offs_d = tl.arange(0, D)
            hi, lo = _query_split(qb, offs_d[:, None], col_h[None, :] * sqh, col_ok[None, :])
            q_t = tl.where(col_lo[None, :], lo, hi)  # (D, HC)
        else:
            offs_p = tl.arange(0, D // 2)
            ok = col_ok[None, :] & ((offs_p[:, None] // (GS // 2)) == (offs_c // HC)[None, :])
            hi, lo = _query_split(qb, 2 * offs_p[:, None], col_h[None, :] * sqh, ok)
            q_even = tl.where(col_lo[None, :], lo, hi)  # (D/2, NG * HC): block-diagonal over groups
            hi, lo = _query_split(qb + 1, 2 * offs_p[:, None], col_h[None, :] * sqh, ok)
            q_odd = tl.where(col_lo[None, :], lo, hi)
    else:
        if FMT == 0:
            offs_d = tl.arange(0, D)
            q_all = tl.load(qb + offs_h[:, None] * sqh + offs_d[None, :], mask=(offs_h < H)[:, None], other=0.0)
        else:
            offs_p = tl.arange(0, D // 2)
            q_even = tl.load(qb + offs_h[:, None] * sqh + 2 * offs_p[None, :], mask=(offs_h < H)[:, None], other=0.0)
            q_odd = tl.load(qb + offs_h[:, None] * sqh + 2 * offs_p[None, :] + 1, mask=(offs_h < H)[:, None], other=0.0)

    num_tiles = tl.cdiv(num_keys, BLOCK_N)
    for tile in tl.range(pid, num_tiles, nprog, num_stages=STAGES):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = offs_n < num_keys
        if FMT == 0:
            k = tl.load(K + b * skb + offs_n[:, None] * skn + offs_d[None, :], mask=in_n[:, None], other=0.0)
            if MATH == 1:
                dots = _dot16(k, q_t, tl.zeros((BLOCK_N, HC), tl.float32), UPCAST)
                dots = dots.reshape(BLOCK_N, HC // HO, HO).sum(axis=1)  # high + low
            elif MATH == 0:
                dots = tl.dot(k.to(tl.float32), tl.trans(q_all))
            else:
                kf = k.to(tl.float32)
                dots = tl.zeros((BLOCK_N, HO), tl.float32)
                for h in tl.static_range(H):
                    qh = tl.sum(tl.where((offs_h == h)[:, None], q_all, 0.0), axis=0)
                    dots = tl.where((offs_h == h)[None, :], tl.sum(kf * qh[None, :], axis=1)[:, None], dots)
        else:
            packed = tl.load(K + b * skb + offs_n[:, None] * skn + offs_p[None, :], mask=in_n[:, None], other=0)
            packed = packed.to(tl.int32)
            offs_g = tl.arange(0, NG)
            sraw = tl.load(S + b * ssb + offs_n[:, None] * NG + offs_g[None, :], mask=in_n[:, None], other=0)
            scale = _scales(sraw, FMT)
            if MATH == 1:
                # Codes are exact in bf16; each group's partial sums come out of the dot in their own
                # columns, and are scaled in fp32.
                c_even = _codes(packed & 15, FMT).to(tl.bfloat16)
                c_odd = _codes(packed >> 4, FMT).to(tl.bfloat16)
                part = _dot16(c_even, q_even, tl.zeros((BLOCK_N, NC), tl.float32), UPCAST)
                part = _dot16(c_odd, q_odd, part, UPCAST)  # (BLOCK_N, NG * HC)
                part = tl.sum(part.reshape(BLOCK_N, NG, HC) * scale[:, :, None], axis=1)
                dots = part.reshape(BLOCK_N, HC // HO, HO).sum(axis=1)  # high + low
            else:
                k_even = _dequant(packed & 15, scale, FMT, BLOCK_N, D // 2, GS // 2)
                k_odd = _dequant(packed >> 4, scale, FMT, BLOCK_N, D // 2, GS // 2)
                if MATH == 0:
                    dots = tl.dot(k_even, tl.trans(q_even))
                    dots = tl.dot(k_odd, tl.trans(q_odd), dots)
                else:
                    dots = tl.zeros((BLOCK_N, HO), tl.float32)
                    for h in tl.static_range(H):
                        qe = tl.sum(tl.where((offs_h == h)[:, None], q_even, 0.0), axis=0)
                        qo = tl.sum(tl.where((offs_h == h)[:, None], q_odd, 0.0), axis=0)
                        s_h = tl.sum(k_even * qe[None, :] + k_odd * qo[None, :], axis=1)
                        dots = tl.where((offs_h == h)[None, :], s_h[:, None], dots)

        relu = tl.maximum(dots, 0.0)
        valid = in_n & (offs_n >= start)
        offs_blk = tile * (BLOCK_N // BS) + tl.arange(0, BLOCK_N // BS)
        for g in tl.static_range(G):
            wg = tl.sum(tl.where((offs_gw == g)[:, None], w_all, 0.0), axis=0)
            _store_block_lse(relu, wg, valid, Out + b * sob + g * sog, offs_blk, NB, BLOCK_N, BS)


MATHS = ("tf32", "bf16", "fma")


@dataclass(frozen=True)
class ScoreTiling:
    """Launch parameters of the scoring kernels (results do not depend on them beyond float rounding).

    ``block_n`` keys per tile (per loop iteration), ``num_warps``; ``programs_per_sm`` > 0 runs the looped
    kernel on ``programs_per_sm`` x the SM count programs (over the whole batch), 0 runs one program per
    tile; ``num_stages`` is the loop's software-pipelining depth; ``math`` is ``tf32``, ``bf16`` or ``fma``
    (module docstring). ``programs_per_sm=0, math="tf32"`` is the one-tile-per-program kernel.
    """

    # Fastest measured on an H100 (`spotattn bench select --score-only`, int4, 128K and 32K keys, B = 1, 4).
    block_n: int = 64
    num_warps: int = 4
    programs_per_sm: int = 4
    num_stages: int = 3
    math: str = "tf32"

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.programs_per_sm < 0 or self.num_stages < 1:
            raise ValueError(f"programs_per_sm must be >= 0 and num_stages >= 1, got {self}")
        if self.math not in MATHS:
            raise ValueError(f"math must be one of {MATHS}, got {self.math!r}")

    @classmethod
    def parse(cls, text: str) -> ScoreTiling:
        """``KEYSxWARPS[:pN][:sN][:MATH]``, e.g. ``128x4`` (one tile per program, tf32: the original kernel)
        or ``64x4:p4:s3:bf16`` (looped, 4 programs per SM, 3 stages, bf16 dot). Omitted: ``p0``, ``s3``,
        ``tf32``."""
        head, *opts = text.strip().split(":")
        try:
            keys, warps = (int(v) for v in head.split("x"))
            fields: dict = dict(block_n=keys, num_warps=warps, programs_per_sm=0, num_stages=3, math="tf32")
            for opt in opts:
                if opt in MATHS:
                    fields["math"] = opt
                elif opt[:1] == "p":
                    fields["programs_per_sm"] = int(opt[1:])
                elif opt[:1] == "s":
                    fields["num_stages"] = int(opt[1:])
                else:
                    raise ValueError(f"unknown field {opt!r}")
        except ValueError as err:
            raise ValueError(f"score tiling {text!r}: use KEYSxWARPS[:pN][:sN][:tf32|bf16|fma] ({err})") from None
        return cls(**fields)

    def __str__(self) -> str:
        text = f"{self.block_n}x{self.num_warps}"
        if self.programs_per_sm:
            text += f":p{self.programs_per_sm}:s{self.num_stages}"
        return f"{text}:{self.math}"


# The original kernel's launch, for comparisons.
ONE_TILE = ScoreTiling(block_n=128, num_warps=4, programs_per_sm=0, math="tf32")


def score_blocks_triton(
    q: torch.Tensor,
    w: torch.Tensor,
    parts: dict[str, torch.Tensor],
    fmt: str,
    num_keys: int,
    block_size: int,
    seq_start: torch.Tensor | None = None,
    tiling: ScoreTiling | str | None = None,
    *,
    block_n: int | None = None,
    num_warps: int | None = None,
    programs_per_sm: int | None = None,
    num_stages: int | None = None,
    math: str | None = None,
) -> torch.Tensor:
    """Block logits ``(B, G, 1, NB)`` of one query per sequence over the first ``num_keys`` cached keys.

    ``q`` ``(B, H, 1, d)`` (already scaled), ``w`` ``(B, G, H, 1)``; ``parts`` as from ``quantize``.
    ``tiling`` (a ``ScoreTiling`` or its text, default ``ScoreTiling()``) and the keyword overrides
    (``ScoreTiling``'s fields) set the launch; results do not depend on it beyond float rounding.
    """
    check_format(fmt)
    if tiling is None:
        tiling = ScoreTiling()
    elif isinstance(tiling, str):
        tiling = ScoreTiling.parse(tiling)
    given = dict(
        block_n=block_n, num_warps=num_warps, programs_per_sm=programs_per_sm, num_stages=num_stages, math=math
    )
    tiling = dataclasses.replace(tiling, **{n: v for n, v in given.items() if v is not None})
    b, h, lq, d = q.shape
    if lq != 1:
        raise ValueError(f"the fused scoring kernel takes one query per sequence, got {lq}")
    g = w.shape[1]
    k = parts["k"]
    s = parts.get("s", k)
    gs = GROUP.get(fmt, 1)
    nb = -(-num_keys // block_size)
    out = torch.empty(b, g, 1, nb, device=q.device, dtype=torch.float32)
    qf = q[:, :, 0].contiguous().float()
    wf = w[..., 0].contiguous().float()
    start = seq_start.to(torch.int32).contiguous() if seq_start is not None else qf
    num_tiles = triton.cdiv(num_keys, tiling.block_n)
    common = dict(G=g, D=d, FMT=_FMT_ID[fmt], GS=gs, BS=block_size, BLOCK_N=tiling.block_n)
    common.update(HAS_START=seq_start is not None, num_warps=tiling.num_warps)
    if tiling.programs_per_sm == 0 and tiling.math == "tf32":
        _score_kernel[(b, num_tiles)](
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
            **common,
        )
        return out
    if fmt != "bf16" and (s.stride(1) != d // gs or s.stride(2) != 1):
        s = s.contiguous()  # the looped kernel takes the scales' token stride as d / group (as stored)
    if tiling.programs_per_sm == 0:
        programs = num_tiles
    else:
        programs = min(num_tiles, triton.cdiv(tiling.programs_per_sm * sm_count(q.device), b))
    math_id = MATHS.index(tiling.math)
    ho = triton.next_power_of_2(h) if math_id else max(16, triton.next_power_of_2(h))
    hc = 2 * ho  # bf16: high and low parts per scale group, at least 16 columns in all
    while hc * (1 if fmt == "bf16" else d // gs) < 16:
        hc *= 2
    _score_loop_kernel[(b, programs)](
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
        out.stride(0),
        out.stride(1),
        num_keys,
        nb,
        H=h,
        HO=ho,
        HC=hc,
        GP=triton.next_power_of_2(g),
        MATH=math_id,
        STAGES=tiling.num_stages,
        UPCAST=interpreting(),
        **common,
    )
    return out
