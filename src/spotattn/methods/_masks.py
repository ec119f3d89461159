"""Small shared pieces of the training-free methods: block masks from selections, config checks."""

from __future__ import annotations

import torch

from ..types import Selection

GRANULARITIES = ("group", "head")


def selection_mask(selection: Selection, num_blocks: int) -> torch.Tensor:
    """Bool ``(B, G, R, NB)``: the blocks a :class:`Selection` reads (the inverse of ``mask_to_selection``).

    Methods that select per query head, or per band, take unions of these masks before building the
    per-kv-group selection the kernels read.
    """
    ids = selection.block_ids.long()
    live = torch.arange(ids.shape[-1], device=ids.device) < selection.counts.unsqueeze(-1)
    mask = torch.zeros(*ids.shape[:3], num_blocks + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(-1, torch.where(live, ids, num_blocks), True)
    return mask[..., :num_blocks]


def group_union(mask: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``(B, Hq, R, NB)`` per-query-head mask to ``(B, Hkv, R, NB)``: a kv-group reads what any of its
    heads needs (the kernels read one list per kv-group, and a block read for one head costs the same
    memory traffic for all heads of the group)."""
    b, hq, r, nb = mask.shape
    return mask.view(b, num_kv_heads, hq // num_kv_heads, r, nb).any(dim=2)


def check_choice(owner: str, name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name} must be one of {allowed}, got {value!r}")


def check_nonneg_int(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner}.{name} must be a non-negative integer, got {value!r}")


def check_probability(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{owner}.{name} must be a probability in (0, 1], got {value!r}")
