"""The selector key cache: one ``d``-dim key per token, in bf16 or 4 bits, and block scoring over it.

Formats (two 4-bit values per byte, even index in the low nibble):

- ``bf16``: the reference, ``2d`` bytes per token.
- ``int4``: symmetric integers in [-7, 7] with one fp16 scale (absmax / 7) per group of 32 values.
  No zero point: selector keys are RMS-normed and rotated, so they are centred; a zero point would
  cost another 2 bytes per group and push the ratio under 3.5x.
- ``mxfp4``: E2M1 values with one power-of-two (E8M0) scale per 32 values. The exponent is rounded up
  (``2^ceil(log2(absmax / 6))``) so that nothing saturates; the OCP rule (floor) clips the block's
  largest values instead.
- ``nvfp4``: E2M1 values with one FP8-E4M3 scale (absmax / 6) per 16 values. No per-tensor second-level
  scale: normed keys have absmax near 1-4, well inside E4M3's range.

Bytes per token for ``d = 64``: bf16 128, int4 36 (3.56x), mxfp4 34 (3.76x), nvfp4 36 (3.56x).
"""

from __future__ import annotations

import torch

from ..cache import MetaEntry
from .selector import block_logits, causal_allowed

FORMATS = ("bf16", "int4", "mxfp4", "nvfp4")
GROUP = {"int4": 32, "mxfp4": 32, "nvfp4": 16}
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_MID = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"selector key format must be one of {FORMATS}, got {fmt!r}")


def group_size(fmt: str, dim: int) -> int:
    g = GROUP[fmt]
    if dim % g:
        raise ValueError(f"{fmt} needs the selector head dim to be a multiple of {g}, got {dim}")
    return g


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``(..., d)`` in [0, 15] -> ``(..., d/2)`` bytes."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    lo, hi = packed & 15, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def _e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (sign in bit 3) of ``x`` already divided by its scale (|x| <= 6)."""
    mag = torch.bucketize(x.abs().clamp(max=6.0), _E2M1_MID.to(x.device))
    return mag | ((x < 0).to(torch.long) << 3)


def _e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    mag = E2M1.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) > 0, -mag, mag)


