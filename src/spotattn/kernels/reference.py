"""Plain PyTorch attention kernels: the CPU path and the oracle every other kernel is tested against.

Layout follows Hugging Face: ``q`` is ``(B, Hq, Lq, D)``, ``k`` and ``v`` are ``(B, Hkv, Lk, D)``; the
``Lq`` queries are the last ``Lq`` positions of the ``Lk`` keys (bottom-right causal alignment, as with
a KV cache). ``seq_start[b]`` is the first valid key of sequence ``b`` (left padding); earlier keys are
never read. Every kernel returns the output (dtype of ``q``) and the natural-log log-sum-exp of the scaled
scores (float32, ``(B, Hq, Lq)``; ``-inf`` for a query that sees no key, whose output is zero).
"""

from __future__ import annotations

import math

import torch

from .checks import check_attention_inputs, num_query_blocks


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in float32 over ``(..., M, D)`` queries and ``(..., N, D)`` keys under a
    boolean ``(..., M, N)`` mask; rows with no allowed key give zeros and ``-inf``."""
    q, k, v = q.float(), k.float(), v.float()
    allowed = allowed.expand(*q.shape[:-1], k.shape[-2])
    if q.device.type == "cpu" and q.dim() == 4:
        # PyTorch's fused CPU kernel returns the log-sum-exp too, and is several times faster here.
        bias = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)[:2]
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.matmul(torch.exp(scores - lse.nan_to_num(neginf=0.0).unsqueeze(-1)), v)
    empty = ~allowed.any(dim=-1)
    return out.masked_fill(empty.unsqueeze(-1), 0.0), lse.masked_fill(empty, float("-inf"))


def _gather_blocks(x: torch.Tensor, token_idx: torch.Tensor) -> torch.Tensor:
    """Gather tokens ``(B, G, N)`` from ``x`` ``(B, Hkv, Lk, D)``; G is Hkv or 1 (shared lists)."""
    b, hkv, _, d = x.shape
    g = token_idx.shape[1]
    if g != hkv:
        token_idx = token_idx.expand(b, hkv, token_idx.shape[-1])
    return torch.gather(x, 2, token_idx.unsqueeze(-1).expand(*token_idx.shape, d))


def _selected_tokens(
    block_ids: torch.Tensor, counts: torch.Tensor, block_size: int, num_keys: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices ``(..., K*bs)`` of the selected blocks and whether each is a real, in-range token."""
    k = block_ids.shape[-1]
    live = torch.arange(k, device=block_ids.device) < counts.unsqueeze(-1)
    offsets = torch.arange(block_size, device=block_ids.device)
    tokens = block_ids.long().clamp(min=0).unsqueeze(-1) * block_size + offsets
    valid = live.unsqueeze(-1) & (tokens < num_keys)
    shape = (*block_ids.shape[:-1], k * block_size)
    return tokens.clamp(max=num_keys - 1).reshape(shape), valid.reshape(shape)


