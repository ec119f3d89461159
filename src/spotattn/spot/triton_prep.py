"""The selector's per-token decode work in one Triton launch: projection, norm, RoPE, encoding, cache write.

The PyTorch path (:meth:`SelectorLayer.keys`, :meth:`SelectorLayer.queries`, :func:`quantize` and an
``index_copy_`` per stored part) launches about 50 small kernels per layer and step. A GEMV plus one prep
kernel still costs three launches (cuBLAS, its bias/cast epilogue, the prep) and the gaps between them, for
about 2 us of actual weight reading at batch 1. So one kernel does it all:

1. A grid of ``(row tiles, K slices)`` programs computes the stacked projection ``[q | k | w]`` (cached by
   :func:`_fused_projection`): each program reads one ``16 x K/split`` tile of the weight, multiplies it
   with each batch row's hidden states on CUDA cores in fp32 (later rows re-read the tile from L1/L2), and
   stores fp32 partial sums (plus the bias, in slice 0) to a workspace. Split-K gives the bandwidth-bound
   GEMV about two programs per SM even though ``N`` is only ~650 rows.
2. The last program to finish (:func:`arrive_last`; the counter resets itself, so CUDA graphs replay it)
   sums the partials, read through L2, and does per sequence what the prep used to: RMSNorm + RoPE of the
   key and of every query head, the query scale, int4 (or bf16) encoding of the key and its write into the
   static selector key cache at the current position (read on the device), and the head weights.

The prep follows the PyTorch arithmetic step by step (same inverse frequencies, fp32 throughout, int4
scales rounded through fp16, round-half-to-even codes). The projection stays fp32 (the module path rounds
it to the weight dtype first), so results agree with the module on the same (bf16) weights up to that
rounding, and with an fp32 copy of it up to float rounding; an int4 code can differ by one where the
scaled value sits on a rounding boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kernels._triton.common import (
    arrive_last,
    hand_off_counters,
    last_dim_contiguous,
    next_pow2,
    sm_count,
)
from .selector import SelectorLayer, inv_frequencies

FUSED_FORMATS = ("bf16", "int4")
_INV_FREQ: dict[tuple[str, int, float], torch.Tensor] = {}

# Projection tiling: _BLOCK_N weight rows per program, a K slice read in chunks of at most _MAX_BLOCK_K.
# Split-K aims at _PROGRAMS_PER_SM programs per SM, but the last program sums split x B partial rows
# alone, so split x B stays within _TAIL_PARTIALS.
_BLOCK_N = 16
_MAX_BLOCK_K = 512
_MIN_BLOCK_K = 32
_PROGRAMS_PER_SM = 2
_TAIL_PARTIALS = 32


@triton.jit
def _round_half_even(x):
    r = tl.floor(x + 0.5)
    # x + 0.5 landed exactly on an odd integer from a .5 tie: step back to the even one (torch.round).
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _norm_rope(x1, x2, w1, w2, c, s, eps, D: tl.constexpr):
    """RMSNorm over the two halves (rows of a 2-D tile, or one vector), then rotate-half RoPE."""
    ms = (tl.sum(x1 * x1, -1, keep_dims=True) + tl.sum(x2 * x2, -1, keep_dims=True)) / D
    r = tl.math.rsqrt(ms + eps)
    y1 = x1 * r * w1
    y2 = x2 * r * w2
    return y1 * c - y2 * s, y2 * c + y1 * s


@triton.jit
def _int4_half(y, K, S, kbase, sbase, half_idx, HALF: tl.constexpr, GS: tl.constexpr):
    """Quantise one half (HALF values) into int4 codes + fp16 scales and store them."""
    yg = tl.reshape(y, (HALF // GS, GS))
    amax = tl.max(tl.abs(yg), 1)
    scale = tl.math.div_rn(amax, 7.0).to(tl.float16).to(tl.float32)
    q = _round_half_even(tl.math.div_rn(yg, tl.maximum(scale, 1e-30)[:, None]))
    codes = (tl.minimum(tl.maximum(q, -7.0), 7.0) + 8.0).to(tl.int32)
    lo, hi = tl.split(tl.reshape(codes, (HALF // 2, 2)))
    packed = (lo | (hi << 4)).to(tl.uint8)
    tl.store(K + kbase + half_idx * (HALF // 2) + tl.arange(0, HALF // 2), packed)
    tl.store(S + sbase + half_idx * (HALF // GS) + tl.arange(0, HALF // GS), scale.to(tl.float16))


@triton.jit
def _partials(P, offs, mask, split_stride, SPLIT: tl.constexpr):
    """The projection at ``offs``: the sum of its SPLIT split-K partials, read through L2 (``.cg``: other
    programs wrote them, and L1 is not coherent across SMs), in slice order."""
    acc = tl.load(P + offs, mask=mask, other=0.0, cache_modifier=".cg")
    for j in tl.static_range(1, SPLIT):
        acc += tl.load(P + j * split_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def _proj_prep_kernel(
    X,
    Wt,
    Bias,
    P,
    Counter,
    QNW,
    KNW,
    InvFreq,
    Pos,
    Qout,
    Wout,
    K,
    S,
    B,
    N,
    KD,
    sxb,
    skb,
    skn,
    ssb,
    ssn,
    eps,
    q_scale,
    H: tl.constexpr,
    HP: tl.constexpr,
    GH: tl.constexpr,
    GHP: tl.constexpr,
    D: tl.constexpr,
    FMT: tl.constexpr,  # 0 bf16, 1 int4
    GS: tl.constexpr,
    HALF: tl.constexpr,  # D // 2
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    KSLICE: tl.constexpr,  # K per program, a multiple of BLOCK_K
    SPLIT: tl.constexpr,
):
    # ---- 1. Projection partials: P[pid_k, b, n] = sum over this K slice of Wt[n, k] * X[b, k] (+ bias).
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k_lo = pid_k * KSLICE
    bias = tl.load(Bias + offs_n, mask=n_ok & (pid_k == 0), other=0.0).to(tl.float32)
    for b in range(B):  # rows after the first read the weight tile again, from L1/L2
        acc = bias
        for k0 in range(k_lo, k_lo + KSLICE, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < KD
            # Contiguous along K: vectorised, coalesced loads (the weight is row-major). A GEMV with a few
            # rows is bound by the weight read: CUDA-core FMAs, no tensor-core tile shuffles.
            wt = tl.load(Wt + offs_n[:, None] * KD + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(X + b * sxb + offs_k, mask=k_ok, other=0.0)
            acc += tl.sum(wt.to(tl.float32) * x.to(tl.float32)[None, :], 1)
        tl.store(P + pid_k * B * N + b * N + offs_n, acc, mask=n_ok)

    # ---- 2. The last program: per sequence, norm + rope, encoding and cache write, queries, head weights.
    if arrive_last(Counter, tl.num_programs(0) * tl.num_programs(1)):
        i = tl.arange(0, HALF)
        i_ok = i < HALF
        pos = tl.load(Pos)
        angle = pos.to(tl.float32) * tl.load(InvFreq + i)
        c = tl.cos(angle)
        s = tl.sin(angle)
        kw1 = tl.load(KNW + i).to(tl.float32)
        kw2 = tl.load(KNW + HALF + i).to(tl.float32)
        h = tl.arange(0, HP)
        hm = (h < H)[:, None]
        qw1 = tl.load(QNW + i).to(tl.float32)[None, :]
        qw2 = tl.load(QNW + HALF + i).to(tl.float32)[None, :]
        gh = tl.arange(0, GHP)
        split_stride = B * N
        for b in range(B):
            b64 = tl.cast(b, tl.int64)  # cache offsets can pass 2**31
            row = b * N  # the projection row of sequence b: [q heads (H*D) | key (D) | head weights (G*H)]

            # The new selector key: norm, rotate, encode, write at `pos`.
            k1 = _partials(P, row + H * D + i, i_ok, split_stride, SPLIT)
            k2 = _partials(P, row + H * D + HALF + i, i_ok, split_stride, SPLIT)
            y1, y2 = _norm_rope(k1, k2, kw1, kw2, c, s, eps, D)
            kbase = b64 * skb + pos.to(tl.int64) * skn
            if FMT == 0:
                tl.store(K + kbase + i, y1.to(tl.bfloat16))
                tl.store(K + kbase + HALF + i, y2.to(tl.bfloat16))
            else:
                sbase = b64 * ssb + pos.to(tl.int64) * ssn
                _int4_half(y1, K, S, kbase, sbase, 0, HALF, GS)
                _int4_half(y2, K, S, kbase, sbase, 1, HALF, GS)

            # Every query head at once: (HP, HALF) tiles.
            qoffs = row + h[:, None] * D + i[None, :]
            q1 = _partials(P, qoffs, hm, split_stride, SPLIT)
            q2 = _partials(P, qoffs + HALF, hm, split_stride, SPLIT)
            z1, z2 = _norm_rope(q1, q2, qw1, qw2, c[None, :], s[None, :], eps, D)
            qout = Qout + b * (H * D) + h[:, None] * D + i[None, :]
            tl.store(qout, z1 * q_scale, mask=hm)
            tl.store(qout + HALF, z2 * q_scale, mask=hm)

            # Head weights: (B, 1, G*H) in the projection's order is (B, G, H, 1) in memory.
            wv = _partials(P, row + H * D + D + gh, gh < GH, split_stride, SPLIT)
            tl.store(Wout + b * GH + gh, wv, mask=gh < GH)


def fused_prep_supported(layer: SelectorLayer, fmt: str, hidden: torch.Tensor) -> bool:
    d = layer.config.head_dim
    return fmt in FUSED_FORMATS and hidden.shape[1] == 1 and d % 64 == 0 and (d & (d - 1)) == 0


def _fused_projection(layer: SelectorLayer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's q, k and w projections stacked into one ``dtype`` weight and bias; cached on the layer
    and rebuilt when any of the weights changes (training, loading, moving) or another dtype is asked."""
    parts = (layer.q_proj.weight, layer.k_proj.weight, layer.w_proj.weight, layer.w_proj.bias)
    key = (dtype, *((t.data_ptr(), t._version) for t in parts))
    cached = getattr(layer, "_fused_projection", None)
    if cached is None or cached[0] != key:
        qw, kw, ww, wb = parts
        weight = torch.cat([qw, kw, ww]).detach().to(dtype)
        bias = torch.cat([wb.new_zeros(qw.shape[0] + kw.shape[0]), wb]).detach().to(dtype)
        cached = (key, weight, bias)
        layer._fused_projection = cached
    return cached[1], cached[2]


