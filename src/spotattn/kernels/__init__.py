"""Attention kernels. Each op dispatches by device: CUDA tensors go to Triton, others to the reference."""

from __future__ import annotations

import warnings

import torch

from . import reference
from .checks import check_attention_inputs, num_query_blocks

__all__ = [
    "block_sparse_prefill",
    "check_attention_inputs",
    "dense_attention",
    "num_query_blocks",
    "reference",
    "sparse_decode",
]

_warned: set[str] = set()


def _triton_or_none(name: str):
    """The Triton implementation of ``name`` if it exists; otherwise warn once, loudly."""
    try:
        from . import triton_ops  # noqa: PLC0415 (optional: needs triton and CUDA)
    except ImportError as exc:
        if name not in _warned:
            _warned.add(name)
            warnings.warn(
                f"spotattn: no Triton kernel for {name} ({exc}); CUDA tensors run the slow PyTorch reference",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    return getattr(triton_ops, name)


def dense_attention(q, k, v, *, scale=None, seq_start=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal dense attention with log-sum-exp (reference path; used by methods that read everything)."""
    return reference.dense_attention_ref(q, k, v, scale=scale, seq_start=seq_start)


def block_sparse_prefill(
    q, k, v, block_ids, counts, block_size, *, scale=None, seq_start=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse causal prefill; see :func:`reference.block_sparse_prefill_ref` for the contract."""
    if q.is_cuda and (fn := _triton_or_none("block_sparse_prefill")) is not None:
        return fn(q, k, v, block_ids, counts, block_size, scale=scale, seq_start=seq_start)
    return reference.block_sparse_prefill_ref(
        q, k, v, block_ids, counts, block_size, scale=scale, seq_start=seq_start
    )


def sparse_decode(
    q, k, v, block_ids, counts, block_size, *, scale=None, seq_start=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse decode of 1..T queries; see :func:`reference.sparse_decode_ref` for the contract."""
    if q.is_cuda and (fn := _triton_or_none("sparse_decode")) is not None:
        return fn(q, k, v, block_ids, counts, block_size, scale=scale, seq_start=seq_start)
    return reference.sparse_decode_ref(q, k, v, block_ids, counts, block_size, scale=scale, seq_start=seq_start)
