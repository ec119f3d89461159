"""Turning estimated block attention mass into a :class:`Selection` under a budget rule (PyTorch path).

Every rule keeps the invariants: the sink block (first valid block) and the blocks holding the row's
own queries are always read; blocks entirely in padding or in the future never are.
"""

from __future__ import annotations

import math

import torch

from .types import Budget, DualTopP, Selection, TopK, TopP


def allowed_blocks(
    num_blocks: int,
    row_last_block: torch.Tensor,
    block_size: int,
    seq_start: torch.Tensor | None,
    batch: int,
) -> torch.Tensor:
    """Bool ``(B, 1, R, NB)``: block j is causal for row r and not wholly inside left padding."""
    j = torch.arange(num_blocks, device=row_last_block.device)
    causal = j <= row_last_block.view(-1, 1)
    if seq_start is None:
        return causal.expand(batch, 1, -1, -1)
    not_pad = (j + 1) * block_size > seq_start.view(-1, 1)
    return causal.view(1, 1, *causal.shape) & not_pad.view(batch, 1, 1, num_blocks)


def _forced_blocks(
    allowed: torch.Tensor,
    row_first_block: torch.Tensor,
    row_last_block: torch.Tensor,
    sink_block: torch.Tensor,
    n_sink: int,
    n_recent: int,
) -> torch.Tensor:
    """Sink blocks from the first valid block on, and recent blocks ending at the row's last block."""
    nb = allowed.shape[-1]
    j = torch.arange(nb, device=allowed.device)
    sink = (j >= sink_block.view(-1, 1, 1, 1)) & (j < sink_block.view(-1, 1, 1, 1) + n_sink)
    first_recent = torch.minimum(row_first_block, row_last_block - n_recent + 1).view(1, 1, -1, 1)
    recent = (j >= first_recent) & (j <= row_last_block.view(1, 1, -1, 1))
    return (sink | recent) & allowed


def select_blocks(
    mass: torch.Tensor,
    budget: Budget,
    block_size: int,
    *,
    row_first_block: torch.Tensor,
    row_last_block: torch.Tensor,
    seq_start: torch.Tensor | None = None,
    first_row: int = 0,
) -> Selection:
    """Select blocks from ``mass`` ``(B, G, R, NB)``, the estimated attention mass of each key block.

    ``row_first_block``/``row_last_block`` ``(R,)`` give the first and last block holding each row's
    queries (forced). Mass outside the allowed blocks is ignored, and the rest renormalised, so any
    non-negative score that is proportional to probability works.
    """
    b, g, r, nb = mass.shape
    allowed = allowed_blocks(nb, row_last_block, block_size, seq_start, b).expand(b, g, r, nb)
    sink_block = (
        seq_start // block_size if seq_start is not None else torch.zeros(b, dtype=torch.long, device=mass.device)
    )
    if isinstance(budget, DualTopP):
        n_sink = max(1, math.ceil(budget.sink / block_size))
        n_recent = max(1, math.ceil(budget.recent / block_size))
    else:
        n_sink, n_recent = 1, 1
    forced = _forced_blocks(allowed, row_first_block, row_last_block, sink_block, n_sink, n_recent)
    residual = allowed & ~forced

    mass = torch.where(allowed, mass.float().clamp(min=0), 0.0)
    total = mass.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    mass = mass / total
    # Rank residual blocks by mass, descending; non-residual blocks sink to the end.
    ranked = torch.where(residual, mass, -1.0)
    sorted_mass, order = ranked.sort(dim=-1, descending=True)
    sorted_mass = sorted_mass.clamp(min=0)
    n_residual = residual.sum(-1)
    n_forced = forced.sum(-1)

    if isinstance(budget, TopK):
        take = (budget.max_blocks(block_size) - n_forced).clamp(min=0)
    elif isinstance(budget, TopP):
        target = budget.p - (mass * forced).sum(-1)
        take = _nucleus_count(sorted_mass, target)
    else:
        target = budget.p * sorted_mass.sum(-1)
        take = _nucleus_count(sorted_mass, target)
        take = torch.maximum(take, math.ceil(budget.min_tokens / block_size) - n_forced)
        if budget.max_tokens is not None:
            take = torch.minimum(take, (math.ceil(budget.max_tokens / block_size) - n_forced).clamp(min=0))
    take = torch.minimum(take.clamp(min=0), n_residual)

    keep_sorted = torch.arange(nb, device=mass.device) < take.unsqueeze(-1)
    keep = torch.zeros_like(residual).scatter(-1, order, keep_sorted) | forced
    return mask_to_selection(keep, block_size, first_row)


