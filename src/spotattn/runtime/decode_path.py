"""The sync-free decode path of a sparsified layer on a :class:`StaticSparseCache`.

The ordinary path (:func:`spotattn.integration.run_layer`) sizes everything from ``k.shape[2]`` and lets
methods keep metadata in growing tensors; on a static buffer both are wrong (the buffer is longer than
the sequence) and growth cannot be replayed by a CUDA graph. Here every length comes from the layer's
device counter, metadata is written in place, and attention runs through the paged decode kernel with
``seq_lens`` so that causality sits on the current position, never on the buffer's end.

A method runs here only if it has a *static decoder* (``register_static_decoder``): a function that
returns a :class:`Selection` (or None for dense) without host synchronisation. ``dense`` and ``spot`` have
one, and ``quest`` and ``twilight`` (:mod:`spotattn.runtime.quest_twilight`); other methods raise a clear
error.

Under ``torch.compile`` (``GraphDecoder(..., compile=True)``) a static decoder is not traced: it runs
behind one opaque custom op, ``spotattn::static_select``, so that its own launches (Triton kernels called
from Python, lazily loaded selectors, metadata writes) stay exactly as in eager mode while inductor fuses
the model's elementwise work around it. The op finds the decoder through an integer handle, and its fake
implementation takes the output shapes recorded by an eager step on the same cache, which must run first
(``GraphDecoder`` does it). Everything it reads that the compiled graph may have changed (the length
counter, the hidden states) is passed as an argument, never read from the cache object; the layer's K/V
buffers are passed too, so that the op is ordered after the graph's write of the new token into them
(decoders such as Quest's read the new key from the buffer).
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import kernels
from ..types import Selection
from .select import select_decode_static
from .static_cache import StaticSparseCache

DENSE_BLOCK_SIZE = 64  # block list granularity of the dense path (64-token tiles, as in the dense kernel rows)


@dataclass
class DecodeContext:
    """What a static decoder sees for one layer's decode call."""

    cache: StaticSparseCache
    state: object  # spotattn.integration.LayerState
    query: torch.Tensor | None  # (B, Hq, T, D); None for an early decoder (register_static_decoder)
    seq_len: torch.Tensor  # 0-dim device tensor: keys that exist, the T new ones included
    positions: torch.Tensor  # (T,) absolute positions of the new tokens
    seq_start: torch.Tensor | None
    scale: float | None = None  # the attention's softmax scale (methods that estimate attention need it)

    @property
    def layer_idx(self) -> int:
        return self.state.layer_idx


StaticDecoder = Callable[[DecodeContext], Selection | None]
_DECODERS: dict[str, StaticDecoder] = {}
_EARLY: set[str] = set()  # decoders that read only the hidden states (see start_selection)


def register_static_decoder(name: str, *, early: bool = False) -> Callable[[StaticDecoder], StaticDecoder]:
    """Register ``name``'s static decoder. ``early=True`` promises that it reads only the layer's hidden
    states, the cache's length and its own metadata, never ``ctx.query`` or the new K/V (``ctx.query`` is
    None then): its selection can start before the layer's q/k/v projections."""

    def wrap(fn: StaticDecoder) -> StaticDecoder:
        _DECODERS[name] = fn
        if early:
            _EARLY.add(name)
        return fn

    return wrap


def static_decoder_names() -> list[str]:
    """The methods with a static decoder, sorted."""
    return sorted(_DECODERS)


