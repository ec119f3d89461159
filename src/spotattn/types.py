"""Core value types: the block selection that methods produce and kernels consume, and budget rules."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Selection:
    """Which key blocks each query row reads.

    ``block_ids``: int32 ``(B, G, R, K)``; entries past ``counts`` are padding (-1) and are never read.
    ``counts``: int32 ``(B, G, R)``. ``G`` is the number of kv-groups, or 1 when one list is shared by all
    heads. In prefill a row is a query block (row ``r`` is absolute query block ``first_row + r``); in
    decode there is a single row shared by the 1..T new query tokens.
    """

    block_ids: torch.Tensor
    counts: torch.Tensor
    block_size: int
    first_row: int = 0

    def __post_init__(self) -> None:
        if self.block_ids.dim() != 4 or self.counts.shape != self.block_ids.shape[:3]:
            raise ValueError(
                "Selection.block_ids must be (B, G, R, K) and counts (B, G, R); got "
                f"{tuple(self.block_ids.shape)} and {tuple(self.counts.shape)}"
            )
        if self.block_size <= 0:
            raise ValueError(f"Selection.block_size must be positive, got {self.block_size}")

    @property
    def shared(self) -> bool:
        """True when one block list serves every head (G == 1)."""
        return self.block_ids.shape[1] == 1

    def expand_groups(self, num_groups: int) -> Selection:
        """The same selection with one list per kv-group (a view when shared)."""
        if self.block_ids.shape[1] == num_groups:
            return self
        if not self.shared:
            raise ValueError(f"cannot expand a selection of {self.block_ids.shape[1]} groups to {num_groups}")
        b, _, r, k = self.block_ids.shape
        return Selection(
            self.block_ids.expand(b, num_groups, r, k),
            self.counts.expand(b, num_groups, r),
            self.block_size,
            self.first_row,
        )


def _positive_int(name: str, value: int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        allowed = "a positive integer or None" if allow_none else "a positive integer"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _probability(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be a probability in (0, 1], got {value!r}")


@dataclass(frozen=True)
class TopK:
    """Read a fixed number of tokens (rounded up to whole blocks), sink and current block included."""

    tokens: int

    def __post_init__(self) -> None:
        _positive_int("TopK.tokens", self.tokens)

    def max_blocks(self, block_size: int) -> int:
        return math.ceil(self.tokens / block_size)


@dataclass(frozen=True)
class TopP:
    """Read the smallest set of blocks whose estimated attention mass reaches ``p``."""

    p: float

    def __post_init__(self) -> None:
        _probability("TopP.p", self.p)


@dataclass(frozen=True)
class DualTopP:
    """SpotAttention's budget: ``sink`` and ``recent`` tokens reserved, nucleus ``p`` over the rest,
    at least ``min_tokens`` and at most ``max_tokens`` (None: no cap) in all."""

    p: float = 0.9
    sink: int = 128
    recent: int = 256
    min_tokens: int = 512
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        _probability("DualTopP.p", self.p)
        for name in ("sink", "recent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"DualTopP.{name} must be a non-negative integer, got {value!r}")
        _positive_int("DualTopP.min_tokens", self.min_tokens)
        _positive_int("DualTopP.max_tokens", self.max_tokens, allow_none=True)
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(
                f"DualTopP.max_tokens ({self.max_tokens}) must be >= min_tokens ({self.min_tokens})"
            )


Budget = TopK | TopP | DualTopP
BUDGET_TYPES: dict[str, type] = {"topk": TopK, "topp": TopP, "dual_topp": DualTopP}


def budget_to_dict(budget: Budget) -> dict:
    name = next(k for k, v in BUDGET_TYPES.items() if isinstance(budget, v))
    return {"rule": name, **{f: getattr(budget, f) for f in budget.__dataclass_fields__}}


def budget_from_dict(data: dict) -> Budget:
    data = dict(data)
    rule = data.pop("rule", None)
    if rule not in BUDGET_TYPES:
        raise ValueError(f"unknown budget rule {rule!r}; allowed: {sorted(BUDGET_TYPES)}")
    return BUDGET_TYPES[rule](**data)
