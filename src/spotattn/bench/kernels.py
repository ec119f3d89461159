"""``spotattn bench kernels``: Triton block-sparse prefill and sparse decode against dense and sparse peers.

Every configuration draws random inputs and a random block selection of the requested density (sink and
diagonal/last block always in), checks the Triton output against the PyTorch reference, then times each
implementation with ``triton.testing.do_bench`` (CUDA events, median, after warm-up) in the same process.

Peers: SDPA with the flash and the cuDNN backends (dense causal; dense decode), FlexAttention with the
same block mask (prefill; the mask is built from the same block lists, diagonal blocks masked causally,
others marked full), and gather-then-SDPA decode (copy the selected tokens, then dense SDPA).
Outputs: ``kernels.json``, ``kernels.md`` and PNG plots in ``out_dir``.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch
import torch.nn.functional as F

BS_PREFILL = 128


@dataclass(frozen=True)
class Shape:
    name: str
    q_heads: int
    kv_heads: int
    head_dim: int


SHAPES = {
    "qwen3-8b": Shape("qwen3-8b", 32, 8, 128),
    "smollm2": Shape("smollm2", 9, 3, 64),
}
FULL_LENGTHS = (8192, 32768, 131072)
FULL_DENSITIES = (1.0, 0.3, 0.1, 0.03, 0.01)
DECODE_BUDGET = 4096  # tokens: the decode target's budget


# ----------------------------------------------------------------------------------------- helpers
def _bench(fn: Callable[[], object]) -> float:
    """Median milliseconds over CUDA events, after warm-up (compilation, autotuning) is done."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _bench_graph(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` replayed from a CUDA graph: for decode-sized work, where the host's
    launch overhead would otherwise be timed instead of the GPU (deployed decode runs in graphs)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-6))


def _sdpa_fn(backend, q, k, v, causal: bool) -> Callable[[], torch.Tensor] | None:
    """A closure running SDPA on one backend with GQA; expands K/V first (untimed) where the backend
    has no native GQA. None if the backend refuses the input."""
    from torch.nn.attention import sdpa_kernel

    group = q.shape[1] // k.shape[1]

    def native():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    try:
        native()
        return native
    except RuntimeError:
        pass
    ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

    def expanded():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, ke, ve, is_causal=causal)

    try:
        expanded()
        return expanded
    except RuntimeError:
        return None


def _timed_or_none(fn: Callable[[], object] | None, graph: bool = False) -> float | None:
    if fn is None:
        return None
    return _bench_graph(fn) if graph else _bench(fn)


