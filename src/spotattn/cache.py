"""A transformers ``Cache`` that keeps, beside each layer's keys and values, the metadata methods need.

Metadata entries are tensors with the batch on dim 0 and tokens (or blocks of ``tokens_per_entry``
tokens) on ``axis``, so that crop and batch reordering apply to them exactly as to the keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


@dataclass
class MetaEntry:
    tensor: torch.Tensor
    tokens_per_entry: int = 1  # 1: one row per token; n: one row per block of n tokens
    axis: int = 2


class SparseLayer(DynamicLayer):
    """A dynamic cache layer plus a dict of :class:`MetaEntry` for the sparse method of that layer."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.meta: dict[str, MetaEntry] = {}

    def _map_meta(self, fn) -> None:
        for entry in self.meta.values():
            entry.tensor = fn(entry.tensor)

    def reset(self) -> None:
        super().reset()
        self.meta.clear()

    def crop(self, tokens_to_remove: int) -> None:
        # Transformers passes a non-positive count here (the legacy positive form is rejected by super).
        super().crop(tokens_to_remove)
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        length = self.get_seq_length()
        for entry in self.meta.values():
            keep = math.ceil(length / entry.tokens_per_entry)
            entry.tensor = entry.tensor.narrow(entry.axis, 0, min(keep, entry.tensor.shape[entry.axis]))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_meta(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_meta(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_meta(lambda t: t.index_select(0, beam_idx.to(t.device)))


class SparseCache(DynamicCache):
    """``DynamicCache`` whose layers are :class:`SparseLayer`. Pass it to ``generate``/``forward`` as
    ``cache`` (transformers >= 5.25) or ``past_key_values`` (``spotattn.integration.cache_kwargs`` picks);
    a sparsified model also creates one by itself when given none."""

    def __init__(self, config=None) -> None:
        if config is None:
            Cache.__init__(self, layer_class_to_replicate=SparseLayer)
        else:
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
            Cache.__init__(self, layers=[SparseLayer() for _ in range(num_layers)])

    def meta(self, layer_idx: int) -> dict[str, MetaEntry]:
        """The metadata dict of layer ``layer_idx`` (created layers are always :class:`SparseLayer`)."""
        while len(self.layers) <= layer_idx:
            self.layers.append(SparseLayer())
        return self.layers[layer_idx].meta
