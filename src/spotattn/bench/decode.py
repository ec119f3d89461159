"""Whole-model decode step: plain Hugging Face against spotattn's static cache in a CUDA graph, dense and sparse.

``spotattn bench decode --out bench_out/decode`` (CUDA only). A random-weight model of a real shape
(default Qwen3-8B), caches filled with random K/V (and random selector keys) of each context length, then
per (batch, context), all in one process on the same model:

- ``hf``: plain Hugging Face, eager, ``DynamicCache``, SDPA (what users run today; the cache is cropped
  back after every step so that every step sees the same length);
- ``dense``: spotattn's own dense decode: ``StaticSparseCache``, the ``dense`` method, the paged Triton
  decode kernel over every block up to the current length, the whole step replayed from a CUDA graph;
- ``spot``: the ``spot`` method (random selector, ``--budget``, ``--key-format`` selector keys) in the
  same static cache and graph, selecting in the attention call; with ``--overlap`` the same step is also
  timed with its selection started on a side stream beside each layer's q/k/v projections
  (``StaticSparseCache.overlap_selection``: ``spot_overlap``);
- ``twilight`` (with ``--baselines`` naming it): the ``twilight`` method, defaults (first two layers dense),
  in the same static cache and graph;
- with ``--compile``, each of these whole-model steps again, compiled with ``torch.compile`` (inductor)
  before capture (``GraphDecoder(compile=True)``): ``<name>_compiled_ms``, ``<name>_compile_s`` (one
  compile per variant and row), ``<name>_compiled_vs_eager_max_abs`` (against the plain eager step);
- one layer's step (layer 0's shapes) timed alone from CUDA graphs: dense SDPA decode on exact-length
  K/V, our dense kernel, spot's selection (selector projections, key write, fused scoring, selection),
  sparse attention, and selection + attention;
- one layer's step inside a model (``*_seq_ms``): dense SDPA, our dense kernel, spot's and Twilight's
  whole step for layers 0-7 back to back in one CUDA graph, divided by the layers. A single replay's
  time includes the graph's own launch latency, which a layer inside a model does not pay; distinct
  layers keep L2 from serving a step's K/V or selector keys from the previous step;
- the training-free baselines on the same layer (``--baselines``, both by default), with the methods'
  default settings and their sync-free path (``spotattn.runtime.quest_twilight``), also from CUDA graphs:
  Twilight's selection (metadata write for the new token, Quest bounds of every page, top 8192 candidate
  tokens, 4-bit estimate over the candidates, top-p 0.85), its sparse attention and both; Quest's
  selection (metadata write, bounds, top 4096 tokens). Random keys make attention nearly uniform, so
  Twilight's top-p keeps most of its candidates: its tokens read are reported beside the candidate budget.

Every figure is a median of CUDA-event timings. Floors are bytes that must be read over ``--bandwidth``
(measured device-to-device copy rate): weights plus the K/V read (dense: all of it; spot: the selected
blocks plus every cached selector key). Output: ``decode.json`` and ``decode.md`` under ``--out``.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch

TB = 1e12


def _median_ms(fn: Callable[[], object], iters: int, before: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(iters):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """Warm ``fn`` up on a side stream, then capture it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


SEQUENCE_LAYERS = 8


def _per_layer_in_sequence_ms(step: Callable[[int], object], layers: int, iters: int) -> float:
    """One layer's step as a model runs it: layers ``0 .. n-1`` back to back in one CUDA graph, divided by
    ``n``. Unlike one replay per step, this leaves out the graph's own launch latency, and every layer reads
    its own K/V and selector keys (no L2 reuse between steps, as in a real model)."""
    n = min(SEQUENCE_LAYERS, layers)

    def all_layers() -> None:
        for i in range(n):
            step(i)

    return _median_ms(_graph(all_layers).replay, iters) / n


def _random_selector(model, directory: Path) -> Path:
    from ..spot import Selector, config_for_model, save_selector
    from ..spot.checkpoint import fingerprint

    selector = Selector(config_for_model(model.config))  # random projections: speed only, never accuracy
    path = directory / "selector"
    save_selector(path, selector, base_model="random", model_fingerprint=fingerprint(model))
    return path


