"""Input validation shared by every attention kernel, so all paths reject bad input the same way."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_start: torch.Tensor | None = None
) -> tuple[int, int, int, int]:
    """Validate ``q (B, Hq, Lq, D)``, ``k``/``v (B, Hkv, Lk, D)``; return ``(B, Hq, Lq, D)``."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D (batch, heads, length, head_dim); got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    b, hq, lq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head_dim"
        )
    if hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({k.shape[1]})")
    if lq > k.shape[2]:
        raise ValueError(f"more queries ({lq}) than keys ({k.shape[2]}): keys must include the queries")
    if q.dtype not in FLOAT_DTYPES or q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(
            f"q, k, v must share one dtype among float32, float16, bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if seq_start is not None and (seq_start.shape != (b,) or seq_start.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"seq_start must be an int tensor of shape ({b},), got {tuple(seq_start.shape)}")
    return b, hq, lq, d


def num_query_blocks(num_queries: int, num_keys: int, block_size: int) -> int:
    """Rows of a prefill selection: the query blocks (aligned to absolute positions) holding the queries."""
    return math.ceil(num_keys / block_size) - (num_keys - num_queries) // block_size
