"""Whole-model decode steps on a :class:`StaticSparseCache`, eager or replayed from one CUDA graph.

Usage (a sparsified model, CUDA)::

    logits, cache = prefill_to_static(model, input_ids, capacity=input_ids.shape[1] + 256)
    decoder = GraphDecoder(model, cache)
    decoder.capture()                      # warm-up (compiles kernels), then capture one step
    token = logits.argmax(-1)
    for _ in range(steps):
        logits = decoder.step(token)       # copy the token in, replay, read the static logits
        token = logits.argmax(-1)

Everything the step needs is on the device: the token in a static input buffer, the position from the
cache's length counter (read inside the graph, advanced by the cache writes inside the graph). So a
replay is one launch from the host for all layers and the host never waits.
"""

from __future__ import annotations

import torch

from ..cache import SparseCache
from ..integration import _seq_start
from .static_cache import StaticSparseCache


@torch.no_grad()
def prefill_to_static(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    capacity: int,
    attention_mask: torch.Tensor | None = None,
    track_density: bool = True,
) -> tuple[torch.Tensor, StaticSparseCache]:
    """Prefill through the ordinary path (a :class:`SparseCache`, the method's own prefill), then copy
    the cache into a static one of ``capacity`` tokens. Returns the last position's logits and the cache.

    The copy briefly holds the K/V twice; left padding (``attention_mask``) is kept as ``seq_start``.
    """
    cache = SparseCache(model.config)
    out = model(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
    static = StaticSparseCache.from_cache(cache, model.config, capacity, track_density=track_density)
    if attention_mask is not None and not bool(attention_mask.all()):
        static.seq_start = _seq_start(attention_mask.to(torch.bool))
    del cache
    return out.logits[:, -1], static


class GraphDecoder:
    """One decode step of ``model`` on ``cache``: :meth:`step_eager`, or :meth:`capture` then :meth:`step`."""

    def __init__(self, model: torch.nn.Module, cache: StaticSparseCache) -> None:
        self.model = model
        self.cache = cache
        batch = cache.layers[0].keys.shape[0]
        self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=cache.layers[0].keys.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _forward(self) -> torch.Tensor:
        batch = self.input_ids.shape[0]
        # Read on the device: the position of the new token is the number of cached tokens.
        position_ids = self.cache.length().view(1, 1).expand(batch, 1)
        out = self.model(
            input_ids=self.input_ids, position_ids=position_ids, past_key_values=self.cache, use_cache=True
        )
        return out.logits[:, -1]

    @torch.no_grad()
    def step_eager(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run one step without a graph (same kernels, launched from Python)."""
        self.input_ids.copy_(tokens.view(-1, 1))
        return self._forward()

    @torch.no_grad()
    def capture(self, warmup: int = 2) -> None:
        """Warm up on a side stream (kernel compilation, autotuning, lazy buffers), undo the warm-up's
        cache advance, and capture one step. Warm-up writes land at positions the next real steps
        overwrite, so the cache's content is unchanged where it is ever read."""
        if not self.input_ids.is_cuda:
            raise RuntimeError("CUDA graphs need the model and cache on a CUDA device")
        saved = self.cache.length().clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._forward()
                self.cache.set_length(saved)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
        self.cache.set_length(saved)  # capture does not run kernels; this only guards against surprises

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Copy ``tokens`` ``(B,)`` in and replay the captured step; returns the static logits ``(B, V)``.

        The returned tensor is overwritten by the next replay: clone it to keep it.
        """
        if self.graph is None or self.logits is None:
            raise RuntimeError("call capture() before step()")
        self.input_ids.copy_(tokens.view(-1, 1))
        self.graph.replay()
        return self.logits
