"""Measuring a selector: attention recall and density under a budget, needle accuracy, decode agreement.

``python -m spotattn.spot.evaluate --model M --checkpoint C --tokens 8192`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import torch

from ..integration import cache_kwargs, density, output_cache, reset_density, sparsify, unsparsify
from ..methods import MethodConfig, OracleConfig
from ..methods.spot import SpotConfig, resolve_checkpoint
from ..selection import select_blocks
from ..types import Budget, DualTopP
from .checkpoint import load_selector
from .quant import dequantize, quantize
from .selector import block_log_probs
from .train import Backbone, Capture


def _keep_mask(sel, nb: int) -> torch.Tensor:
    keep = torch.zeros(*sel.block_ids.shape[:3], nb + 1, dtype=torch.bool, device=sel.block_ids.device)
    keep.scatter_(-1, sel.block_ids.long() % (nb + 1), True)  # padding (-1) lands in the extra column
    return keep[..., :nb]


@dataclass
class LayerView:
    """One layer's last queries: the head-averaged attention over key blocks (the teacher), the selector's
    query-side inputs and its raw keys for every position."""

    teacher: torch.Tensor  # (B, groups, queries, blocks)
    queries: tuple[torch.Tensor, torch.Tensor]  # the selector layer's (q, w) for the last queries
    keys: torch.Tensor  # raw selector keys of every position, before quantisation
    qpos: torch.Tensor  # positions of the last queries


@torch.no_grad()
def layer_views(model, input_ids: torch.Tensor, checkpoint: str | None, last: int = 64) -> tuple[list[LayerView], int]:
    """One backbone forward over ``input_ids``: a view of each selector layer's last ``last`` queries, and the
    selector's block size."""
    selector, _ = load_selector(resolve_checkpoint(checkpoint), model=model, device=input_ids.device)
    cfg = selector.config
    capture = Capture(cfg.block_size, cfg.num_groups, 256, torch.float32)
    with Backbone(model, capture, cfg.layer_ids) as backbone:
        backbone.run(input_ids)
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    qpos = pos[-last:]
    views = []
    for idx in cfg.layer_ids:
        layer, hidden = selector.layer(idx), capture.hidden[idx]
        views.append(LayerView(capture.teacher[idx][:, :, -last:].float(), layer.queries(hidden[:, -last:], qpos),
                               layer.keys(hidden, pos), qpos))
    return views, cfg.block_size


def selector_log_probs(view: LayerView, key_format: str, block_size: int) -> torch.Tensor:
    """The selector's block log-probabilities for the view's queries, its keys stored in ``key_format``."""
    keys = dequantize(quantize(view.keys, key_format), key_format)
    return block_log_probs(*view.queries, keys, view.qpos, block_size)


def budget_stats(
    view: LayerView, logp: torch.Tensor, budget: Budget, temperature: float, block_size: int
) -> dict[str, float]:
    """Recall, density, the exact top blocks' recall at the same count, and the density the exact attention
    needs under ``budget``, for one layer's queries (means over them)."""
    teacher, qpos = view.teacher, view.qpos
    rows, nb = qpos // block_size, teacher.shape[-1]
    probs = torch.softmax(logp / temperature, dim=-1)
    keep = _keep_mask(select_blocks(probs, budget, block_size, row_first_block=rows, row_last_block=rows), nb)
    order = teacher.argsort(-1, descending=True)
    ranks = torch.arange(nb, device=keep.device)
    top = torch.zeros_like(keep).scatter(-1, order, ranks < keep.sum(-1, keepdim=True))
    exact = _keep_mask(select_blocks(teacher, budget, block_size, row_first_block=rows, row_last_block=rows), nb)
    mass = teacher.sum(-1)
    avail = (qpos + 1).float()
    return {
        "recall": float(((teacher * keep).sum(-1) / mass).mean()),
        "oracle_recall_same_density": float(((teacher * top).sum(-1) / mass).mean()),
        "density": float(((keep.float() * block_size).sum(-1).clamp(max=avail) / avail).mean()),
        "oracle_density_same_budget": float(((exact.float() * block_size).sum(-1).clamp(max=avail) / avail).mean()),
    }


def attention_recall(
    model,
    input_ids: torch.Tensor,
    checkpoint: str | None,
    settings: dict[str, tuple[Budget, str, float]],
    last: int = 64,
) -> dict[str, dict[str, float]]:
    """For the last ``last`` queries of ``input_ids`` and each setting ``name -> (budget, key_format,
    temperature)``: the share of the layer's head-averaged attention inside the blocks spot selects
    (recall), the density read, the recall of the exact top blocks at the same block count (oracle at
    equal density), and the density the exact attention itself needs under the same budget rule.
    Averaged over layers and queries, with per-layer lists; one backbone forward for all settings."""
    views, bs = layer_views(model, input_ids, checkpoint, last)
    per_layer: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    with torch.no_grad():
        for view in views:
            logps = {fmt: selector_log_probs(view, fmt, bs) for fmt in {fmt for _, fmt, _ in settings.values()}}
            for name, (budget, fmt, temperature) in settings.items():
                per_layer[name].append(budget_stats(view, logps[fmt], budget, temperature, bs))
    out = {}
    for name, layers in per_layer.items():
        out[name] = {k: sum(layer[k] for layer in layers) / len(layers) for k in layers[0]}
        out[name]["min_layer_recall"] = min(layer["recall"] for layer in layers)
        out[name]["recall_layers"] = [round(layer["recall"], 4) for layer in layers]
        out[name]["oracle_recall_layers"] = [round(layer["oracle_recall_same_density"], 4) for layer in layers]
    return out


