"""Fused dequantise-and-score Triton kernel for the selector key cache (decode, one query per sequence).

Each cached key is read once (bf16, or packed 4-bit codes plus their group scales), dequantised in
registers, scored against the ``H`` selector query heads with a tensor-core dot (heads padded to 16;
fp32 operands, TF32 on the GPU, or, with ``ScoreTiling.half``, fp16 operands: the same 10-bit mantissas
at half the registers and twice the tensor-core rate, for keys and queries inside fp16's range, which
RMS-normed selector keys and queries are), passed through ReLU and the per-group head weights, masked for
padding and the future, and each 16-token block is reduced to its log-sum-exp. Only block logits reach
memory: ``NB = L / 16`` floats per group instead of ``L`` token scores or ``L * d`` dequantised values.

The grid is persistent (``programs_per_sm`` x the SM count, spread over the batch; 0: one program per
tile): each program walks tiles ``pid, pid + P, ...`` in a ``tl.range`` loop with ``num_stages``, so the
next tiles' loads are issued under the current tile's math. The 4-bit path is bound by the instructions
that decode the codes rather than by memory: on an H200 at 128K keys it reads 1.2 TB/s at B = 1 and 1.8
TB/s at B = 4 with the PTX decoding, about 1 TB/s with fp32 operands (``BENCHMARKS.md``).
"""

from __future__ import annotations

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


# int4 bytes -> (low nibble - 8) * scale and (high nibble - 8) * scale in fp16, two bytes (one f16x2 pair
# of each) per call, two instructions per value: a byte permute (and a shift) puts the two bytes' nibbles
# in the two halves of a register, lop3 masks them and ORs in the bits of fp16 1024, then 1032 is
# subtracted and the scale multiplied, two values per instruction. Two bytes, not four, per call: that is
# what one thread holds of a row in the tensor-core operand layout, so no bytes are gathered first. The
# results equal the fp16 Triton path's bit for bit (an exact subtraction, one rounding in the product).
# Compiled for sm_90, the loop over a 64-key tile is 339 SASS instructions per thread, against 418 for
# the fp16 Triton path and 476 for fp32 operands.
_INT4_PTX = tl.constexpr("""
{
.reg .b32 t, off;
mov.b32 off, 0x64086408;
prmt.b32 t, $2, $2, 0x3120;
lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xEA;
shr.b32 t, t, 4;
lop3.b32 $1, t, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 $0, $0, off;
sub.f16x2 $1, $1, off;
mul.f16x2 $0, $0, $3;
mul.f16x2 $1, $1, $3;
}
""")


