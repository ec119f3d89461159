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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SelectorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown selector config field(s) {unknown}")
        return cls(**data)


def rope_tables(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(L, dim)`` in float32 for the half-split (rotate_half) RoPE convention."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
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

    def keys(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Selector keys ``(B, L, d)`` (normed, rotated, float32) for hidden states ``(B, L, hidden)``."""
        k = self.k_norm(self.k_proj(hidden.to(self.k_proj.weight.dtype)).float())
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        return apply_rope(k, cos, sin)

    def queries(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries ``(B, H, L, d)`` and mixing weights ``(B, G, H, L)``, both float32."""
        b, length, _ = hidden.shape
        cfg = self.config
        x = hidden.to(self.q_proj.weight.dtype)
        q = self.q_proj(x).float().view(b, length, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        q = self.q_norm(q)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        q = apply_rope(q, cos, sin)
        # The score is a dot product of two unit-RMS vectors: divide by sqrt(d) so it is O(1) at init.
        q = q * cfg.head_dim**-0.5
        w = self.w_proj(x).float().view(b, length, cfg.num_groups, cfg.num_heads).permute(0, 2, 3, 1)
        return q, w


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
    "rope_tables",
    "token_scores",
]
