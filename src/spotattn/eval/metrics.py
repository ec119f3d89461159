"""Fidelity metrics of a sparse method against dense attention on the same inputs.

Task accuracy, next-token KL(dense || sparse) and top-1 agreement, perplexity, attention recall (the
share of the dense attention mass that lies inside the blocks a method selected) and density read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..integration import LayerState, density, layer_states
from ..methods import AttentionCall
from ..selection import block_sums
from ..types import Selection


def answer_score(output: str, answers: Sequence[str]) -> float:
    """Share of ``answers`` that appear in ``output`` (case-insensitive substrings); NaN without answers."""
    if not answers:
        return float("nan")
    text = output.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def kl_divergence(dense_logits: torch.Tensor, sparse_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_dense || P_sparse) in nats per position, for logits ``(..., V)``; computed in float32."""
    p_log = torch.log_softmax(dense_logits.float(), dim=-1)
    q_log = torch.log_softmax(sparse_logits.float(), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).clamp(min=0.0)  # clamp: rounding can go below 0


def top1_agreement(dense_logits: torch.Tensor, sparse_logits: torch.Tensor) -> float:
    """Share of positions where both pick the same most likely next token."""
    return float((dense_logits.argmax(-1) == sparse_logits.argmax(-1)).float().mean())


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (nats) of each target under the logits at the same position."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def perplexity(nll: torch.Tensor | float) -> float:
    """exp(mean NLL)."""
    mean = float(nll.float().mean()) if isinstance(nll, torch.Tensor) else float(nll)
    return math.exp(mean)


