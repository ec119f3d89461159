"""Text generation on the static decode path: prefill once, then one CUDA-graph replay per new token.

Hugging Face ``generate()`` on a sparsified model decodes through the ordinary path: every step launches
each layer's kernels from Python and sizes tensors on the host. :func:`generate` prefills through the
method's own prefill, copies the cache into a :class:`StaticSparseCache` with room for the new tokens,
and runs every decode step as one replay of a captured step (:class:`GraphDecoder`), the path
``spotattn bench decode`` times. On a CPU, or with ``graph=False``, the same steps run eagerly.

Token choice happens on the device between replays (greedy, or sampling with a temperature, top-k and
top-p); the host reads back only whether every sequence has finished, and only when an end-of-sequence
token is given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..integration import sparsified_config
from .decode_path import static_decoder_names
from .graph_decode import GraphDecoder, prefill_to_static


@dataclass
class Generation:
    """What :func:`generate` returns: the token ids and where the time went."""

    sequences: torch.Tensor  # (B, prompt + new): the prompt, then the new tokens (``pad_token_id`` after EOS)
    prompt_tokens: int
    new_tokens: int  # decode positions produced per sequence (at most max_new_tokens)
    prefill_seconds: float  # prefill and the copy into the static cache
    setup_seconds: float  # warm-up, compilation and graph capture (0 without a graph or compilation)
    decode_seconds: float  # the decode loop alone
    engine: str  # "graph", "compiled graph", "eager" or "compiled"

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second of the decode loop, per sequence (the first token comes from prefill)."""
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")


def end_ids(model: torch.nn.Module, tokenizer=None) -> int | list[int] | None:
    """The ids Hugging Face ``generate()`` stops at by default: the model's generation config's end ids
    (several for some models), else the tokenizer's end id."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return ids if ids is not None else getattr(tokenizer, "eos_token_id", None)


def _check(name: str, ok: bool, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"generate: {name} must be {allowed}, got {value!r}")


def next_token(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of ``logits`` ``(B, V)``: the argmax, or a sample from the softmax at
    ``temperature`` restricted to the ``top_k`` most likely tokens and the smallest set of mass ``top_p``."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass ranked before a token already reaches top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).view(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    graph: bool | None = None,
    compile: bool = False,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> Generation:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` ``(B, L)`` with a sparsified model.

    ``attention_mask``: 1 for real tokens; left padding only (the new tokens follow the last column).
    ``eos_token_id``: a sequence stops at it and is filled with ``pad_token_id`` (default: the first EOS
    id) after; the loop stops when every sequence has. ``graph``: replay each step from a CUDA graph
    (default: on CUDA); ``compile``: compile the step with ``torch.compile`` first. ``on_token`` is called
    with each new token column ``(B,)`` (on the device), e.g. to stream text.
    """
    config = sparsified_config(model)
    if config is None:
        raise ValueError("generate: the model is not sparsified; call spotattn.sparsify(model, config) first")
    if config.method not in static_decoder_names():
        raise ValueError(
            f"generate: method {config.method!r} has no static decode path (methods with one: "
            f"{', '.join(static_decoder_names())}); use Hugging Face model.generate() for it"
        )
    _check("input_ids", input_ids.dim() == 2 and input_ids.shape[1] > 0, "a non-empty (batch, length) tensor",
           tuple(input_ids.shape))
    _check("max_new_tokens", isinstance(max_new_tokens, int) and max_new_tokens > 0, "a positive int",
           max_new_tokens)
    if attention_mask is not None:
        _check("attention_mask", attention_mask.shape == input_ids.shape, f"shaped like input_ids "
               f"{tuple(input_ids.shape)}", tuple(attention_mask.shape))
        _check("attention_mask", bool(attention_mask[:, -1].all()), "left padding only (last column all 1)",
               "a right-padded mask")
    if do_sample:
        _check("temperature", temperature > 0, "> 0 when sampling", temperature)
        _check("top_k", top_k is None or top_k > 0, "None or a positive int", top_k)
        _check("top_p", top_p is None or 0 < top_p <= 1, "None or in (0, 1]", top_p)
        _check("generator", generator is None or generator.device.type == input_ids.device.type,
               f"None or a torch.Generator on {input_ids.device.type} (where the tokens are drawn)",
               None if generator is None else generator.device)
    on_cuda = input_ids.is_cuda
    graph = on_cuda if graph is None else graph
    _check("graph", not graph or on_cuda, "False on a CPU (CUDA graphs need a CUDA device)", graph)
    eos = torch.tensor(
        [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
        dtype=torch.long, device=input_ids.device,
    )
    pad = pad_token_id if pad_token_id is not None else int(eos[0]) if eos.numel() else 0

    def pick(logits: torch.Tensor) -> torch.Tensor:
        return next_token(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                          generator=generator)

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(input_ids.device)

    start = time.perf_counter()
    prompt = input_ids.shape[1]
    logits, cache = prefill_to_static(model, input_ids, capacity=prompt + max_new_tokens,
                                      attention_mask=attention_mask)
    sync()
    prefilled = time.perf_counter()
    decoder = GraphDecoder(model, cache, compile=compile)
    if graph:
        decoder.capture()
        step = decoder.step
    else:
        step = decoder.step_compiled if compile else decoder.step_eager
        decoder.prepare()
    sync()
    ready = time.perf_counter()

    tokens = []
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        token = pick(logits)
        if eos.numel():
            token = token.masked_fill(finished, pad)
            finished |= torch.isin(token, eos)
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if i + 1 == max_new_tokens or (eos.numel() and bool(finished.all())):
            break
        logits = step(token)
    sync()
    done = time.perf_counter()
    sequences = torch.cat([input_ids, torch.stack(tokens, 1)], 1)
    engine = {(False, False): "eager", (False, True): "compiled", (True, False): "graph",
              (True, True): "compiled graph"}[graph, compile]
    return Generation(sequences, prompt, len(tokens), prefilled - start, ready - prefilled, done - ready, engine)
