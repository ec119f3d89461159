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

``GraphDecoder(model, cache, compile=True)`` compiles the step with ``torch.compile`` (inductor, one full
graph, static shapes) before capturing it, so that each layer's elementwise work (RMSNorm, rotary, q/k
norms, SiLU * mul, residual adds: tens of small kernels per layer) fuses into a few kernels. What stays
outside the compiled region:

- the capture itself (``torch.cuda.graph`` wraps the compiled call; nothing compiles inside a capture:
  compilation runs in the warm-up, and the capture runs under ``fail_on_recompile``);
- one plain eager step before compiling: it allocates what the decode path creates lazily (page tables,
  selector key buffers, density counters) and records each layer's selection layout;
- attention and selection, as opaque custom ops (``spotattn::sparse_decode_paged``,
  ``spotattn::static_select``): inductor calls them, it does not trace into them;
- moving the length counter between steps (``StaticSparseCache.set_length``). The cache writes of the
  step itself (new K/V, the counter's advance) are inside: inductor writes them in place into the static
  buffers (they are mutated graph inputs).

The throwaway steps (the warm-up before a capture, the eager and first compiled call of a compilation)
undo both what they advance: the cache's length and the model's decode density counters, so that
``spotattn.density`` counts only the steps a user ran.
"""

from __future__ import annotations

import gc
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ..cache import SparseCache
from ..integration import _seq_start, cache_kwargs, layer_states, sparsified_config
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
    out = model(input_ids, attention_mask=attention_mask, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    static = StaticSparseCache.from_cache(cache, model.config, capacity, track_density=track_density)
    if attention_mask is not None and not bool(attention_mask.all()):
        static.seq_start = _seq_start(attention_mask.to(torch.bool))
    del cache
    return out.logits[:, -1], static


class GraphDecoder:
    """One decode step of ``model`` on ``cache``: :meth:`step_eager`, or :meth:`capture` then :meth:`step`.

    ``compile=True``: the step is compiled with ``torch.compile`` before :meth:`capture` (see the module
    doc); :meth:`step_compiled` runs the compiled step without a graph (any device, CPU included).
    ``compile_mode`` is passed to ``torch.compile``; modes that build their own CUDA graphs
    ("reduce-overhead", "max-autotune") are refused, since the decoder captures the step itself.
    """

    def __init__(
        self, model: torch.nn.Module, cache: StaticSparseCache, *, compile: bool = False,
        compile_mode: str | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        batch = cache.layers[0].keys.shape[0]
        self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=cache.layers[0].keys.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.compile_seconds: float | None = None  # first compiled call: tracing, inductor, one run
        self._compiled: Callable[[GraphDecoder], torch.Tensor] | None = None
        if compile:
            if compile_mode in ("reduce-overhead", "max-autotune"):
                raise ValueError(
                    f"compile_mode {compile_mode!r} captures CUDA graphs of its own; GraphDecoder captures the "
                    "step itself: use the default mode or 'max-autotune-no-cudagraphs'"
                )
            # fullgraph: a graph break would silently split the fusion; dynamic=False: one static graph
            # per (batch, capacity), never re-traced with symbolic shapes.
            # Unbound (called with self): a bound method here would tie the decoder in a reference cycle, and
            # its cache and graph memory would outlive it until the next garbage collection.
            self._compiled = torch.compile(_own_code(GraphDecoder._forward), fullgraph=True, dynamic=False,
                                           mode=compile_mode)

    def _forward(self) -> torch.Tensor:
        batch = self.input_ids.shape[0]
        # Read on the device: the position of the new token is the number of cached tokens.
        position_ids = self.cache.length().view(1, 1).expand(batch, 1)
        out = self.model(
            input_ids=self.input_ids, position_ids=position_ids, **cache_kwargs(self.cache), use_cache=True
        )
        return out.logits[:, -1]

    @torch.no_grad()
    def step_eager(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run one step without a graph and without compilation (same kernels, launched from Python)."""
        self.input_ids.copy_(tokens.view(-1, 1))
        return self._forward()

    @torch.no_grad()
    def step_compiled(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the compiled step without a graph; compiles on the first call (``compile=True`` only).

        A later call that would recompile raises instead: the step must stay one graph for every position.
        """
        if self._compiled is None:
            raise RuntimeError("step_compiled needs GraphDecoder(..., compile=True)")
        self._compile()
        self.input_ids.copy_(tokens.view(-1, 1))
        with torch.compiler.set_stance("fail_on_recompile"):
            return self._compiled(self)

    def prepare(self) -> None:
        """Compile the step now (``compile=True``; a no-op otherwise), so that the first step is not slower."""
        self._compile()

    @torch.no_grad()
    def _compile(self) -> None:
        """One plain eager step (lazy buffers, selection layouts), then the first compiled call; both
        steps' cache advances are undone, their writes land where the next real step writes."""
        if self._compiled is None or self.compile_seconds is not None:
            return
        with self._throwaway():
            self._forward()
        start = time.perf_counter()
        with self._throwaway():
            self._compiled(self)
            if self.input_ids.is_cuda:
                torch.cuda.synchronize()
        self.compile_seconds = time.perf_counter() - start
        # Tracing leaves cyclic garbage that references the cache: collect it now, so that dropping the
        # decoder and the cache frees their device memory at once rather than at some later collection.
        gc.collect()

    @torch.no_grad()
    def capture(self, warmup: int = 2) -> None:
        """Warm up on a side stream (compilation, kernel compilation, autotuning, lazy buffers), undo the
        warm-up's cache advance and density counts, and capture one step. Warm-up writes land at positions the next real
        steps overwrite, so the cache's content is unchanged where it is ever read."""
        if not self.input_ids.is_cuda:
            raise RuntimeError("CUDA graphs need the model and cache on a CUDA device")
        compiled = self._compiled

        def step() -> torch.Tensor:
            return compiled(self) if compiled is not None else self._forward()

        saved = self.cache.length().clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._compile()
            for _ in range(warmup):
                with self._throwaway():
                    step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # A recompile here would compile inside the capture: raise instead.
        with torch.compiler.set_stance("fail_on_recompile"), torch.cuda.graph(self.graph):
            self.logits = step()
        self.cache.set_length(saved)  # capture does not run kernels; this only guards against surprises

    @contextmanager
    def _throwaway(self) -> Iterator[None]:
        """Run a step that does not count: afterwards the cache's length and the decode density counters are
        back where they were. The counters the step created or replaced keep their identity (a graph captured
        later adds to them in place) and take their old values, or zero where there were none."""
        length = self.cache.length().clone()
        stores = []
        if sparsified_config(self.model) is not None:
            stores = [store for state in layer_states(self.model) for store in (state.read, state.available)]
        before = [{name: value.clone() for name, value in store.items()} for store in stores]
        try:
            yield
        finally:
            self.cache.set_length(length)
            for store, old in zip(stores, before, strict=True):
                for name, value in store.items():
                    if name not in old:
                        value.zero_()
                    elif value.is_contiguous():  # else an expanded view the step did not touch: unchanged
                        value.copy_(old[name])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Copy ``tokens`` ``(B,)`` in and replay the captured step; returns the static logits ``(B, V)``.

        The returned tensor is overwritten by the next replay: clone it to keep it.
        """
        if self.graph is None or self.logits is None:
            raise RuntimeError("call capture() before step()")
        self.input_ids.copy_(tokens.view(-1, 1))
        self.graph.replay()
        return self.logits


def _own_code(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` rebuilt on a private copy of its code object. Dynamo keeps compiled code, guards and the
    recompile limit per code object: with a copy, each decoder has its own entry (never counted as a
    recompile of another decoder's step) that is freed with the decoder."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
