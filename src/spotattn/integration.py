"""Plugging methods into Hugging Face models through transformers' ``AttentionInterface``.

``sparsify`` attaches one method instance per attention layer, registers the ``spotattn`` attention and
mask functions, and switches the model to them; ``unsparsify`` restores the model exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.llama.modeling_llama import LlamaModel

from . import kernels
from .cache import SparseCache
from .methods import AttentionCall, Method, MethodConfig, make_config, method_class
from .selection import density_of
from .types import Selection

ATTN_NAME = "spotattn"
STATE_ATTR = "_spotattn_layer"
MODEL_ATTR = "_spotattn"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
MAX_DECODE_QUERIES = 8  # up to this many new tokens on top of a cache run the decode path (spec. verify)
PHASES = ("prefill", "decode")
# The models' cache keyword: transformers 5.25 renamed ``past_key_values`` to ``cache`` (the old name still
# works, with a warning, until 5.40).
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


@dataclass
class LayerState:
    """What one sparsified attention layer carries: its method, captured inputs and density counters."""

    method: Method
    layer_idx: int
    num_kv_heads: int
    hidden_states: torch.Tensor | None = None
    cache: Cache | None = None
    read: dict[str, torch.Tensor] = field(default_factory=dict)
    available: dict[str, torch.Tensor] = field(default_factory=dict)
    # Optional inspection hook (evaluation): the latest call's selection (None: dense) and a callback
    # ``observer(state, call, selection, phase)`` run before attention; off unless someone sets it.
    last_selection: Selection | None = None
    # A selection a static cache started in the pre-hook, before the q/k/v projections (runtime.decode_path)
    pending_selection: Any = None
    observer: Callable[[LayerState, AttentionCall, Selection | None, str], None] | None = None

    def record(self, phase: str, read: torch.Tensor, available: torch.Tensor) -> None:
        """Add tokens read/available per kv-group (summed over the batch) without a host sync."""
        read = read.sum(0).double().expand(self.num_kv_heads)
        available = available.sum(0).double().expand(self.num_kv_heads)
        if phase in self.read:
            self.read[phase] = self.read[phase] + read
            self.available[phase] = self.available[phase] + available
        else:
            self.read[phase], self.available[phase] = read, available

    def cache_meta(self) -> dict | None:
        if isinstance(self.cache, SparseCache):
            return self.cache.meta(self.layer_idx)
        return None


@dataclass
class SparsifyRecord:
    config: MethodConfig
    previous_attn_implementation: str | None
    hooks: list[Any]
    layers: list[LayerState]


def _seq_start(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """First valid key per sequence from the 2-D padding mask our mask function returns."""
    if attention_mask is None:
        return None
    return attention_mask.to(torch.int8).argmax(dim=-1)


def spotattn_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Mask interface: a 2-D (B, kv_length) bool padding mask, or None when nothing is padded.

    Causality is applied by the kernels, so only padding travels. Left padding works everywhere;
    right padding only in a prefill without cache (its pad keys sit after every valid query).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"spotattn expects a 2-D padding attention_mask, got shape {tuple(attention_mask.shape)}")
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    if mask.shape[1] != kv_length:
        raise ValueError(f"attention_mask covers {mask.shape[1]} positions, the keys are {kv_length}")
    if bool(mask.all()):
        return None
    positions = torch.arange(kv_length, device=mask.device)
    left_padded = mask == (positions >= _seq_start(mask).unsqueeze(-1))
    if not bool(left_padded.all()):
        lengths = mask.sum(-1, keepdim=True)
        right_padded = bool((mask == (positions < lengths)).all())
        if not (right_padded and q_length == kv_length):
            raise ValueError(
                "spotattn supports left padding (tokenizer.padding_side='left'), and right padding only in a "
                "prefill without cache; this attention_mask has padding inside or after the tokens"
            )
        return None  # right padding: pad keys come after every valid query, so causality hides them
    return mask


def dense_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, seq_start: torch.Tensor | None
) -> torch.Tensor:
    """Dense causal attention through PyTorch SDPA, bottom-right aligned, padding excluded."""
    lq, lk = q.shape[2], k.shape[2]
    if seq_start is None and (lq == lk or lq == 1):
        return F.scaled_dot_product_attention(q, k, v, is_causal=lq == lk and lq > 1, scale=scale, enable_gqa=True)
    key_pos = torch.arange(lk, device=q.device)
    q_pos = key_pos[lk - lq :].unsqueeze(-1)
    mask = key_pos <= q_pos
    if seq_start is not None:
        start = seq_start.view(-1, 1, 1, 1)
        # Padded queries see their own padding: they stay finite and are never read by real queries.
        mask = mask & ((key_pos >= start) | (q_pos < start))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def run_layer(state: LayerState, q, k, v, scale: float, seq_start: torch.Tensor | None) -> torch.Tensor:
    """One layer's attention under its method: select, then read only what was selected."""
    lq, lk = q.shape[2], k.shape[2]
    decode = lq <= MAX_DECODE_QUERIES and lk > lq
    phase = "decode" if decode else "prefill"
    static_attention = getattr(state.cache, "decode_attention", None)
    if decode and static_attention is not None:
        # A static cache (spotattn.runtime): k/v are whole buffers and lengths live on the device.
        return static_attention(state, q, k, v, scale, seq_start)
    call = AttentionCall(
        q, k, v, scale, state.layer_idx, seq_start, hidden_states=state.hidden_states, cache_state=state.cache_meta()
    )
    selection: Selection | None = state.method.decode(call) if decode else state.method.prefill(call)
    state.last_selection = selection
    if state.observer is not None:
        state.observer(state, call, selection, phase)
    if selection is None:
        out = dense_sdpa(q, k, v, scale, seq_start)
        available = _causal_tokens(lq, lk, seq_start, q.shape[0], q.device)
        state.record(phase, available, available)
        return out
    if decode:
        out, _ = kernels.sparse_decode(
            q, k, v, selection.block_ids[:, :, 0], selection.counts[:, :, 0], selection.block_size,
            scale=scale, seq_start=seq_start,
        )
    else:
        out, _ = kernels.block_sparse_prefill(
            q, k, v, selection.block_ids, selection.counts, selection.block_size, scale=scale, seq_start=seq_start
        )
    state.record(phase, *density_of(selection, lq, lk, seq_start, decode=decode))
    return out