def _hf_step(model, batch: int, ctx: int, iters: int, dtype: torch.dtype) -> float:
    from transformers import DynamicCache

    from ..integration import cache_kwargs

    text = model.config.get_text_config(decoder=True)
    dev = model.device
    cache = DynamicCache()
    shape = (batch, text.num_key_value_heads, ctx, text.head_dim)
    for i in range(text.num_hidden_layers):
        cache.update(torch.randn(shape, device=dev, dtype=dtype), torch.randn(shape, device=dev, dtype=dtype), i)
    token = torch.randint(0, text.vocab_size, (batch, 1), device=dev)

    def step() -> None:
        model(token, **cache_kwargs(cache), use_cache=True)

    with torch.no_grad():
        for _ in range(2):
            step()
            cache.crop(ctx)
        return _median_ms(step, iters, before=lambda: cache.crop(ctx))


def _fill_static(cache, ctx: int) -> None:
    for layer in cache.layers:
        layer.keys[:, :, :ctx].normal_()
        layer.values[:, :, :ctx].normal_()
    cache.set_length(ctx)


def _fill_selector_keys(cache, ctx: int, key_format: str, dim: int) -> None:
    from ..spot.quant import KeyCache, quantize

    for i, layer in enumerate(cache.layers):
        b = layer.keys.shape[0]
        parts = quantize(torch.randn(b, cache.capacity, dim, device=layer.keys.device), key_format)
        for name, part in parts.items():
            part[:, ctx:].zero_()
            layer.meta.pop(f"{KeyCache.PREFIX}.{name}", None)
            entry = cache.allocate_meta(i, f"{KeyCache.PREFIX}.{name}", part, tokens_per_entry=1, axis=1)
            entry.tensor.copy_(part)


def _whole_model(decoder, cache, ctx: int, iters: int) -> tuple[float, float]:
    """(median ms of a graph replay, max |graph - eager| logits at the same position)."""
    text = decoder.model.config.get_text_config(decoder=True)
    batch = cache.layers[0].keys.shape[0]
    token = torch.randint(0, text.vocab_size, (batch,), device=cache.layers[0].keys.device)
    cache.set_length(ctx)
    eager = decoder.step_eager(token).float().clone()
    cache.set_length(ctx)
    decoder.capture()
    cache.set_length(ctx)
    replay = decoder.step(token).float().clone()
    err = float((replay - eager).abs().max())
    cache.set_length(ctx)
    ms = _median_ms(lambda: decoder.step(token), iters, before=lambda: cache.set_length(ctx))
    return ms, err


def _layer_figures(model, cache, ctx: int, batch: int, iters: int, spot: bool, profile_to: Path | None = None) -> dict:
    """One layer's decode step (layer 0), each part captured in a CUDA graph."""
    import torch.nn.functional as F

    from ..runtime.decode_path import DENSE_BLOCK_SIZE, _attend

    text = model.config.get_text_config(decoder=True)
    dev, dtype = model.device, model.dtype
    hq, hkv, d = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    q = torch.randn(batch, hq, 1, d, device=dev, dtype=dtype)
    scale = d**-0.5
    out: dict = {}
    seq_len = torch.tensor(ctx + 1, device=dev)
    if spot:
        return _spot_layer(model, cache, q, seq_len, scale, iters, profile_to)
    k = torch.randn(batch, hkv, ctx + 1, d, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    out["layer_dense_sdpa_ms"] = _median_ms(
        _graph(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)).replay, iters
    )
    bs = DENSE_BLOCK_SIZE
    ids = cache.all_blocks(bs).view(1, 1, -1).expand(batch, 1, -1)
    counts = torch.full((batch, 1), math.ceil((ctx + 1) / bs), device=dev, dtype=torch.int32)
    out["layer_dense_ours_ms"] = _median_ms(
        _graph(lambda: _attend(cache, 0, q, ids, counts, bs, scale, None, seq_len)).replay, iters
    )

    def sdpa(i: int) -> None:
        layer = cache.layers[i]
        F.scaled_dot_product_attention(
            q, layer.keys[:, :, : ctx + 1], layer.values[:, :, : ctx + 1], scale=scale, enable_gqa=True
        )

    n = text.num_hidden_layers
    out["layer_dense_sdpa_seq_ms"] = _per_layer_in_sequence_ms(sdpa, n, iters)
    out["layer_dense_ours_seq_ms"] = _per_layer_in_sequence_ms(
        lambda i: _attend(cache, i, q, ids, counts, bs, scale, None, seq_len), n, iters
    )
    return out