@torch.no_grad()
def forced_decode_logits(model, input_ids: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """Logits of each continuation token's step, teacher-forced: ``(T, vocab)``."""
    out = model(input_ids=input_ids, use_cache=True)
    cache, logits = output_cache(out), [out.logits[:, -1]]
    for t in range(continuation.shape[1] - 1):
        out = model(input_ids=continuation[:, t : t + 1], **cache_kwargs(cache), use_cache=True)
        cache = output_cache(out)
        logits.append(out.logits[:, -1])
    return torch.cat(logits).float()


def needle_eval(
    model,
    tokenizer,
    configs: dict[str, MethodConfig | None],
    lengths: list[int],
    depths: list[float],
    max_new_tokens: int = 24,
) -> dict:
    """Needle accuracy, decode density, and next-token KL / top-1 agreement with dense per method."""
    from ..tasks import build_needle_prompt

    results: dict[str, dict] = {
        name: {"correct": 0, "total": 0, "decode_density": [], "kl": [], "top1": []} for name in configs
    }
    for length in lengths:
        for depth in depths:
            prompt = build_needle_prompt(tokenizer, length, depth)
            ids = prompt.input_ids.to(model.device)
            with torch.no_grad():
                dense_out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
            cont = dense_out[:, ids.shape[1] :]
            dense_logits = forced_decode_logits(model, ids, cont)
            for name, config in configs.items():
                r = results[name]
                if config is None:
                    text = tokenizer.decode(cont[0], skip_special_tokens=True)
                    r["correct"] += prompt.is_correct(text)
                    r["total"] += 1
                    continue
                sparsify(model, config)
                try:
                    with torch.no_grad():
                        out = model.generate(
                            ids,
                            attention_mask=torch.ones_like(ids),
                            max_new_tokens=max_new_tokens,
                            do_sample=False,
                            temperature=None,
                            top_p=None,
                            top_k=None,
                        )
                    r["decode_density"].append(density(model, "decode").mean)
                    reset_density(model)
                    logits = forced_decode_logits(model, ids, cont)
                finally:
                    unsparsify(model)
                text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
                r["correct"] += prompt.is_correct(text)
                r["total"] += 1
                logp_d, logp_s = dense_logits.log_softmax(-1), logits.log_softmax(-1)
                r["kl"].append(float((logp_d.exp() * (logp_d - logp_s)).sum(-1).mean()))
                r["top1"].append(float((dense_logits.argmax(-1) == logits.argmax(-1)).float().mean()))
    summary = {}
    for name, r in results.items():
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        summary[name] = {
            "accuracy": r["correct"] / max(1, r["total"]),
            "n": r["total"],
            "decode_density": mean(r["decode_density"]),
            "next_token_kl": mean(r["kl"]),
            "top1_agreement": mean(r["top1"]),
        }
    return summary


def main() -> None:
    import click  # noqa: PLC0415 (the budget syntax's errors)

    from ..cli import parse_budget  # noqa: PLC0415
    from ..models import load_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--p", type=float, default=0.9)
    parser.add_argument(
        "--min-tokens", type=int, default=DualTopP().min_tokens,
        help="DualTopP floor (tokens) for the needle test and the --sweep-p settings",
    )
    parser.add_argument(
        "--temperature", type=float, default=None,
        help="spot's temperature in the needle test (default: the selector's recommended one, as SpotConfig)",
    )
    parser.add_argument("--sweep-p", type=float, nargs="+", default=[0.9])
    parser.add_argument(
        "--budgets", nargs="+", default=[],
        help="more recall settings as budgets (topk:TOKENS, topp:P, dual_topp:P[,sink=N,...]), each at every "
        "--temperatures and --formats",
    )
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    parser.add_argument("--formats", nargs="+", default=["bf16", "int4"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-needle", action="store_true")
    args = parser.parse_args()
    budgets: dict[str, Budget] = {}
    for text in args.budgets:
        try:
            budgets[text] = parse_budget(text)
        except click.BadParameter as exc:
            parser.error(f"--budgets {text!r}: {exc.message}")
    model, tok = load_model(args.model, device=args.device)
    budget = DualTopP(p=args.p, min_tokens=args.min_tokens)
    report: dict = {"budget": str(budget), "tokens": args.tokens}
    start = time.time()
    from ..tasks import build_needle_prompt

    ids = build_needle_prompt(tok, max(args.tokens), 0.5).input_ids.to(model.device)
    settings = {
        f"{fmt} p={p} T={t}": (DualTopP(p=p, min_tokens=args.min_tokens), fmt, t)
        for fmt in args.formats
        for p in args.sweep_p
        for t in args.temperatures
    }
    settings |= {f"{fmt} {text} T={t}": (b, fmt, t) for fmt in args.formats for text, b in budgets.items()
                 for t in args.temperatures}
    report["recall"] = attention_recall(model, ids, args.checkpoint, settings)
    print(json.dumps(report), file=sys.stderr, flush=True)  # progress; stdout gets one JSON object
    if not args.skip_needle:
        configs: dict[str, MethodConfig | None] = {
            "dense": None,
            "oracle": OracleConfig(budget=budget, block_size=16, granularity="shared", sparse_prefill=False),
        }
        for fmt in args.formats:
            configs[f"spot-{fmt}"] = SpotConfig(
                checkpoint=args.checkpoint, budget=budget, key_format=fmt, temperature=args.temperature
            )
        report["needle"] = needle_eval(model, tok, configs, args.tokens, args.depths)
    report["seconds"] = round(time.time() - start, 1)
    print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