@triton.jit
def _dequant_int4_ptx(packed, scale, N: tl.constexpr, C: tl.constexpr, GC: tl.constexpr):
    """(N, C) int4 bytes and (N, C // GC) fp16 scales -> the (even, odd) values, each (N, C) fp16."""
    even, odd = tl.inline_asm_elementwise(
        _INT4_PTX,
        "=r,=r,r,r",
        [packed.reshape(N, C // GC, GC), scale.to(tl.float16)[:, :, None]],
        dtype=(tl.float16, tl.float16),
        is_pure=True,
        pack=2,
    )
    return even.reshape(N, C), odd.reshape(N, C)


@triton.jit
def _dequant(
    codes, scale, FMT: tl.constexpr, N: tl.constexpr, C: tl.constexpr, GC: tl.constexpr, HALF: tl.constexpr
):
    """(N, C) 4-bit codes -> values times their group scale (GC columns per group), float32 or fp16."""
    if FMT == 1 and HALF:
        # code - 8, exactly, in fp16: 1024 + code as fp16 bits (exponent of 1024, code in the mantissa),
        # minus 1032; the scale is stored in fp16.
        vals = (codes.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
        vals = (vals.reshape(N, C // GC, GC) * scale.to(tl.float16)[:, :, None]).reshape(N, C)
    else:
        if FMT == 1:
            # code - 8, exactly, without an int->float conversion: 2**23 + code as float bits, minus 2**23 + 8.
            vals = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        else:
            vals = _e2m1(codes)
        vals = (vals.reshape(N, C // GC, GC) * scale[:, :, None]).reshape(N, C)
        if HALF:
            vals = vals.to(tl.float16)
    return vals


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
    sob,
    sog,
    num_keys,
    NB,
    H: tl.constexpr,
    HP: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    FMT: tl.constexpr,
    GS: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_START: tl.constexpr,
    STAGES: tl.constexpr,
    HALF: tl.constexpr,
    PTX: tl.constexpr,
):
    # Scales are (B, L, D // GS) with tokens contiguous: their row stride is the constexpr D // GS, so
    # their loads vectorise and pipeline like the codes'.
    b = tl.program_id(0)
    pid = tl.program_id(1)
    nprog = tl.num_programs(1)
    offs_h = tl.arange(0, HP)
    qb = Q + b * sqb

    # Everything per sequence is loaded once, before the loop.
    offs_gw = tl.arange(0, GP)
    w_all = tl.load(
        W + b * swb + offs_gw[:, None] * swg + offs_h[None, :],
        mask=(offs_gw < G)[:, None] & (offs_h < H)[None, :],
        other=0.0,
    )
    if HAS_START:
        start = tl.load(Start + b)
    else:
        start = 0
    if FMT == 0:
        offs_d = tl.arange(0, D)
        q_all = tl.load(qb + offs_h[:, None] * sqh + offs_d[None, :], mask=(offs_h < H)[:, None], other=0.0)
        if HALF:
            q_all = q_all.to(tl.float16)
    else:
        # Byte i holds elements 2i (low nibble) and 2i+1 (high nibble): score the even and the odd halves
        # with one dot each instead of interleaving them (a join/reshape would force the dequantised tile
        # through shared memory before the tensor-core dot).
        offs_p = tl.arange(0, D // 2)
        offs_g = tl.arange(0, D // GS)
        q_rows = qb + offs_h[:, None] * sqh + 2 * offs_p[None, :]
        q_even = tl.load(q_rows, mask=(offs_h < H)[:, None], other=0.0)
        q_odd = tl.load(q_rows + 1, mask=(offs_h < H)[:, None], other=0.0)
        if HALF:
            q_even = q_even.to(tl.float16)
            q_odd = q_odd.to(tl.float16)

    for tile in tl.range(pid, tl.cdiv(num_keys, BLOCK_N), nprog, num_stages=STAGES):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = offs_n < num_keys
        if FMT == 0:
            k = tl.load(K + b * skb + offs_n[:, None] * skn + offs_d[None, :], mask=in_n[:, None], other=0.0)
            dots = tl.dot(k.to(q_all.dtype), tl.trans(q_all))  # (BLOCK_N, HP)
        else:
            packed = tl.load(K + b * skb + offs_n[:, None] * skn + offs_p[None, :], mask=in_n[:, None], other=0)
            sraw = tl.load(S + b * ssb + offs_n[:, None] * (D // GS) + offs_g[None, :], mask=in_n[:, None], other=0)
            if PTX and FMT == 1:
                k_even, k_odd = _dequant_int4_ptx(packed, sraw, BLOCK_N, D // 2, GS // 2)
            else:
                if HALF and FMT == 1:
                    packed = packed.to(tl.int16)
                else:
                    packed = packed.to(tl.int32)
                scale = _scales(sraw, FMT)
                k_even = _dequant(packed & 15, scale, FMT, BLOCK_N, D // 2, GS // 2, HALF)
                k_odd = _dequant(packed >> 4, scale, FMT, BLOCK_N, D // 2, GS // 2, HALF)
            dots = tl.dot(k_even, tl.trans(q_even))
            dots = tl.dot(k_odd, tl.trans(q_odd), dots)  # (BLOCK_N, HP)

        relu = tl.maximum(dots, 0.0)
        valid = in_n & (offs_n >= start)
        offs_blk = tile * (BLOCK_N // BS) + tl.arange(0, BLOCK_N // BS)
        for g in tl.static_range(G):
            wg = tl.sum(tl.where((offs_gw == g)[:, None], w_all, 0.0), axis=0)
            _store_block_lse(relu, wg, valid, Out + b * sob + g * sog, offs_blk, NB, BLOCK_N, BS)


@dataclass(frozen=True)
class ScoreTiling:
    """Launch parameters of the scoring kernel (results do not depend on them beyond float rounding).

    ``block_n`` keys per tile, ``num_warps``; ``programs_per_sm`` > 0 launches ``programs_per_sm`` x the SM
    count programs (over the whole batch), 0 one program per tile; ``num_stages`` is the loop's
    software-pipelining depth; ``half`` dequantises into fp16 and dots fp16 operands (fp32 accumulation)
    instead of fp32 ones (TF32 on the GPU): both keep 10-bit mantissas; ``ptx`` (with ``half``) decodes
    int4 codes with inline PTX, two values per instruction (the Triton interpreter, which cannot run PTX,
    takes the fp16 Triton path, whose results are bit-identical).
    """

    # The launch shape: fastest measured on an H100 (`spotattn bench select --score-only`, int4, 128K and
    # 32K keys, B = 1, 4), with fp32 operands. fp16 operands and the PTX decoding: fewer instructions per
    # tile (see _INT4_PTX).
    block_n: int = 64
    num_warps: int = 4
    programs_per_sm: int = 4
    num_stages: int = 3
    half: bool = True
    ptx: bool = True

    def __post_init__(self) -> None:
        if self.ptx and not self.half:
            raise ValueError("ptx decoding produces fp16 operands: it needs half=True")
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.programs_per_sm < 0 or self.num_stages < 1:
            raise ValueError(f"programs_per_sm must be >= 0 and num_stages >= 1, got {self}")

    @classmethod
    def parse(cls, text: str) -> ScoreTiling:
        """``KEYSxWARPS[:pN][:sN][:h|:ptx]``, e.g. ``128x4`` (one tile per program) or ``64x4:p4:s3:h`` (4
        programs per SM, 3 stages, fp16 operands; ``:ptx`` also decodes int4 in PTX). Omitted: ``p0``, ``s3``,
        fp32 operands."""
        head, *opts = text.strip().split(":")
        try:
            keys, warps = (int(v) for v in head.split("x"))
            fields: dict = dict(
                block_n=keys, num_warps=warps, programs_per_sm=0, num_stages=3, half=False, ptx=False
            )
            for opt in opts:
                if opt == "ptx":
                    fields["half"] = fields["ptx"] = True
                elif opt == "h":
                    fields["half"] = True
                elif opt[:1] == "p":
                    fields["programs_per_sm"] = int(opt[1:])
                elif opt[:1] == "s":
                    fields["num_stages"] = int(opt[1:])
                else:
                    raise ValueError(f"unknown field {opt!r}")
        except ValueError as err:
            raise ValueError(f"score tiling {text!r}: use KEYSxWARPS[:pN][:sN][:h|:ptx] ({err})") from None
        return cls(**fields)

    def __str__(self) -> str:
        text = f"{self.block_n}x{self.num_warps}"
        if self.programs_per_sm:
            text += f":p{self.programs_per_sm}:s{self.num_stages}"
        return text + (":ptx" if self.ptx else ":h" if self.half else "")


# The launch before the persistent grid (one 128-key tile per program, fp32 operands), for comparisons.
ONE_TILE = ScoreTiling(block_n=128, num_warps=4, programs_per_sm=0, half=False, ptx=False)


def score_blocks_triton(
    q: torch.Tensor,
    w: torch.Tensor,
    parts: dict[str, torch.Tensor],
    fmt: str,
    num_keys: int,
    block_size: int,
    seq_start: torch.Tensor | None = None,
    tiling: ScoreTiling | str | None = None,
) -> torch.Tensor:
    """Block logits ``(B, G, 1, NB)`` of one query per sequence over the first ``num_keys`` cached keys.

    ``q`` ``(B, H, 1, d)`` (already scaled), ``w`` ``(B, G, H, 1)``; ``parts`` as from ``quantize``.
    ``tiling`` (a ``ScoreTiling`` or its text; default ``ScoreTiling()``) sets the launch.
    """
    check_format(fmt)
    tiling = ScoreTiling.parse(tiling) if isinstance(tiling, str) else tiling or ScoreTiling()
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
    if fmt != "bf16" and (s.stride(1) != d // GROUP[fmt] or s.stride(2) != 1):
        s = s.contiguous()  # the kernel takes the scales' token stride as d / group (as stored)
    num_tiles = triton.cdiv(num_keys, tiling.block_n)
    programs = num_tiles
    if tiling.programs_per_sm:
        programs = min(num_tiles, triton.cdiv(tiling.programs_per_sm * sm_count(q.device), b))
    _score_kernel[(b, programs)](
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
        HP=max(16, triton.next_power_of_2(h)),
        G=g,
        GP=triton.next_power_of_2(g),
        D=d,
        FMT=_FMT_ID[fmt],
        GS=GROUP.get(fmt, 1),
        BS=block_size,
        BLOCK_N=tiling.block_n,
        HAS_START=seq_start is not None,
        STAGES=tiling.num_stages,
        HALF=tiling.half,
        PTX=tiling.ptx and fmt == "int4" and not interpreting(),
        num_warps=tiling.num_warps,
    )
    return out