def quantize(keys: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """Selector keys ``(B, L, d)`` -> the stored parts of ``fmt`` (each with tokens on dim 1)."""
    check_format(fmt)
    if fmt == "bf16":
        return {"k": keys.to(torch.bfloat16)}
    b, length, d = keys.shape
    g = group_size(fmt, d)
    x = keys.float().view(b, length, d // g, g)
    amax = x.abs().amax(-1, keepdim=True)
    if fmt == "int4":
        scale = (amax / 7.0).to(torch.float16).float()
        q = torch.round(x / scale.clamp(min=1e-30)).clamp(-7, 7) + 8
        return {"k": _pack(q.view(b, length, d)), "s": scale.squeeze(-1).to(torch.float16)}
    if fmt == "mxfp4":
        exp = torch.ceil(torch.log2((amax / 6.0).clamp(min=2.0**-126))).clamp(-127, 127)
        codes = _e2m1_encode(x / torch.exp2(exp))
        return {"k": _pack(codes.view(b, length, d)), "s": (exp.squeeze(-1) + 127).to(torch.uint8)}
    scale = (amax / 6.0).clamp(min=2.0**-9).to(torch.float8_e4m3fn)
    codes = _e2m1_encode(x / scale.float())
    return {"k": _pack(codes.view(b, length, d)), "s": scale.squeeze(-1).view(torch.uint8)}


def dequantize(parts: dict[str, torch.Tensor], fmt: str) -> torch.Tensor:
    """Stored parts -> float32 keys ``(B, L, d)``."""
    check_format(fmt)
    if fmt == "bf16":
        return parts["k"].float()
    packed, s = parts["k"], parts["s"]
    b, length, half = packed.shape
    d = half * 2
    g = group_size(fmt, d)
    codes = _unpack(packed).view(b, length, d // g, g)
    if fmt == "int4":
        x = (codes.float() - 8.0) * s.float().unsqueeze(-1)
    elif fmt == "mxfp4":
        x = _e2m1_decode(codes) * torch.exp2(s.float() - 127.0).unsqueeze(-1)
    else:
        x = _e2m1_decode(codes) * s.view(torch.float8_e4m3fn).float().unsqueeze(-1)
    return x.view(b, length, d)


def bytes_per_token(parts: dict[str, torch.Tensor]) -> float:
    """Measured storage per token (all parts, all batch rows)."""
    first = next(iter(parts.values()))
    tokens = first.shape[0] * first.shape[1]
    return sum(p.numel() * p.element_size() for p in parts.values()) / tokens


class KeyCache:
    """Selector keys of one layer inside a SparseCache layer's ``meta`` dict (tokens on dim 1)."""

    PREFIX = "spot_k"

    def __init__(self, meta: dict[str, MetaEntry], fmt: str) -> None:
        check_format(fmt)
        self.meta, self.fmt = meta, fmt

    def _names(self) -> list[str]:
        return [f"{self.PREFIX}.{n}" for n in (("k",) if self.fmt == "bf16" else ("k", "s"))]

    def __len__(self) -> int:
        entry = self.meta.get(f"{self.PREFIX}.k")
        return 0 if entry is None else entry.tensor.shape[1]

    def append(self, keys: torch.Tensor) -> None:
        parts = quantize(keys, self.fmt)
        for name, part in parts.items():
            full = f"{self.PREFIX}.{name}"
            entry = self.meta.get(full)
            if entry is None:
                self.meta[full] = MetaEntry(part, tokens_per_entry=1, axis=1)
            else:
                entry.tensor = torch.cat([entry.tensor, part], dim=1)

    def parts(self) -> dict[str, torch.Tensor]:
        return {name.split(".")[-1]: self.meta[name].tensor for name in self._names()}


def score_blocks_torch(
    q: torch.Tensor,
    w: torch.Tensor,
    parts: dict[str, torch.Tensor],
    fmt: str,
    q_pos: torch.Tensor,
    block_size: int,
    seq_start: torch.Tensor | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Block logits ``(B, G, Lq, NB)`` of queries ``(B, H, Lq, d)`` over the cached keys (PyTorch path).

    Dequantises in key chunks so that a long cache is never expanded to float32 all at once.
    """
    from .selector import token_scores

    length = next(iter(parts.values())).shape[1]
    chunk = max(block_size, chunk - chunk % block_size)
    out = []
    for a in range(0, length, chunk):
        e = min(length, a + chunk)
        keys = dequantize({n: p[:, a:e] for n, p in parts.items()}, fmt)
        scores = token_scores(q, w, keys)
        allowed = causal_allowed(q_pos, e, seq_start)[..., a:e]
        out.append(block_logits(scores, allowed, block_size))
    return torch.cat(out, dim=-1)


def score_blocks(
    q: torch.Tensor,
    w: torch.Tensor,
    parts: dict[str, torch.Tensor],
    fmt: str,
    q_pos: torch.Tensor,
    block_size: int,
    seq_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block logits over the cached keys: the fused Triton kernel on CUDA for decode, else PyTorch."""
    if q.is_cuda and q.shape[2] == 1:
        try:
            from .triton_score import score_blocks_triton  # noqa: PLC0415 (needs triton)
        except ImportError:
            pass
        else:
            return score_blocks_triton(q, w, parts, fmt, int(q_pos[-1]) + 1, block_size, seq_start)
    return score_blocks_torch(q, w, parts, fmt, q_pos, block_size, seq_start)


__all__ = [
    "FORMATS",
    "KeyCache",
    "bytes_per_token",
    "dequantize",
    "quantize",
    "score_blocks",
    "score_blocks_torch",
]