def _spot_layer(
    model, cache, q: torch.Tensor, seq_len: torch.Tensor, scale: float, iters: int, profile_to: Path | None = None
) -> dict:
    from ..integration import layer_states
    from ..runtime.decode_path import DecodeContext, _attend, _spot

    text = model.config.get_text_config(decoder=True)
    batch = q.shape[0]
    out: dict = {}
    state = layer_states(model)[0]
    state.hidden_states = torch.randn(batch, 1, text.hidden_size, device=q.device, dtype=q.dtype)
    ctx_obj = DecodeContext(cache, state, q, seq_len, seq_len.view(1) - 1, None)
    held: dict = {}

    def select() -> None:
        held["sel"] = _spot(ctx_obj)

    def attend() -> None:
        sel = held["sel"]
        _attend(cache, 0, q, sel.block_ids[:, :, 0], sel.counts[:, :, 0], sel.block_size, scale, None, seq_len)

    def both() -> None:
        select()
        attend()

    if profile_to is not None:  # kernel-level breakdown of one selection and its attention, launched eagerly
        select()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                select()
                attend()
            torch.cuda.synchronize()
        profile_to.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    out["layer_spot_select_ms"] = _median_ms(_graph(select).replay, iters)
    out["layer_spot_attn_ms"] = _median_ms(_graph(attend).replay, iters)
    out["layer_spot_step_ms"] = _median_ms(_graph(both).replay, iters)
    out["layer_spot_tokens_read"] = float(held["sel"].counts.float().mean()) * held["sel"].block_size

    states = layer_states(model)
    contexts = [DecodeContext(cache, st, q, seq_len, seq_len.view(1) - 1, None) for st in states]
    for st in states:
        st.hidden_states = state.hidden_states

    def step(i: int) -> None:
        sel = _spot(contexts[i])
        _attend(cache, i, q, sel.block_ids[:, :, 0], sel.counts[:, :, 0], sel.block_size, scale, None, seq_len)

    out["layer_spot_step_seq_ms"] = _per_layer_in_sequence_ms(step, len(states), iters)
    for st in states:
        st.hidden_states = None
    return out


BASELINES = ("twilight", "quest")


def _baseline_layer(model, cache, ctx: int, batch: int, iters: int, baselines: tuple[str, ...]) -> dict:
    """Twilight's and Quest's step on layer 0's K/V (methods' defaults), each part from its own CUDA graph.

    The page metadata is built once from the random keys, as a prefill leaves it; every timed selection then
    rewrites the newest page's bounds (and, for Twilight, quantises the newest key), as a decode step does.
    """
    from ..methods.quest import QuestConfig
    from ..methods.twilight import TwilightConfig
    from ..runtime.decode_path import _attend
    from ..runtime.quest_twilight import quest_select, static_meta, triton_available, twilight_select, update_meta

    text = model.config.get_text_config(decoder=True)
    dev = cache.layers[0].keys.device
    q = torch.randn(batch, text.num_attention_heads, 1, text.head_dim, device=dev, dtype=cache.layers[0].keys.dtype)
    scale = text.head_dim**-0.5
    seq_len = torch.tensor(ctx + 1, device=dev)
    keys = cache.layers[0].keys
    twilight, quest = TwilightConfig(), QuestConfig()
    page, bits = twilight.block_size, twilight.quant_bits
    fast = triton_available(dev)
    meta = static_meta(cache, 0, page, bits)
    out: dict = {}
    held: dict = {}

    def tokens(sel) -> float:
        return float(sel.counts.float().mean()) * sel.block_size

    def select() -> None:
        update_meta(keys, meta, seq_len, page, bits, fast)
        held["sel"] = twilight_select(q, keys, meta, seq_len, twilight, scale, None, fast)

    def attend() -> None:
        sel = held["sel"]
        _attend(cache, 0, q, sel.block_ids[:, :, 0], sel.counts[:, :, 0], page, scale, None, seq_len)

    def both() -> None:
        select()
        attend()

    def quest_only() -> None:
        update_meta(keys, meta, seq_len, page, None, fast)
        held["quest"] = quest_select(q, keys, meta, seq_len, quest.budget, page, None, fast)

    if "twilight" in baselines:
        out["layer_twilight_select_ms"] = _median_ms(_graph(select).replay, iters)
        out["layer_twilight_attn_ms"] = _median_ms(_graph(attend).replay, iters)
        out["layer_twilight_step_ms"] = _median_ms(_graph(both).replay, iters)
        metas = [meta] + [static_meta(cache, i, page, bits) for i in range(1, min(SEQUENCE_LAYERS, len(cache.layers)))]

        def step(i: int) -> None:
            layer_keys = cache.layers[i].keys
            update_meta(layer_keys, metas[i], seq_len, page, bits, fast)
            sel = twilight_select(q, layer_keys, metas[i], seq_len, twilight, scale, None, fast)
            _attend(cache, i, q, sel.block_ids[:, :, 0], sel.counts[:, :, 0], page, scale, None, seq_len)

        out["layer_twilight_step_seq_ms"] = _per_layer_in_sequence_ms(step, len(metas), iters)
        out["layer_twilight_tokens_read"] = tokens(held["sel"])
        out["layer_twilight_candidate_tokens"] = tokens(
            quest_select(q, keys, meta, seq_len, twilight.candidates, page, None, fast)
        )
    if "quest" in baselines:
        out["layer_quest_select_ms"] = _median_ms(_graph(quest_only).replay, iters)
        out["layer_quest_tokens_read"] = tokens(held["quest"])
    return out


