"""``spotattn eval``: the evaluation runner on the command line."""

from __future__ import annotations

from pathlib import Path

import click

from ..tasks import TASKS
from .runner import EvalArgumentError

METHODS_HELP = (
    "Method specs NAME[:KEY=VALUE,...], separated by ';' or ','. Budget keys: topp=P, topk=TOKENS, "
    "dual_topp=P (with sink=, recent=, min_tokens=, max_tokens=); other keys are config fields, e.g. "
    "block_size=64, sparse_prefill=false. Example: 'dense;oracle:topp=0.9,block_size=64;oracle:topk=1024'."
)


@click.command()
@click.option("--model", "model_name", default="smollm2-135m", show_default=True,
              help="HF id or folder, a .gguf file, or smollm2-135m (offline).")
@click.option("--methods", default="dense;oracle:topp=0.9", show_default=True, help=METHODS_HELP)
@click.option("--tasks", default="all", show_default=True,
              help=f"Comma-separated: {', '.join(TASKS)}, or all.")
@click.option("--lengths", default="2k", show_default=True,
              help="Comma-separated total lengths (prompt + answer budget), e.g. 2k,4k,8k (k = 1024).")
@click.option("--samples", type=int, default=3, show_default=True, help="Samples per task and length.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/eval"),
              show_default=True, help="Folder for results.jsonl (appended; reruns resume) and report/.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="float32, bfloat16, float16 or auto.")
@click.option("--allow-beyond-window", is_flag=True, help="Allow lengths beyond the model's context window.")
@click.option("--recall/--no-recall", default=True, show_default=True,
              help="Measure attention recall (costs an exact attention pass per sparse call).")
@click.option("--engine", type=click.Choice(["auto", "static", "hf"]), default="auto", show_default=True,
              help="How generation tasks decode: static (spotattn.generate: static cache, a CUDA graph per "
              "token; no decode recall), hf (Hugging Face generate), auto (static for methods with a static "
              "decoder when --no-recall, else hf).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--time-limit", type=float, default=None,
              help="Stop starting new samples after this many seconds.")
@click.option("--report-only", is_flag=True, help="Only rebuild the report from OUT/results.jsonl.")
@click.option("--report/--no-report", default=True, show_default=True,
              help="Write OUT/report/ at the end (--report-only rebuilds it later).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes, each running a share of the methods with its own copy of the model, all "
              "appending to OUT/results.jsonl (logs in OUT/jobs/). Keeps a GPU busy with a small model.")
def eval_command(model_name, methods, tasks, lengths, samples, out, seed, device, dtype, allow_beyond_window,
                 recall, engine, progress, time_limit, report_only, report, jobs) -> None:
    """Long-context tasks under sparse methods against dense: accuracy, fidelity, density, recall."""
    from .report import write_report

    if report_only:
        path = write_report(out, out / "report")
        click.echo(f"report: {path}")
        return
    if jobs > 1:
        _run_jobs(jobs, model_name, methods, tasks, lengths, samples, out, seed, device, dtype,
                  allow_beyond_window, recall, engine, progress, time_limit)
        if report:
            click.echo(f"report: {write_report(out, out / 'report')}")
        return
    from .runner import evaluate

    try:
        result = evaluate(
            model_name, methods=methods, tasks=tasks, lengths=lengths, samples=samples, out=out, seed=seed,
            device=device, dtype=dtype, allow_beyond_window=allow_beyond_window, recall=recall,
            progress=progress, time_limit=time_limit, engine=engine, report=report,
        )
    except EvalArgumentError as exc:
        raise click.BadParameter(exc.detail, param_hint=exc.param) from exc
    click.echo(f"{result.computed} items computed, {result.skipped} already in {result.path}")
    if report:
        click.echo(f"report: {out / 'report' / 'report.md'}")


def _run_jobs(jobs, model_name, methods, tasks, lengths, samples, out, seed, device, dtype, allow_beyond_window,
              recall, engine, progress, time_limit) -> None:
    """``--jobs N``: the arguments checked here, then this same command per share of the methods."""
    from .jobs import run_workers, split_methods
    from .runner import (
        RESULTS_FILE,
        check_engine,
        check_results_file,
        check_samples,
        parse_lengths,
        parse_methods,
        parse_tasks,
    )

    try:
        check_samples(samples)
        task_list, length_list = parse_tasks(tasks), parse_lengths(lengths)
        specs = parse_methods(methods)
        check_engine(engine, specs, recall)
        check_results_file(out / RESULTS_FILE, model_name, specs)
    except EvalArgumentError as exc:
        raise click.BadParameter(exc.detail, param_hint=exc.param) from exc
    shared = ["--model", model_name, "--tasks", tasks, "--lengths", lengths, "--samples", str(samples),
              "--out", str(out), "--seed", str(seed), "--device", device, "--dtype", dtype, "--engine", engine,
              "--recall" if recall else "--no-recall", "--no-progress", "--no-report", "--jobs", "1"]
    shared += ["--allow-beyond-window"] if allow_beyond_window else []
    shared += ["--time-limit", str(time_limit)] if time_limit is not None else []
    groups = split_methods([s.label for s in specs], jobs)
    total = len(specs) * len(task_list) * len(length_list) * samples
    try:
        run_workers(groups, lambda group: ["eval", "--methods", ";".join(group), *shared], out, total,
                    echo=click.echo, progress=progress)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
