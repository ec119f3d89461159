"""``spotattn train``: distil a SpotAttention selector from a frozen model; ``spotattn calibrate``: choose its
temperature for the length it will serve."""

from __future__ import annotations

import click


@click.command()
@click.option(
    "--model",
    "model_name",
    default="smollm2-135m",
    show_default=True,
    help="HF id or folder, a .gguf file, or smollm2-135m (offline).",
)
@click.option(
    "--data",
    default="bible",
    show_default=True,
    help="bible | essays (second half, disjoint from the needle haystack) | hf:NAME[:CONFIG] | "
    "a .txt file or folder; several separated by commas, each optionally SPEC@WEIGHT (relative weights: "
    "how often a training window comes from it; default: by size), e.g. bible@1,essays@1.",
)
@click.option(
    "--out", required=True, help="Checkpoint stem: writes OUT.safetensors, OUT.json, OUT.train.log."
)
@click.option("--seq-len", type=int, default=1024, show_default=True)
@click.option("--steps", type=int, default=300, show_default=True)
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--warmup", type=int, default=20, show_default=True)
@click.option("--clip", type=float, default=1.0, show_default=True, help="Gradient-norm clip.")
@click.option(
    "--heads", "num_heads", type=int, default=None, help="Selector heads H_I (default by model size)."
)
@click.option("--head-dim", type=int, default=None, help="Selector dims d_I (default by model size).")
@click.option(
    "--per-group/--shared",
    default=False,
    show_default=True,
    help="One distribution per kv-group instead of one shared by all heads.",
)
@click.option(
    "--rope-max-wavelength",
    type=float,
    default=None,
    help="Leave RoPE frequencies with a longer wavelength (tokens) unrotated; e.g. the --seq-len, so "
    "that no unseen angle appears at longer contexts (default: rotate all).",
)
@click.option(
    "--length-scaling/--no-length-scaling",
    default=False,
    show_default=True,
    help="Learn a per-layer gain g: scores x (1 + g log(position + 1)).",
)
@click.option(
    "--residual-kl/--full-kl",
    default=False,
    show_default=True,
    help="Train on the KL over the blocks dual top-p does not force (past its sink and recent tokens), "
    "renormalised there: the ranking its nucleus uses.",
)
@click.option(
    "--sparse-kl",
    "sparse_top",
    type=int,
    default=None,
    help="Sparse KL over the teacher's top N blocks plus a rest bucket (default: dense KL).",
)
@click.option(
    "--teacher-heads",
    type=click.Choice(["mean", "max"]),
    default="mean",
    show_default=True,
    help="How the teacher reduces over query heads: their mean attention per block, or per block the largest "
    "any head gives (renormalised), so that blocks one head reads sharply rank high.",
)
@click.option("--chunk", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Query chunk of teacher and loss: larger is faster (fewer, larger kernels) and takes more "
                   "GPU memory (Qwen3-8B at 16K on an H100: 8.3 s and 26 GB a step at 256, 3.9 s and 30 GB at 1024).")
