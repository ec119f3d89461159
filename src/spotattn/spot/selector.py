"""The SpotAttention selector: a small per-layer indexer that predicts the layer's attention over key blocks.

For each full-attention layer it reads the layer's normed hidden states (the input of q/k/v) and has its
own projections: ``H`` query heads and one shared key, each of ``d`` dims, RMSNorm then RoPE on both.
A key token ``s`` gets, from query ``t``, the score

    I(t, s) = sum_j w_{t,j} * ReLU(q_{t,j} . k_s)

with ``w_t`` a learned function of the query token (one weight per head; one set per kv-group when
``num_groups > 1``). Token scores become a distribution over 16-token key blocks by log-sum-exp inside
each block: ``logit(b) = logsumexp_{s in b} I(t, s)``, so that ``softmax_b(logit)`` equals the sum of
the token-level ``softmax_s(I)`` over the block's tokens. That makes the block distribution directly
comparable with the teacher's (attention summed over a block's tokens), and keeps the selector
calibrated at the token level, whatever block size inference later groups the tokens into.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

NEG_INF = float("-inf")


@dataclass
class SelectorConfig:
    """Shape of a selector; saved in the checkpoint JSON."""

    hidden_size: int
    num_layers: int
    layer_ids: tuple[int, ...] | list[int] | None = None  # the full-attention layers it serves (None: all)
    num_heads: int = 4  # H_I
    head_dim: int = 128  # d_I
    num_groups: int = 1  # 1: one distribution shared by all heads; Hkv: one per kv-group
    block_size: int = 16
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    # Frequencies whose wavelength (tokens) exceeds this are left unrotated (position-free dims). Set it to
    # the training length: every angle the selector then meets at 8x that length was seen in training.
    rope_max_wavelength: float | None = None
    # Multiply the scores of a query at position t by (1 + g * log(t + 1)), g learned per layer, so the
    # sharpness can follow the number of keys (the softmax over 8x more keys flattens otherwise).
    length_scaling: bool = False

    def __post_init__(self) -> None:
        if self.layer_ids is None:
            self.layer_ids = list(range(self.num_layers))
        self.layer_ids = [int(i) for i in self.layer_ids]
        for name in ("hidden_size", "num_layers", "num_heads", "head_dim", "num_groups", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SelectorConfig.{name} must be a positive integer, got {value!r}")
        if self.head_dim % 2:
            raise ValueError(f"SelectorConfig.head_dim must be even (RoPE), got {self.head_dim}")
        mw = self.rope_max_wavelength
        if mw is not None and (isinstance(mw, bool) or not isinstance(mw, (int, float)) or not mw > 0):
            raise ValueError(f"SelectorConfig.rope_max_wavelength must be a positive number or None, got {mw!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SelectorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown selector config field(s) {unknown}")
        return cls(**data)


def inv_frequencies(
    dim: int, theta: float, max_wavelength: float | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """RoPE inverse frequencies ``(dim/2,)``, float32; those with a wavelength over ``max_wavelength`` are 0."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    if max_wavelength is not None:
        inv = torch.where(2 * math.pi / inv > max_wavelength, torch.zeros_like(inv), inv)
    return inv


