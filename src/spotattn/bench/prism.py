"""Prism estimation cost against dense prefill, one attention layer (``python -m spotattn.bench.prism``).

For each length: random post-RoPE queries and keys of a real layer shape (Qwen3-8B: 32 query heads, 8 kv
heads, head dim 128, RoPE base 1e6), bf16 on CUDA. Timed with CUDA events (median after warm-up):

- ``estimate_ms``: the whole ``prism`` prefill selection as the integration calls it (three Triton
  launches: mean pooling with the band norms, then calibration and band probabilities, then top-p and
  the block lists), and its parts ``pool_ms`` (the first launch) and ``kernels_ms`` (the other two);
- ``unfused_ms``: the same selection the way it was built before those kernels were fused: PyTorch
  pooling and calibration (band indices copied to the device each call), the Triton mask kernels
  (``prism_block_mask``), ``mask_to_selection`` (a host sync for the lists' width);
- ``dense_cudnn_ms`` / ``dense_flash_ms``: dense causal SDPA on the cuDNN and flash backends;
- ``sparse_ms``: the Triton block-sparse prefill over Prism's own selection, at the density it chose.

Random activations carry no real attention structure, so the density here is not a model's density;
only the costs are meaningful. At short lengths the Triton mask is also checked against the PyTorch
estimator (``mask_mismatch``), and the fused selection against the PyTorch path's
(``selection_mismatch``: share of rows whose lists differ). Writes ``prism.json`` and ``prism.md`` to ``--out``.

Real-model mode (``--model``): the same costs on a real model's attention, at the density Prism selects
there, per layer and summed over layers, with the sparse kernel also timed on a random mask of that
density (``spotattn.bench.prism_model``)::

    python -m spotattn.bench.prism --model /path/to/smollm2.gguf --text kjv.txt --lengths 8192 \
        --p 0.93,0.95 --layers all --out bench_out/prism-model

``--model`` takes what ``spotattn.load_model`` takes (a Hugging Face id or folder, a ``.gguf`` file,
``smollm2-135m``); the first ``length`` tokens of ``--text`` are used; lengths above the model's window
need ``--beyond-window``. Writes ``prism-model.json``, ``prism-model.md`` and ``prism-model.png``.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import click
import torch

from ..methods.base import AttentionCall
from ..methods.prism import Prism, PrismConfig, band_scales, mean_pool, pooled_block_mask
from ..selection import density_of, mask_to_selection
from ..types import Selection
from .kernels import SHAPES, _bench, _sdpa_fn


def _rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE at positions 0..L-1, as Hugging Face applies it."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = torch.arange(x.shape[2], device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def prefill_density(selection: Selection, length: int) -> tuple[float, list[float]]:
    """Share of the causally available tokens a full-prefill selection reads (block granularity), over
    all kv-groups and per kv-group (batch summed)."""
    on_host = Selection(selection.block_ids.cpu(), selection.counts.cpu(), selection.block_size, selection.first_row)
    read, avail = density_of(on_host, length, length, None, decode=False)
    per_group = (read.sum(0) / avail.sum(0)).tolist()
    return float(read.sum() / avail.sum()), per_group


def bench_length(shape_name: str, length: int, p: float, check: bool, log, device: str = "cuda") -> dict:
    from torch.nn.attention import SDPBackend

    from ..kernels import prism_triton, triton_ops

    shape = SHAPES[shape_name]
    dev, dt = torch.device(device), torch.bfloat16
    torch.manual_seed(0)
    q = _rope(torch.randn(1, shape.q_heads, length, shape.head_dim, device=dev, dtype=dt), 1e6)
    k = _rope(torch.randn(1, shape.kv_heads, length, shape.head_dim, device=dev, dtype=dt), 1e6)
    v = torch.randn_like(k)
    config = PrismConfig(block_size=128, p=p)
    method = Prism(config, None, 0)
    scale = shape.head_dim**-0.5
    call = AttentionCall(q, k, v, scale, 0, None)
    bs = config.block_size
    bands, _ = method.bands(shape.head_dim)
    consts = method.band_constants(shape.head_dim, dev)
    row: dict = dict(shape=shape_name, length=length, block_size=bs, p=p)

    def unfused() -> Selection:
        qbar, kbar = mean_pool(q, bs), mean_pool(k, bs)
        inv = band_scales(qbar, kbar, bands, True)
        return mask_to_selection(prism_triton.prism_block_mask(qbar, kbar, bands, inv, p, bs, 0, None), bs, 0)

    pooled = prism_triton.pool_blocks(q, k, bs, None, consts.mask)
    row["pool_ms"] = _bench(lambda: prism_triton.pool_blocks(q, k, bs, None, consts.mask))
    row["kernels_ms"] = _bench(
        lambda: prism_triton.estimate_from_pooled(
            pooled[0], pooled[1], consts.mask, prism_triton.SCALE_CALIBRATED, None, pooled[2], p, bs, 0, None, False
        )
    )
    row["estimate_ms"] = _bench(lambda: method.prefill(call))
    row["unfused_ms"] = _bench(unfused)
    selection = method.prefill(call)
    row["density"] = prefill_density(selection, length)[0]
    if check:
        qbar, kbar = mean_pool(q, bs), mean_pool(k, bs)
        inv = band_scales(qbar, kbar, bands, True)
        mask_t = prism_triton.prism_block_mask(qbar, kbar, bands, inv, p, bs, 0, None)
        mask_r = pooled_block_mask(qbar, kbar, bands, inv, p, bs, 0, None)
        row["mask_mismatch"] = float((mask_t != mask_r).float().mean())
        ref = mask_to_selection(mask_r, bs, 0, width=selection.block_ids.shape[-1])
        differ = (ref.block_ids != selection.block_ids).any(-1) | (ref.counts != selection.counts)
        row["selection_mismatch"] = float(differ.float().mean())
    log(f"L={length}: estimate {row['estimate_ms']:.3f} ms, density {row['density']:.3f}")
    cudnn = _sdpa_fn(SDPBackend.CUDNN_ATTENTION, q, k, v, True)
    flash = _sdpa_fn(SDPBackend.FLASH_ATTENTION, q, k, v, True)
    row["dense_cudnn_ms"] = _bench(cudnn) if cudnn else None
    row["dense_flash_ms"] = _bench(flash) if flash else None
    log(f"L={length}: dense cudnn {row['dense_cudnn_ms']}, flash {row['dense_flash_ms']}")
    sparse = functools.partial(
        triton_ops.block_sparse_prefill, q, k, v, selection.block_ids, selection.counts, bs, scale=scale
    )
    row["sparse_ms"] = _bench(sparse)
    dense = row["dense_cudnn_ms"] or row["dense_flash_ms"]
    if dense:
        row["estimate_share_of_dense"] = row["estimate_ms"] / dense
        row["sparse_speedup_vs_dense"] = dense / row["sparse_ms"]
        row["total_speedup_vs_dense"] = dense / (row["sparse_ms"] + row["estimate_ms"])
    log(json.dumps(row))
    return row


def write_report(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "prism.json").write_text(json.dumps(rows, indent=2))
    head = (
        "| length | estimate ms | pool | kernels | unfused ms | dense cuDNN ms | est/dense | density | sparse ms |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['length']} | {r['estimate_ms']:.3f} | {r['pool_ms']:.3f} | {r['kernels_ms']:.3f} | "
            f"{r['unfused_ms']:.3f} | {r.get('dense_cudnn_ms') or float('nan'):.2f} | "
            f"{100 * r.get('estimate_share_of_dense', float('nan')):.1f}% | {r['density']:.3f} | "
            f"{r['sparse_ms']:.2f} |"
        )
    (out / "prism.md").write_text("\n".join(lines) + "\n")


@click.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--shape", default="qwen3-8b", type=click.Choice(sorted(SHAPES)), help="random mode: the layer shape")
@click.option("--lengths", default=None,
              help="comma-separated sequence lengths (random mode: 16384,131072; --model: the model's window)")
@click.option("--p", "p_text", default=None,
              help="top-p in (0, 1]: one value in random mode (0.93); with --model a comma-separated list (0.93,0.95)")
@click.option("--check-below", default=32768, type=int,
              help="random mode: compare with the PyTorch estimator below this length; --model: check the whole "
              "sparse output (else its last two query blocks) against the reference below it")
@click.option("--model", "model_name", default=None,
              help="real-model mode: a Hugging Face id or folder, a .gguf file or smollm2-135m")
@click.option("--text", "text_path", type=click.Path(path_type=Path), default=None,
              help="with --model: the text file whose first tokens are read")
@click.option("--layers", default=None, help="with --model: all (default) or comma-separated layer ids, e.g. 0,5,29")
@click.option("--beyond-window", is_flag=True,
              help="with --model: allow lengths above the model's window (labelled as beyond it)")
@click.option("--progress/--no-progress", default=True, help="with --model: a progress bar over layers")
def main(
    out_dir: Path, shape: str, lengths: str | None, p_text: str | None, check_below: int, model_name: str | None,
    text_path: Path | None, layers: str | None, beyond_window: bool, progress: bool,
) -> None:
    """Time Prism's estimation against dense cuDNN prefill on one layer of random inputs, or (--model)
    Prism's estimation and sparse prefill on the layers of a real model."""
    import shlex  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from ..eval.runner import EvalArgumentError  # noqa: PLC0415
    from .prism_model import parse_p, run_model_bench  # noqa: PLC0415 (it imports this module)

    t0 = time.time()

    def log(msg: str) -> None:
        click.echo(f"[{time.time() - t0:6.1f}s] {msg}", err=True)

    try:
        if model_name is not None:
            if text_path is None:
                raise EvalArgumentError("--text", "the real-model mode (--model) needs a text file")
            run_model_bench(
                model_name, text_path=text_path, lengths=lengths, p=p_text, layers=layers or "all",
                beyond_window=beyond_window, out=out_dir, check_below=check_below, progress=progress, log=log,
                command="python -m spotattn.bench.prism " + shlex.join(sys.argv[1:]),
            )
            click.echo((out_dir / "prism-model.md").read_text().split("\n## Per layer")[0])
            return
        for name, given in (("--text", text_path), ("--layers", layers), ("--beyond-window", beyond_window)):
            if given:
                raise EvalArgumentError(name, "applies only to the real-model mode; give --model too")
        p_values = parse_p(p_text) if p_text is not None else [0.93]
        if len(p_values) != 1:
            raise EvalArgumentError("--p", f"the random-input mode takes one value, got {p_text!r}")
    except EvalArgumentError as exc:
        raise click.BadParameter(exc.detail, param_hint=exc.param) from exc
    except RuntimeError as exc:  # no CUDA for the timing
        raise click.ClickException(str(exc)) from exc
    if not torch.cuda.is_available():
        raise click.ClickException("this benchmark needs CUDA")

    rows = []
    for length in (int(x) for x in (lengths or "16384,131072").split(",")):
        rows.append(bench_length(shape, length, p_values[0], length < check_below, log))
        write_report(rows, out_dir)  # keep what is done if a later length fails
    click.echo((out_dir / "prism.md").read_text())


if __name__ == "__main__":
    main()