@click.option("--eval-every", type=int, default=50, show_default=True)
@click.option("--save-every", type=int, default=100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-chars", type=int, default=None, help="Use at most this much text (of each --data source).")
@click.option("--device", default="auto", show_default=True)
@click.option("--time-limit", type=float, default=None, help="Stop (eval + save) after this many seconds.")
@click.option("--name", default=None, help="Base-model name to record (default: --model).")
@click.option("--resume", is_flag=True, help="Continue from OUT's saved state.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs still print at each eval).")
def train_command(
    model_name,
    data,
    out,
    seq_len,
    steps,
    batch_size,
    lr,
    warmup,
    clip,
    num_heads,
    head_dim,
    per_group,
    rope_max_wavelength,
    length_scaling,
    residual_kl,
    sparse_top,
    teacher_heads,
    chunk,
    eval_every,
    save_every,
    seed,
    max_chars,
    device,
    time_limit,
    name,
    resume,
    no_progress,
) -> None:
    """Distil a selector: frozen backbone, KL(attention || selector) over 16-token key blocks."""
    from .train import TrainConfig, train

    cfg = TrainConfig(
        model=model_name,
        data=data,
        out=out,
        seq_len=seq_len,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        clip=clip,
        num_heads=num_heads,
        head_dim=head_dim,
        per_group=per_group,
        rope_max_wavelength=rope_max_wavelength,
        length_scaling=length_scaling,
        residual_kl=residual_kl,
        sparse_top=sparse_top,
        teacher_heads=teacher_heads,
        chunk=chunk,
        eval_every=eval_every,
        save_every=save_every,
        seed=seed,
        max_chars=max_chars,
        device=device,
        time_limit=time_limit,
        name=name,
    )
    try:
        metrics = train(cfg, resume=resume, echo=click.echo, progress=not no_progress)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    click.echo(f"to serve longer than {seq_len} tokens, set its temperature: spotattn calibrate --model {model_name} "
               f"--checkpoint {out} --tokens LENGTH")


@click.command()
@click.option("--model", "model_name", default="smollm2-135m", show_default=True,
              help="The model the selector was trained on (HF id or folder, a .gguf file, or smollm2-135m).")
@click.option("--checkpoint", required=True, help="Selector checkpoint (stem or either file) whose JSON gets the T.")
@click.option("--tokens", type=click.IntRange(min=64), default=8192, show_default=True,
              help="Length of the calibration text: the context length you will serve.")
@click.option("--data", default="essays", show_default=True,
              help="Calibration text, as spotattn train's --data (one source); its first --tokens tokens are read. "
              "Use text the selector did not train on: it is sharper on its own training text.")
@click.option("--budget", "budget_text", default="dual_topp:0.9", show_default=True,
              help="The budget to calibrate: topp:P or dual_topp:P[,sink=N,recent=N,min_tokens=N,max_tokens=N].")
@click.option("--density", type=float, default=0.2, show_default=True,
              help="Share of the causal tokens the budget should read at the chosen temperature.")
@click.option("--queries", type=click.IntRange(min=1), default=64, show_default=True,
              help="Last queries of the text measured in every layer.")
@click.option("--key-format", type=click.Choice(["bf16", "int4", "mxfp4", "nvfp4"]), default="bf16",
              show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--write/--dry-run", default=True, show_default=True,
              help="Write inference.temperature into the checkpoint's JSON, or only print the result.")
def calibrate_command(model_name, checkpoint, tokens, data, budget_text, density, queries, key_format, device,
                      write) -> None:
    """Pick the selector temperature at which a budget reads a target density at the serving length."""
    from ..cli import parse_budget
    from ..methods.spot import resolve_checkpoint
    from .calibrate import calibrate, check_density, write_temperature
    from .checkpoint import SHIPPED_DIR, paths

    budget = parse_budget(budget_text)
    path = resolve_checkpoint(checkpoint)
    weights, meta_path = paths(path)
    if not (weights.exists() and meta_path.exists()):
        raise click.BadParameter(f"no selector checkpoint at {weights} and {meta_path}", param_hint="--checkpoint")
    if write and meta_path.resolve().parent == SHIPPED_DIR:
        raise click.BadParameter(
            "a shipped selector is part of the package: copy its two files elsewhere and calibrate the copy, "
            "or pass --dry-run", param_hint="--checkpoint")
    try:
        check_density(density)
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("--density "), param_hint="--density") from exc
    from ..models import load_model
    from .evaluate import layer_views
    from .train import load_text, parse_data

    try:
        if len(parse_data(data)) != 1:
            raise ValueError(f"{data!r}: give one source")
        text = load_text(data, max_chars=tokens * 12)  # enough characters for --tokens tokens in any language
    except (ValueError, FileNotFoundError) as exc:
        raise click.BadParameter(str(exc), param_hint="--data") from exc
    model, tokenizer = load_model(model_name, device=device)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens].to(model.device)
    if ids.shape[1] < tokens:
        raise click.BadParameter(f"{data!r} holds {ids.shape[1]} tokens, fewer than --tokens {tokens}",
                                 param_hint="--data")
    views, block_size = layer_views(model, ids, str(path), last=queries)
    try:
        best, tried = calibrate(views, budget, block_size, density, key_format=key_format)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{budget} over the last {queries} queries of {tokens} tokens of {data} ({key_format} keys):")
    click.echo("  T        density  recall  (exact top blocks at that density)")
    for p in tried:
        mark = "  <- chosen" if p is best else ""
        exact = p.oracle_recall_same_density
        click.echo(f"  {p.temperature:<8.4f} {p.density:7.3f}  {p.recall:6.3f}  ({exact:.3f}){mark}")
    if write:
        note = (f"calibrated by spotattn calibrate: {budget} reads {best.density:.1%} of {tokens} tokens of {data} "
                f"at recall {best.recall:.3f}")
        click.echo(f"wrote temperature {best.temperature:.4f} to {write_temperature(path, best, note)}")
