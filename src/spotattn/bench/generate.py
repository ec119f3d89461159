"""End-to-end generation speed: ``spotattn.generate`` with dense attention and with sparse methods.

``spotattn bench generate --context 131072 --new-tokens 64`` (CUDA): a random-weight model of a real
shape (default Qwen3-8B), one random prompt of ``--context`` tokens, then for each method on the same
model and prompt: prefill, set-up (warm-up, compilation, graph capture) and the decode loop of
``spotattn.generate``, as a user runs it. The decode figure is new tokens per second of the loop (one
CUDA-graph replay per token plus the token choice), so it includes what ``bench decode``'s step time
leaves out. Spot runs a random selector: its speed is real, its choices are not (random weights).
Output: ``generate.json`` and ``generate.md`` under ``--out``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import click
import torch

from .decode import _random_selector

METHODS = ("dense", "spot", "twilight", "quest")


def bench_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    configs: dict[str, object],
    new_tokens: int,
    *,
    compile: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """One row per ``configs`` entry (name -> method config): ``spotattn.generate``'s timings and decode
    density on ``input_ids``, and its decode speed-up over the ``dense`` row when there is one."""
    from .. import density, sparsify, unsparsify
    from ..runtime import generate

    rows = []
    for name, config in configs.items():
        sparsify(model, config)
        try:
            out = generate(model, input_ids, max_new_tokens=new_tokens, compile=compile)
            row = dict(
                method=name,
                batch=input_ids.shape[0],
                context=input_ids.shape[1],
                new_tokens=out.new_tokens,
                engine=out.engine,
                prefill_s=out.prefill_seconds,
                setup_s=out.setup_seconds,
                decode_s=out.decode_seconds,
                tokens_per_s=out.tokens_per_second,
                decode_density=density(model, "decode").mean,
            )
        finally:
            unsparsify(model)
            if input_ids.is_cuda:
                torch.cuda.empty_cache()
        rows.append(row)
        log(json.dumps(row))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for row in rows:
        row["decode_speedup_vs_dense"] = row["tokens_per_s"] / dense["tokens_per_s"] if dense else None
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| method | B | context | new tokens | engine | prefill s | set-up s | decode tokens/s | decode density "
        "| decode vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = "-" if r["decode_speedup_vs_dense"] is None else f"{r['decode_speedup_vs_dense']:.2f}x"
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['context']} | {r['new_tokens']} | {r['engine']} | "
            f"{r['prefill_s']:.2f} | {r['setup_s']:.2f} | {r['tokens_per_s']:.1f} | {r['decode_density']:.1%} | "
            f"{speedup} |"
        )
    return "\n".join(lines) + "\n"


@click.command("generate")
@click.option("--shape", default="qwen3-8b", show_default=True, help="random:<shape> model to build")
@click.option("--context", type=int, default=32768, show_default=True, help="prompt tokens")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--new-tokens", type=int, default=64, show_default=True)
@click.option("--methods", default="dense,spot", show_default=True, help=f"comma-separated, of {', '.join(METHODS)}")
@click.option("--budget", "budget_text", default="topk:4096", show_default=True, help="spot budget (as in generate)")
@click.option("--key-format", default="int4", show_default=True, help="spot selector key format")
@click.option("--compile/--no-compile", "compile_step", default=False, show_default=True,
              help="compile each decode step with torch.compile before capture")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench_out/generate"), show_default=True)
def generate_command(shape, context, batch, new_tokens, methods, budget_text, key_format, compile_step, out) -> None:
    """End-to-end spotattn.generate: prefill, set-up and decode tokens/s, dense and sparse, one model and prompt."""
    from ..cli import parse_budget
    from ..methods import make_config
    from ..methods.spot import SpotConfig
    from ..models import random_model

    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown or not names:
        raise click.BadParameter(f"got {names}; allowed: {', '.join(METHODS)}", param_hint="--methods")
    for value, name in ((context, "--context"), (batch, "--batch"), (new_tokens, "--new-tokens")):
        if value <= 0:
            raise click.BadParameter(f"must be positive, got {value}", param_hint=name)
    if not torch.cuda.is_available():
        raise click.ClickException("the generation benchmark needs a CUDA device")
    budget = parse_budget(budget_text)
    model = random_model(shape, device="cuda", dtype=torch.bfloat16)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(0, vocab, (batch, context), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    configs: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="spotattn-bench-") as tmp:
        for name in names:
            if name == "spot":
                configs[name] = SpotConfig(checkpoint=str(_random_selector(model, Path(tmp))), budget=budget,
                                           key_format=key_format)
            else:
                configs[name] = make_config(name)
        rows = bench_generate(model, ids, configs, new_tokens, compile=compile_step,
                              log=lambda s: click.echo(s, err=True))
    header = (f"spotattn.generate, random {shape}, {torch.cuda.get_device_name()}, torch {torch.__version__}; spot "
              f"`{budget_text}`, {key_format} selector keys; {'compiled, ' if compile_step else ''}CUDA graph")
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate.json").write_text(json.dumps(dict(header=header, rows=rows), indent=1) + "\n")
    text = markdown(rows, header)
    (out / "generate.md").write_text(text)
    click.echo(text)