def _nucleus_count(sorted_mass: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smallest prefix of ``sorted_mass`` whose sum reaches ``target`` (0 when target <= 0)."""
    before = sorted_mass.cumsum(-1) - sorted_mass
    count = (before < target.unsqueeze(-1) - 1e-7).sum(-1)
    return torch.where(target > 1e-7, count, torch.zeros_like(count))


def mask_to_selection(
    keep: torch.Tensor, block_size: int, first_row: int = 0, width: int | None = None
) -> Selection:
    """Bool ``(B, G, R, NB)`` block mask to a :class:`Selection` with ascending block ids.

    ``width``: the lists' width, at least the largest count (``NB`` always is); None: the largest count,
    which costs a device-to-host sync on CUDA.
    """
    nb = keep.shape[-1]
    j = torch.arange(nb, device=keep.device)
    key = torch.where(keep, j, nb + j)
    counts = keep.sum(-1).to(torch.int32)
    if width is None:
        width = max(1, int(counts.max()))
    ids = key.sort(dim=-1).values[..., :width]
    ids = torch.where(ids < nb, ids, -1).to(torch.int32)
    return Selection(ids.contiguous(), counts, block_size, first_row)


def full_selection(
    batch: int, num_blocks: int, row_last_block: torch.Tensor, block_size: int, first_row: int = 0
) -> Selection:
    """Every causal block for every row: the selection that reproduces dense attention."""
    keep = allowed_blocks(num_blocks, row_last_block, block_size, None, batch)
    return mask_to_selection(keep, block_size, first_row)


def block_sums(token_mass: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sum ``(..., L)`` token mass into ``(..., ceil(L / bs))`` blocks."""
    length = token_mass.shape[-1]
    pad = (-length) % block_size
    if pad:
        token_mass = torch.nn.functional.pad(token_mass, (0, pad))
    return token_mass.unflatten(-1, (-1, block_size)).sum(-1)


def rows_for_prefill(num_queries: int, num_keys: int, block_size: int, device) -> tuple[int, torch.Tensor]:
    """First absolute query block and each row's block index for a prefill of ``num_queries``."""
    first = (num_keys - num_queries) // block_size
    last = math.ceil(num_keys / block_size)
    return first, torch.arange(first, last, device=device)


def rows_for_decode(num_queries: int, num_keys: int, block_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The single decode row's first and last query block, as ``(1,)`` tensors."""
    first = torch.tensor([(num_keys - num_queries) // block_size], device=device)
    last = torch.tensor([(num_keys - 1) // block_size], device=device)
    return first, last


def density_of(
    selection: Selection,
    num_queries: int,
    num_keys: int,
    seq_start: torch.Tensor | None,
    *,
    decode: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens read and tokens causally available, per (batch, group), at block granularity.

    A row's read tokens are the valid, causal tokens of its selected blocks; its available tokens are
    the valid tokens up to its last query. Rows are weighted by the number of queries they hold.
    """
    bs = selection.block_size
    b, g, r, k = selection.block_ids.shape
    device = selection.block_ids.device
    offset = num_keys - num_queries
    if decode:
        q_lo = torch.tensor([offset], device=device)
        q_hi = torch.tensor([num_keys], device=device)
    else:
        rows = torch.arange(selection.first_row, selection.first_row + r, device=device)
        q_lo = (rows * bs).clamp(min=offset)
        q_hi = ((rows + 1) * bs).clamp(max=num_keys)
    weight = (q_hi - q_lo).clamp(min=0).float()
    # A 0-dim tensor on the selection's device (not a float) so that the views below stay on it.
    start = seq_start.view(b, 1, 1, 1).float() if seq_start is not None else torch.zeros((), device=device)
    ids = selection.block_ids.long()
    live = torch.arange(k, device=device) < selection.counts.unsqueeze(-1)
    lo = torch.maximum(ids.float() * bs, torch.as_tensor(start))
    hi = torch.minimum((ids.float() + 1) * bs, q_hi.view(1, 1, r, 1).float())
    read = ((hi - lo).clamp(min=0) * live).sum(-1)
    avail = (q_hi.view(1, 1, r).float() - torch.as_tensor(start).view(-1, 1, 1)).clamp(min=0)
    avail = avail.expand(b, g, r)
    return (read * weight).sum(-1), (avail * weight).sum(-1)
