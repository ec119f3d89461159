"""``spotattn demo``: a needle in a haystack on the real SmolLM2, dense against a sparse method."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .integration import density, sparsify, unsparsify
from .methods import MethodConfig, OracleConfig
from .methods.spot import SpotConfig
from .models import SMOLLM2_ALIAS, load_model
from .tasks import build_needle_prompt
from .types import TopP

# At 4K tokens this budget reads under 30% in prefill and about 11% in decode, and still finds the needle.
DEFAULT_DEMO_CONFIG = OracleConfig(budget=TopP(0.8), block_size=64)


def answer(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int = 24) -> tuple[str, float]:
    """Greedy answer and the wall time of the whole generate call."""
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None)
    if input_ids.is_cuda:
        torch.cuda.synchronize()
    text = tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True).strip().split("\n\n")[0]
    return text, time.perf_counter() - start


def run_demo(
    *,
    tokens: int = 4096,
    depth: float = 0.5,
    device: str = "auto",
    config: MethodConfig | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run the demo: dense, then each sparse method (``config``, or the oracle and the shipped spot
    selector). Returns what it printed as a dict keyed by method."""
    configs = [config] if config is not None else [DEFAULT_DEMO_CONFIG, SpotConfig()]
    echo(f"Loading {SMOLLM2_ALIAS} ...")
    model, tokenizer = load_model(SMOLLM2_ALIAS, device=device)
    prompt = build_needle_prompt(tokenizer, tokens, depth)
    input_ids = prompt.input_ids.to(model.device)
    echo(f"Needle in a haystack: {input_ids.shape[1]} tokens of Paul Graham essays on {model.device}, "
         f"needle at depth {depth:.0%}.")
    echo(f"Question: {prompt.question}\n")

    text, seconds = answer(model, tokenizer, input_ids)
    results = {"dense": {"answer": text, "correct": prompt.is_correct(text), "seconds": seconds}}
    echo(f"{'dense':6s} ({seconds:5.1f} s) [{'correct' if results['dense']['correct'] else 'wrong'}]: {text}")
    densities = {}
    for method_config in configs:
        sparsify(model, method_config)
        try:
            text, seconds = answer(model, tokenizer, input_ids)
            densities[method_config.method] = (density(model, "prefill"), density(model, "decode"))
        finally:
            unsparsify(model)
        prefill, decode = densities[method_config.method]
        ok = prompt.is_correct(text)
        results[method_config.method] = {
            "answer": text, "correct": ok, "seconds": seconds, "prefill_density": prefill.mean,
            "decode_density": decode.mean, "config": method_config.to_dict(),
        }
        echo(f"{method_config.method:6s} ({seconds:5.1f} s) [{'correct' if ok else 'wrong'}]: {text}")
    for name, (prefill, decode) in densities.items():
        echo(f"\n{name} read {prefill.mean:.1%} of the causal attention in prefill and {decode.mean:.1%} in decode.")
        if prefill.mean < 1.0:
            echo("Prefill density per layer (%):")
            echo(prefill.compact())
        echo("Decode density per layer (%):")
        echo(decode.compact())
    if model.device.type == "cpu":
        echo("\n(On CPU, sparse attention runs the PyTorch reference path: it shows what is read, not speed.)")
    return results