def prefill_selection(
    b: int, g: int, length: int, bs: int, density: float, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random causal block lists: row r keeps ``round(density * (r + 1))`` of its r + 1 causal blocks
    (at least the sink and the diagonal), ascending; ``-1`` past the count."""
    nb = math.ceil(length / bs)
    r = torch.arange(nb, device=device)
    want = torch.clamp(torch.round(density * (r + 1)), min=2).long().clamp(max=r + 1)
    score = torch.rand(b, g, nb, nb, device=device)
    j = r.view(1, -1)
    score = torch.where(j > r.view(-1, 1), -1.0, score)
    score[..., 0] = 2.0
    score = torch.where(j == r.view(-1, 1), 3.0, score)
    order = score.argsort(-1, descending=True)
    keep_sorted = torch.arange(nb, device=device) < want.view(-1, 1)
    key = torch.where(keep_sorted, order, nb)
    width = int(want.max())
    ids = key.sort(-1).values[..., :width]
    ids = torch.where(ids < nb, ids, -1).int().contiguous()
    counts = want.int().view(1, 1, nb).expand(b, g, nb).contiguous()
    return ids, counts


def decode_selection(
    b: int, g: int, length: int, bs: int, budget_tokens: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random block lists of ``budget_tokens`` (rounded to blocks) per (batch, group), sink and last in."""
    nb = math.ceil(length / bs)
    k = max(2, min(nb, math.ceil(budget_tokens / bs)))
    score = torch.rand(b, g, nb, device=device)
    score[..., 0] = 2.0
    score[..., -1] = 2.0
    ids = score.topk(k, dim=-1).indices.sort(-1).values.int().contiguous()
    return ids, torch.full((b, g), k, dtype=torch.int32, device=device)


def _flex_block_mask(ids: torch.Tensor, counts: torch.Tensor, group: int, length: int, bs: int):
    """FlexAttention BlockMask with our block lists: the diagonal (last id of each row) is a partial
    block, the others are full blocks. The mask_mod also encodes the selection (not only causality), so
    FlexAttention's own semantics match ours; compiled, it only evaluates it on the diagonal blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = math.ceil(length / bs)
    live = torch.arange(ids.shape[-1], device=ids.device) < counts.unsqueeze(-1)
    chosen = torch.zeros(*ids.shape[:3], nb + 1, dtype=torch.bool, device=ids.device)
    chosen.scatter_(-1, torch.where(live, ids.long(), nb), True)
    chosen = chosen[..., :nb].contiguous()
    ids = ids.repeat_interleave(group, 1)
    counts = counts.repeat_interleave(group, 1)
    idx = F.pad(ids.clamp(min=0), (0, nb - ids.shape[-1]))
    diag = (
        torch.arange(nb, device=ids.device, dtype=torch.int32).view(1, 1, nb, 1).expand(*ids.shape[:2], nb, 1)
    )
    partial_idx = F.pad(diag, (0, nb - 1)).contiguous()
    partial_num = torch.ones_like(counts)

    def selected_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & chosen[b, h // group, q_idx // bs, kv_idx // bs]

    return BlockMask.from_kv_blocks(
        partial_num,
        partial_idx,
        (counts - 1).contiguous(),
        idx.contiguous(),
        BLOCK_SIZE=bs,
        mask_mod=selected_causal,
        seq_lengths=(length, length),
    )


_FLEX = None


def _flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


# ----------------------------------------------------------------------------------------- prefill
def bench_prefill(shape: Shape, batch: int, length: int, densities: Sequence[float], log) -> list[dict]:
    from torch.nn.attention import SDPBackend

    from ..kernels import triton_ops
    from ..kernels.reference import block_sparse_prefill_ref

    dev = torch.device("cuda")
    dt = torch.bfloat16
    g = shape.q_heads // shape.kv_heads
    bs = BS_PREFILL
    torch.manual_seed(0)
    q = torch.randn(batch, shape.q_heads, length, shape.head_dim, device=dev, dtype=dt)
    k = torch.randn(batch, shape.kv_heads, length, shape.head_dim, device=dev, dtype=dt)
    v = torch.randn_like(k)
    dense_pairs = length * (length + 1) / 2
    flop_scale = 4 * shape.head_dim * shape.q_heads * batch  # QK^T and PV, 2 flops per MAC

    flash = _sdpa_fn(SDPBackend.FLASH_ATTENTION, q, k, v, True)
    cudnn = _sdpa_fn(SDPBackend.CUDNN_ATTENTION, q, k, v, True)
    t_flash, t_cudnn = _timed_or_none(flash), _timed_or_none(cudnn)
    rows = []
    for density in densities:
        ids, counts = prefill_selection(batch, shape.kv_heads, length, bs, density, dev)
        ours = functools.partial(triton_ops.block_sparse_prefill, q, k, v, ids, counts, bs)
        out, _ = ours()
        # Rows are independent: check the last two (the heaviest) against the reference at full length.
        tail = length - (math.ceil(length / bs) - 2) * bs
        ref, _ = block_sparse_prefill_ref(q[:, :, -tail:], k, v, ids[:, :, -2:], counts[:, :, -2:], bs)
        err_ref = _rel_err(out[:, :, -tail:], ref)
        del ref
        mask = _flex_block_mask(ids, counts, g, length, bs)
        flex = functools.partial(_flex(), q, k, v, block_mask=mask, enable_gqa=True)
        err_flex = _rel_err(out, flex())
        t_ours, t_flex = _bench(ours), _bench(flex)
        read = counts.float()
        pairs = float(((read - 1) * bs * bs + bs * (bs + 1) / 2).sum() / (batch * shape.kv_heads))
        flops = flop_scale * pairs
        row = dict(
            phase="prefill",
            shape=shape.name,
            batch=batch,
            length=length,
            density=density,
            block_size=bs,
            actual_density=pairs / dense_pairs,
            ours_ms=t_ours,
            flex_ms=t_flex,
            sdpa_flash_dense_ms=t_flash,
            sdpa_cudnn_dense_ms=t_cudnn,
            ours_tflops=flops / t_ours / 1e9,
            flex_tflops=flops / t_flex / 1e9,
            flash_tflops=flop_scale * dense_pairs / t_flash / 1e9 if t_flash else None,
            cudnn_tflops=flop_scale * dense_pairs / t_cudnn / 1e9 if t_cudnn else None,
            rel_err_vs_reference=err_ref,
            rel_err_vs_flex=err_flex,
        )
        rows.append(row)
        del mask, flex
        log(
            f"prefill {shape.name} B={batch} L={length} d={density}: ours {t_ours:.3f} ms, "
            f"flex {t_flex:.3f}, "
            f"cudnn {t_cudnn}, flash {t_flash}, err {err_ref:.1e}"
        )
    return rows


# ----------------------------------------------------------------------------------------- decode
def bench_decode(
    shape: Shape, batch: int, length: int, densities: Sequence[float], log, block_sizes: Sequence[int] = (64,)
) -> list[dict]:
    from torch.nn.attention import SDPBackend

    from ..kernels import triton_ops
    from ..kernels.reference import sparse_decode_ref
    from ..selection import rows_for_decode
    from ..types import TopK

    dev = torch.device("cuda")
    dt = torch.bfloat16
    torch.manual_seed(0)
    q = torch.randn(batch, shape.q_heads, 1, shape.head_dim, device=dev, dtype=dt)
    k = torch.randn(batch, shape.kv_heads, length, shape.head_dim, device=dev, dtype=dt)
    v = torch.randn_like(k)
    elem = k.element_size()
    flash = _sdpa_fn(SDPBackend.FLASH_ATTENTION, q, k, v, False)
    cudnn = _sdpa_fn(SDPBackend.CUDNN_ATTENTION, q, k, v, False)
    t_flash, t_cudnn = _timed_or_none(flash, graph=True), _timed_or_none(cudnn, graph=True)
    dense_bytes = 2 * batch * shape.kv_heads * length * shape.head_dim * elem
    budgets = sorted({max(128, int(round(d * length))) for d in densities} | {DECODE_BUDGET})
    rows = []
    for bs in block_sizes:
        # Selection cost for this length: block scores over one mean key per block, then top-k.
        rep = k.view(batch, shape.kv_heads, -1, bs, shape.head_dim).mean(3)
        first, last = rows_for_decode(1, length, bs, dev)

        def select(rep=rep, first=first, last=last, bs=bs):
            mass = triton_ops.block_scores(q, rep, bs, length)
            return triton_ops.select_blocks_device(
                mass.unsqueeze(2), TopK(DECODE_BUDGET), bs, row_first_block=first, row_last_block=last
            )

        t_select = _bench_graph(select)
        t_scores = _bench_graph(functools.partial(triton_ops.block_scores, q, rep, bs, length))
        for budget in budgets:
            if bs != 64 and budget != DECODE_BUDGET:
                continue  # other block sizes only at the target budget
            ids, counts = decode_selection(batch, shape.kv_heads, length, bs, budget, dev)
            ours = functools.partial(triton_ops.sparse_decode, q, k, v, ids, counts, bs)
            out, _ = ours()
            ref, _ = sparse_decode_ref(q, k, v, ids, counts, bs)
            err = _rel_err(out, ref)
            del ref
            tok = (ids.long().unsqueeze(-1) * bs + torch.arange(bs, device=dev)).flatten(2)

            def gather(tok=tok):
                idx = tok.unsqueeze(-1).expand(-1, -1, -1, shape.head_dim)
                kg, vg = torch.gather(k, 2, idx), torch.gather(v, 2, idx)
                return F.scaled_dot_product_attention(q, kg, vg, enable_gqa=True)

            err_gather = _rel_err(out, gather())
            t_ours, t_gather = _bench_graph(ours), _bench_graph(gather)
            t_eager = _bench(ours)
            read = 2 * batch * shape.kv_heads * tok.shape[-1] * shape.head_dim * elem
            rows.append(
                dict(
                    phase="decode",
                    shape=shape.name,
                    batch=batch,
                    length=length,
                    budget_tokens=tok.shape[-1],
                    density=tok.shape[-1] / length,
                    block_size=bs,
                    ours_ms=t_ours,
                    gather_sdpa_ms=t_gather,
                    sdpa_flash_dense_ms=t_flash,
                    sdpa_cudnn_dense_ms=t_cudnn,
                    select_topk_ms=t_select,
                    scores_ms=t_scores,
                    ours_eager_ms=t_eager,
                    ours_tbps=read / t_ours / 1e9,
                    gather_tbps=read / t_gather / 1e9,
                    flash_tbps=dense_bytes / t_flash / 1e9 if t_flash else None,
                    cudnn_tbps=dense_bytes / t_cudnn / 1e9 if t_cudnn else None,
                    rel_err_vs_reference=err,
                    rel_err_vs_gather=err_gather,
                )
            )
            log(
                f"decode {shape.name} B={batch} L={length} budget={tok.shape[-1]} bs={bs}: "
                f"ours {t_ours:.4f} ms, gather {t_gather:.4f}, flash {t_flash}, cudnn {t_cudnn}, "
                f"select {t_select:.4f} (scores {t_scores:.4f}), eager {t_eager:.4f}, err {err:.1e}"
            )
    return rows


# ---------------------------------------------------------------------------------- decode selection
SELECT_BUDGETS = ("topk:4096", "dual:0.9:4096", "topp:0.9")
# One tile per program first (the launch before the persistent grid), then persistent grids with fp32
# operands (the launch before fp16 operands), with fp16 ones, and with int4 decoded in PTX
# (ScoreTiling.parse's syntax).
SCORE_TILES = (
    "128x4",
    "64x4:p4:s3",
    "64x4:p4:s3:h",
    "64x4:p4:s3:ptx",
    "64x4:p2:s3:ptx",
    "64x4:p8:s3:ptx",
    "64x4:p4:s4:ptx",
    "32x4:p8:s3:ptx",
    "128x4:p2:s3:ptx",
    "128x8:p2:s3:ptx",
    "128x4:p4:s3:ptx",
)


def _select_budget(text: str):
    from ..types import DualTopP, TopK, TopP

    kind, *rest = text.split(":")
    if kind == "topk":
        return TopK(int(rest[0]))
    if kind == "topp":
        return TopP(float(rest[0]))
    if kind == "dual":
        return DualTopP(p=float(rest[0]), max_tokens=int(rest[1]) if len(rest) > 1 else None)
    raise click.BadParameter(f"budget {text!r}: use topk:N, topp:P or dual:P[:MAX_TOKENS]", param_hint="--budgets")


def bench_select(
    blocks: Sequence[int] = (8200, 2056),
    batches: Sequence[int] = (1, 4),
    budgets: Sequence[str] = SELECT_BUDGETS,
    spreads: Sequence[float] = (1.0, 4.0),
    warps: Sequence[int | None] = (None,),
    log: Callable[[str], None] = print,
    stages: bool = False,
) -> list[dict]:
    """Time the fused decode selection (``select_decode_fused``) alone, replayed from a CUDA graph (median).

    Scores: one row of ``NB`` block logits per sequence, N(0, ``spread``) (a larger spread is a more peaked
    selector). The row is the static-cache decode case: ``NB`` blocks of 16 tokens over the buffer, the live
    length ``16 * NB - 100`` tokens, the output width as the decode path sets it. Every configuration is
    first checked against ``select_blocks`` (PyTorch) on the same input. ``warps``: launch widths to compare
    (None: the kernel's own choice). ``stages``: also each stage's SM cycles (``stage_cycles``, median of 50
    launches of the stamped kernel, row 0) in ``stage_cycles``.
    """
    from ..kernels._triton.select import STAGES, _tiles, select_decode_fused
    from ..runtime.select import _cap_blocks, _forced_counts
    from ..selection import rows_for_decode, select_blocks

    dev = torch.device("cuda")
    bs = 16
    rows = []
    for nb in blocks:
        for batch in batches:
            live = bs * nb - 100
            seq_len = torch.tensor(live, device=dev)
            first, last = rows_for_decode(1, live, bs, dev)
            allowed = torch.arange(nb, device=dev) <= last
            gen = torch.Generator(device=dev).manual_seed(nb)
            for spread in spreads:
                logits = torch.randn(batch, 1, 1, nb, device=dev, generator=gen) * spread
                mass = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
                for text in budgets:
                    budget = _select_budget(text)
                    ref = select_blocks(mass, budget, bs, row_first_block=first, row_last_block=last)
                    k = ref.block_ids.shape[-1]
                    n_sink, n_recent = _forced_counts(budget, bs)
                    width = n_sink + max(n_recent, 2) + _cap_blocks(budget, bs, nb)  # as the decode path
                    for nw in warps:
                        run = functools.partial(
                            select_decode_fused, logits, budget, bs, width, logits=True, seq_len=seq_len, num_warps=nw
                        )
                        got = run()
                        same = torch.equal(got.counts, ref.counts)
                        same = same and torch.equal(got.block_ids[..., :k], ref.block_ids)
                        row = dict(
                            blocks=nb,
                            batch=batch,
                            budget=text,
                            spread=spread,
                            num_warps=_tiles(nb, nw)[0],
                            select_us=_bench_graph(run) * 1e3,
                            kept_blocks=float(ref.counts.float().mean()),
                            matches_select_blocks=same,
                        )
                        if stages:
                            clock = torch.zeros(batch, 16, dtype=torch.int64, device=dev)
                            runs = []
                            for _ in range(50):
                                run(stage_cycles=clock)
                                runs.append(clock[0, : len(STAGES) + 1].diff().tolist())
                            medians = torch.tensor(runs).median(0).values.tolist()
                            row["stage_cycles"] = dict(zip(STAGES, medians, strict=True))
                        rows.append(row)
                        log(json.dumps(row))
    return rows


def _round_robin(fns: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """One call of the next function in turn: each call captured into a CUDA graph reads other inputs."""
    turn = itertools.count()
    return lambda: fns[next(turn) % len(fns)]()


def bench_score(
    blocks: Sequence[int] = (8200, 2056),
    batches: Sequence[int] = (1, 4),
    tiles: Sequence[str] = ("128x4",),
    key_format: str = "int4",
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Time the fused selector scoring kernel (``score_blocks_triton``) over ``16 * NB`` cached keys in the
    Qwen3-8B selector shape (4 heads x 128), per launch (``ScoreTiling`` text, e.g. ``128x4`` for the
    one-tile-per-program launch, ``64x4:p4:s3`` for a persistent grid), from a CUDA graph. Each launch is
    checked against the PyTorch path (``score_blocks_torch``) and against the first launch.

    Two timings: ``warm`` replays the kernel on the same keys, which stay in L2 when they fit (50 MB on an
    H100: 128K keys of int4 at B = 4 do); ``cold`` rotates over copies of the keys that together exceed
    twice the L2, so each call reads from HBM, as in a decode step, where the other layers' weights and
    K/V pass through L2 between two reads of a layer's selector keys."""
    from ..spot.quant import bytes_per_token, quantize, score_blocks_torch
    from ..spot.triton_score import ScoreTiling, score_blocks_triton

    tilings = [ScoreTiling.parse(t) for t in tiles]  # fail on a bad spec before any timing
    dev = torch.device("cuda")
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    rows = []
    for nb in blocks:
        for batch in batches:
            gen = torch.Generator(device=dev).manual_seed(nb)
            parts = quantize(torch.randn(batch, nb * 16, 128, device=dev, generator=gen), key_format)
            q = torch.randn(batch, 4, 1, 128, device=dev, generator=gen) * 128**-0.5
            w = torch.rand(batch, 1, 4, 1, device=dev, generator=gen)
            exact = score_blocks_torch(q, w, parts, key_format, torch.tensor([nb * 16 - 1], device=dev), 16)
            key_bytes = batch * nb * 16 * bytes_per_token(parts)
            copies = [parts] + [{n: p.clone() for n, p in parts.items()} for _ in range(int(2 * l2 // key_bytes))]
            first = None
            for tiling in tilings:
                runs = [
                    functools.partial(score_blocks_triton, q, w, keys, key_format, nb * 16, 16, tiling=tiling)
                    for keys in copies
                ]
                run, rotating = runs[0], _round_robin(runs)
                got = run()
                first = got if first is None else first
                t_warm, t_cold = _bench_graph(run), _bench_graph(rotating)
                row = dict(
                    blocks=nb,
                    batch=batch,
                    key_format=key_format,
                    tiling=str(tiling),
                    block_n=tiling.block_n,
                    num_warps=tiling.num_warps,
                    programs_per_sm=tiling.programs_per_sm,
                    num_stages=tiling.num_stages,
                    key_mb=key_bytes / 1e6,
                    score_us=t_warm * 1e3,
                    tbps=key_bytes / (t_warm * 1e-3) / 1e12,
                    score_us_cold=t_cold * 1e3,
                    tbps_cold=key_bytes / (t_cold * 1e-3) / 1e12,
                    max_abs_diff_vs_torch=float((got - exact).abs().max()),
                    max_abs_diff_vs_first_tile=float((got - first).abs().max()),
                )
                rows.append(row)
                log(json.dumps(row))
    return rows


def select_markdown(rows: list[dict], score_rows: list[dict]) -> str:
    lines = [
        "Fused decode selection (`select_decode_fused`), median us of CUDA-graph replay:",
        "",
        "| blocks | B | budget | spread | warps | selection us | kept blocks | = select_blocks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['blocks']} | {r['batch']} | {r['budget']} | {r['spread']} | {r['num_warps']} | "
            f"{r['select_us']:.1f} | {r['kept_blocks']:.0f} | {r['matches_select_blocks']} |"
        )
    staged = [r for r in rows if "stage_cycles" in r]
    if staged:
        names = list(staged[0]["stage_cycles"])
        lines += [
            "",
            "Where the selection's time goes: SM clock cycles per stage (`stage_cycles`, median of 50 launches, "
            "row 0):",
            "",
            "| blocks | B | budget | spread | warps | " + " | ".join(names) + " | total |",
            "|---|---|---|---|---|" + "---|" * (len(names) + 1),
        ]
        for r in staged:
            cycles = [r["stage_cycles"][n] for n in names]
            lines.append(f"| {r['blocks']} | {r['batch']} | {r['budget']} | {r['spread']} | {r['num_warps']} | "
                         + " | ".join(f"{c:.0f}" for c in cycles) + f" | {sum(cycles):.0f} |")
    lines += [
        "",
        "Selector scoring (`score_blocks_triton`, 4 heads x 128, 16 keys per block), median us of CUDA-graph",
        "replay; warm: the same keys every call (L2-resident when they fit), cold: rotating over copies of the",
        "keys larger than twice the L2 (read from HBM, as in a decode step). Tiling: keys per tile x warps, :pN",
        "programs per SM (persistent grid), :sN its pipelining stages.",
        "",
        "| blocks | B | format | MB | tiling | us warm | TB/s warm | us cold | TB/s cold | max diff vs torch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in score_rows:
        lines.append(
            f"| {r['blocks']} | {r['batch']} | {r['key_format']} | {r['key_mb']:.1f} | {r['tiling']} | "
            f"{r['score_us']:.1f} | {r['tbps']:.2f} | {r['score_us_cold']:.1f} | {r['tbps_cold']:.2f} | "
            f"{r['max_abs_diff_vs_torch']:.1e} |"
        )
    return "\n".join(lines) + "\n"


@click.command("select")
@click.option("--blocks", default="8200,2056", show_default=True, help="blocks per row (16-token blocks)")
@click.option("--batch", "batches", default="1,4", show_default=True, help="comma-separated batch sizes")
@click.option("--budgets", default=",".join(SELECT_BUDGETS), show_default=True, help="topk:N, topp:P, dual:P[:MAX]")
@click.option("--spreads", default="1,4", show_default=True, help="std of the random block logits")
@click.option("--warps", default="auto", show_default=True, help="selection launch widths, e.g. auto,4,8,16")
@click.option("--score-tiles", default=",".join(SCORE_TILES), show_default=True,
              help="scoring kernel launches to compare, comma-separated, each KEYSxWARPS[:pN][:sN][:h|:ptx]: "
              "KEYS keys per tile, WARPS warps; :pN a persistent grid of N programs per SM (omitted: one "
              "program per tile), :sN its pipelining stages (default 3), :h fp16 dot operands, :ptx fp16 "
              "with int4 decoded in inline PTX (omitted: fp32, TF32). 'default' is score_blocks_triton's "
              "default")
@click.option("--key-format", default="int4", show_default=True, help="selector key format for the scoring kernel")
@click.option("--score-only", is_flag=True, help="time only the scoring kernel (skip the selection kernel)")
@click.option("--stages", is_flag=True, help="also the selection kernel's SM cycles per stage (a stamped build)")
def select_command(blocks, batches, budgets, spreads, warps, score_tiles, key_format, score_only, stages) -> None:
    """Time the fused decode-row selection kernel and the selector scoring kernel alone, from CUDA graphs."""
    from ..spot.triton_score import ScoreTiling

    if not torch.cuda.is_available():
        raise click.ClickException("the selection benchmark needs a CUDA GPU")
    try:
        tiles = tuple(
            str(ScoreTiling() if t.strip() == "default" else ScoreTiling.parse(t)) for t in score_tiles.split(",")
        )
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--score-tiles") from None
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    rows = []
    if not score_only:
        rows = bench_select(
            _ints(blocks),
            _ints(batches),
            tuple(b.strip() for b in budgets.split(",")),
            tuple(float(x) for x in spreads.split(",")),
            tuple(None if x.strip() == "auto" else int(x) for x in warps.split(",")),
            log=log,
            stages=stages,
        )
    score_rows = bench_score(_ints(blocks), _ints(batches), tiles, key_format, log=log)
    click.echo(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    click.echo(select_markdown(rows, score_rows))


# ----------------------------------------------------------------------------------------- report
def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, evaluated on this run's rows where present."""
    out = []

    def find(**kv):
        return next((r for r in rows if all(r.get(k) == v for k, v in kv.items())), None)

    r = find(phase="prefill", shape="qwen3-8b", batch=1, length=32768, density=1.0)
    if r:
        ratio = _ratio(r["ours_ms"], r["sdpa_cudnn_dense_ms"])
        out.append(
            dict(
                target="prefill 100% 32K: ours / cuDNN <= 1.3", value=ratio, met=bool(ratio and ratio <= 1.3)
            )
        )
    r = find(phase="prefill", shape="qwen3-8b", batch=1, length=131072, density=0.1)
    if r:
        for name, key, need in (
            ("cuDNN dense", "sdpa_cudnn_dense_ms", 6),
            ("flash dense", "sdpa_flash_dense_ms", 8),
            ("FlexAttention same mask", "flex_ms", 1),
        ):
            ratio = _ratio(r[key], r["ours_ms"])
            out.append(
                dict(
                    target=f"prefill 10% 128K: {name} / ours >= {need}",
                    value=ratio,
                    met=bool(ratio and ratio >= need if need > 1 else ratio and ratio > 1),
                )
            )
    for batch in (1, 8):
        r = find(
            phase="decode",
            shape="qwen3-8b",
            batch=batch,
            length=131072,
            budget_tokens=DECODE_BUDGET,
            block_size=64,
        )
        if r:
            for name, key, need in (
                ("dense SDPA", "sdpa_flash_dense_ms", 8),
                ("gather+SDPA", "gather_sdpa_ms", 2),
            ):
                ratio = _ratio(r[key], r["ours_ms"])
                out.append(
                    dict(
                        target=f"decode 128K 4096 B={batch}: {name} / ours >= {need}",
                        value=ratio,
                        met=bool(ratio and ratio >= need),
                    )
                )
    errs = [r["rel_err_vs_reference"] for r in rows]
    if errs:
        out.append(
            dict(target="rel. error vs reference < 1e-2 (bf16), worst", value=max(errs), met=max(errs) < 1e-2)
        )
    return out


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [
        f"# Kernel benchmark ({result['device']}, torch {result['torch']}, triton {result['triton']}, bf16)",
        "",
    ]
    lines += ["## Targets", "", "| target | value | met |", "|---|---|---|"]
    lines += [
        f"| {t['target']} | {_fmt(t['value'], 4)} | {'yes' if t['met'] else 'NO'} |"
        for t in result["targets"]
    ]
    lines += [
        "",
        "## Prefill (block size 128; ms, TFLOP/s in brackets; speed-ups = peer time / ours)",
        "",
        "| shape | B | length | density | ours | FlexAttention | SDPA cuDNN dense | SDPA flash dense "
        "| vs cuDNN | vs flash | vs Flex | err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["phase"] == "prefill"):
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['length']} | {r['density']:g} | {_fmt(r['ours_ms'])} "
            f"({_fmt(r['ours_tflops'], 0)}) | {_fmt(r['flex_ms'])} ({_fmt(r['flex_tflops'], 0)}) | "
            f"{_fmt(r['sdpa_cudnn_dense_ms'])} ({_fmt(r['cudnn_tflops'], 0)}) | "
            f"{_fmt(r['sdpa_flash_dense_ms'])} "
            f"({_fmt(r['flash_tflops'], 0)}) | {_fmt(_ratio(r['sdpa_cudnn_dense_ms'], r['ours_ms']), 2)} | "
            f"{_fmt(_ratio(r['sdpa_flash_dense_ms'], r['ours_ms']), 2)} | "
            f"{_fmt(_ratio(r['flex_ms'], r['ours_ms']), 2)} | {r['rel_err_vs_reference']:.1e} |"
        )
    lines += [
        "",
        "## Decode (1 query token; CUDA-graph replay, ms, TB/s of K/V read in brackets; "
        "speed-ups = peer time / ours; eager = ours without a graph)",
        "",
        "| shape | B | length | budget | bs | ours | gather+SDPA | SDPA flash dense | SDPA cuDNN dense "
        "| vs dense | vs gather | ours eager | scores / scores+top-k | err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["phase"] == "decode"):
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['length']} | {r['budget_tokens']} | {r['block_size']} | "
            f"{_fmt(r['ours_ms'], 4)} ({_fmt(r['ours_tbps'], 2)}) | {_fmt(r['gather_sdpa_ms'], 4)} "
            f"({_fmt(r['gather_tbps'], 2)}) | {_fmt(r['sdpa_flash_dense_ms'], 4)} "
            f"({_fmt(r['flash_tbps'], 2)}) | "
            f"{_fmt(r['sdpa_cudnn_dense_ms'], 4)} ({_fmt(r['cudnn_tbps'], 2)}) | "
            f"{_fmt(_ratio(r['sdpa_flash_dense_ms'], r['ours_ms']), 1)} | "
            f"{_fmt(_ratio(r['gather_sdpa_ms'], r['ours_ms']), 1)} | {_fmt(r['ours_eager_ms'], 4)} | "
            f"{_fmt(r['scores_ms'], 4)} / {_fmt(r['select_topk_ms'], 4)} | "
            f"{r['rel_err_vs_reference']:.1e} |"
        )
    lines += ["", f"Command: `{result['command']}`", f"Wall time: {result['wall_s']:.0f} s", ""]
    return "\n".join(lines)


def _xy(pts):
    return [p[0] for p in pts], [p[1] for p in pts]


def plots(rows: list[dict], out_dir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    pre = [r for r in rows if r["phase"] == "prefill" and r["batch"] == 1]
    dec = [r for r in rows if r["phase"] == "decode" and r["block_size"] == 64]
    if pre:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for shape, ls in zip(sorted({r["shape"] for r in pre}), ("-", "--"), strict=False):
            sub = [r for r in pre if r["shape"] == shape]
            for dens in sorted({r["density"] for r in sub}, reverse=True)[:3]:
                pts = sorted((r["length"], r["ours_ms"]) for r in sub if r["density"] == dens)
                axes[0].plot(*_xy(pts), ls, marker="o", label=f"{shape} ours {dens:g}")
            for key, lab in (("sdpa_cudnn_dense_ms", "cuDNN dense"), ("sdpa_flash_dense_ms", "flash dense")):
                pts = sorted({(r["length"], r[key]) for r in sub if r[key]})
                if pts:
                    axes[0].plot(*_xy(pts), ls, marker="x", label=f"{shape} {lab}")
            for length in sorted({r["length"] for r in sub}):
                pts = sorted(
                    (r["density"], _ratio(r["sdpa_cudnn_dense_ms"], r["ours_ms"]) or 0)
                    for r in sub
                    if r["length"] == length
                )
                axes[1].plot(*_xy(pts), ls, marker="o", label=f"{shape} {length // 1024}K ours")
                pts = sorted(
                    (r["density"], _ratio(r["sdpa_cudnn_dense_ms"], r["flex_ms"]) or 0)
                    for r in sub
                    if r["length"] == length
                )
                axes[1].plot(*_xy(pts), ":", marker=".", label=f"{shape} {length // 1024}K Flex")
        axes[0].set(xscale="log", yscale="log", xlabel="length", ylabel="ms", title="prefill latency (B=1)")
        axes[1].set(
            xscale="log",
            yscale="log",
            xlabel="block density",
            ylabel="speed-up over cuDNN dense",
            title="prefill speed-up (B=1)",
        )
        for ax in axes:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out_dir / "prefill.png", dpi=110)
        plt.close(fig)
        written.append("prefill.png")
    if dec:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for shape, ls in zip(sorted({r["shape"] for r in dec}), ("-", "--"), strict=False):
            for batch in sorted({r["batch"] for r in dec}):
                sub = [r for r in dec if r["shape"] == shape and r["batch"] == batch]
                tag = f"{shape} B={batch}"
                pts = sorted((r["length"], r["ours_ms"]) for r in sub if r["budget_tokens"] == DECODE_BUDGET)
                axes[0].plot(*_xy(pts), ls, marker="o", label=f"{tag} ours 4096")
                pts = sorted(
                    (r["length"], r["gather_sdpa_ms"]) for r in sub if r["budget_tokens"] == DECODE_BUDGET
                )
                axes[0].plot(*_xy(pts), ls, marker="s", label=f"{tag} gather 4096")
                pts = sorted({(r["length"], r["sdpa_flash_dense_ms"]) for r in sub})
                axes[0].plot(*_xy(pts), ls, marker="x", label=f"{tag} dense")
                for length in sorted({r["length"] for r in sub}):
                    pts = sorted(
                        (r["density"], _ratio(r["sdpa_flash_dense_ms"], r["ours_ms"]) or 0)
                        for r in sub
                        if r["length"] == length
                    )
                    axes[1].plot(*_xy(pts), ls, marker="o", label=f"{tag} {length // 1024}K")
        axes[0].set(xscale="log", yscale="log", xlabel="context length", ylabel="ms", title="decode latency")
        axes[1].set(
            xscale="log",
            yscale="log",
            xlabel="token density",
            ylabel="speed-up over dense SDPA",
            title="decode speed-up (block 64)",
        )
        for ax in axes:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out_dir / "decode.png", dpi=110)
        plt.close(fig)
        written.append("decode.png")
    return written


def run_kernel_bench(
    out_dir: str | Path,
    lengths: Sequence[int] | None = None,
    densities: Sequence[float] | None = None,
    shapes: Sequence[str] | None = None,
    batches: Sequence[int] | None = None,
    quick: bool = False,
    command: str = "",
    log: Callable[[str], None] = print,
) -> dict:
    """Run the kernel benchmark and write ``kernels.json``, ``kernels.md`` and plots into ``out_dir``.

    Defaults (full run, a few minutes on an H100): lengths 8K/32K/128K, densities 1..1%, both shapes,
    batch 1 and 8. Prefill at batch 8 and the SmolLM2 shape stop at 32K (``quick``: one shape, batch 1,
    8K and 32K, densities 1 and 0.1). Decode always adds the 4096-token target budget.
    """
    if not torch.cuda.is_available():
        raise click.ClickException("the kernel benchmark needs a CUDA GPU")
    import triton

    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if quick:
        lengths = lengths or (8192, 32768)
        densities = densities or (1.0, 0.1)
        shapes = shapes or ("qwen3-8b",)
        batches = batches or (1,)
    lengths = tuple(lengths or FULL_LENGTHS)
    densities = tuple(densities or FULL_DENSITIES)
    shapes = tuple(shapes or SHAPES)
    batches = tuple(batches or (1, 8))
    for s in shapes:
        if s not in SHAPES:
            raise click.BadParameter(f"unknown shape {s!r}; allowed: {sorted(SHAPES)}", param_hint="--shapes")
    rows: list[dict] = []
    for name in shapes:
        shape = SHAPES[name]
        for batch in batches:
            for length in lengths:
                # Long dense prefills at batch 8 or the small shape add minutes and no information.
                if (
                    quick
                    or batch == 1
                    and name == "qwen3-8b"
                    or length <= 32768
                    and batch == 1
                    or length <= 8192
                ):
                    rows += bench_prefill(shape, batch, length, densities, log)
                torch.cuda.empty_cache()
        for batch in batches:
            for length in lengths:
                sizes = (64, 16) if length == max(lengths) else (64,)
                rows += bench_decode(shape, batch, length, densities, log, block_sizes=sizes)
                torch.cuda.empty_cache()
    result = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        command=command or "spotattn bench kernels",
        shapes=[asdict(SHAPES[s]) for s in shapes],
        rows=rows,
        wall_s=time.time() - t0,
    )
    result["targets"] = targets(rows)
    (out_dir / "kernels.json").write_text(json.dumps(result, indent=1))
    (out_dir / "kernels.md").write_text(markdown(result))
    result["plots"] = plots(rows, out_dir)
    return result


def _ints(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        mult = 1024 if part.endswith("K") else 1
        out.append(int(part.rstrip("K")) * mult)
    return tuple(out)


@click.command("kernels")
@click.option("--out", "out_dir", default="bench_out/kernels", show_default=True, help="output folder")
@click.option("--lengths", default=None, help="comma-separated context lengths, e.g. 8K,32K,128K")
@click.option("--densities", default=None, help="comma-separated block densities in (0, 1], e.g. 1,0.1,0.01")
@click.option("--batch", "batches", default=None, help="comma-separated batch sizes, e.g. 1,8")
@click.option("--shapes", default=None, help=f"comma-separated layer shapes among {sorted(SHAPES)}")
@click.option("--quick", is_flag=True, help="a small grid (one shape, batch 1, 8K-32K)")
def kernels_command(out_dir, lengths, densities, batches, shapes, quick) -> None:
    """Time the Triton prefill/decode kernels against SDPA (flash, cuDNN), FlexAttention and gather+SDPA."""
    dens = tuple(float(x) for x in densities.split(",")) if densities else None
    if dens and not all(0 < d <= 1 for d in dens):
        raise click.BadParameter("densities must be in (0, 1]", param_hint="--densities")
    given = {"--lengths": lengths, "--densities": densities, "--batch": batches, "--shapes": shapes}
    command = "spotattn bench kernels" + "".join(f" {k} {v}" for k, v in given.items() if v)
    command += " --quick" * quick + f" --out {out_dir}"
    result = run_kernel_bench(
        out_dir,
        _ints(lengths) if lengths else None,
        dens,
        tuple(s.strip() for s in shapes.split(",")) if shapes else None,
        _ints(batches) if batches else None,
        quick,
        command=command,
        log=lambda m: click.echo(m, err=True),
    )
    click.echo(markdown(result))


if __name__ == "__main__":
    kernels_command()