def dense_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    seq_start: torch.Tensor | None = None,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal dense attention, computed in query chunks so memory stays linear in length."""
    b, hq, lq, d = check_attention_inputs(q, k, v, seq_start)
    hkv, lk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    group = hq // hkv
    offset = lk - lq
    start = seq_start.view(b, 1, 1, 1) if seq_start is not None else 0
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    key_pos = torch.arange(lk, device=q.device)
    for a in range(0, lq, chunk):
        e = min(lq, a + chunk)
        qc = q[:, :, a:e].reshape(b, hkv, group * (e - a), d)
        qpos = (torch.arange(a, e, device=q.device) + offset).repeat(group)
        allowed = (key_pos <= qpos.unsqueeze(-1)) & (key_pos >= start)
        o, s = _attend(qc, k, v, allowed.expand(b, hkv, -1, -1), scale)
        out[:, :, a:e] = o.view(b, hq, e - a, d).to(q.dtype)
        lse[:, :, a:e] = s.view(b, hq, e - a)
    return out, lse


def block_sparse_prefill_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_ids: torch.Tensor,
    counts: torch.Tensor,
    block_size: int,
    *,
    scale: float | None = None,
    seq_start: torch.Tensor | None = None,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention where query block ``r`` reads only the key blocks ``block_ids[b, g, r, :counts]``.

    Rows are query blocks aligned to absolute positions: row 0 is the block holding the first query.
    Works in query chunks under a token mask expanded from the block lists (simple and vectorised; the
    GPU kernels are the ones whose cost follows the density).
    """
    b, hq, lq, d = check_attention_inputs(q, k, v, seq_start)
    hkv, lk = k.shape[1], k.shape[2]
    rows = num_query_blocks(lq, lk, block_size)
    _check_selection(block_ids, counts, b, hkv, rows)
    scale = d**-0.5 if scale is None else scale
    group = hq // hkv
    offset = lk - lq
    first = offset // block_size
    num_blocks = blocks_in(lk, block_size)
    live = torch.arange(block_ids.shape[-1], device=q.device) < counts.unsqueeze(-1)
    chosen = torch.zeros(*block_ids.shape[:3], num_blocks + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, torch.where(live, block_ids.long(), num_blocks), True)
    token_chosen = chosen[..., :num_blocks].repeat_interleave(block_size, dim=-1)[..., :lk]  # (B, G, R, Lk)
    key_pos = torch.arange(lk, device=q.device)
    start = seq_start.view(b, 1, 1, 1) if seq_start is not None else 0
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    for a in range(0, lq, chunk):
        e = min(lq, a + chunk)
        qpos = torch.arange(a, e, device=q.device) + offset
        selected = token_chosen[:, :, qpos // block_size - first]  # (B, G, c, Lk)
        allowed = selected & (key_pos <= qpos.unsqueeze(-1)) & (key_pos >= start)
        allowed = allowed.expand(b, hkv, e - a, lk).repeat(1, 1, group, 1)
        qc = q[:, :, a:e].reshape(b, hkv, group * (e - a), d)
        o, s = _attend(qc, k, v, allowed, scale)
        out[:, :, a:e] = o.view(b, hq, e - a, d).to(q.dtype)
        lse[:, :, a:e] = s.view(b, hq, e - a)
    return out, lse


def sparse_decode_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_ids: torch.Tensor,
    counts: torch.Tensor,
    block_size: int,
    *,
    scale: float | None = None,
    seq_start: torch.Tensor | None = None,
    seq_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """1..T new queries (the last T positions) against the key blocks ``block_ids[b, g, :counts[b, g]]``.

    ``block_ids`` is ``(B, G, K)`` and ``counts`` ``(B, G)``, G being Hkv or 1. The T queries share the
    list; each still sees only keys at or before its own position.

    ``seq_len`` (a 0-dim integer tensor) places the queries at ``seq_len - T .. seq_len - 1`` instead of
    at the end of ``k``: keys past it are never read. It lets ``k``/``v`` be a whole static buffer whose
    live length sits on the device, with no host read of it (so the call also traces under torch.compile).
    """
    b, hq, t, d = check_attention_inputs(q, k, v, seq_start)
    hkv, lk = k.shape[1], k.shape[2]
    _check_selection(block_ids.unsqueeze(2), counts.unsqueeze(2), b, hkv, 1)
    scale = d**-0.5 if scale is None else scale
    group = hq // hkv
    tokens, valid = _selected_tokens(block_ids, counts, block_size, lk)
    ks, vs = _gather_blocks(k, tokens), _gather_blocks(v, tokens)
    end = lk if seq_len is None else seq_len.reshape(()).long()
    qpos = (torch.arange(t, device=q.device) + end - t).repeat(group)
    start = seq_start.view(b, 1, 1, 1) if seq_start is not None else 0
    tok = tokens.expand(b, hkv, -1).unsqueeze(2)
    allowed = valid.expand(b, hkv, -1).unsqueeze(2) & (tok <= qpos.view(1, 1, -1, 1)) & (tok >= start)
    o, s = _attend(q.reshape(b, hkv, group * t, d), ks, vs, allowed, scale)
    return o.view(b, hq, t, d).to(q.dtype), s.view(b, hq, t)


def _check_selection(block_ids: torch.Tensor, counts: torch.Tensor, b: int, hkv: int, rows: int) -> None:
    if block_ids.dim() != 4 or counts.shape != block_ids.shape[:3]:
        raise ValueError(
            f"block_ids must be (B, G, R, K) with counts (B, G, R); got {tuple(block_ids.shape)} "
            f"and {tuple(counts.shape)}"
        )
    if block_ids.shape[0] != b or block_ids.shape[1] not in (1, hkv) or block_ids.shape[2] != rows:
        raise ValueError(
            f"block_ids has shape {tuple(block_ids.shape)}; expected batch {b}, groups 1 or {hkv} "
            f"(the kv heads), and {rows} query-block rows"
        )
    if block_ids.dtype not in (torch.int32, torch.int64) or counts.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_ids and counts must be int32 or int64, got {block_ids.dtype}, {counts.dtype}")


def blocks_in(length: int, block_size: int) -> int:
    """Number of blocks covering ``length`` tokens."""
    return math.ceil(length / block_size)