def _projection_dtype(layer: SelectorLayer, hidden: torch.Tensor) -> torch.dtype:
    # A decode step is bound by reading the stacked weight: with half-precision hidden states, read it in
    # that precision (half the bytes of fp32; the shipped selectors are stored in bf16 anyway).
    if hidden.dtype in (torch.bfloat16, torch.float16):
        return hidden.dtype
    return layer.q_proj.weight.dtype


def _inv_freq(device: torch.device, dim: int, theta: float, max_wavelength: float | None) -> torch.Tensor:
    # Built exactly as rope_tables builds it; cached (a graph capture must not allocate it).
    key = (str(device), dim, theta, max_wavelength)
    if key not in _INV_FREQ:
        _INV_FREQ[key] = inv_frequencies(dim, theta, max_wavelength, device)
    return _INV_FREQ[key]


def _split_k(n: int, k: int, b: int, device: torch.device) -> int:
    """K slices for the projection: about _PROGRAMS_PER_SM programs per SM over the 16-row tiles (a power
    of two, so the slices come out even), within the tail's _TAIL_PARTIALS and at least 64 K per slice."""
    want = next_pow2(triton.cdiv(_PROGRAMS_PER_SM * sm_count(device), triton.cdiv(n, _BLOCK_N)))
    cap = 1 << (max(1, _TAIL_PARTIALS // b).bit_length() - 1)
    return max(1, min(want, cap, triton.cdiv(k, 64)))


def _k_tiling(k: int, split: int) -> tuple[int, int, int]:
    """(chunk, K per program, programs along K) for about ``split`` slices of ``k``."""
    per = triton.cdiv(k, split)
    block_k = min(_MAX_BLOCK_K, max(_MIN_BLOCK_K, next_pow2(per)))
    kslice = triton.cdiv(per, block_k) * block_k
    return block_k, kslice, triton.cdiv(k, kslice)


def selector_decode_prep(
    layer: SelectorLayer,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    fmt: str,
    key_buf: torch.Tensor,
    scale_buf: torch.Tensor | None,
    *,
    split_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the new token's selector key into ``key_buf``/``scale_buf`` ``(B, capacity, ...)`` at
    ``positions[0]`` and return the queries ``(B, H, 1, d)`` and head weights ``(B, G, H, 1)`` (fp32),
    as :meth:`SelectorLayer.keys` + :func:`quantize` + :meth:`SelectorLayer.queries` would.

    ``split_k`` (tests) fixes the number of K slices of the projection; by default it follows the SM count.
    """
    cfg = layer.config
    b = hidden.shape[0]
    h, d, g = cfg.num_heads, cfg.head_dim, cfg.num_groups
    # The three projections (q heads, key, head weights) as one stacked weight: rows [q | k | w].
    weight, bias = _fused_projection(layer, _projection_dtype(layer, hidden))
    n, kd = weight.shape
    # In the weight's dtype, as the module casts it (a no-op on the serving path, where the stacked weight
    # takes the hidden states' half-precision dtype).
    x = last_dim_contiguous(hidden.reshape(b, kd).to(weight.dtype))
    block_k, kslice, split = _k_tiling(kd, split_k or _split_k(n, kd, b, hidden.device))
    partials = torch.empty(split, b, n, device=hidden.device, dtype=torch.float32)
    q = torch.empty(b, h, 1, d, device=hidden.device, dtype=torch.float32)
    w = torch.empty(b, g, h, 1, device=hidden.device, dtype=torch.float32)
    s = scale_buf if scale_buf is not None else key_buf
    _proj_prep_kernel[(triton.cdiv(n, _BLOCK_N), split)](
        x,
        weight,
        bias,
        partials,
        hand_off_counters(hidden.device, 1),
        layer.q_norm.weight,
        layer.k_norm.weight,
        _inv_freq(hidden.device, d, cfg.rope_theta, cfg.rope_max_wavelength),
        positions,
        q,
        w,
        key_buf,
        s,
        b,
        n,
        kd,
        x.stride(0),
        key_buf.stride(0),
        key_buf.stride(1),
        s.stride(0),
        s.stride(1),
        float(layer.k_norm.eps if layer.k_norm.eps is not None else torch.finfo(torch.float32).eps),
        d**-0.5,
        H=h,
        HP=max(2, triton.next_power_of_2(h)),
        GH=g * h,
        GHP=max(2, triton.next_power_of_2(g * h)),
        D=d,
        FMT=FUSED_FORMATS.index(fmt),
        GS=32,
        HALF=d // 2,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=block_k,
        KSLICE=kslice,
        SPLIT=split,
        num_warps=4,
        # A single chunk per program needs no pipelining (its shared-memory stages would cost occupancy).
        num_stages=1 if kslice == block_k else 2,
    )
    factor = layer.length_factor(positions)
    return q, w if factor is None else w * factor
