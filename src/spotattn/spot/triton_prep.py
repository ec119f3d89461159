"""One Triton kernel for the selector's per-token decode work after its three projections.

The PyTorch path (:meth:`SelectorLayer.keys`, :meth:`SelectorLayer.queries`, :func:`quantize` and an
``index_copy_`` per stored part) launches about 50 small kernels per layer and step: RMSNorm, the RoPE
tables, rotate-half, the head scale, int4 quantisation, packing, casts. Here one program per sequence
reads the projection outputs and does all of it in registers: RMSNorm + RoPE of the key and of every
query head, the query scale, int4 (or bf16) encoding of the key, and the write of the key into the static
selector key cache at the current position (read on the device, so CUDA graphs can replay it).

It follows the PyTorch arithmetic step by step (same inverse frequencies, fp32 throughout, int4 scales
rounded through fp16, round-half-to-even codes); results agree up to float rounding (an ulp in rsqrt,
cos/sin), so a code can differ by one where the scaled value sits on a rounding boundary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .selector import SelectorLayer, inv_frequencies

FUSED_FORMATS = ("bf16", "int4")
_INV_FREQ: dict[tuple[str, int, float], torch.Tensor] = {}


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
def _prep_kernel(
    QL,
    KL,
    WL,
    QNW,
    KNW,
    InvFreq,
    Pos,
    Qout,
    Wout,
    K,
    S,
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
):
    b = tl.program_id(0)
    i = tl.arange(0, HALF)
    pos = tl.load(Pos)
    angle = pos.to(tl.float32) * tl.load(InvFreq + i)
    c = tl.cos(angle)
    s = tl.sin(angle)

    # The new selector key: norm, rotate, encode, write at `pos`.
    k1 = tl.load(KL + b * sxb + i).to(tl.float32)
    k2 = tl.load(KL + b * sxb + HALF + i).to(tl.float32)
    kw1 = tl.load(KNW + i).to(tl.float32)
    kw2 = tl.load(KNW + HALF + i).to(tl.float32)
    y1, y2 = _norm_rope(k1, k2, kw1, kw2, c, s, eps, D)
    kbase = b.to(tl.int64) * skb + pos.to(tl.int64) * skn
    if FMT == 0:
        tl.store(K + kbase + i, y1.to(tl.bfloat16))
        tl.store(K + kbase + HALF + i, y2.to(tl.bfloat16))
    else:
        sbase = b.to(tl.int64) * ssb + pos.to(tl.int64) * ssn
        _int4_half(y1, K, S, kbase, sbase, 0, HALF, GS)
        _int4_half(y2, K, S, kbase, sbase, 1, HALF, GS)

    # Every query head at once: (HP, HALF) tiles.
    h = tl.arange(0, HP)
    hm = (h < H)[:, None]
    qrow = QL + b * sxb + h[:, None] * D + i[None, :]
    q1 = tl.load(qrow, mask=hm, other=0.0).to(tl.float32)
    q2 = tl.load(qrow + HALF, mask=hm, other=0.0).to(tl.float32)
    qw1 = tl.load(QNW + i).to(tl.float32)[None, :]
    qw2 = tl.load(QNW + HALF + i).to(tl.float32)[None, :]
    z1, z2 = _norm_rope(q1, q2, qw1, qw2, c[None, :], s[None, :], eps, D)
    qout = Qout + b * (H * D) + h[:, None] * D + i[None, :]
    tl.store(qout, z1 * q_scale, mask=hm)
    tl.store(qout + HALF, z2 * q_scale, mask=hm)

    # Head weights: (B, 1, G*H) in the projection's order is (B, G, H, 1) in memory.
    gh = tl.arange(0, GHP)
    wv = tl.load(WL + b * sxb + gh, mask=gh < GH, other=0.0).to(tl.float32)
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


def selector_decode_prep(
    layer: SelectorLayer,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    fmt: str,
    key_buf: torch.Tensor,
    scale_buf: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the new token's selector key into ``key_buf``/``scale_buf`` ``(B, capacity, ...)`` at
    ``positions[0]`` and return the queries ``(B, H, 1, d)`` and head weights ``(B, G, H, 1)`` (fp32),
    as :meth:`SelectorLayer.keys` + :func:`quantize` + :meth:`SelectorLayer.queries` would."""
    cfg = layer.config
    b = hidden.shape[0]
    h, d, g = cfg.num_heads, cfg.head_dim, cfg.num_groups
    # One GEMV for the three projections (q heads, key, head weights): rows of ``proj`` are [q | k | w].
    weight, bias = _fused_projection(layer, _projection_dtype(layer, hidden))
    x = hidden.to(weight.dtype)
    proj = F.linear(x.reshape(b, -1), weight, bias)
    ql, kl, wl = proj, proj[:, h * d :], proj[:, h * d + d :]
    q = torch.empty(b, h, 1, d, device=hidden.device, dtype=torch.float32)
    w = torch.empty(b, g, h, 1, device=hidden.device, dtype=torch.float32)
    s = scale_buf if scale_buf is not None else key_buf
    _prep_kernel[(b,)](
        ql,
        kl,
        wl,
        layer.q_norm.weight,
        layer.k_norm.weight,
        _inv_freq(hidden.device, d, cfg.rope_theta, cfg.rope_max_wavelength),
        positions,
        q,
        w,
        key_buf,
        s,
        proj.stride(0),
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
        num_warps=4,
    )
    factor = layer.length_factor(positions)
    return q, w if factor is None else w * factor
