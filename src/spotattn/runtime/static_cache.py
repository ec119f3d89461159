"""``StaticSparseCache``: preallocated K/V and method metadata, written in place at a device position.

Each layer is a transformers ``StaticLayer`` (buffers ``(B, Hkv, capacity, D)``, a device counter
``cumulative_length`` advanced in place by ``update``) plus a dict of static metadata buffers with the
same layout rules as :class:`spotattn.cache.MetaEntry` (batch on dim 0, tokens or blocks on ``axis``).

The attention layers of a sparsified model see the whole buffer as ``k``/``v``. The keys past the
current length hold stale or zero data and must never be read, so :func:`spotattn.integration.run_layer`
hands decode calls on this cache to :meth:`StaticSparseCache.decode_attention`, which takes every length
from the device counter (see :mod:`spotattn.runtime.decode_path`).

Build one from a prefilled :class:`spotattn.SparseCache` with :meth:`StaticSparseCache.from_cache`
(prefill runs through the ordinary path), or empty with random contents for benchmarks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.cache_utils import Cache, StaticLayer

from ..cache import MetaEntry, SparseCache

CAPACITY_MULTIPLE = 256  # every block size spotattn uses divides it, so pages tile the buffer exactly


class StaticSparseLayer(StaticLayer):
    """A transformers ``StaticLayer`` with a ``meta`` dict of static :class:`MetaEntry` buffers."""

    def __init__(self, max_cache_len: int, **kwargs: Any) -> None:
        super().__init__(max_cache_len, **kwargs)
        self.meta: dict[str, MetaEntry] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        from ..integration import MAX_DECODE_QUERIES  # noqa: PLC0415 (integration imports this package)

        if key_states.shape[-2] > MAX_DECODE_QUERIES:
            raise ValueError(
                f"StaticSparseCache takes decode steps of at most {MAX_DECODE_QUERIES} tokens, got "
                f"{key_states.shape[-2]}; prefill with a spotattn.SparseCache and convert it with "
                "StaticSparseCache.from_cache"
            )
        return super().update(key_states, value_states, *args, **kwargs)


class StaticSparseCache(Cache):
    """A static, CUDA-graph-safe KV cache for sparsified models; decode steps only (see module doc)."""

    def __init__(
        self,
        config: Any,
        *,
        batch_size: int,
        capacity: int,
        device: torch.device | str,
        dtype: torch.dtype,
        track_density: bool = True,
        overlap_selection: bool = True,
    ) -> None:
        text = config.get_text_config(decoder=True)
        capacity = math.ceil(capacity / CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE
        layers = [StaticSparseLayer(capacity) for _ in range(text.num_hidden_layers)]
        super().__init__(layers=layers)
        self.capacity = capacity
        self.track_density = track_density
        # True (the default): start selections that need only the hidden states (spot) in the layer's
        # pre-hook, on CUDA on a side stream beside the q/k/v projections (runtime.decode_path.start_selection;
        # 1.04-1.11x on the whole model at 128K, B 1, H100); False selects in the attention call.
        self.overlap_selection = overlap_selection
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        shape = (batch_size, text.num_key_value_heads, capacity, head_dim)
        probe = torch.empty(batch_size, text.num_key_value_heads, 0, head_dim, device=device, dtype=dtype)
        for layer in self.layers:
            layer.lazy_initialization(probe, probe)  # allocates the (zeroed) buffers now, not in a capture
            assert layer.keys.shape == shape
        # First valid key per sequence (left padding), fixed at prefill; None when nothing is padded.
        self.seq_start: torch.Tensor | None = None
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block size -> (table, all blocks)
        # layer -> handle of the opaque selection op under torch.compile (see runtime.decode_path)
        self._select_slots: dict[int, int] = {}

    # ------------------------------------------------------------------------------------ lengths

    def length(self, layer_idx: int = 0) -> torch.Tensor:
        """Tokens stored in layer ``layer_idx`` (a 0-dim device tensor: reading it does not sync)."""
        return self.layers[layer_idx].cumulative_length

    def set_length(self, tokens: int | torch.Tensor) -> None:
        """Move every layer's write position (in place: captured graphs keep seeing the same tensors)."""
        for layer in self.layers:
            if isinstance(tokens, int):
                layer.cumulative_length.fill_(tokens)
            else:
                layer.cumulative_length.copy_(tokens)

    # ------------------------------------------------------------------------------------- metadata

    def meta(self, layer_idx: int) -> dict[str, MetaEntry]:
        return self.layers[layer_idx].meta

    def allocate_meta(
        self, layer_idx: int, name: str, like: torch.Tensor, tokens_per_entry: int = 1, axis: int = 2
    ) -> MetaEntry:
        """A zeroed static buffer shaped like ``like`` but with ``capacity / tokens_per_entry`` on ``axis``."""
        shape = list(like.shape)
        shape[axis] = math.ceil(self.capacity / tokens_per_entry)
        entry = MetaEntry(torch.zeros(shape, dtype=like.dtype, device=like.device), tokens_per_entry, axis)
        self.layers[layer_idx].meta[name] = entry
        return entry

    # ------------------------------------------------------------------------------- construction

    @classmethod
    def from_cache(
        cls, cache: SparseCache, config: Any, capacity: int, *, track_density: bool = True
    ) -> StaticSparseCache:
        """Copy a prefilled :class:`SparseCache` (K/V and every metadata entry) into static buffers."""
        first = cache.layers[0]
        length = first.keys.shape[-2]
        if capacity < length + 1:
            raise ValueError(f"capacity {capacity} leaves no room to decode after {length} cached tokens")
        out = cls(
            config,
            batch_size=first.keys.shape[0],
            capacity=capacity,
            device=first.keys.device,
            dtype=first.keys.dtype,
            track_density=track_density,
        )
        for i, (src, dst) in enumerate(zip(cache.layers, out.layers, strict=True)):
            dst.keys[:, :, :length].copy_(src.keys)
            dst.values[:, :, :length].copy_(src.values)
            for name, entry in getattr(src, "meta", {}).items():
                static = out.allocate_meta(i, name, entry.tensor, entry.tokens_per_entry, entry.axis)
                static.tensor.narrow(entry.axis, 0, entry.tensor.shape[entry.axis]).copy_(entry.tensor)
        out.set_length(length)
        return out

    # --------------------------------------------------------------------------- attention views

    def paged(self, layer_idx: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k_pages, v_pages, block_table)``: the contiguous buffers seen as ``block_size``-token pages.

        Page ``p`` starts at element ``p * block_size * D``; heads are ``capacity * D`` apart. Logical
        block ``j`` of sequence ``b`` is page ``b * Hkv * NB + j`` (``NB = capacity / block_size``). The
        views overlap (a page's other heads are further pages' data), which only matters for writes;
        the paged decode kernel only reads. No copy.
        """
        layer = self.layers[layer_idx]
        if block_size not in self._tables:
            # Built once, before any capture (a graph must not allocate its constants).
            b, h, c, _ = layer.keys.shape
            nb = c // block_size
            dev = layer.keys.device
            table = torch.arange(b, device=dev).view(b, 1) * h * nb + torch.arange(nb, device=dev)
            self._tables[block_size] = (table.to(torch.int32), torch.arange(nb, device=dev, dtype=torch.int32))
        table = self._tables[block_size][0]
        return _pages(layer.keys, block_size), _pages(layer.values, block_size), table

    def all_blocks(self, block_size: int) -> torch.Tensor:
        """``arange(capacity / block_size)`` as int32 on the cache's device (the dense block list)."""
        if block_size not in self._tables:
            self.paged(0, block_size)
        return self._tables[block_size][1]

    def start_selection(self, state: Any) -> None:
        """Entry point used by the attention pre-hook: start a selection that needs only the hidden states."""
        from .decode_path import start_selection  # noqa: PLC0415

        start_selection(self, state)

    def decode_attention(self, state: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         seq_start: torch.Tensor | None) -> torch.Tensor:
        """Entry point used by ``run_layer`` for decode calls on this cache."""
        from .decode_path import static_decode  # noqa: PLC0415 (decode_path imports methods lazily)

        return static_decode(self, state, q, scale, seq_start if seq_start is not None else self.seq_start)


def _pages(buffer: torch.Tensor, block_size: int) -> torch.Tensor:
    b, h, c, d = buffer.shape
    nb = c // block_size
    num_pages = (b - 1) * h * nb + nb  # the last page of the last sequence's first head ends the range
    return buffer.as_strided((num_pages, h, block_size, d), (block_size * d, c * d, d, 1))
