"""Triton kernels behind :mod:`spotattn.kernels` for CUDA tensors (importing this needs ``triton``).

Each kernel is a ``torch.library`` custom op (``torch.ops.spotattn.*``) with a fake implementation, so it
traces under ``torch.compile`` and replays inside CUDA graphs. The functions here validate input and
raise a ``ValueError`` naming the parameter for anything the kernels cannot take; they never fall back.
"""

from ._triton.decode import (
    DECODE_BLOCK_SIZES,
    MAX_DECODE_QUERIES,
    choose_splits,
    sparse_decode,
    sparse_decode_paged,
    sparse_decode_paged_ref,
)
from ._triton.prefill import PREFILL_BLOCK_SIZES, block_sparse_prefill
from ._triton.scoring import block_scores, block_scores_ref, select_blocks_device, selection_width

__all__ = [
    "DECODE_BLOCK_SIZES",
    "MAX_DECODE_QUERIES",
    "PREFILL_BLOCK_SIZES",
    "block_scores",
    "block_scores_ref",
    "block_sparse_prefill",
    "choose_splits",
    "select_blocks_device",
    "selection_width",
    "sparse_decode",
    "sparse_decode_paged",
    "sparse_decode_paged_ref",
]