def _causal_tokens(lq: int, lk: int, seq_start: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """Tokens a dense causal pass reads, per batch row, as a (B, 1) tensor."""
    q_pos = torch.arange(lk - lq, lk, device=device, dtype=torch.float64)
    start = seq_start.double().view(-1, 1) if seq_start is not None else torch.zeros(batch, 1, device=device)
    return (q_pos + 1 - start).clamp(min=0).sum(-1, keepdim=True)


def spotattn_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``spotattn`` entry of transformers' AttentionInterface."""
    state: LayerState | None = getattr(module, STATE_ATTR, None)
    if state is None:
        raise RuntimeError("spotattn attention called on a module that was not sparsified; use spotattn.sparsify")
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("spotattn does not support sliding-window attention layers yet")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = run_layer(state, query, key, value, scale, _seq_start(attention_mask))
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, spotattn_attention)
AttentionMaskInterface.register(ATTN_NAME, spotattn_mask)


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]


def _check_model(model: torch.nn.Module, config: MethodConfig) -> list[torch.nn.Module]:
    model_config = getattr(model, "config", None)
    model_type = getattr(model_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"spotattn does not support model type {model_type!r} ({type(model).__name__}); "
            f"supported families: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if hasattr(model, MODEL_ATTR):
        raise ValueError("this model is already sparsified; call spotattn.unsparsify(model) first")
    text_config = model_config.get_text_config(decoder=True)
    layer_types = getattr(text_config, "layer_types", None) or []
    if getattr(text_config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
        raise ValueError("spotattn does not support sliding-window attention layers yet")
    if model_type == "mistral" and getattr(text_config, "sliding_window", None):
        raise ValueError("spotattn does not support Mistral's sliding-window attention (config.sliding_window)")
    config.check_model(text_config)
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"found no attention layers in {type(model).__name__}")
    return modules


def cache_kwargs(cache: Cache | None) -> dict[str, Cache | None]:
    """``{CACHE_KWARG: cache}``: pass a cache to a model under the installed transformers' keyword."""
    return {CACHE_KWARG: cache}


def output_cache(output: object) -> Cache | None:
    """The cache a model's output carries: ``output.cache`` from transformers 5.25 (``past_key_values`` is
    only an alias there, which may go), ``output.past_key_values`` before."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _cache_of(kwargs: dict) -> Cache | None:
    """The cache a layer or model was called with: ``cache`` from transformers 5.25, ``past_key_values`` before."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _capture_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    state: LayerState = getattr(module, STATE_ATTR)
    state.hidden_states = kwargs.get("hidden_states", args[0] if args else None)
    state.cache = _cache_of(kwargs)
    start_selection = getattr(state.cache, "start_selection", None)
    if start_selection is not None:  # a static cache: selection that needs only the hidden states starts here
        start_selection(state)


def _release_inputs(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    state: LayerState = getattr(module, STATE_ATTR)
    state.hidden_states, state.cache, state.pending_selection = None, None, None


def _use_sparse_cache(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Give the model a SparseCache where it would build (or was handed) a fresh plain cache."""
    cache = _cache_of(kwargs)
    fresh_plain = type(cache) is DynamicCache and cache.get_seq_length() == 0
    if (cache is None and kwargs.get("use_cache", True) is not False) or fresh_plain:
        kwargs.pop("past_key_values" if CACHE_KWARG == "cache" else "cache", None)
        kwargs[CACHE_KWARG] = SparseCache(module.config)
        return args, kwargs
    return None


def sparsify(model: torch.nn.Module, config: MethodConfig | str) -> torch.nn.Module:
    """Make ``model`` run ``config``'s sparse-attention method; returns the same model.

    Everything is validated before anything changes: on any error the model is left as it was.
    """
    if isinstance(config, str):
        config = make_config(config)
    if not isinstance(config, MethodConfig):
        raise TypeError(f"config must be a MethodConfig or a method name, got {type(config).__name__}")
    modules = _check_model(model, config)
    text_config = model.config.get_text_config(decoder=True)
    cls = method_class(config.method)
    num_kv_heads = text_config.num_key_value_heads
    states = [LayerState(cls(config, text_config, m.layer_idx), m.layer_idx, num_kv_heads) for m in modules]
    previous = model.config._attn_implementation
    hooks: list[Any] = []
    try:
        for module, state in zip(modules, states, strict=True):
            setattr(module, STATE_ATTR, state)
            hooks.append(module.register_forward_pre_hook(_capture_inputs, with_kwargs=True))
            hooks.append(module.register_forward_hook(_release_inputs, with_kwargs=True))
        base = getattr(model, "model", model)
        hooks.append(base.register_forward_pre_hook(_use_sparse_cache, with_kwargs=True))
        model.set_attn_implementation(ATTN_NAME)
        setattr(model, MODEL_ATTR, SparsifyRecord(config, previous, hooks, states))
    except Exception:
        _detach(modules, hooks)
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)
        raise
    return model


def _detach(modules: list[torch.nn.Module], hooks: list[Any]) -> None:
    for hook in hooks:
        hook.remove()
    for module in modules:
        if hasattr(module, STATE_ATTR):
            delattr(module, STATE_ATTR)


def unsparsify(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`sparsify`: the model runs its original attention again."""
    record: SparsifyRecord | None = getattr(model, MODEL_ATTR, None)
    if record is None:
        raise ValueError("this model is not sparsified")
    _detach(_attention_modules(model), record.hooks)
    model.set_attn_implementation(record.previous_attn_implementation)
    delattr(model, MODEL_ATTR)
    return model


def layer_states(model: torch.nn.Module) -> list[LayerState]:
    """The per-layer states of a sparsified model, in layer order (for inspection hooks)."""
    return list(_record(model).layers)


def sparsified_config(model: torch.nn.Module) -> MethodConfig | None:
    record: SparsifyRecord | None = getattr(model, MODEL_ATTR, None)
    return record.config if record else None


@dataclass
class DensityReport:
    """Share of causally available tokens actually read, per layer and kv-group, since the last reset."""

    phase: str
    per_layer: torch.Tensor  # (layers, kv_groups), NaN where a layer has not run in this phase
    tokens_read: float
    tokens_available: float

    @property
    def mean(self) -> float:
        return self.tokens_read / self.tokens_available if self.tokens_available else float("nan")

    def compact(self, width: int = 10) -> str:
        """One line per ``width`` layers: each layer's mean density in percent."""
        values = self.per_layer.nanmean(dim=1).tolist()
        cells = [f"{100 * v:3.0f}" if v == v else "  -" for v in values]
        lines = [f"L{i:02d}-{min(i + width, len(cells)) - 1:02d}: " + " ".join(cells[i : i + width])
                 for i in range(0, len(cells), width)]
        return "\n".join(lines)


def _record(model: torch.nn.Module) -> SparsifyRecord:
    record = getattr(model, MODEL_ATTR, None)
    if record is None:
        raise ValueError("this model is not sparsified; call spotattn.sparsify(model, config) first")
    return record


def density(model: torch.nn.Module, phase: str = "all") -> DensityReport:
    """Density read since the last :func:`reset_density`, for ``phase`` in prefill, decode or all."""
    if phase not in (*PHASES, "all"):
        raise ValueError(f"phase must be one of {(*PHASES, 'all')}, got {phase!r}")
    phases = PHASES if phase == "all" else (phase,)
    rows, total_read, total_avail = [], 0.0, 0.0
    for state in _record(model).layers:
        # Counters live on the model's device; sum them on the host, where the report is read.
        zero = torch.zeros(state.num_kv_heads, dtype=torch.float64)
        read = sum((state.read[p].cpu() for p in phases if p in state.read), zero)
        avail = sum((state.available[p].cpu() for p in phases if p in state.available), zero)
        rows.append(torch.where(avail > 0, read / avail.clamp(min=1e-30), float("nan")))
        total_read += float(read.sum())
        total_avail += float(avail.sum())
    return DensityReport(phase, torch.stack(rows), total_read, total_avail)


def reset_density(model: torch.nn.Module) -> None:
    for state in _record(model).layers:
        state.read.clear()
        state.available.clear()
