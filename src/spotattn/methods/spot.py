"""``spot``: SpotAttention. A distilled selector predicts each query's attention over 16-token key blocks;
a budget rule (dual top-p by default) turns that distribution into the blocks to read.

Selection runs at every decode step from the current query. The selector's own keys (one ``d_I`` vector
per token, bf16 or 4-bit) live in the SparseCache layer metadata and are appended as tokens arrive, so
crop and beam reordering follow the KV cache. Prefill is dense by default (the paper's protocol); with
``sparse_prefill`` each 16-query row reads the blocks its queries' distributions select.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..selection import rows_for_decode, rows_for_prefill, select_blocks
from ..spot.checkpoint import check_shapes, checkpoint_digest, load_selector, read_meta, shipped_selector
from ..spot.quant import FORMATS, KeyCache, quantize, score_blocks, score_blocks_torch
from ..spot.selector import Selector, SelectorLayer
from ..types import Budget, DualTopP, Selection, TopK, TopP
from ._masks import check_nonneg_int
from .base import AttentionCall, Method, MethodConfig, register_method

DEFAULT_SELECTOR = "smollm2-135m"
_LOCK = threading.Lock()
_LOADED: dict[tuple[str, str], Selector] = {}


def resolve_checkpoint(checkpoint: str | None) -> Path:
    """``None`` or a shipped name -> the packaged selector; otherwise a path (stem or either file)."""
    if checkpoint is None:
        return shipped_selector(DEFAULT_SELECTOR)
    path = Path(checkpoint)
    if not path.suffix and not path.with_suffix(".json").exists():
        try:
            return shipped_selector(checkpoint)
        except FileNotFoundError:
            pass
    return path


def _selector_on(path: Path, device: torch.device) -> Selector:
    """One shared copy of the selector per (checkpoint, device), loaded on first use."""
    key = (str(path.resolve()), str(device))
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = load_selector(path, device=device)[0]
        return _LOADED[key]


@dataclass
class SpotConfig(MethodConfig):
    block_size: int = 16
    checkpoint: str | None = None  # selector stem/path or shipped name; None: the shipped SmolLM2 selector
    budget: Budget = field(default_factory=DualTopP)
    key_format: str = "bf16"  # bf16 | int4 | mxfp4 | nvfp4
    sparse_prefill: bool = False
    # Selector distribution softmax(logit / T); T < 1 sharpens it and reads less. None: the checkpoint's
    # recommended value (its JSON "inference.temperature"), else 1.
    temperature: float | None = None
    prefill_chunk: int = 256  # queries scored at once in sparse prefill
    # The first N layers run dense in prefill and decode, as Quest and Twilight read their first two; 0 (the
    # paper's protocol) sparsifies every layer. Those layers cache no selector keys and score nothing.
    dense_layers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.budget, (TopK, TopP, DualTopP)):
            raise ValueError(f"SpotConfig.budget must be TopK, TopP or DualTopP, got {self.budget!r}")
        if self.key_format not in FORMATS:
            raise ValueError(f"SpotConfig.key_format must be one of {FORMATS}, got {self.key_format!r}")
        t = self.temperature
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0):
            raise ValueError(f"SpotConfig.temperature must be positive, got {self.temperature!r}")
        if not isinstance(self.prefill_chunk, int) or self.prefill_chunk <= 0:
            raise ValueError(f"SpotConfig.prefill_chunk must be a positive integer, got {self.prefill_chunk!r}")
        check_nonneg_int("SpotConfig", "dense_layers", self.dense_layers)

    def artifacts(self) -> dict[str, str]:
        return {"selector": checkpoint_digest(resolve_checkpoint(self.checkpoint))}

    def check_model(self, model_config) -> None:
        super().check_model(model_config)
        path = resolve_checkpoint(self.checkpoint)
        meta = read_meta(path)
        check_shapes(meta, model_config, f" {path.name}")
        sel_bs = meta["selector"]["block_size"]
        if sel_bs != self.block_size:
            raise ValueError(f"SpotConfig.block_size={self.block_size} differs from the selector's block size {sel_bs}")


@register_method("spot")
class Spot(Method):
    Config = SpotConfig

    def __init__(self, config: SpotConfig, model_config, layer_idx: int) -> None:
        super().__init__(config, model_config, layer_idx)
        self.path = resolve_checkpoint(config.checkpoint)
        meta = read_meta(self.path)
        # A layer the selector does not serve, or one of the first dense_layers, reads everything (prefill,
        # decode and the static decoder all return None for it) and keeps no selector keys.
        self.serves = layer_idx in meta["selector"]["layer_ids"] and layer_idx >= config.dense_layers
        self.temperature = float(config.temperature or meta.get("inference", {}).get("temperature", 1.0))

    def _layer(self, device: torch.device) -> SelectorLayer:
        return _selector_on(self.path, device).layer(self.layer_idx)

    def _new_keys(self, call: AttentionCall, layer: SelectorLayer) -> tuple[torch.Tensor, dict | None]:
        """Selector keys of the new tokens, appended to the cache; returns positions and cached parts."""
        lq, lk = call.num_queries, call.num_keys
        pos = torch.arange(lk - lq, lk, device=call.query.device)
        keys = layer.keys(call.hidden_states, pos)
        if call.cache_state is None:
            if lq != lk:
                raise RuntimeError(
                    "spot needs its selector keys for the cached tokens: run generation with the SparseCache "
                    "that a sparsified model creates (pass no cache, or a spotattn.SparseCache)"
                )
            return pos, quantize(keys, self.config.key_format)
        cache = KeyCache(call.cache_state, self.config.key_format)
        if len(cache) != lk - lq:
            raise RuntimeError(
                f"spot's selector key cache of layer {self.layer_idx} has {len(cache)} tokens, the KV cache "
                f"holds {lk - lq}; the cache was filled before sparsify() or by another method"
            )
        cache.append(keys)
        return pos, cache.parts()

    def prefill(self, call: AttentionCall) -> Selection | None:
        if not self.serves:
            return None
        if call.hidden_states is None:
            raise RuntimeError("spot needs the layer's hidden states; use spotattn.sparsify")
        layer = self._layer(call.query.device)
        with torch.no_grad():
            pos, parts = self._new_keys(call, layer)
            if not self.config.sparse_prefill:
                return None
            return self._sparse_prefill(call, layer, pos, parts)

    def _sparse_prefill(self, call: AttentionCall, layer: SelectorLayer, pos: torch.Tensor, parts: dict) -> Selection:
        bs = self.config.block_size
        first, rows = rows_for_prefill(call.num_queries, call.num_keys, bs, call.query.device)
        q, w = layer.queries(call.hidden_states, pos)
        b, g = q.shape[0], w.shape[1]
        nb = -(-call.num_keys // bs)
        mass = torch.zeros(b, g, len(rows), nb, device=q.device)
        row_of_query = pos // bs - first
        step = self.config.prefill_chunk
        for a in range(0, call.num_queries, step):
            e = min(call.num_queries, a + step)
            # Keys past the chunk's last query are never visible to it: score only up to there.
            nkeys = min(call.num_keys, -(-(int(pos[e - 1]) + 1) // bs) * bs)
            chunk_parts = {n: p[:, :nkeys] for n, p in parts.items()}
            logits = score_blocks_torch(
                q[:, :, a:e], w[..., a:e], chunk_parts, self.config.key_format, pos[a:e], bs, call.seq_start
            )
            probs = torch.softmax(_finite_rows(logits) / self.temperature, dim=-1)
            idx = row_of_query[a:e].view(1, 1, -1, 1).expand(*probs.shape)
            mass[..., : probs.shape[-1]].scatter_reduce_(2, idx, probs, reduce="amax")
        return select_blocks(
            mass,
            self.config.budget,
            bs,
            row_first_block=rows,
            row_last_block=rows,
            seq_start=call.seq_start,
            first_row=first,
        )

    def decode(self, call: AttentionCall) -> Selection | None:
        if not self.serves:
            return None
        if call.hidden_states is None:
            raise RuntimeError("spot needs the layer's hidden states; use spotattn.sparsify")
        layer = self._layer(call.query.device)
        bs = self.config.block_size
        with torch.no_grad():
            pos, parts = self._new_keys(call, layer)
            q, w = layer.queries(call.hidden_states, pos)
            logits = score_blocks(q, w, parts, self.config.key_format, pos, bs, call.seq_start)
            # One row shared by the (1..8) new queries: a block counts as much as its best query wants it.
            mass = torch.softmax(_finite_rows(logits) / self.temperature, dim=-1).amax(dim=2, keepdim=True)
            first, last = rows_for_decode(call.num_queries, call.num_keys, bs, call.query.device)
            return _select(call.query.is_cuda)(
                mass,
                self.config.budget,
                bs,
                row_first_block=first,
                row_last_block=last,
                seq_start=call.seq_start,
            )


def _select(cuda: bool):
    """The sync-free device selection on CUDA (static width, CUDA-graph safe), else the reference."""
    if cuda:
        try:
            from ..kernels.triton_ops import select_blocks_device  # noqa: PLC0415 (needs triton)
        except ImportError:
            return select_blocks
        return select_blocks_device
    return select_blocks


def _finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """Rows with no visible key (inside left padding) become uniform instead of NaN."""
    empty = torch.isinf(logits).all(-1, keepdim=True)
    return torch.where(empty, torch.zeros_like(logits), logits)
