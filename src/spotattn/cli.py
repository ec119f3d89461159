"""The ``spotattn`` command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from .bench.attend import attend_command
from .bench.decode import decode_command
from .bench.generate import generate_command
from .bench.kernels import kernels_command, select_command
from .bench.train import train_command as bench_train_command
from .eval.cli import eval_command
from .methods import available_methods, make_config
from .spot.cli import calibrate_command, train_command
from .types import BUDGET_TYPES, DualTopP, TopK, TopP


def parse_budget(text: str):
    """``topk:1024``, ``topp:0.9`` or ``dual_topp:0.9[,sink=128,recent=256,min_tokens=512,max_tokens=4096]``."""
    rule, _, rest = text.partition(":")
    if rule not in BUDGET_TYPES or not rest:
        raise click.BadParameter(
            f"{text!r}; expected topk:TOKENS, topp:P or dual_topp:P[,sink=N,recent=N,min_tokens=N,max_tokens=N]",
            param_hint="--budget",
        )
    head, *options = rest.split(",")
    try:
        if rule == "topk":
            return TopK(int(head))
        if rule == "topp":
            return TopP(float(head))
        kwargs = {}
        for option in options:
            key, _, value = option.partition("=")
            kwargs[key.strip()] = int(value)
        return DualTopP(float(head), **kwargs)
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(str(exc), param_hint="--budget") from exc


def parse_options(pairs: tuple[str, ...]) -> dict:
    """``key=value`` pairs; values parse as JSON when they can (numbers, true/false), else strings."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--set")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def build_config(method: str, budget: str | None, block_size: int | None, pairs: tuple[str, ...]):
    options = parse_options(pairs)
    if budget is not None:
        options["budget"] = parse_budget(budget)
    if block_size is not None:
        options["block_size"] = block_size
    try:
        return make_config(method, **options)
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(str(exc), param_hint="--method/--set") from exc


def method_options(fn=None, *, method_default: str | None = "dense", method_help: str = ""):
    """The method options of ``generate`` and ``demo`` (the demo's default is its own comparison)."""
    if fn is None:
        return lambda f: method_options(f, method_default=method_default, method_help=method_help)
    fn = click.option("--set", "pairs", multiple=True, metavar="KEY=VALUE", help="Other method options.")(fn)
    fn = click.option("--block-size", type=int, default=None, help="Key block size (16..256, power of two).")(fn)
    budgets = "topk:TOKENS | topp:P | dual_topp:P[,sink=..,recent=..,min_tokens=..,max_tokens=..]."
    fn = click.option("--budget", default=None, help=budgets)(fn)
    fn = click.option(
        "--method",
        default=method_default,
        show_default=method_default is not None,
        help=f"One of: {', '.join(available_methods())}.{method_help}",
    )(fn)
    return fn


@click.group()
@click.version_option(package_name="spotattn")
def main() -> None:
    """spotattn: plug-in sparse attention for Hugging Face long-context models."""


@main.command()
@click.option("--model", "model_name", default="smollm2-135m", show_default=True,
              help="HF id or folder, a .gguf file, smollm2-135m (offline) or random:<shape>.")
@method_options
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--sample/--greedy", default=False, show_default=True)
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chat/--no-chat", default=True, show_default=True, help="Wrap the prompt in the chat template.")
@click.option("--device", default="auto", show_default=True)
@click.option("--engine", type=click.Choice(["auto", "static", "hf"]), default="auto", show_default=True,
              help="static: spotattn.generate (static cache, one CUDA-graph replay per token on a GPU); hf: "
              "Hugging Face generate() on the ordinary path; auto: static where the method has a static "
              "decode path, else hf.")