def run(
    shape: str,
    contexts: list[int],
    batches: list[int],
    budget_text: str,
    key_format: str,
    iters: int,
    bandwidth: float,
    skip_hf: bool,
    log: Callable[[str], None] = print,
    on_row: Callable[[dict], None] | None = None,
    profile_dir: Path | None = None,
    baselines: tuple[str, ...] = BASELINES,
    compile: bool = False,
    overlap: bool = False,
) -> dict:
    from .. import sparsify, unsparsify
    from ..cli import parse_budget
    from ..methods.spot import SpotConfig
    from ..methods.twilight import TwilightConfig
    from ..models import random_model
    from ..runtime import GraphDecoder, StaticSparseCache
    from ..spot.quant import bytes_per_token, quantize

    if not torch.cuda.is_available():
        raise click.ClickException("the decode benchmark needs a CUDA device")
    budget = parse_budget(budget_text)
    dev = torch.device("cuda")
    started = time.time()
    model = random_model(shape, device=dev, dtype=torch.bfloat16).eval()
    text = model.config.get_text_config(decoder=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layers, hkv, d = text.num_hidden_layers, text.num_key_value_heads, text.head_dim
    log(f"model {shape}: {weight_bytes / 1e9:.1f} GB of weights, built in {time.time() - started:.0f} s")
    tmp = Path(tempfile.mkdtemp(prefix="spotattn-bench-"))
    selector_path = _random_selector(model, tmp)
    spot_config = SpotConfig(checkpoint=str(selector_path), budget=budget, key_format=key_format)
    from ..spot.checkpoint import read_meta

    sel_dim = read_meta(selector_path)["selector"]["head_dim"]
    sel_bytes = bytes_per_token(quantize(torch.randn(1, 64, sel_dim), key_format))
    report: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": shape,
        "weights_bytes": weight_bytes,
        "budget": budget_text,
        "key_format": key_format,
        "selector_bytes_per_token": sel_bytes,
        "bandwidth_tb_s": bandwidth,
        "baselines": _baseline_configs(baselines),
        "compile": compile,
        "rows": [],
    }
    for batch in batches:
        for ctx in contexts:
            kv_bytes = layers * 2 * batch * hkv * ctx * d * 2
            free, _ = torch.cuda.mem_get_info()
            row: dict = {"batch": batch, "context": ctx, "kv_bytes": kv_bytes}
            report["rows"].append(row)
            if kv_bytes * 1.1 + 3e9 > free:
                row["skipped"] = f"K/V {kv_bytes / 1e9:.1f} GB does not fit ({free / 1e9:.1f} GB free)"
                log(f"B={batch} ctx={ctx}: {row['skipped']}")
                continue
            budget_tokens = _budget_tokens(budget, ctx)
            row["floor_dense_ms"] = (weight_bytes + kv_bytes) / (bandwidth * TB) * 1e3
            sparse_bytes = layers * batch * (2 * hkv * budget_tokens * d * 2 + ctx * sel_bytes)
            row["floor_spot_ms"] = (weight_bytes + sparse_bytes) / (bandwidth * TB) * 1e3
            if not skip_hf:
                try:
                    model.set_attn_implementation("sdpa")
                    row["hf_ms"] = _hf_step(model, batch, ctx, max(3, iters // 4), model.dtype)
                except Exception as exc:  # noqa: BLE001 (one failed variant must not hide the others)
                    row["hf_error"] = f"{type(exc).__name__}: {exc}"[:300]
                torch.cuda.empty_cache()
            cache = StaticSparseCache(
                model.config, batch_size=batch, capacity=ctx + 128, device=dev, dtype=model.dtype, track_density=False
            )
            _fill_static(cache, ctx)
            variants: list[tuple[str, object]] = [("dense", "dense"), ("spot", spot_config)]
            if overlap:  # spot with its selection on a side stream beside the projections (whole model only)
                variants.append(("spot_overlap", spot_config))
            if "twilight" in baselines:  # the whole model too (first two layers dense, as in Twilight)
                variants.append(("twilight", TwilightConfig()))
            for name, config in variants:
                try:
                    sparsify(model, config)
                    cache.overlap_selection = name == "spot_overlap"
                    if name.startswith("spot"):
                        _fill_selector_keys(cache, ctx, key_format, sel_dim)
                    decoder = GraphDecoder(model, cache)
                    row[f"{name}_ms"], row[f"{name}_graph_vs_eager_max_abs"] = _whole_model(decoder, cache, ctx, iters)
                    prof = profile_dir / f"select_b{batch}_{ctx}.txt" if profile_dir and name == "spot" else None
                    if name in ("dense", "spot"):  # twilight's one-layer figures come from _baseline_layer
                        row.update(_layer_figures(model, cache, ctx, batch, iters, name == "spot", prof))
                    if compile:  # the same step compiled (inductor) before capture; error vs the plain eager step
                        del decoder
                        decoder = GraphDecoder(model, cache, compile=True)
                        ms, err = _whole_model(decoder, cache, ctx, iters)
                        row[f"{name}_compiled_ms"], row[f"{name}_compiled_vs_eager_max_abs"] = ms, err
                        row[f"{name}_compile_s"] = decoder.compile_seconds
                    del decoder
                except Exception as exc:  # noqa: BLE001
                    row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
                finally:
                    unsparsify(model)
                torch.cuda.empty_cache()
            if baselines:
                try:
                    row.update(_baseline_layer(model, cache, ctx, batch, iters, baselines))
                except Exception as exc:  # noqa: BLE001
                    row["baselines_error"] = f"{type(exc).__name__}: {exc}"[:300]
            del cache
            torch.cuda.empty_cache()
            _ratios(row)
            log(json.dumps(row))
            if on_row is not None:
                on_row(report)
    report["seconds"] = time.time() - started
    return report


def _budget_tokens(budget, ctx: int) -> int:
    from ..types import DualTopP, TopK

    if isinstance(budget, TopK):
        return min(ctx, budget.tokens)
    if isinstance(budget, DualTopP) and budget.max_tokens is not None:
        return min(ctx, budget.max_tokens)
    return ctx


def _ratios(row: dict) -> None:
    def ratio(a: str, b: str, name: str) -> None:
        if a in row and b in row:
            row[name] = row[a] / row[b]

    ratio("hf_ms", "dense_ms", "dense_speedup_vs_hf")
    ratio("hf_ms", "spot_ms", "spot_speedup_vs_hf")
    ratio("dense_ms", "spot_ms", "spot_speedup_vs_dense")
    ratio("twilight_ms", "spot_ms", "spot_speedup_vs_twilight")
    ratio("dense_compiled_ms", "spot_compiled_ms", "spot_compiled_speedup_vs_dense_compiled")
    ratio("dense_ms", "dense_compiled_ms", "dense_compile_speedup")
    ratio("spot_ms", "spot_compiled_ms", "spot_compile_speedup")
    ratio("spot_ms", "spot_overlap_ms", "spot_overlap_speedup")
    ratio("spot_compiled_ms", "spot_overlap_compiled_ms", "spot_compiled_overlap_speedup")
    ratio("dense_ms", "floor_dense_ms", "dense_over_floor")
    ratio("spot_ms", "floor_spot_ms", "spot_over_floor")
    ratio("layer_dense_sdpa_ms", "layer_spot_step_ms", "layer_spot_speedup_vs_sdpa")
    ratio("layer_dense_ours_ms", "layer_spot_step_ms", "layer_spot_speedup_vs_ours_dense")
    ratio("layer_dense_sdpa_ms", "layer_twilight_step_ms", "layer_twilight_speedup_vs_sdpa")
    ratio("layer_twilight_step_ms", "layer_spot_step_ms", "layer_spot_speedup_vs_twilight")
    ratio("layer_dense_sdpa_seq_ms", "layer_spot_step_seq_ms", "layer_spot_seq_speedup_vs_sdpa")
    ratio("layer_twilight_step_seq_ms", "layer_spot_step_seq_ms", "layer_spot_seq_speedup_vs_twilight")


def _baseline_configs(baselines: tuple[str, ...]) -> dict:
    from ..methods.quest import QuestConfig
    from ..methods.twilight import TwilightConfig

    configs = {"twilight": TwilightConfig(), "quest": QuestConfig()}
    return {name: configs[name].to_dict() for name in baselines}


def _cell(row: dict, key: str, fmt: str = "{:.2f}") -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def markdown(report: dict) -> str:
    lines = [
        f"## Whole-model decode step ({report['device']}, torch {report['torch']}, {report['shape']}, bf16)",
        "",
        f"Sparse: `spot`, budget `{report['budget']}`, {report['key_format']} selector keys "
        f"({report['selector_bytes_per_token']:.0f} B/token). Floors at {report['bandwidth_tb_s']} TB/s. "
        "Times are ms per step (medians).",
        "",
        "| B | context | plain HF | ours dense (graph) | spot (graph) | floor dense | floor spot | "
        "spot vs HF | spot vs ours dense | dense vs HF | twilight (graph) | spot vs twilight |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['batch']} | {row['context']} | skipped: {row['skipped']} |||||||||| |")
            continue
        lines.append(
            f"| {row['batch']} | {row['context']} | {_cell(row, 'hf_ms')} | {_cell(row, 'dense_ms')} | "
            f"{_cell(row, 'spot_ms')} | {_cell(row, 'floor_dense_ms')} | {_cell(row, 'floor_spot_ms')} | "
            f"{_cell(row, 'spot_speedup_vs_hf')}x | {_cell(row, 'spot_speedup_vs_dense')}x | "
            f"{_cell(row, 'dense_speedup_vs_hf')}x | {_cell(row, 'twilight_ms')} | "
            f"{_cell(row, 'spot_speedup_vs_twilight')}x |"
        )
    lines += _table(
        report,
        "One layer's decode step (layer 0 shapes, each part replayed from a CUDA graph), ms:",
        ["dense SDPA", "ours dense", "spot selection", "spot attention", "spot both", "tokens read", "spot vs SDPA"],
        lambda row: [
            _cell(row, "layer_dense_sdpa_ms", "{:.3f}"), _cell(row, "layer_dense_ours_ms", "{:.3f}"),
            _cell(row, "layer_spot_select_ms", "{:.3f}"), _cell(row, "layer_spot_attn_ms", "{:.3f}"),
            _cell(row, "layer_spot_step_ms", "{:.3f}"), _cell(row, "layer_spot_tokens_read", "{:.0f}"),
            f"{_cell(row, 'layer_spot_speedup_vs_sdpa')}x",
        ],
    )
    lines += _sequence_table(report)
    if any("layer_twilight_step_ms" in r or "layer_quest_select_ms" in r for r in report["rows"]):
        lines += _baseline_table(report)
    if report.get("compile"):
        lines += _compiled_table(report)
    if any("spot_overlap_ms" in r for r in report["rows"]):
        lines += _overlap_table(report)
    errors = [(r["batch"], r["context"], k, v) for r in report["rows"] for k, v in r.items() if k.endswith("_error")]
    if errors:
        lines += ["", "Errors:", ""] + [f"- B={b} ctx={c} {k}: {v}" for b, c, k, v in errors]
    return "\n".join(lines) + "\n"


def _table(report: dict, intro: str, columns: list[str], cells: Callable[[dict], list[str]]) -> list[str]:
    """A markdown table with one line per measured row: batch, context, then ``cells(row)`` under ``columns``."""
    lines = ["", intro, "", "| B | context | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for row in report["rows"]:
        if "skipped" not in row:
            lines.append(f"| {row['batch']} | {row['context']} | " + " | ".join(cells(row)) + " |")
    return lines


def _sequence_table(report: dict) -> list[str]:
    return _table(
        report,
        f"One layer's step inside a model: layers 0-{SEQUENCE_LAYERS - 1} back to back in one CUDA graph, each on "
        "its own K/V and selector keys, time / layers (no per-replay launch latency, no L2 reuse), ms:",
        ["dense SDPA", "ours dense", "spot both", "twilight both", "spot vs SDPA", "spot vs twilight"],
        lambda row: [
            _cell(row, "layer_dense_sdpa_seq_ms", "{:.3f}"), _cell(row, "layer_dense_ours_seq_ms", "{:.3f}"),
            _cell(row, "layer_spot_step_seq_ms", "{:.3f}"), _cell(row, "layer_twilight_step_seq_ms", "{:.3f}"),
            f"{_cell(row, 'layer_spot_seq_speedup_vs_sdpa')}x", f"{_cell(row, 'layer_spot_seq_speedup_vs_twilight')}x",
        ],
    )


def _baseline_table(report: dict) -> list[str]:
    configs = report.get("baselines", {})
    tw, qu = configs.get("twilight", {}), configs.get("quest", {})

    def budget(d: dict | None) -> str:
        return f"{d['rule']}:{d['tokens']}" if d else "-"

    return _table(
        report,
        "Training-free baselines, one layer (same shapes, each part replayed from a CUDA graph; selection "
        "includes the metadata write for the new token), ms. "
        f"Twilight: Quest candidates `{budget(tw.get('candidates'))}`, {tw.get('quant_bits')}-bit estimate, "
        f"top-p {tw.get('p')}, {tw.get('block_size')}-token pages; Quest: `{budget(qu.get('budget'))}`. "
        "Random keys make attention flat, so Twilight's top-p keeps most of its candidates (tokens read: "
        "kept / candidates); on peaked, real attention it keeps fewer, and its attention costs less.",
        ["twilight selection", "twilight attention", "twilight both", "tokens read (kept / candidates)",
         "twilight vs SDPA", "spot both", "spot vs twilight", "quest selection", "quest tokens"],
        lambda row: [
            _cell(row, "layer_twilight_select_ms", "{:.3f}"), _cell(row, "layer_twilight_attn_ms", "{:.3f}"),
            _cell(row, "layer_twilight_step_ms", "{:.3f}"),
            f"{_cell(row, 'layer_twilight_tokens_read', '{:.0f}')} / "
            f"{_cell(row, 'layer_twilight_candidate_tokens', '{:.0f}')}",
            f"{_cell(row, 'layer_twilight_speedup_vs_sdpa')}x", _cell(row, "layer_spot_step_ms", "{:.3f}"),
            f"{_cell(row, 'layer_spot_speedup_vs_twilight')}x", _cell(row, "layer_quest_select_ms", "{:.3f}"),
            _cell(row, "layer_quest_tokens_read", "{:.0f}"),
        ],
    )


def _compiled_table(report: dict) -> list[str]:
    return _table(
        report,
        "Whole-model step compiled with torch.compile (inductor) before capture, ms (graph replay); compile s "
        "is the first compiled call (tracing, inductor, one run); max |diff| against the plain eager step:",
        ["dense", "dense compiled", "spot", "spot compiled", "spot vs dense (compiled)", "twilight compiled",
         "compile s (dense / spot)", "max diff (dense / spot)"],
        lambda row: [
            _cell(row, "dense_ms"), _cell(row, "dense_compiled_ms"), _cell(row, "spot_ms"),
            _cell(row, "spot_compiled_ms"), f"{_cell(row, 'spot_compiled_speedup_vs_dense_compiled')}x",
            _cell(row, "twilight_compiled_ms"),
            f"{_cell(row, 'dense_compile_s', '{:.0f}')} / {_cell(row, 'spot_compile_s', '{:.0f}')}",
            f"{_cell(row, 'dense_compiled_vs_eager_max_abs', '{:.3g}')} / "
            f"{_cell(row, 'spot_compiled_vs_eager_max_abs', '{:.3g}')}",
        ],
    )


def _overlap_table(report: dict) -> list[str]:
    return _table(
        report,
        "spot's selection on a side stream beside each layer's q/k/v projections (`--overlap`) against the same "
        "selection in the attention call; whole model, ms (graph replay):",
        ["spot", "spot overlapped", "gain", "spot compiled", "spot overlapped compiled", "gain (compiled)"],
        lambda row: [
            _cell(row, "spot_ms"), _cell(row, "spot_overlap_ms"), f"{_cell(row, 'spot_overlap_speedup')}x",
            _cell(row, "spot_compiled_ms"), _cell(row, "spot_overlap_compiled_ms"),
            f"{_cell(row, 'spot_compiled_overlap_speedup')}x",
        ],
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@click.command("decode")
@click.option("--shape", default="qwen3-8b", show_default=True, help="random:<shape> model to build")
@click.option("--contexts", default="8192,32768,131072", show_default=True, help="comma-separated context lengths")
@click.option(
    "--batches",
    default="1,4",
    show_default=True,
    help="comma-separated batch sizes (skipped if K/V won't fit)",
)
@click.option("--budget", "budget_text", default="topk:4096", show_default=True, help="spot budget (as in generate)")
@click.option("--key-format", default="int4", show_default=True, help="selector key format: bf16, int4, mxfp4, nvfp4")
@click.option("--iters", default=20, show_default=True, help="timed steps per figure (plain HF: a quarter)")
@click.option("--bandwidth", default=3.0, show_default=True, help="memory bandwidth for the floors, TB/s")
@click.option("--skip-hf", is_flag=True, help="skip the plain Hugging Face baseline")
@click.option("--profile", is_flag=True, help="also write a kernel profile of spot's selection and attention per row")
@click.option(
    "--baselines",
    default=",".join(BASELINES),
    show_default=True,
    help="training-free methods timed beside spot, comma-separated ('' for none): twilight (one layer and the "
    "whole model), quest (one layer's selection)",
)
@click.option(
    "--compile",
    "compile_step",
    is_flag=True,
    help="also time each whole-model step compiled with torch.compile (inductor) before capture (one compile "
    "per variant and row; compile seconds in the JSON)",
)
@click.option(
    "--overlap",
    is_flag=True,
    help="also time the whole-model spot step with its selection started on a side stream beside each layer's "
    "q/k/v projections (StaticSparseCache.overlap_selection) instead of in the attention call",
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench_out/decode"), show_default=True)
def decode_command(
    shape: str,
    contexts: str,
    batches: str,
    budget_text: str,
    key_format: str,
    iters: int,
    bandwidth: float,
    skip_hf: bool,
    profile: bool,
    baselines: str,
    compile_step: bool,
    overlap: bool,
    out: Path,
) -> None:
    """Whole-model decode step: plain HF vs spotattn dense and sparse, in CUDA graphs."""
    chosen = tuple(name.strip() for name in baselines.split(",") if name.strip())
    unknown = sorted(set(chosen) - set(BASELINES))
    if unknown:
        raise click.BadParameter(f"unknown {unknown}; allowed: {', '.join(BASELINES)}", param_hint="--baselines")
    out.mkdir(parents=True, exist_ok=True)

    def save(report: dict) -> None:  # after every row, so that an interrupted run keeps what it measured
        (out / "decode.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "decode.md").write_text(markdown(report))

    report = run(
        shape,
        _ints(contexts),
        _ints(batches),
        budget_text,
        key_format,
        iters,
        bandwidth,
        skip_hf,
        log=lambda s: click.echo(s, err=True),
        on_row=save,
        profile_dir=out if profile else None,
        baselines=chosen,
        compile=compile_step,
        overlap=overlap,
    )
    save(report)
    click.echo(markdown(report))


if __name__ == "__main__":
    decode_command()
