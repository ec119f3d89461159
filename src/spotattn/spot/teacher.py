"""The distillation target and losses.

Teacher of a layer: its softmax attention averaged over query heads (or over the heads of each kv-group),
summed onto the selector's key blocks, computed in query chunks so memory stays linear in length. The
``max`` option takes, per block, the largest mass any head gives it, renormalised: one selection serves
all heads, and a head that reads a few blocks sharply weighs as much there as the heads that spread.
Loss: forward KL(teacher || selector) per query; the sparse variant keeps the teacher's top blocks
exactly and lumps every other block into one "rest" bucket.
"""

from __future__ import annotations

import torch

from ..selection import block_sums

HEAD_REDUCTIONS = ("mean", "max")


def check_heads(heads: str, name: str = "heads") -> None:
    if heads not in HEAD_REDUCTIONS:
        raise ValueError(f"{name} must be one of {HEAD_REDUCTIONS}, got {heads!r}")


def teacher_block_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    block_size: int,
    *,
    num_groups: int = 1,
    seq_start: torch.Tensor | None = None,
    chunk: int = 256,
    out_dtype: torch.dtype = torch.float32,
    heads: str = "mean",
) -> torch.Tensor:
    """Attention mass per key block, reduced over query heads, ``(B, G, Lq, NB)``.

    ``query`` ``(B, Hq, Lq, D)`` and ``key`` ``(B, Hkv, Lk, D)`` are post-RoPE; queries are the last Lq
    positions of the keys. ``num_groups`` 1 averages over all query heads; Hkv averages within each group.
    ``heads="max"``: each block's largest mass over those heads instead, renormalised to sum to 1.
    """
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    if num_groups not in (1, hkv):
        raise ValueError(f"num_groups must be 1 or the number of kv heads ({hkv}), got {num_groups}")
    check_heads(heads)
    rep = hq // hkv
    offset = lk - lq
    nb = -(-lk // block_size)
    key_pos = torch.arange(lk, device=query.device)
    kf = key.float()
    out = torch.zeros(b, num_groups, lq, nb, dtype=out_dtype, device=query.device)
    # The (chunk x keys x heads) score tensor is the whole cost: every pass over it is memory traffic. So
    # the scale goes into the queries, only the keys the chunk's last query sees are scored (a causal
    # triangle, half the work on average), and the causal mask touches only the chunk's diagonal columns.
    for a in range(0, lq, chunk):
        e = min(lq, a + chunk)
        seen = e + offset  # keys [0, seen) are visible to some query of the chunk
        qc = (query[:, :, a:e].float() * scale).view(b, hkv, rep, e - a, d)
        scores = torch.einsum("bgrqd,bgkd->bgrqk", qc, kf[:, :, :seen])
        diagonal = scores[..., a + offset :]
        diagonal.masked_fill_(key_pos[a + offset : seen] > (key_pos[a:e] + offset).unsqueeze(-1), float("-inf"))
        if seq_start is not None:
            scores.masked_fill_((key_pos[:seen] < seq_start.view(b, 1, 1, 1, 1)), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if seq_start is not None:
            probs = probs.nan_to_num(0.0)  # a query inside the left padding sees no key (out of place: autograd)
        if heads == "mean":
            probs = probs.mean(dim=(1, 2)).unsqueeze(1) if num_groups == 1 else probs.mean(dim=2)
            blocks = block_sums(probs, block_size)
        else:
            blocks = block_sums(probs, block_size).amax(dim=2)  # per block, the largest head of each group
            if num_groups == 1:
                blocks = blocks.amax(dim=1, keepdim=True)
            blocks = blocks / blocks.sum(-1, keepdim=True).clamp(min=1e-30)
        out[:, :, a:e, : blocks.shape[-1]] = blocks.to(out_dtype)
    return out


def forward_kl(teacher: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Per-query KL(teacher || student) over the last dim; teacher zeros contribute nothing."""
    t = teacher.float()
    return (torch.xlogy(t, t) - t * student_logp.masked_fill(t <= 0, 0.0)).sum(-1)


def sparse_kl(teacher: torch.Tensor, student_logp: torch.Tensor, top: int) -> torch.Tensor:
    """Per-query KL over the teacher's ``top`` blocks plus one bucket holding all the other blocks."""
    nb = teacher.shape[-1]
    if top >= nb:
        return forward_kl(teacher, student_logp)
    t = teacher.float()
    idx = t.topk(top, dim=-1).indices
    in_top = torch.zeros_like(t, dtype=torch.bool).scatter(-1, idx, True)
    t_top = t.gather(-1, idx)
    s_top = student_logp.gather(-1, idx)
    t_rest = (1.0 - t_top.sum(-1)).clamp(min=0.0)
    s_rest = torch.logsumexp(student_logp.masked_fill(in_top, float("-inf")), dim=-1)
    kl_top = (torch.xlogy(t_top, t_top) - t_top * s_top.masked_fill(t_top <= 0, 0.0)).sum(-1)
    kl_rest = torch.xlogy(t_rest, t_rest) - t_rest * torch.where(t_rest > 0, s_rest, torch.zeros_like(s_rest))
    return kl_top + kl_rest


def residual_kl(teacher: torch.Tensor, student_logp: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Per-query KL between the two distributions restricted to the ``residual`` blocks (bool, broadcast to
    the teacher's shape) and renormalised there, weighted by the teacher's mass on them.

    Dual top-p always reads the sink and recent blocks and spends its nucleus on the rest, so only the
    ranking inside the residual matters; the weight makes a query count as much as the mass at stake.
    Queries with no residual mass contribute 0.
    """
    t = teacher.float().masked_fill(~residual, 0.0)
    mass = t.sum(-1, keepdim=True)
    t = t / mass.clamp(min=1e-30)
    s = student_logp.masked_fill(~residual, float("-inf"))
    s = s - torch.logsumexp(s, dim=-1, keepdim=True).nan_to_num(0.0, neginf=0.0)
    kl = (torch.xlogy(t, t) - t * s.masked_fill(t <= 0, 0.0)).sum(-1)
    return kl * mass.squeeze(-1)


def residual_blocks(q_pos: torch.Tensor, num_blocks: int, block_size: int, sink: int, recent: int) -> torch.Tensor:
    """Bool ``(Lq, NB)``: the blocks dual top-p would not force for a query at ``q_pos`` (``sink`` and
    ``recent`` in tokens, rounded up to blocks as the selection rounds them)."""
    n_sink = max(1, -(-sink // block_size))
    n_recent = max(1, -(-recent // block_size))
    j = torch.arange(num_blocks, device=q_pos.device)
    last = (q_pos // block_size).unsqueeze(-1)
    return (j >= n_sink) & (j <= last - n_recent)


def block_recall(teacher: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Share of the teacher's mass inside the kept blocks, per query (``keep`` bool, same shape)."""
    return (teacher.float() * keep).sum(-1) / teacher.float().sum(-1).clamp(min=1e-30)