@click.option("--compile/--no-compile", "compile_step", default=False, show_default=True,
              help="static engine: compile the decode step with torch.compile first.")
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="static engine: print the text as the tokens arrive (tokens/s then include the printing).")
def generate(model_name, method, budget, block_size, pairs, prompt, prompt_file, max_new_tokens, sample,
             temperature, seed, chat, device, engine, compile_step, stream) -> None:
    """Generate a continuation with a sparse-attention method and report the density it read."""
    from . import density, sparsify
    from .models import load_model
    from .runtime.decode_path import static_decoder_names

    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give exactly one of --prompt or --prompt-file")
    if max_new_tokens <= 0:
        raise click.BadParameter("must be positive", param_hint="--max-new-tokens")
    config = build_config(method, budget, block_size, pairs)
    has_static = config.method in static_decoder_names()
    if engine == "static" and not has_static:
        raise click.BadParameter(f"method {config.method!r} has no static decode path (methods with one: "
                                 f"{', '.join(static_decoder_names())}); use --engine hf", param_hint="--engine")
    use_static = has_static and engine != "hf"
    if compile_step and not use_static:
        raise click.BadParameter("--compile needs the static engine", param_hint="--compile")
    text = prompt if prompt is not None else prompt_file.read_text(encoding="utf-8")
    model, tokenizer = load_model(model_name, device=device)
    if tokenizer is None:
        raise click.UsageError(f"{model_name} has no tokenizer; generate needs a real model")
    input_ids = encode_prompt(tokenizer, text, chat).to(model.device)
    sparsify(model, config)
    torch.manual_seed(seed)
    start = time.perf_counter()
    if use_static:
        from .runtime import generate as static_generate
        from .runtime.generate import end_ids

        gen = torch.Generator(device=model.device).manual_seed(seed)
        printer = TextStream(tokenizer) if stream else None
        out = static_generate(model, input_ids, max_new_tokens=max_new_tokens, eos_token_id=end_ids(model, tokenizer),
                              do_sample=sample, temperature=temperature, generator=gen, compile=compile_step,
                              on_token=printer)
        tokens = out.sequences[0, input_ids.shape[1]:]
        timing = (f"{out.engine} engine: prefill {out.prefill_seconds:.2f} s, set-up {out.setup_seconds:.2f} s, "
                  f"decode {out.new_tokens} tokens at {out.tokens_per_second:.1f} tokens/s")
    else:
        printer = None
        with torch.no_grad():
            hf = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                                do_sample=sample, temperature=temperature if sample else None, top_p=None, top_k=None)
        tokens = hf[0, input_ids.shape[1]:]
        timing = f"hf engine: {time.perf_counter() - start:.2f} s for {len(tokens)} tokens"
    if printer is not None:
        printer.finish()
    else:
        click.echo(tokenizer.decode(tokens, skip_special_tokens=True))
    report = density(model)
    click.echo(f"\n[{config.method}] {input_ids.shape[1]} prompt tokens, {timing}, density prefill "
               f"{density(model, 'prefill').mean:.1%}, decode {density(model, 'decode').mean:.1%}", err=True)
    click.echo(report.compact(), err=True)


class TextStream:
    """Prints one sequence's text as its tokens arrive (an ``on_token`` callback of ``spotattn.generate``).

    Each call decodes the whole continuation and prints what is new up to its last whitespace: a word's
    text can still change with its next token (merged pieces, an incomplete UTF-8 character), so the rest
    waits for a later call or :meth:`finish`.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0

    def __call__(self, token: torch.Tensor) -> None:
        self.ids.append(int(token[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = max(text.rfind(" "), text.rfind("\n")) + 1
        if cut > self.shown:
            click.echo(text[self.shown : cut], nl=False)
            self.shown = cut

    def finish(self) -> None:
        click.echo(self.tokenizer.decode(self.ids, skip_special_tokens=True)[self.shown :])


def encode_prompt(tokenizer, text: str, chat: bool) -> torch.Tensor:
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return torch.tensor([list(ids)])
    return tokenizer(text, return_tensors="pt")["input_ids"]


@main.command()
@click.option("--tokens", type=int, default=4096, show_default=True, help="Prompt length.")
@click.option("--depth", type=float, default=0.5, show_default=True, help="Needle depth in [0, 1].")
@click.option("--device", default="auto", show_default=True)
@method_options(method_default=None, method_help=" Default: dense, the oracle and spot side by side.")
def demo(tokens, depth, device, method, budget, block_size, pairs) -> None:
    """Needle in a haystack on SmolLM2 (offline): dense, the oracle and spot side by side (or --method)."""
    from .demo import run_demo

    if method is None and budget is None and block_size is None and not pairs:
        config = None  # the demo default: the oracle and the shipped spot selector
    else:
        config = build_config(method or "dense", budget, block_size, pairs)
    run_demo(tokens=tokens, depth=depth, device=device, config=config, echo=click.echo)


@main.group()
def bench() -> None:
    """Speed benchmarks against dense attention, measured in one run."""


bench.add_command(kernels_command, name="kernels")
bench.add_command(decode_command, name="decode")
bench.add_command(select_command, name="select")
bench.add_command(attend_command, name="attend")
bench.add_command(generate_command, name="generate")
bench.add_command(bench_train_command, name="train")
main.add_command(eval_command, name="eval")
main.add_command(train_command, name="train")
main.add_command(calibrate_command, name="calibrate")


if __name__ == "__main__":
    main()
