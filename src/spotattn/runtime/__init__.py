"""Decode runtime: a preallocated static sparse KV cache and whole-model decode steps in CUDA graphs.

``StaticSparseCache`` is a transformers ``Cache`` whose buffers never move: new tokens are written in
place at a device-side position, and every length the attention path needs (causality, how many keys
exist, where to write the method's metadata) is read from device tensors. So a sparsified model's
decode step has no host synchronisation and can be captured once in a ``torch.cuda.CUDAGraph`` and
replayed for every following token (``GraphDecoder``).
"""

from . import quest_twilight  # noqa: F401 (registers the quest and twilight static decoders)
from .generate import Generation, generate
from .graph_decode import GraphDecoder, prefill_to_static
from .select import select_decode_static
from .static_cache import StaticSparseCache, StaticSparseLayer

__all__ = [
    "Generation",
    "GraphDecoder",
    "StaticSparseCache",
    "StaticSparseLayer",
    "generate",
    "prefill_to_static",
    "select_decode_static",
]
