"""``spotattn bench train``: what selector distillation costs on a model shape before a real run is paid for.

It runs the training step of ``spotattn train`` (:func:`spotattn.spot.train.distill_step`: the frozen
backbone's forward with the teacher, every layer's KL backward, AdamW) on a randomly initialised model of a
real shape (``random:<shape>``), with the default selector for that shape and random token windows. Time
and memory depend on the shapes, not on the weights or the text, so the figures hold for the real model of
that shape; the loss does not, and is not reported. It times the default recipe (one selector shared by
all heads, the head-mean teacher, dense KL); ``--per-group`` and the other loss options cost more.

Output: seconds per step (the first step, which includes warm-up, apart), tokens per second, the peak
GPU memory of a step, the backbone's and the selector's sizes, and the hours that ``--plan-steps`` steps
would take. Writes ``train.json`` and ``train.md`` under ``--out``.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import click
import torch
from tqdm import tqdm

from ..models import RANDOM_SHAPES, random_model
from ..spot.selector import Selector, config_for_model
from ..spot.train import (
    Backbone,
    TrainConfig,
    autocast_for,
    distill_step,
    make_capture,
    make_optimizer,
    take_peak_gpu_gb,
)

JSON_FILE, MD_FILE = "train.json", "train.md"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(
    shape: str,
    *,
    seq_len: int,
    batch_size: int = 1,
    steps: int = 3,
    chunk: int = 1024,
    num_layers: int | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> dict:
    """Time ``steps`` distillation steps of the default selector on a random ``shape`` model."""
    if shape not in RANDOM_SHAPES:
        raise ValueError(f"shape must be one of {sorted(RANDOM_SHAPES)}, got {shape!r}")
    for name, value, least in (("seq_len", seq_len, 16), ("batch_size", batch_size, 1), ("steps", steps, 2),
                               ("chunk", chunk, 1)):
        if value < least:  # steps: the first one is warm-up and not counted
            raise ValueError(f"{name} must be >= {least}, got {value}")
    model = random_model(shape, device=device, num_layers=num_layers)
    dev = next(model.parameters()).device
    text = model.config.get_text_config(decoder=True)
    cfg = TrainConfig(model=f"random:{shape}", data="random tokens", out="", seq_len=seq_len,
                      batch_size=batch_size, steps=steps, chunk=chunk)
    sel_cfg = config_for_model(model.config)
    selector = Selector(sel_cfg).to(dev)
    optim, sched = make_optimizer(selector, cfg)
    gen = torch.Generator().manual_seed(0)
    take_peak_gpu_gb(dev)  # from here on: the steps' peak, weights and optimiser state included
    times = []
    with Backbone(model, make_capture(sel_cfg, cfg, dev), sel_cfg.layer_ids) as backbone:
        for _ in tqdm(range(steps), desc=f"bench train {shape} {seq_len}", disable=not progress):
            ids = torch.randint(0, text.vocab_size, (batch_size, seq_len), generator=gen).to(dev)
            _sync(dev)
            t0 = time.perf_counter()
            distill_step(backbone, selector, ids, cfg, optim, sched, autocast_for(dev))
            _sync(dev)
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    return {
        "shape": shape,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "layers": text.num_hidden_layers,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "chunk": chunk,
        "selector": {"layers": len(sel_cfg.layer_ids), "heads": sel_cfg.num_heads, "head_dim": sel_cfg.head_dim,
                     "params": selector.num_parameters()},
        "backbone_gb": sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9,
        "first_step_s": times[0],
        "step_s": step_s,
        "step_s_all": times,
        "tokens_per_s": batch_size * seq_len / step_s,
        "peak_gpu_gb": take_peak_gpu_gb(dev),
    }


def markdown(report: dict, plan_steps: int) -> str:
    sel = report["selector"]
    peak = report["peak_gpu_gb"]
    hours = plan_steps * report["step_s"] / 3600
    rows = [
        ("model", f"random-weight {report['shape']} ({report['layers']} layers, {report['backbone_gb']:.1f} GB)"),
        ("selector", f"{sel['layers']} layers x ({sel['heads']} heads x {sel['head_dim']}), "
                     f"{sel['params'] / 1e6:.1f}M parameters"),
        ("window", f"batch {report['batch_size']} x {report['seq_len']} tokens, query chunk {report['chunk']}"),
        ("first step (warm-up)", f"{report['first_step_s']:.2f} s"),
        ("step (median of the rest)", f"{report['step_s']:.2f} s"),
        ("tokens per second", f"{report['tokens_per_s']:,.0f}"),
        ("peak GPU memory", f"{peak:.1f} GB" if peak is not None else "- (CPU)"),
        (f"{plan_steps} steps", f"{hours:.2f} h"),
    ]
    return "\n".join(
        [f"## Selector distillation cost ({report['device']}, torch {report['torch']})", "",
         "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    )


@click.command()
@click.option("--shape", default="qwen3-8b", show_default=True, type=click.Choice(sorted(RANDOM_SHAPES)),
              help="random-weight model shape to build")
@click.option("--seq-len", type=click.IntRange(min=16), default=16384, show_default=True,
              help="training window, tokens")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--steps", type=click.IntRange(min=2), default=3, show_default=True,
              help="steps to time; the first counts as warm-up")
@click.option("--chunk", type=click.IntRange(min=1), default=1024, show_default=True,
              help="query chunk of the teacher and the loss")
@click.option("--plan-steps", type=click.IntRange(min=1), default=2000, show_default=True,
              help="steps of the run to estimate the hours of")
@click.option("--device", default="auto", show_default=True,
              help="auto (the GPU; refused without one), cuda, cuda:N or cpu (slow for real shapes)")
@click.option("--out", default="bench_out/train", show_default=True, type=click.Path(file_okay=False))
def train_command(shape: str, seq_len: int, batch_size: int, steps: int, chunk: int, plan_steps: int,
                  device: str, out: str) -> None:
    """What one selector-distillation step costs on a model shape (time, memory), from random weights.

    It times the default recipe (a shared selector, the head-mean teacher, dense KL)."""
    if device == "auto":
        if not torch.cuda.is_available():
            raise click.BadParameter("no GPU here; pass --device cpu to time on the CPU", param_hint="--device")
    else:
        try:
            torch.device(device)
        except RuntimeError:
            raise click.BadParameter(f"expected auto, cpu, cuda or cuda:N, got {device!r}",
                                     param_hint="--device") from None
    report = bench_train(shape, seq_len=seq_len, batch_size=batch_size, steps=steps, chunk=chunk, device=device)
    report["plan_steps"] = plan_steps
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / JSON_FILE).write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report, plan_steps)
    (folder / MD_FILE).write_text(text)
    click.echo(text)
