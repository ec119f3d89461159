"""Decode-row selection with a static width and a device-side length: no host sync, CUDA-graph safe.

Same rules as :func:`spotattn.selection.select_blocks` for one decode row (sink and the row's own /
recent blocks forced, nothing in padding or the future), but

- the causal limit comes from ``seq_len``, a 0-dim device tensor, so the block masses may cover a
  whole static buffer (blocks past the current length are simply not allowed);
- for budgets with a cap (``TopK``, ``DualTopP`` with ``max_tokens``) it ranks with ``torch.topk`` over
  the cap instead of sorting every block, and builds the id list from the forced ranges plus the top
  entries: one small sort of about ``cap`` ids instead of two sorts over all blocks.

On CUDA the whole rule runs in one fused Triton kernel instead (``kernels/_triton/select.py``: same ids
and counts, thresholds by bisection, no sort); the PyTorch code below is the CPU path and the reference.

Budgets without a cap fall back to :func:`~spotattn.kernels.triton_ops.select_blocks_device` semantics
(width = all blocks) through the same code with ``k = NB``.
"""

from __future__ import annotations

import math

import torch

from ..types import Budget, DualTopP, Selection, TopK, TopP


def _forced_counts(budget: Budget, block_size: int) -> tuple[int, int]:
    if isinstance(budget, DualTopP):
        return max(1, math.ceil(budget.sink / block_size)), max(1, math.ceil(budget.recent / block_size))
    return 1, 1


def _cap_blocks(budget: Budget, block_size: int, num_blocks: int) -> int:
    """Most residual blocks a row can take (the ``topk`` width)."""
    if isinstance(budget, TopK):
        return min(num_blocks, budget.max_blocks(block_size))
    if isinstance(budget, DualTopP) and budget.max_tokens is not None:
        return min(num_blocks, math.ceil(budget.max_tokens / block_size))
    return num_blocks


def select_decode_static(
    mass: torch.Tensor,
    budget: Budget,
    block_size: int,
    seq_len: torch.Tensor,
    num_queries: int = 1,
    seq_start: torch.Tensor | None = None,
) -> Selection:
    """Selection for one decode row from ``mass`` ``(B, G, 1, NB)``; ``seq_len`` counts the keys that
    exist, new queries included (0-dim or ``(1,)`` integer tensor on ``mass``'s device).

    The output width is static: ``n_sink + max(n_recent, 2) + cap``; ids are ascending, -1 padded.
    """
    b, g, r, nb = mass.shape
    if r != 1:
        raise ValueError(f"select_decode_static takes one decode row, got {r}")
    if num_queries > block_size:
        raise ValueError(f"at most block_size ({block_size}) new queries, got {num_queries}")
    device = mass.device
    n_sink, n_recent = _forced_counts(budget, block_size)
    span = max(n_recent, 2)  # the recent range, or the row's own (at most 2) blocks, whichever is wider
    fused = _fused_select(mass)
    if fused is not None:  # one kernel instead of ~40 launches with a top-k and a sort
        width = n_sink + span + _cap_blocks(budget, block_size, nb)
        return fused(
            mass, budget, block_size, width, logits=False, seq_len=seq_len, num_queries=num_queries, seq_start=seq_start
        )
    j = torch.arange(nb, device=device)
    seq_len = seq_len.reshape(1).long()
    last = (seq_len - 1) // block_size
    first_q = (seq_len - num_queries) // block_size
    first_recent = torch.minimum(first_q, last - n_recent + 1)
    sink_block = (seq_start.long() // block_size).view(b, 1, 1, 1) if seq_start is not None else torch.zeros_like(last)
    allowed = j <= last
    if seq_start is not None:
        allowed = allowed & ((j + 1) * block_size > seq_start.view(b, 1, 1, 1))
    allowed = allowed.expand(b, g, 1, nb)
    in_sink = (j >= sink_block) & (j < sink_block + n_sink)
    forced = (in_sink | ((j >= first_recent) & (j <= last))) & allowed
    residual = allowed & ~forced

    mass = torch.where(allowed, mass.float().clamp(min=0), 0.0)
    mass = mass / mass.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    cap = _cap_blocks(budget, block_size, nb)
    top_mass, top_ids = torch.where(residual, mass, -1.0).topk(cap, dim=-1)  # sorted, descending
    top_mass = top_mass.clamp(min=0)
    n_forced = forced.sum(-1)
    n_residual = residual.sum(-1)
    if isinstance(budget, TopK):
        take = (budget.max_blocks(block_size) - n_forced).clamp(min=0)
    elif isinstance(budget, TopP):
        take = _nucleus(top_mass, budget.p - (mass * forced).sum(-1))
    else:
        # The target is p of all residual mass, not only of the top ``cap`` entries.
        residual_mass = torch.where(residual, mass, 0.0).sum(-1)
        take = _nucleus(top_mass, budget.p * residual_mass)
        take = torch.maximum(take, math.ceil(budget.min_tokens / block_size) - n_forced)
        if budget.max_tokens is not None:
            take = torch.minimum(take, (math.ceil(budget.max_tokens / block_size) - n_forced).clamp(min=0))
    take = torch.minimum(take.clamp(min=0), n_residual)
    chosen = torch.where(torch.arange(cap, device=device) < take.unsqueeze(-1), top_ids, nb)

    # Forced ids from their two ranges; a recent block that is also a sink block is listed once.
    sink_ids = sink_block.view(-1, 1, 1, 1) + torch.arange(n_sink, device=device)
    sink_ids = sink_ids.expand(b, g, 1, n_sink)
    recent_ids = (first_recent + torch.arange(span, device=device)).expand(b, g, 1, span)
    sink_ok = sink_ids <= last
    recent_ok = (recent_ids <= last) & ~((recent_ids >= sink_block) & (recent_ids < sink_block + n_sink))
    if seq_start is not None:
        first_valid = (seq_start.long() // block_size).view(b, 1, 1, 1)
        recent_ok = recent_ok & (recent_ids >= first_valid)
    recent_ok = recent_ok & (recent_ids >= 0)
    ids = torch.cat(
        [torch.where(sink_ok, sink_ids, nb), torch.where(recent_ok, recent_ids, nb), chosen.expand(b, g, 1, cap)],
        dim=-1,
    )
    ids = ids.sort(dim=-1).values
    counts = (ids < nb).sum(-1).to(torch.int32)
    ids = torch.where(ids < nb, ids, -1).to(torch.int32)
    return Selection(ids.contiguous(), counts, block_size)


def _fused_select(scores: torch.Tensor):
    """The fused Triton selection for CUDA rows it can hold, else None (CPU keeps the PyTorch path)."""
    if not scores.is_cuda:
        return None
    try:
        from ..kernels._triton.select import fused_select_supported, select_decode_fused  # noqa: PLC0415
    except ImportError:
        return None
    return select_decode_fused if fused_select_supported(scores.shape[-1]) else None


def _nucleus(sorted_mass: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smallest prefix of ``sorted_mass`` reaching ``target`` (0 when target <= 0); capped at its width."""
    before = sorted_mass.cumsum(-1) - sorted_mass
    count = (before < target.unsqueeze(-1) - 1e-7).sum(-1)
    return torch.where(target > 1e-7, count, torch.zeros_like(count))