def rope_tables(
    positions: torch.Tensor, dim: int, theta: float, max_wavelength: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(L, dim)`` in float32 for the half-split (rotate_half) RoPE convention."""
    inv = inv_frequencies(dim, theta, max_wavelength, positions.device)
    angles = positions.float().unsqueeze(-1) * inv
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(..., L, dim)`` by position; cos/sin broadcast over the leading dims."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class SelectorLayer(nn.Module):
    """The indexer of one attention layer."""

    def __init__(self, config: SelectorConfig) -> None:
        super().__init__()
        self.config = config
        h, d = config.num_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, d, bias=False)
        self.w_proj = nn.Linear(config.hidden_size, config.num_groups * h, bias=True)
        self.q_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.k_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.length_gain = nn.Parameter(torch.zeros(1)) if config.length_scaling else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.hidden_size**-0.5
        nn.init.normal_(self.q_proj.weight, std=std)
        nn.init.normal_(self.k_proj.weight, std=std)
        # Start with small, equal head weights: a soft, nearly uniform distribution the KL can sharpen.
        nn.init.zeros_(self.w_proj.weight)
        nn.init.constant_(self.w_proj.bias, 1.0 / self.config.num_heads)
        self.q_norm.reset_parameters()
        self.k_norm.reset_parameters()
        if self.length_gain is not None:
            nn.init.zeros_(self.length_gain)  # starts as no scaling; the data decides

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        return rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_max_wavelength)

    def length_factor(self, positions: torch.Tensor) -> torch.Tensor | None:
        """``(L,)`` multiplier of the scores of queries at ``positions`` (None without length scaling)."""
        if self.length_gain is None:
            return None
        return 1.0 + self.length_gain.float() * torch.log1p(positions.float())

    def keys(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Selector keys ``(B, L, d)`` (normed, rotated, float32) for hidden states ``(B, L, hidden)``."""
        k = self.k_norm(self.k_proj(hidden.to(self.k_proj.weight.dtype)).float())
        return apply_rope(k, *self.rope(positions))

    def queries(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries ``(B, H, L, d)`` and mixing weights ``(B, G, H, L)``, both float32."""
        b, length, _ = hidden.shape
        cfg = self.config
        x = hidden.to(self.q_proj.weight.dtype)
        q = self.q_proj(x).float().view(b, length, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        q = apply_rope(self.q_norm(q), *self.rope(positions))
        # The score is a dot product of two unit-RMS vectors: divide by sqrt(d) so it is O(1) at init.
        q = q * cfg.head_dim**-0.5
        w = self.w_proj(x).float().view(b, length, cfg.num_groups, cfg.num_heads).permute(0, 2, 3, 1)
        factor = self.length_factor(positions)
        # Scores are linear in w, so scaling w scales them.
        return q, w if factor is None else w * factor


def token_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``I(t, s)`` ``(B, G, Lq, Lk)``; q ``(B, H, Lq, d)``, weights ``(B, G, H, Lq)``, keys ``(B, Lk, d)``."""
    relu = F.relu(torch.matmul(q, keys.unsqueeze(1).transpose(-1, -2)))  # (B, H, Lq, Lk)
    return torch.einsum("bghq,bhqk->bgqk", w, relu)


def block_logits(scores: torch.Tensor, allowed: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """Log-sum-exp of token scores ``(..., Lk)`` in each key block -> ``(..., NB)``; masked tokens drop out.

    A block with no allowed token gets -inf.
    """
    if allowed is not None:
        scores = scores.masked_fill(~allowed, NEG_INF)
    length = scores.shape[-1]
    pad = (-length) % block_size
    if pad:
        scores = F.pad(scores, (0, pad), value=NEG_INF)
    return torch.logsumexp(scores.unflatten(-1, (-1, block_size)), dim=-1)


def causal_allowed(q_pos: torch.Tensor, num_keys: int, seq_start: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``(B or 1, 1, Lq, Lk)``: key s is visible to the query at absolute position ``q_pos``."""
    key_pos = torch.arange(num_keys, device=q_pos.device)
    allowed = key_pos <= q_pos.unsqueeze(-1)
    if seq_start is not None:
        allowed = allowed & (key_pos >= seq_start.view(-1, 1, 1))
        return allowed.unsqueeze(1)
    return allowed.view(1, 1, *allowed.shape)


def block_log_probs(
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    q_pos: torch.Tensor,
    block_size: int,
    seq_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Selector log-distribution over key blocks ``(B, G, Lq, NB)`` for queries at ``q_pos`` ``(Lq,)``."""
    allowed = causal_allowed(q_pos, keys.shape[1], seq_start)
    logits = block_logits(token_scores(q, w, keys), allowed, block_size)
    # Queries that see nothing (inside left padding) get a uniform row instead of NaN.
    empty = torch.isinf(logits).all(-1, keepdim=True)
    logits = torch.where(empty, torch.zeros_like(logits), logits)
    return torch.log_softmax(logits, dim=-1)


class Selector(nn.Module):
    """Selectors for all served layers of one model, addressed by the model's layer index."""

    def __init__(self, config: SelectorConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleDict({str(i): SelectorLayer(config) for i in config.layer_ids})

    def layer(self, layer_idx: int) -> SelectorLayer:
        key = str(layer_idx)
        if key not in self.layers:
            raise KeyError(f"this selector has no layer {layer_idx}; it serves {self.config.layer_ids}")
        return self.layers[key]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def default_shape(hidden_size: int) -> tuple[int, int]:
    """(H_I, d_I) for a backbone of ``hidden_size``: the paper's 4 x 128 from 2048 up, smaller below.

    Small models get 4 x 64 so that the selector stays a few percent of the backbone (SmolLM2-135M:
    hidden 576, 30 layers -> 5.6M selector parameters, 11 MB in bf16, 4% of the model).
    """
    if hidden_size >= 2048:
        return 4, 128
    return 4, 64 if hidden_size >= 512 else 32


def config_for_model(
    model_config,
    num_heads: int | None = None,
    head_dim: int | None = None,
    num_groups: int = 1,
    block_size: int = 16,
    *,
    rope_max_wavelength: float | None = None,
    length_scaling: bool = False,
) -> SelectorConfig:
    """A selector config for a Hugging Face text config (full-attention layers only)."""
    text = (
        model_config.get_text_config(decoder=True)
        if hasattr(model_config, "get_text_config")
        else model_config
    )
    h_default, d_default = default_shape(text.hidden_size)
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    layer_ids = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    rope = getattr(text, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0)))
    if num_groups not in (1, text.num_key_value_heads):
        raise ValueError(
            f"num_groups must be 1 (shared) or the model's kv heads ({text.num_key_value_heads})"
        )
    return SelectorConfig(
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        layer_ids=layer_ids,
        num_heads=num_heads or h_default,
        head_dim=head_dim or d_default,
        num_groups=num_groups,
        block_size=block_size,
        rope_theta=theta,
        norm_eps=float(getattr(text, "rms_norm_eps", 1e-6)),
        rope_max_wavelength=rope_max_wavelength,
        length_scaling=length_scaling,
    )


__all__ = [
    "Selector",
    "SelectorConfig",
    "SelectorLayer",
    "apply_rope",
    "block_log_probs",
    "block_logits",
    "causal_allowed",
    "config_for_model",
    "default_shape",
    "inv_frequencies",
    "rope_tables",
    "token_scores",
]
