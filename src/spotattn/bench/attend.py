"""``spotattn bench attend``: the sparse decode attention kernel alone, in spot's decode layout, per launch tiling.

The layout is what a spot decode step reads: a paged K/V cache of 16-token pages in a shuffled block
table, one block list per sequence shared by all heads (``TopK``), one query token, the Qwen3-8B layer
shape. Each timed call reads another of several random selections, so the blocks come from HBM (their
total is well beyond the L2), as in a decode step where every layer reads its own cache.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence

import click
import torch

from .kernels import SHAPES, _bench_graph, _ints, _rel_err, _round_robin, decode_selection

# The split kernel's default, then variations of one parameter at a time and a few combinations.
ATTEND_TILES = (
    "default",
    "64x4:s2:p2",
    "64x4:s3:p2",
    "64x4:s4:p2",
    "64x4:s2:p4",
    "64x4:s3:p4",
    "64x4:s3:p8",
    "32x4:s3:p4",
    "32x4:s4:p8",
    "64x8:s3:p2",
    "128x8:s2:p2",
    "128x8:s3:p4",
)


def bench_attend(
    batches: Sequence[int] = (1, 4),
    context: int = 131072,
    tokens: int = 4096,
    tilings: Sequence[str] = ATTEND_TILES,
    copies: int = 8,
    log: Callable[[str], None] = print,
    block_size: int = 16,
    list_tokens: int | None = None,
) -> list[dict]:
    """Median microseconds of ``sparse_decode_paged`` (split and reduce kernels) per tiling, from CUDA graphs,
    with the bytes of K/V read per second; every tiling is checked against ``sparse_decode_paged_ref``.
    ``list_tokens``: the static width of the block lists in tokens, ``-1`` padded past the ``tokens`` read
    (a budget without a cap has lists as wide as the cache); default ``tokens``."""
    from ..kernels._triton.decode import DEFAULT_TILING, DecodeTiling, _launch_decode, choose_splits
    from ..kernels.triton_ops import sparse_decode_paged_ref

    dev = torch.device("cuda")
    shape, bs, dt = SHAPES["qwen3-8b"], block_size, torch.bfloat16
    parsed = [DEFAULT_TILING if t.strip() == "default" else DecodeTiling.parse(t) for t in tilings]
    rows = []
    for batch in batches:
        gen = torch.Generator(device=dev).manual_seed(batch)
        nb = math.ceil(context / bs)
        pages = (batch * nb, shape.kv_heads, bs, shape.head_dim)
        k_pages = torch.randn(pages, device=dev, dtype=dt, generator=gen)
        v_pages = torch.randn(pages, device=dev, dtype=dt, generator=gen)
        table = torch.randperm(batch * nb, device=dev, generator=gen).view(batch, nb).int()
        seq_lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
        q = torch.randn(batch, shape.q_heads, 1, shape.head_dim, device=dev, dtype=dt, generator=gen)
        selections = [decode_selection(batch, 1, context, bs, tokens, dev) for _ in range(copies)]
        pad = math.ceil((list_tokens or tokens) / bs) - selections[0][0].shape[-1]
        if pad > 0:
            selections = [(torch.nn.functional.pad(ids, (0, pad), value=-1), n) for ids, n in selections]
        ids0, counts0 = selections[0]
        ref, _ = sparse_decode_paged_ref(q, k_pages, v_pages, table, seq_lens, ids0, counts0, bs)
        width = ids0.shape[-1]
        live = int(counts0.max())
        read = 2 * batch * shape.kv_heads * live * bs * shape.head_dim * k_pages.element_size()
        scale = shape.head_dim**-0.5
        for tiling in parsed:
            splits = choose_splits(batch * shape.kv_heads, width, bs, dev, tiling)
            calls = [
                functools.partial(
                    _launch_decode, q, k_pages, v_pages, ids, counts, bs, scale, None, seq_lens, table, splits, tiling
                )
                for ids, counts in selections
            ]
            err = _rel_err(calls[0]()[0], ref)
            ms = _bench_graph(_round_robin(calls))
            row = dict(
                batch=batch, context=context, block_size=bs, tokens=live * bs, list_tokens=width * bs,
                tiling=str(tiling),
                default=tiling == DEFAULT_TILING, splits=splits, us=ms * 1e3, tbps=read / ms / 1e9,
                rel_err_vs_reference=err,
            )
            rows.append(row)
            log(json.dumps(row))
        del k_pages, v_pages
    return rows


def attend_markdown(rows: list[dict]) -> str:
    lines = [
        "Sparse decode attention (`sparse_decode_paged`: split + reduce kernels), Qwen3-8B layer shape, pages of",
        "one block, one shared block list per sequence; median us of CUDA-graph replay over rotating selections:",
        "",
        "| B | context | block | tokens read | list width | tiling | splits | us | TB/s | rel. err vs reference |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r["tiling"] + (" (default)" if r["default"] else "")
        cells = (r["batch"], r["context"], r["block_size"], r["tokens"], r["list_tokens"], name, r["splits"],
                 f"{r['us']:.1f}", f"{r['tbps']:.2f}", f"{r['rel_err_vs_reference']:.1e}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


@click.command("attend")
@click.option("--batch", "batches", default="1,4", show_default=True, help="comma-separated batch sizes")
@click.option("--context", type=int, default=131072, show_default=True, help="tokens in each sequence's cache")
@click.option("--tokens", type=int, default=4096, show_default=True, help="tokens each query reads (TopK)")
@click.option("--list-tokens", type=int, default=None,
              help="static width of the block lists in tokens, -1 padded past --tokens (default: --tokens; "
              "a budget without a cap lists the whole cache, e.g. 131072)")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128"]), default="16", show_default=True,
              help="tokens per block and page (spot reads 16; the dense path 64)")
@click.option("--tilings", default=",".join(ATTEND_TILES), show_default=True,
              help="split-kernel launches to compare, comma-separated, each TOKENSxWARPS[:sN][:pN]: tokens per "
              "tile, warps, pipelining stages, programs per SM the split count aims at; 'default' is the "
              "kernel's default")
def attend_command(batches: str, context: int, tokens: int, list_tokens: int | None, block_size: str,
                   tilings: str) -> None:
    """Time the sparse decode attention kernel alone, per launch tiling, from CUDA graphs."""
    from ..kernels._triton.decode import DecodeTiling

    if context < 16 or tokens < 32:
        raise click.BadParameter("--context must be >= 16 and --tokens >= 32", param_hint="--context/--tokens")
    if list_tokens is not None and not tokens <= list_tokens <= context:
        raise click.BadParameter(f"must lie in [--tokens, --context] = [{tokens}, {context}], got {list_tokens}",
                                 param_hint="--list-tokens")
    names = [t.strip() for t in tilings.split(",") if t.strip()]
    try:
        for name in names:
            if name != "default":
                DecodeTiling.parse(name)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--tilings") from None
    if not torch.cuda.is_available():
        raise click.ClickException("the attention benchmark needs a CUDA GPU")
    rows = bench_attend(_ints(batches), context, tokens, names, log=lambda m: click.echo(m, err=True),
                        block_size=int(block_size), list_tokens=list_tokens)
    click.echo(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    click.echo(attend_markdown(rows))
