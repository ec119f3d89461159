"""Sparse decode attention (1..8 new queries) over selected key blocks, flash-decoding style.

Split kernel: one program per (split, batch, kv-head). Its tile rows are all ``group * T`` queries of
the kv-group (GQA packing), so each selected block is read from memory once for all heads sharing it.
The program walks its slice of the block list in ``BLOCK_N``-token tiles; a tile gathers
``BLOCK_N // block_size`` blocks (so block size 16 still gives wide tiles). It writes a normalised
partial output and its log-sum-exp. The reduce kernel merges the splits.

The number of splits (the grid) is fixed on the host from static shapes (the width of the block list,
batch and heads), never from the counts on the device, so there is no host sync and the launch is
CUDA-graph safe. Each program divides its row's live count over the splits on the device (whole tiles per
split), so a wide list that is mostly padding (a budget without a cap) still spreads its blocks over all
splits; a split left without blocks writes an empty partial.

The paged variant reads K/V through a block table: logical block ``j`` of sequence ``b`` lives in page
``block_table[b, j]`` of ``k_pages``/``v_pages``; page size equals the selection's block size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..checks import check_attention_inputs
from ..reference import _check_selection, sparse_decode_ref
from .common import (
    HEAD_DIMS,
    LOG2E,
    as_int32,
    dot_precision,
    interpreting,
    last_dim_contiguous,
    mm,
    next_pow2,
    require,
    require_range,
    sm_count,
)

DECODE_BLOCK_SIZES = (16, 32, 64, 128)
MAX_DECODE_QUERIES = 8
MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    Q,
    K,
    V,
    Ids,
    Counts,
    Start,
    SeqLens,
    Table,
    PartO,
    PartLse,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    svb,
    svh,
    svt,
    sib,
    sig,
    scb,
    scg,
    stb,
    slb,
    Hkv,
    T,
    Lk,
    group,
    qk_scale,
    num_splits,
    HAS_START: tl.constexpr,
    SHARED: tl.constexpr,
    PAGED: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    s = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // Hkv).to(tl.int64)
    hk = pid % Hkv
    if SHARED:
        g = 0
    else:
        g = hk
    if HAS_START:
        start = tl.load(Start + b)
    else:
        start = 0
    if PAGED:
        seq_len = tl.load(SeqLens + b * slb).to(tl.int32)
    else:
        seq_len = Lk
    M = group * T
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < M
    head = hk * group + offs_m // T
    t = offs_m % T
    qpos = seq_len - T + t
    q = tl.load(
        Q + b * sqb + head[:, None] * sqh + t[:, None] * sqt + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )

    cnt = tl.load(Counts + b * scb + g * scg)
    BPT: tl.constexpr = BLOCK_N // BS
    per_split = tl.cdiv(tl.cdiv(cnt, num_splits), BPT) * BPT  # the live blocks, in whole tiles per split
    lo = s * per_split
    hi = tl.minimum(lo + per_split, cnt)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    within = offs_n % BS
    id_base = Ids + b * sib + g * sig
    for li0 in range(lo, hi, BPT):
        li = li0 + offs_n // BS
        live = li < hi
        blk = tl.load(id_base + li, mask=live, other=0)
        tok = blk * BS + within
        kv_ok = live & (tok < seq_len) & (tok >= start)
        if PAGED:
            page = tl.load(Table + b * stb + blk, mask=live, other=0).to(tl.int64)
            k_off = page * skb + hk * skh + within * skt
            v_off = page * svb + hk * svh + within * svt
        else:
            k_off = b * skb + hk * skh + tok * skt
            v_off = b * svb + hk * svh + tok * svt
        k = tl.load(K + k_off[None, :] + offs_d[:, None], mask=kv_ok[None, :], other=0.0)
        qk = mm(q, k, PREC, UPCAST) * qk_scale
        qk = tl.where(kv_ok[None, :] & (tok[None, :] <= qpos[:, None]), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + v_off[:, None] + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    lse2 = tl.where(seen, m_i + tl.math.log2(l_safe), float("-inf"))  # base 2, merged by the reducer
    part = (pid * num_splits + s) * M + offs_m
    tl.store(PartO + part[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None], mask=row_ok[:, None])
    tl.store(PartLse + part, lse2, mask=row_ok)


@triton.jit
def _decode_reduce_kernel(
    PartO,
    PartLse,
    Out,
    Lse,
    sob,
    soh,
    sot,
    Hkv,
    Hq,
    T,
    group,
    num_splits,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    pid = tl.program_id(0)
    M = group * T
    row = pid % M
    bh = pid // M
    b = (bh // Hkv).to(tl.int64)
    hk = bh % Hkv
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < num_splits
    part = (bh * num_splits + offs_s) * M + row
    lse_s = tl.load(PartLse + part, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse_s - m_safe)
    total = tl.sum(w, 0)
    o = tl.load(PartO + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    seen = total > 0
    out = tl.sum(o * w[:, None], 0) / tl.where(seen, total, 1.0)
    lse = tl.where(
        seen, (m_safe + tl.math.log2(tl.where(seen, total, 1.0))) * 0.6931471805599453, float("-inf")
    )
    head = hk * group + row // T
    t = row % T
    tl.store(Out + b * sob + head * soh + t * sot + offs_d, out.to(Out.dtype.element_ty))
    tl.store(Lse + (b * Hq + head) * T + t, lse)


@dataclass(frozen=True)
class DecodeTiling:
    """Launch parameters of the split kernel (results do not depend on them beyond float rounding).

    ``block_n`` tokens per tile (at least the block size: a tile gathers ``block_n // block_size``
    blocks; None: 128 for blocks under 64 tokens, else one block), ``num_warps``, ``num_stages`` (the
    loop's software pipelining), and ``programs_per_sm``: the split count aims at this many programs per SM
    over the whole launch.
    """

    # The automatic tile, measured on an H100 at 128K (`spotattn bench attend`): for 16-token blocks (spot,
    # 4096 tokens read) 128-token tiles took 13.8 against 14.4 us at B = 1 and 30.3 against 34.0 us at B = 4
    # for 64-token tiles; for 64-token blocks (the dense path) 64-token tiles stay ahead (701 against 726 us
    # at B = 4).
    block_n: int | None = None
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: int = 2

    def __post_init__(self) -> None:
        if self.block_n is not None and (self.block_n < 16 or self.block_n & (self.block_n - 1)):
            raise ValueError(f"DecodeTiling: block_n must be a power of two >= 16, got {self.block_n}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"DecodeTiling: num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1 or self.programs_per_sm < 1:
            raise ValueError(f"DecodeTiling: num_stages and programs_per_sm must be >= 1, got {self}")

    @classmethod
    def parse(cls, text: str) -> DecodeTiling:
        """``TOKENSxWARPS[:sN][:pN]``, e.g. ``128x4:s2:p2``, or ``autox4`` for the automatic tile; omitted
        fields keep the default."""
        head, *opts = text.strip().split(":")
        try:
            tokens, warps = head.split("x")
            fields = dict(block_n=None if tokens == "auto" else int(tokens), num_warps=int(warps))
            for opt in opts:
                key = {"s": "num_stages", "p": "programs_per_sm"}.get(opt[:1])
                if key is None:
                    raise ValueError(f"unknown field {opt!r}")
                fields[key] = int(opt[1:])
            return cls(**fields)
        except ValueError as err:
            raise ValueError(f"decode tiling {text!r}: use TOKENSxWARPS[:sN][:pN] ({err})") from None

    def __str__(self) -> str:
        return f"{self.block_n or 'auto'}x{self.num_warps}:s{self.num_stages}:p{self.programs_per_sm}"

    def tile(self, block_size: int) -> int:
        """Tokens per tile for ``block_size``-token blocks (a tile holds whole blocks)."""
        if self.block_n is None:
            return 128 if block_size < 64 else block_size
        return max(self.block_n, block_size)


DEFAULT_TILING = DecodeTiling()


def choose_splits(
    batch_heads: int, width: int, block_size: int, device: torch.device, tiling: DecodeTiling = DEFAULT_TILING
) -> int:
    """Splits so that about ``tiling.programs_per_sm`` programs per SM run (a single sequence fills the
    GPU), each split holding whole tiles, at most ``MAX_SPLITS`` (the reducer keeps all splits of a row in
    registers)."""
    bpt = tiling.tile(block_size) // block_size
    target = tiling.programs_per_sm * sm_count(device)
    per_split = max(bpt, math.ceil(width * batch_heads / target))
    per_split = max(per_split, math.ceil(width / MAX_SPLITS))
    per_split = math.ceil(per_split / bpt) * bpt
    return max(1, math.ceil(width / per_split))


def _launch_decode(
    q, k, v, block_ids, counts, block_size, scale, seq_start, seq_lens, table, num_splits,
    tiling: DecodeTiling = DEFAULT_TILING,
):
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    m = group * t
    width = block_ids.shape[-1]
    block_n = tiling.tile(block_size)
    bpt = block_n // block_size
    per_split = math.ceil(math.ceil(width / num_splits) / bpt) * bpt
    splits = max(1, math.ceil(width / per_split))
    part_o = torch.empty(b * hkv * splits * m, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(b * hkv * splits * m, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, t, dtype=torch.float32, device=q.device)
    paged = table is not None
    placeholder = counts
    _decode_split_kernel[(splits, b * hkv)](
        q,
        k,
        v,
        block_ids,
        counts,
        seq_start if seq_start is not None else placeholder,
        seq_lens if paged else placeholder,
        table if paged else placeholder,
        part_o,
        part_lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        block_ids.stride(0),
        block_ids.stride(1),
        counts.stride(0),
        counts.stride(1),
        table.stride(0) if paged else 0,
        seq_lens.stride(0) if paged else 0,
        hkv,
        t,
        0 if paged else k.shape[2],
        group,
        scale * LOG2E,
        splits,
        HAS_START=seq_start is not None,
        SHARED=block_ids.shape[1] == 1,
        PAGED=paged,
        BS=block_size,
        BLOCK_M=max(16, next_pow2(m)),
        BLOCK_N=block_n,
        HEAD_DIM=d,
        PREC=dot_precision(q.dtype),
        UPCAST=interpreting(),
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
    )
    _decode_reduce_kernel[(b * hkv * m,)](
        part_o,
        part_lse,
        out,
        lse,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        hkv,
        hq,
        t,
        group,
        splits,
        BLOCK_S=max(2, next_pow2(splits)),
        HEAD_DIM=d,
        num_warps=4,
    )
    return out, lse


_SCHEMA_TAIL = "int block_size, float scale, Tensor? seq_start, int num_splits) -> (Tensor, Tensor)"


@torch.library.custom_op(
    "spotattn::sparse_decode",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor block_ids, Tensor counts, " + _SCHEMA_TAIL,
)
def _decode_op(q, k, v, block_ids, counts, block_size, scale, seq_start, num_splits):
    return _decode_impl(q, k, v, block_ids, counts, block_size, scale, seq_start, num_splits)


def _decode_impl(q, k, v, block_ids, counts, block_size, scale, seq_start, num_splits):
    return _launch_decode(q, k, v, block_ids, counts, block_size, scale, seq_start, None, None, num_splits)


@torch.library.custom_op(
    "spotattn::sparse_decode_paged",
    mutates_args=(),
    schema="(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, Tensor seq_lens, "
    "Tensor block_ids, Tensor counts, " + _SCHEMA_TAIL,
)
def _decode_paged_op(
    q, k_pages, v_pages, block_table, seq_lens, block_ids, counts, block_size, scale, seq_start, num_splits
):
    return _decode_paged_impl(
        q,
        k_pages,
        v_pages,
        block_table,
        seq_lens,
        block_ids,
        counts,
        block_size,
        scale,
        seq_start,
        num_splits,
    )


def _decode_paged_impl(
    q, k_pages, v_pages, block_table, seq_lens, block_ids, counts, block_size, scale, seq_start, num_splits
):
    return _launch_decode(
        q,
        k_pages,
        v_pages,
        block_ids,
        counts,
        block_size,
        scale,
        seq_start,
        seq_lens,
        block_table,
        num_splits,
    )


def _decode_fake(q, *args):
    b, hq, t, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, hq, t), dtype=torch.float32)


_decode_op.register_fake(_decode_fake)
_decode_paged_op.register_fake(_decode_fake)


def _check_decode(q: torch.Tensor, hkv: int, block_size: int, name: str) -> int:
    b, hq, t, d = q.shape
    require(name, "block_size", block_size, DECODE_BLOCK_SIZES)
    require(name, "head_dim", d, HEAD_DIMS)
    require_range(name, "number of query tokens (q.shape[2])", t, 1, MAX_DECODE_QUERIES)
    require_range(name, "query heads per kv head", hq // hkv, 1, 16)
    return d


def sparse_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_ids: torch.Tensor,
    counts: torch.Tensor,
    block_size: int,
    *,
    scale: float | None = None,
    seq_start: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton sparse decode; same contract as ``reference.sparse_decode_ref``.

    ``block_size`` in (16, 32, 64, 128), ``head_dim`` in (32, 64, 128), 1 to 8 query tokens.
    ``num_splits`` overrides the automatic split count (a tuning knob; results do not depend on it).
    """
    b, hq, t, d = check_attention_inputs(q, k, v, seq_start)
    hkv = k.shape[1]
    _check_decode(q, hkv, block_size, "sparse_decode")
    _check_selection(block_ids.unsqueeze(2), counts.unsqueeze(2), b, hkv, 1)
    scale = d**-0.5 if scale is None else float(scale)
    splits = num_splits or choose_splits(b * hkv, block_ids.shape[-1], block_size, q.device)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    start = seq_start.to(torch.int32).contiguous() if seq_start is not None else None
    # Eager calls skip the custom-op layer (its dispatch costs microseconds); tracing goes through it.
    op = _decode_op if torch.compiler.is_compiling() else _decode_impl
    return op(q, k, v, as_int32(block_ids), as_int32(counts), block_size, scale, start, splits)


def _lengths(seq_lens: torch.Tensor) -> torch.Tensor:
    # int64 and broadcast (stride 0) lengths are read as they are: a decode step's one device counter,
    # expanded over the batch, then costs no conversion kernel.
    return seq_lens if seq_lens.dtype in (torch.int32, torch.int64) else as_int32(seq_lens)


def sparse_decode_paged(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_ids: torch.Tensor,
    counts: torch.Tensor,
    block_size: int,
    *,
    scale: float | None = None,
    seq_start: torch.Tensor | None = None,
    kv_layout: str = "HND",
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse decode over a paged KV cache.

    - ``q``: ``(B, Hq, T, D)``, the last ``T`` positions of each sequence.
    - ``k_pages``/``v_pages``: ``(P, Hkv, block_size, D)`` (``kv_layout="HND"``) or
      ``(P, block_size, Hkv, D)`` (``"NHD"``): ``P`` physical pages of ``block_size`` tokens.
    - ``block_table``: int ``(B, max_blocks)``; logical block ``j`` of sequence ``b`` is page
      ``block_table[b, j]``.
    - ``seq_lens``: int ``(B,)``, tokens in each sequence (sequences may differ in length).
    - ``block_ids`` ``(B, G, K)``/``counts`` ``(B, G)``: logical blocks to read, as in :func:`sparse_decode`.
    - ``seq_start``: optional first valid token of each sequence (left padding inside the pages).

    Returns ``(out, lse)`` like :func:`sparse_decode`.
    """
    if kv_layout not in ("HND", "NHD"):
        raise ValueError(f"sparse_decode_paged: kv_layout must be 'HND' or 'NHD', got {kv_layout!r}")
    if k_pages.dim() != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            f"sparse_decode_paged: k_pages and v_pages must be equal 4-D page arrays, got "
            f"{tuple(k_pages.shape)} and {tuple(v_pages.shape)}"
        )
    if kv_layout == "NHD":
        k_pages, v_pages = k_pages.transpose(1, 2), v_pages.transpose(1, 2)
    if k_pages.shape[2] != block_size:
        raise ValueError(
            f"sparse_decode_paged: page size ({k_pages.shape[2]}) must equal block_size ({block_size})"
        )
    b, hq, t, d = q.shape
    if q.dim() != 4 or k_pages.shape[3] != d or hq % k_pages.shape[1] != 0 or q.dtype != k_pages.dtype:
        raise ValueError(
            f"sparse_decode_paged: q {tuple(q.shape)} {q.dtype} does not fit pages {tuple(k_pages.shape)} "
            f"{k_pages.dtype} (head_dim, kv heads and dtype must agree)"
        )
    if block_table.dim() != 2 or block_table.shape[0] != b or seq_lens.shape != (b,):
        raise ValueError(
            f"sparse_decode_paged: block_table must be (B, max_blocks) and seq_lens (B,) with B={b}; got "
            f"{tuple(block_table.shape)} and {tuple(seq_lens.shape)}"
        )
    hkv = k_pages.shape[1]
    _check_decode(q, hkv, block_size, "sparse_decode_paged")
    _check_selection(block_ids.unsqueeze(2), counts.unsqueeze(2), b, hkv, 1)
    scale = d**-0.5 if scale is None else float(scale)
    splits = num_splits or choose_splits(b * hkv, block_ids.shape[-1], block_size, q.device)
    start = seq_start.to(torch.int32).contiguous() if seq_start is not None else None
    op = _decode_paged_op if torch.compiler.is_compiling() else _decode_paged_impl
    return op(
        last_dim_contiguous(q),
        last_dim_contiguous(k_pages),
        last_dim_contiguous(v_pages),
        as_int32(block_table),
        _lengths(seq_lens),
        as_int32(block_ids),
        as_int32(counts),
        block_size,
        scale,
        start,
        splits,
    )


def sparse_decode_paged_ref(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_ids: torch.Tensor,
    counts: torch.Tensor,
    block_size: int,
    *,
    scale: float | None = None,
    seq_start: torch.Tensor | None = None,
    kv_layout: str = "HND",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference for :func:`sparse_decode_paged`: rebuild each sequence's contiguous K/V from its
    pages and run :func:`reference.sparse_decode_ref` per sequence (host loop; for tests)."""
    if kv_layout == "NHD":
        k_pages, v_pages = k_pages.transpose(1, 2), v_pages.transpose(1, 2)
    outs, lses = [], []
    for i in range(q.shape[0]):
        n = int(seq_lens[i])
        pages = block_table[i, : math.ceil(n / block_size)].long()
        k = k_pages[pages].transpose(0, 1).reshape(k_pages.shape[1], -1, q.shape[-1])[:, :n].unsqueeze(0)
        v = v_pages[pages].transpose(0, 1).reshape(v_pages.shape[1], -1, q.shape[-1])[:, :n].unsqueeze(0)
        start = seq_start[i : i + 1] if seq_start is not None else None
        sel = slice(i, i + 1)
        o, s = sparse_decode_ref(
            q[sel], k, v, block_ids[sel], counts[sel], block_size, scale=scale, seq_start=start
        )
        outs.append(o)
        lses.append(s)
    return torch.cat(outs), torch.cat(lses)