def static_decode(
    cache: StaticSparseCache, state, q: torch.Tensor, scale: float, seq_start: torch.Tensor | None
) -> torch.Tensor:
    """One layer's attention for a decode call on ``cache`` (the new K/V are already written)."""
    name = state.method.config.method
    decoder = _DECODERS.get(name)
    if decoder is None:
        raise NotImplementedError(
            f"method {name!r} has no static (CUDA-graph) decode path yet; static decoders exist for "
            f"{static_decoder_names()}. Decode with a spotattn.SparseCache instead"
        )
    b, _, t, _ = q.shape
    seq_len = cache.length(state.layer_idx)
    pending, state.pending_selection = state.pending_selection, None
    if pending is not None:  # started in the layer's pre-hook (start_selection): wait for it here
        selection = pending.selection
        if not torch.compiler.is_compiling():
            # Always, also for a dense layer: the side stream forked, and a CUDA graph capture needs it joined.
            _join(pending.handle, q.device)
        elif selection is not None:  # compiled: a dense layer started nothing (its recorded layout is None)
            torch.ops.spotattn.select_join(
                q, selection.block_ids, selection.counts, pending.hidden, pending.seq_len, pending.handle
            )
    elif torch.compiler.is_compiling():  # compiled steps leave state.last_selection as the last eager step set it
        selection = _select_opaque(cache, state, q, seq_len, seq_start, scale)
    else:
        positions = seq_len - t + torch.arange(t, device=q.device)
        with torch.no_grad():
            selection = decoder(DecodeContext(cache, state, q, seq_len, positions, seq_start, scale))
        _remember(cache, state, selection)
        state.last_selection = selection
    if selection is None:
        bs = DENSE_BLOCK_SIZE
        ids = cache.all_blocks(bs).view(1, 1, -1).expand(b, 1, -1)
        counts = ((seq_len + bs - 1) // bs).to(torch.int32).view(1, 1).expand(b, 1)
    else:
        bs = selection.block_size
        ids, counts = selection.block_ids[:, :, 0], selection.counts[:, :, 0]
    out = _attend(cache, state.layer_idx, q, ids, counts, bs, scale, seq_start, seq_len)
    if cache.track_density:
        _record(state, None if selection is None else counts, bs, seq_len, seq_start, b)
    return out


def _attend(cache, layer_idx, q, ids, counts, block_size, scale, seq_start, seq_len) -> torch.Tensor:
    if q.is_cuda:
        from ..kernels.triton_ops import sparse_decode_paged  # noqa: PLC0415 (needs triton)

        k_pages, v_pages, table = cache.paged(layer_idx, block_size)
        seq_lens = seq_len.view(1).expand(q.shape[0])
        out, _ = sparse_decode_paged(
            q, k_pages, v_pages, table, seq_lens, ids, counts, block_size, scale=scale, seq_start=seq_start
        )
        return out
    # CPU: the reference kernel on the whole buffer, the length taken from the device counter as on CUDA
    # (no host read, so the step also traces under torch.compile).
    layer = cache.layers[layer_idx]
    out, _ = kernels.reference.sparse_decode_ref(
        q, layer.keys, layer.values, ids, counts, block_size, scale=scale, seq_start=seq_start, seq_len=seq_len
    )
    return out


def _record(state, counts, block_size, seq_len, seq_start, batch) -> None:
    """Decode density counters, accumulated in place so that graph replays keep adding to them.
    ``counts`` None: the dense path, which reads every available token."""
    length = seq_len.double().reshape(1, 1)
    start = None if seq_start is None else seq_start.double().view(-1, 1)
    available = length.expand(batch, 1) if start is None else (length - start).clamp(min=0)  # (B, 1)
    if counts is None:
        read = available
    else:
        # The valid tokens of the selected blocks, as density_of counts them on the ordinary path: every list
        # holds the current block (its slots past the last token are not read) and the first valid block
        # (its left padding is not read).
        unread = torch.remainder(-length, block_size)
        if start is not None:
            unread = unread + torch.remainder(start, block_size)
        read = counts.double() * block_size - unread
    for store, value in ((state.read, read), (state.available, available)):
        value = value.sum(0).expand(state.num_kv_heads)
        current = store.get("decode")
        if current is None or not current.is_contiguous():  # the ordinary path stores expanded views
            store["decode"] = value.clone() if current is None else current + value
        else:
            store["decode"].add_(value)


# ------------------------------------------------ early selection: beside the layer's q/k/v projections


@dataclass
class _Pending:
    """A selection started by :func:`start_selection`, joined by :func:`static_decode`."""

    selection: Selection | None
    hidden: torch.Tensor  # read by the selection: kept alive (and, compiled, unreused) until the join
    seq_len: torch.Tensor
    handle: int


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def start_selection(cache: StaticSparseCache, state) -> None:
    """The attention pre-hook's part (``StaticSparseCache.start_selection``): start an early decoder's
    selection from the layer's hidden states, before the q/k/v projections.

    On CUDA it runs on a side stream: its projection, scoring and selection kernels (a few of them
    latency-bound, the selection on one SM) overlap the layer's projection GEMMs, and the attention waits for
    it (an event, captured as a graph edge in a CUDA graph). On CPU it runs inline, one step earlier than
    the attention call. Left padding is the cache's ``seq_start`` (the attention mask is not known here).
    """
    state.pending_selection = None
    if not cache.overlap_selection:  # turned off: the selection runs in the attention call
        return
    from ..integration import MAX_DECODE_QUERIES  # noqa: PLC0415 (integration imports this package)

    hidden = state.hidden_states
    if state.method.config.method not in _EARLY or hidden is None or hidden.shape[1] > MAX_DECODE_QUERIES:
        return
    # The counter before this layer's write of the new tokens, plus those tokens: what static_decode reads.
    seq_len = cache.length(state.layer_idx) + hidden.shape[1]
    if torch.compiler.is_compiling():
        handle = _recorded_handle(cache, state)
        spec = _SLOTS[handle].spec
        selection = None
        if spec is not None:
            ids, counts = torch.ops.spotattn.select_early(hidden, seq_len, cache.seq_start, handle)
            selection = Selection(ids, counts, spec[4])
    else:
        handle = _own_handle(cache, state)
        selection = _launch(handle, hidden, seq_len, cache.seq_start)
        _remember(cache, state, selection)
        state.last_selection = selection
    state.pending_selection = _Pending(selection, hidden, seq_len, handle)


def _launch(
    handle: int, hidden: torch.Tensor, seq_len: torch.Tensor, seq_start: torch.Tensor | None
) -> Selection | None:
    slot = _SLOTS[handle]
    cache, state = slot.cache(), slot.state()
    if cache is None or state is None:
        raise RuntimeError("spotattn: the cache or the sparsified model of this step is gone")
    t = hidden.shape[1]
    main = torch.cuda.current_stream(hidden.device) if hidden.is_cuda else None
    side = None
    if main is not None:
        side = _SIDE_STREAMS.get(hidden.device.index)
        if side is None:
            side = _SIDE_STREAMS[hidden.device.index] = torch.cuda.Stream(hidden.device)
        side.wait_stream(main)  # the hidden states and the length are written on the main stream
    saved, state.hidden_states = state.hidden_states, hidden  # the compiled graph's hidden states
    try:
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext(), torch.no_grad():
            positions = seq_len - t + torch.arange(t, device=hidden.device)
            selection = _DECODERS[state.method.config.method](
                DecodeContext(cache, state, None, seq_len, positions, seq_start)
            )
            if side is not None:
                if slot.done is None:  # made in an eager step, re-recorded in captures
                    slot.done = torch.cuda.Event()
                slot.done.record(side)
    finally:
        state.hidden_states = saved
    if side is not None:
        # Memory that crosses streams: the allocator must not hand it out again before the other stream's use.
        for tensor in (hidden, seq_len):
            tensor.record_stream(side)
        if selection is not None:
            for tensor in (selection.block_ids, selection.counts):
                tensor.record_stream(main)
    return selection


def _join(handle: int, device: torch.device) -> None:
    done = _SLOTS[handle].done
    if done is not None and device.type == "cuda":
        torch.cuda.current_stream(device).wait_event(done)


@torch.library.custom_op("spotattn::select_early", mutates_args=())
def _select_early_op(
    hidden: torch.Tensor, seq_len: torch.Tensor, seq_start: torch.Tensor | None, handle: int
) -> tuple[torch.Tensor, torch.Tensor]:
    selection = _launch(handle, hidden, seq_len, seq_start)
    if selection is None:
        raise RuntimeError("spotattn::select_early: the decoder returned None where an eager step selected blocks")
    return selection.block_ids, selection.counts  # fresh tensors, made by the decoder


@_select_early_op.register_fake
def _select_early_fake(hidden, seq_len, seq_start, handle):
    return _recorded_outputs(hidden, handle)


# Declared as mutating the query (it writes nothing): the compiled graph then orders the attention, which
# reads the query, after the wait. It takes select_early's outputs, so that it is ordered after the fork
# (without them nothing ties the two ops, and inductor may schedule the wait first, which then waits for
# an earlier record of the event); and the hidden states and the length, so that inductor keeps their
# buffers, which the side stream reads, alive until here.
@torch.library.custom_op("spotattn::select_join", mutates_args=("query",))
def _select_join_op(
    query: torch.Tensor,
    block_ids: torch.Tensor,
    counts: torch.Tensor,
    hidden: torch.Tensor,
    seq_len: torch.Tensor,
    handle: int,
) -> None:
    _join(handle, query.device)


@_select_join_op.register_fake
def _select_join_fake(query, block_ids, counts, hidden, seq_len, handle):
    return None


# ------------------------------------------------------------------- the opaque selection under compile


@dataclass
class _Slot:
    """One (cache, layer) pair the opaque op can run: weak references, so a dropped cache is freed."""

    cache: weakref.ref
    state: weakref.ref
    # What the layer's decoder returned in the last eager step: None (dense) or
    # (ids shape, ids dtype, counts shape, counts dtype, block size).
    spec: tuple | None = None
    recorded: bool = False
    done: torch.cuda.Event | None = None  # the side stream's last early selection (start_selection)


_SLOTS: dict[int, _Slot] = {}
_HANDLES = itertools.count()


def _slot_handle(cache: StaticSparseCache, state) -> int | None:
    handle = cache._select_slots.get(state.layer_idx)
    if handle is not None and handle in _SLOTS and _SLOTS[handle].state() is state:
        return handle
    return None


def _own_handle(cache: StaticSparseCache, state) -> int:
    """The layer's handle, made on first use (eager steps only)."""
    handle = _slot_handle(cache, state)
    if handle is None:
        for dead in [h for h, slot in _SLOTS.items() if slot.cache() is None or slot.state() is None]:
            del _SLOTS[dead]
        handle = next(_HANDLES)
        _SLOTS[handle] = _Slot(weakref.ref(cache), weakref.ref(state))
        cache._select_slots[state.layer_idx] = handle
    return handle


def _remember(cache: StaticSparseCache, state, selection: Selection | None) -> None:
    """Record the layout of the layer's selection, for the fake implementations of the opaque ops."""
    slot = _SLOTS[_own_handle(cache, state)]
    if selection is None:
        slot.spec = None
    else:
        ids, counts = selection.block_ids, selection.counts
        slot.spec = (tuple(ids.shape), ids.dtype, tuple(counts.shape), counts.dtype, selection.block_size)
    slot.recorded = True


def _recorded_handle(cache: StaticSparseCache, state) -> int:
    handle = _slot_handle(cache, state)
    if handle is None or not _SLOTS[handle].recorded:
        raise RuntimeError(
            "compiling a decode step on a StaticSparseCache needs one eager step on that cache first (it records "
            "each layer's selection layout and allocates lazy buffers); GraphDecoder(compile=True) does this"
        )
    return handle


def _select_opaque(
    cache: StaticSparseCache, state, q: torch.Tensor, seq_len: torch.Tensor, seq_start: torch.Tensor | None,
    scale: float | None,
) -> Selection | None:
    """The layer's selection inside a compiled region: None for a dense layer, else the opaque op."""
    handle = _recorded_handle(cache, state)
    spec = _SLOTS[handle].spec
    if spec is None:
        return None
    layer = cache.layers[state.layer_idx]
    ids, counts = torch.ops.spotattn.static_select(
        q, state.hidden_states, layer.keys, layer.values, seq_len, seq_start, scale, handle
    )
    return Selection(ids, counts, spec[4])


@torch.library.custom_op("spotattn::static_select", mutates_args=())
def _static_select_op(
    query: torch.Tensor,
    hidden: torch.Tensor | None,
    keys: torch.Tensor,
    values: torch.Tensor,
    seq_len: torch.Tensor,
    seq_start: torch.Tensor | None,
    scale: float | None,
    handle: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    slot = _SLOTS[handle]
    cache, state = slot.cache(), slot.state()
    if cache is None or state is None:
        raise RuntimeError("spotattn::static_select: the cache or the sparsified model of this step is gone")
    layer = cache.layers[state.layer_idx]
    # keys/values are here for ordering only: decoders read the cache's buffers, which must be these.
    if keys.data_ptr() != layer.keys.data_ptr() or values.data_ptr() != layer.values.data_ptr():
        raise RuntimeError("spotattn::static_select: the step wrote the K/V cache out of place")
    t = query.shape[2]
    positions = seq_len - t + torch.arange(t, device=query.device)
    # The compiled graph hands the layer's hidden states over as an argument; decoders read the state's.
    saved, state.hidden_states = state.hidden_states, hidden
    try:
        with torch.no_grad():
            selection = _DECODERS[state.method.config.method](
                DecodeContext(cache, state, query, seq_len, positions, seq_start, scale)
            )
    finally:
        state.hidden_states = saved
    if selection is None:
        raise RuntimeError("spotattn::static_select: the decoder returned None where an eager step selected blocks")
    # Fresh, contiguous outputs: the layout the fake implementation promises, aliasing no input.
    return selection.block_ids.contiguous(), selection.counts.contiguous()


@_static_select_op.register_fake
def _static_select_fake(query, hidden, keys, values, seq_len, seq_start, scale, handle):
    return _recorded_outputs(query, handle)


def _recorded_outputs(like: torch.Tensor, handle: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (ids, counts) in the layout the layer's last eager selection had (the ops' fake outputs)."""
    ids_shape, ids_dtype, counts_shape, counts_dtype, _ = _SLOTS[handle].spec
    return like.new_empty(ids_shape, dtype=ids_dtype), like.new_empty(counts_shape, dtype=counts_dtype)


# ------------------------------------------------------------------------------------ static decoders


@register_static_decoder("dense")
def _dense(ctx: DecodeContext) -> Selection | None:
    return None


@register_static_decoder("spot", early=True)
def _spot(ctx: DecodeContext) -> Selection | None:
    """SpotAttention: write the new selector keys in place, score the whole buffer, select by budget.

    Scoring reads the selector keys of the whole buffer (future entries are zeros or stale, always
    finite); selection allows only blocks up to ``seq_len`` and renormalises over them, so the result
    is the one the ordinary path gets from the live prefix. Cost: scoring scales with the capacity.
    """
    from ..methods.spot import _finite_rows  # noqa: PLC0415 (methods import the integration)
    from ..spot.quant import KeyCache, quantize, score_blocks_torch

    method = ctx.state.method
    if not method.serves:  # no selector for this layer, or one of SpotConfig.dense_layers: dense, no key buffers
        return None
    hidden = ctx.state.hidden_states
    if hidden is None:
        raise RuntimeError("spot needs the layer's hidden states; use spotattn.sparsify")
    cfg = method.config
    # Only the hidden states are read (never ctx.query): the selection can start before the q/k/v projections.
    on_gpu, one_query = hidden.is_cuda, hidden.shape[1] == 1
    layer = method._layer(hidden.device)
    meta = ctx.cache.meta(ctx.layer_idx)
    if on_gpu and _fused_prep(layer, cfg.key_format, hidden):
        # One kernel for norm + rope of key and queries, int4/bf16 encoding and the cache write.
        from ..spot.triton_prep import selector_decode_prep  # noqa: PLC0415 (needs triton)

        buffers = _key_buffers(ctx, meta, layer, cfg.key_format, hidden, KeyCache.PREFIX)
        qs, w = selector_decode_prep(layer, hidden, ctx.positions, cfg.key_format, buffers["k"], buffers.get("s"))
    else:
        parts = quantize(layer.keys(hidden, ctx.positions), cfg.key_format)
        buffers = {}
        for name, part in parts.items():
            full = f"{KeyCache.PREFIX}.{name}"
            entry = meta.get(full)
            if entry is None:  # a cache that was not prefilled by spot (benchmarks): zeros, written as we go
                entry = ctx.cache.allocate_meta(ctx.layer_idx, full, part, tokens_per_entry=1, axis=1)
            entry.tensor.index_copy_(1, ctx.positions, part)
            buffers[name] = entry.tensor
        qs, w = layer.queries(hidden, ctx.positions)
    bs = cfg.block_size
    if on_gpu and one_query:
        from ..spot.triton_score import score_blocks_triton  # noqa: PLC0415 (needs triton)

        logits = score_blocks_triton(qs, w, buffers, cfg.key_format, ctx.cache.capacity, bs, ctx.seq_start)
    else:
        logits = score_blocks_torch(qs, w, buffers, cfg.key_format, ctx.positions, bs, ctx.seq_start)
    if on_gpu and one_query:
        from .select import _cap_blocks, _forced_counts, _fused_select  # noqa: PLC0415

        fused = _fused_select(logits)
        if fused is not None:
            # Softmax over the allowed blocks, at the selector's temperature, happens inside the selection
            # kernel (the same distribution as softmax over the buffer then renormalised, up to rounding).
            n_sink, n_recent = _forced_counts(cfg.budget, bs)
            width = n_sink + max(n_recent, 2) + _cap_blocks(cfg.budget, bs, logits.shape[-1])
            return fused(logits, cfg.budget, bs, width, logits=True, seq_len=ctx.seq_len, seq_start=ctx.seq_start,
                         temperature=method.temperature)
    mass = torch.softmax(_finite_rows(logits) / method.temperature, dim=-1).amax(dim=2, keepdim=True)
    return select_decode_static(mass, cfg.budget, bs, ctx.seq_len, hidden.shape[1], ctx.seq_start)


def _fused_prep(layer, fmt: str, hidden: torch.Tensor) -> bool:
    try:
        from ..spot.triton_prep import fused_prep_supported  # noqa: PLC0415 (needs triton)
    except ImportError:
        return False
    return fused_prep_supported(layer, fmt, hidden)


def _key_buffers(ctx: DecodeContext, meta: dict, layer, fmt: str, hidden: torch.Tensor, prefix: str) -> dict:
    """The static selector key buffers, allocated (zeros) on first use when the cache was not prefilled by
    spot; that happens in the warm-up before any capture."""
    from ..spot.quant import quantize  # noqa: PLC0415

    buffers = {}
    template = None
    for name in ("k",) if fmt == "bf16" else ("k", "s"):
        entry = meta.get(f"{prefix}.{name}")
        if entry is None:
            if template is None:  # shapes and dtypes of the stored parts, from one zero key
                template = quantize(hidden.new_zeros(hidden.shape[0], 1, layer.config.head_dim).float(), fmt)
            entry = ctx.cache.allocate_meta(ctx.layer_idx, f"{prefix}.{name}", template[name], 1, axis=1)
        buffers[name] = entry.tensor
    return buffers