def selected_block_mask(selection: Selection, num_groups: int, num_blocks: int) -> torch.Tensor:
    """Bool ``(B, G, R, NB)``: which blocks each row of ``selection`` reads (padding entries ignored)."""
    sel = selection.expand_groups(num_groups)
    k = sel.block_ids.shape[-1]
    live = torch.arange(k, device=sel.block_ids.device) < sel.counts.unsqueeze(-1)
    ids = torch.where(live & (sel.block_ids >= 0), sel.block_ids.long(), num_blocks)  # dead -> spare column
    mask = torch.zeros(*sel.block_ids.shape[:3], num_blocks + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(-1, ids, True)
    return mask[..., :num_blocks]


def attention_recall(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    selection: Selection,
    seq_start: torch.Tensor | None = None,
    *,
    decode: bool,
    max_queries: int | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Share of each query's exact (dense, causal) attention mass inside its selected blocks.

    ``query`` ``(B, Hq, Lq, D)`` are the last ``Lq`` positions of ``key`` ``(B, Hkv, Lk, D)``. A decode
    selection has one row for all queries; a prefill selection one row per query block from
    ``selection.first_row``. Only the last ``max_queries`` queries are scored when given (they have the
    longest contexts). Returns ``(B, Hkv)``: the mean over the group's heads and the valid queries.
    """
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    group = hq // hkv
    bs = selection.block_size
    num_blocks = -(-lk // bs)
    mask = selected_block_mask(selection, hkv, num_blocks)
    first_query = lq - min(lq, max_queries) if max_queries else 0
    positions = torch.arange(lk - lq, lk, device=query.device)
    rows = torch.zeros_like(positions) if decode else positions // bs - selection.first_row
    key_pos = torch.arange(lk, device=query.device)
    if seq_start is None:
        seq_start = torch.zeros(b, dtype=torch.long, device=key.device)
    start = seq_start.view(b, 1, 1, 1)
    keys = key.float().transpose(-1, -2)
    total = torch.zeros(b, hkv, device=query.device, dtype=torch.float64)
    count = torch.zeros(b, 1, device=query.device, dtype=torch.float64)
    for a in range(first_query, lq, chunk):
        e = min(lq, a + chunk)
        n = e - a
        qc = query[:, :, a:e].float().reshape(b, hkv, group * n, d)  # heads of a group side by side
        qpos = positions[a:e].repeat(group)
        allowed = (key_pos <= qpos.unsqueeze(-1)) & (key_pos >= start)
        scores = (qc @ keys * scale).masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no key: zero mass
        mass = block_sums(probs, bs).view(b, hkv, group, n, num_blocks)
        chosen = mask[:, :, rows[a:e]].unsqueeze(2)  # (B, Hkv, 1, n, NB)
        valid = (positions[a:e].view(1, 1, 1, n) >= start.view(b, 1, 1, 1)).double()  # not left padding
        total += ((mass * chosen).sum(-1).double() * valid).sum((2, 3))
        count += valid.sum((2, 3)).view(b, 1) * group
    return (total / count.clamp(min=1)).float()


def block_attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    block_size: int,
    seq_start: torch.Tensor | None = None,
    chunk: int = 512,
) -> torch.Tensor:
    """Exact causal attention mass summed per (query block, key block): float64 ``(B, Hq, R, NB)``.

    ``query`` ``(B, Hq, Lq, D)`` are the last ``Lq`` positions of ``key`` ``(B, Hkv, Lk, D)``; rows are
    query blocks aligned to absolute positions (row 0 holds the first query), as in a prefill selection.
    Each valid query contributes mass 1 spread over its key blocks, so the recall of any block mask is
    ``(mass * mask).sum() / mass.sum()``, and many masks can be scored from one exact attention pass.
    """
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    group = hq // hkv
    offset = lk - lq
    first = offset // block_size
    num_blocks = -(-lk // block_size)
    rows = num_blocks - first
    start = (seq_start if seq_start is not None else torch.zeros(b, dtype=torch.long, device=key.device))
    start = start.view(b, 1, 1, 1)
    out = torch.zeros(b, hkv, group, rows, num_blocks, dtype=torch.float64, device=query.device)
    keys = key.float()
    for a in range(0, lq, chunk):
        e = min(lq, a + chunk)
        n = e - a
        last_key = offset + e  # keys past the chunk's last query are never seen: skip them
        kc = keys[:, :, :last_key]
        qc = query[:, :, a:e].float().reshape(b, hkv, group * n, d)
        qpos = (torch.arange(a, e, device=query.device) + offset).repeat(group)
        kpos = torch.arange(last_key, device=query.device)
        allowed = (kpos <= qpos.unsqueeze(-1)) & (kpos >= start)
        scores = (qc @ kc.transpose(-1, -2) * scale).masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # a query with no key (padding): no mass
        mass = block_sums(probs, block_size).view(b, hkv, group, n, -1)
        row = (torch.arange(a, e, device=query.device) + offset) // block_size - first
        out[..., : mass.shape[-1]].index_add_(3, row, mass.double())
    return out.view(b, hq, rows, num_blocks)


def mask_recall(mass: torch.Tensor, mask: torch.Tensor, *, mass_first_row: int = 0, mask_first_row: int = 0) -> float:
    """Share of the exact attention mass ``(B, Hq, R, NB)`` (see :func:`block_attention_mass`) inside a
    block mask ``(B, G, R', NB')`` at the same or a coarser block size (a whole multiple of the mass's),
    G dividing Hq (one list per kv-group, or one per head). The first rows are absolute query blocks
    (``Selection.first_row``), each at its own block size."""
    b, hq, rows, nb = mass.shape
    f = -(-nb // mask.shape[3])
    if -(-nb // f) != mask.shape[3] or hq % mask.shape[1]:
        raise ValueError(f"mask_recall: the mask {tuple(mask.shape)} does not tile the mass {tuple(mass.shape)}")
    m = mask.repeat_interleave(f, dim=3)[..., :nb].repeat_interleave(f, dim=2)
    skip = mass_first_row - mask_first_row * f  # fine rows of the first coarse row that hold no query
    m = m[:, :, skip : skip + rows].repeat_interleave(hq // mask.shape[1], dim=1)
    total = float(mass.sum())
    return float((mass * m).sum()) / total if total > 0 else 1.0


class RecallRecorder:
    """Attaches to a sparsified model and accumulates attention recall per layer and phase.

    A call that reads everything (selection None) has recall 1 by definition. Prefill scores only the
    last ``max_prefill_queries`` queries, so recording stays cheap at long lengths.
    """

    def __init__(self, model: torch.nn.Module, max_prefill_queries: int = 256) -> None:
        self.states: list[LayerState] = layer_states(model)
        self.max_prefill_queries = max_prefill_queries
        self.sums: dict[str, list[float]] = {}
        self.counts: dict[str, list[int]] = {}
        for state in self.states:
            state.observer = self._observe

    def _observe(
        self, state: LayerState, call: AttentionCall, selection: Selection | None, phase: str
    ) -> None:
        if selection is None:
            value = 1.0
        else:
            recall = attention_recall(
                call.query, call.key, call.scale, selection, call.seq_start, decode=phase == "decode",
                max_queries=None if phase == "decode" else self.max_prefill_queries,
            )
            value = float(recall.mean())
        i = self.states.index(state)
        sums = self.sums.setdefault(phase, [0.0] * len(self.states))
        counts = self.counts.setdefault(phase, [0] * len(self.states))
        sums[i] += value
        counts[i] += 1

    def per_layer(self, phase: str) -> list[float | None]:
        """Mean recall of each layer's calls in ``phase`` (None where the layer had none)."""
        sums, counts = self.sums.get(phase), self.counts.get(phase)
        if sums is None or counts is None:
            return [None] * len(self.states)
        return [s / c if c else None for s, c in zip(sums, counts, strict=True)]

    def mean(self, phase: str) -> float | None:
        values = [v for v in self.per_layer(phase) if v is not None]
        return sum(values) / len(values) if values else None

    def detach(self) -> None:
        for state in self.states:
            state.observer = None


def density_summary(model: torch.nn.Module) -> dict:
    """Mean density read per phase (and overall) and per layer (mean over kv-groups), JSON-ready."""
    out: dict = {"mean": {}, "layers": {}}
    for phase in ("prefill", "decode", "all"):
        report = density(model, phase)
        out["mean"][phase] = _finite(report.mean)
        if phase != "all":
            out["layers"][phase] = [_finite(v) for v in report.per_layer.nanmean(dim=1).tolist()]
    return out


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
