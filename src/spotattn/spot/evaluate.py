"""Measuring a selector: attention recall and density under a budget, needle accuracy, decode agreement.

``python -m spotattn.spot.evaluate --model M --checkpoint C --tokens 8192`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

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


@torch.no_grad()
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
    Averaged over layers and queries; one backbone forward for all settings."""
    selector, _ = load_selector(resolve_checkpoint(checkpoint), model=model, device=input_ids.device)
    cfg = selector.config
    bs = cfg.block_size
    capture = Capture(bs, cfg.num_groups, 256, torch.float32)
    with Backbone(model, capture, cfg.layer_ids) as backbone:
        backbone.run(input_ids)
    length = input_ids.shape[1]
    pos = torch.arange(length, device=input_ids.device)
    qpos = pos[-last:]
    rows = qpos // bs
    acc: dict[str, dict[str, list[float]]] = {
        n: {"recall": [], "oracle_recall_same_density": [], "density": [], "oracle_density_same_budget": []}
        for n in settings
    }
    for idx in cfg.layer_ids:
        layer = selector.layer(idx)
        hidden = capture.hidden[idx]
        raw_keys = layer.keys(hidden, pos)
        q, w = layer.queries(hidden[:, -last:], qpos)
        teacher = capture.teacher[idx][:, :, -last:].float()
        nb = teacher.shape[-1]
        order = teacher.argsort(-1, descending=True)
        for name, (budget, fmt, temperature) in settings.items():
            keys = dequantize(quantize(raw_keys, fmt), fmt)
            logp = block_log_probs(q, w, keys, qpos, bs)
            probs = torch.softmax(logp / temperature, dim=-1)
            keep = _keep_mask(select_blocks(probs, budget, bs, row_first_block=rows, row_last_block=rows), nb)
            ranks = torch.arange(nb, device=keep.device)
            top = torch.zeros_like(keep).scatter(-1, order, ranks < keep.sum(-1, keepdim=True))
            exact = _keep_mask(select_blocks(teacher, budget, bs, row_first_block=rows, row_last_block=rows), nb)
            a = acc[name]
            a["recall"].append(float(((teacher * keep).sum(-1) / teacher.sum(-1)).mean()))
            a["oracle_recall_same_density"].append(float(((teacher * top).sum(-1) / teacher.sum(-1)).mean()))
            avail = (qpos + 1).float()
            a["density"].append(float(((keep.float() * bs).sum(-1).clamp(max=avail) / avail).mean()))
            a["oracle_density_same_budget"].append(
                float(((exact.float() * bs).sum(-1).clamp(max=avail) / avail).mean())
            )
    out = {}
    for name, a in acc.items():
        out[name] = {k: sum(v) / len(v) for k, v in a.items()}
        out[name]["min_layer_recall"] = min(a["recall"])
        out[name]["recall_layers"] = [round(v, 4) for v in a["recall"]]
        out[name]["oracle_recall_layers"] = [round(v, 4) for v in a["oracle_recall_same_density"]]
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
