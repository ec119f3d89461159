"""What every task shares: the sample type, chat encoding, haystacks and exact token-length fitting."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import torch

# A few plain sentences that carry no information: the "noise" haystack of passkey and RULER tasks.
NOISE_SENTENCES = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class TaskSample:
    """One prompt of one task, ready to run: token ids plus what a correct output must contain.

    ``kind`` is ``generate`` (greedy answer scored by :meth:`score`) or ``perplexity`` (the ids are a
    document whose next-token log-likelihood is measured; ``answers`` is empty).
    """

    task: str
    input_ids: torch.Tensor  # (1, L) int64
    answers: tuple[str, ...]
    max_new_tokens: int
    kind: Literal["generate", "perplexity"] = "generate"
    depth: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def score(self, output: str) -> float:
        """Share of the expected answers found in ``output`` (case-insensitive substring match)."""
        if not self.answers:
            return float("nan")
        text = output.lower()
        return sum(answer.lower() in text for answer in self.answers) / len(self.answers)


def chat_ids(tokenizer, content: str, answer_prefix: str = "") -> list[int]:
    """``content`` as one user turn in the model's chat template (plain text without one), followed by
    an optional start of the assistant's answer that steers short models into the expected format."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
        )
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = tokenizer(content + "\nAnswer:", add_special_tokens=True)["input_ids"]
    if answer_prefix:
        ids += tokenizer(answer_prefix, add_special_tokens=False)["input_ids"]
    return ids


def fit_length(render: Callable[[int], list[int]], total_tokens: int, guess: int, upper: int) -> list[int]:
    """The longest ``render(n)`` (``0 <= n <= upper``) that has at most ``total_tokens`` tokens.

    ``render(n)`` builds a prompt around ``n`` units of filler (tokens, list entries); its length grows
    almost one-for-one with ``n`` but re-tokenising text at the seams can shift it by a token or two, so
    a few Newton steps from ``guess`` land on the target and a short walk down settles the rest.
    """
    n = max(0, min(guess, upper))
    best: tuple[int, list[int]] | None = None
    for _ in range(8):
        ids = render(n)
        if len(ids) <= total_tokens and (best is None or len(ids) > len(best[1])):
            best = (n, ids)
        if len(ids) == total_tokens:
            return ids
        step = total_tokens - len(ids)
        nxt = max(0, min(upper, n + step))
        if nxt == n:
            break
        n = nxt
    if best is None:  # every try overshot: walk down until it fits
        while n > 0:
            n = max(0, n - max(1, n // 64))
            ids = render(n)
            if len(ids) <= total_tokens:
                return ids
        ids = render(0)
        if len(ids) > total_tokens:
            raise ValueError(
                f"total_tokens={total_tokens} is too short: the prompt needs {len(ids)} tokens "
                "without any filler"
            )
        return ids
    return best[1]


def check_total_tokens(total_tokens: int, minimum: int = 64) -> None:
    if isinstance(total_tokens, bool) or not isinstance(total_tokens, int) or total_tokens < minimum:
        raise ValueError(f"total_tokens must be an integer >= {minimum}, got {total_tokens!r}")


@lru_cache(maxsize=8)
def _noise_ids(tokenizer, min_tokens: int) -> tuple[int, ...]:
    unit = tokenizer(NOISE_SENTENCES, add_special_tokens=False)["input_ids"]
    repeats = int(1.25 * min_tokens / max(1, len(unit))) + 4  # seams merge a few tokens
    return tuple(tokenizer(NOISE_SENTENCES * repeats, add_special_tokens=False)["input_ids"])


@lru_cache(maxsize=4)
def _essay_ids(tokenizer) -> tuple[int, ...]:
    from .needle import essay_text  # the essays live with the needle task that introduced them

    return tuple(tokenizer(essay_text(), add_special_tokens=False)["input_ids"])


HAYSTACKS = ("essay", "noise")


def haystack_ids(tokenizer, kind: str, min_tokens: int, rng: random.Random | None = None) -> list[int]:
    """At least ``min_tokens`` filler tokens: Paul Graham essays (from a seeded offset, wrapping
    around) or repeated noise sentences."""
    if kind == "noise":
        return list(_noise_ids(tokenizer, min_tokens))
    if kind != "essay":
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {kind!r}")
    ids = _essay_ids(tokenizer)
    start = rng.randrange(len(ids)) if rng is not None else 0
    out = list(ids[start:]) + list(ids[:start])
    while len(out) < min_tokens:  # longer than all essays: repeat them
        out += list(ids)
    return out


@lru_cache(maxsize=4)
def _sentence_ends(tokenizer) -> frozenset[int]:
    """Token ids whose text ends a sentence, where inserts may go without splitting a sentence."""
    vocab = tokenizer.get_vocab()
    return frozenset(i for t, i in vocab.items() if t.rstrip("Ċ").endswith((".", "!", "?")) and len(t) <= 4)


def splice(tokenizer, filler: Sequence[int], inserts: Sequence[tuple[float, str]]) -> str:
    """Filler text with each ``(depth, text)`` insert at that relative depth, moved back to the end of a
    sentence (within 48 tokens) so that neither the filler nor the insert is cut in two."""
    ends = _sentence_ends(tokenizer)
    cuts = []
    for depth, text in sorted(inserts, key=lambda x: x[0]):
        cut = int(round(len(filler) * depth))
        for back in range(min(48, cut)):
            if filler[cut - 1 - back] in ends:
                cut -= back
                break
        cuts.append((cut, text))
    parts, prev = [], 0
    for cut, text in cuts:
        cut = max(cut, prev)
        parts.append(tokenizer.decode(list(filler[prev:cut])))
        parts.append(" " + text.strip() + " ")
        prev = cut
    parts.append(tokenizer.decode(list(filler[prev:])))
    return "".join(parts).strip()


def haystack_prompt(
    tokenizer,
    total_tokens: int,
    filler: Sequence[int],
    inserts: Sequence[tuple[float, str]],
    make_content: Callable[[str], str],
    answer_prefix: str = "",
) -> list[int]:
    """Chat prompt ids of (almost always exactly) ``total_tokens`` tokens: ``make_content(context)``
    where the context is filler with ``inserts`` spliced in."""

    def render(n: int) -> list[int]:
        return chat_ids(tokenizer, make_content(splice(tokenizer, filler[:n], inserts)), answer_prefix)

    overhead = len(render(0))
    if overhead + 16 > total_tokens:
        raise ValueError(f"total_tokens={total_tokens} is too short for this task's text ({overhead} tokens)")
    if len(filler) < total_tokens - overhead:
        needed = total_tokens - overhead
        raise ValueError(f"the haystack has {len(filler)} tokens, fewer than the {needed} needed")
    return fit_length(render, total_tokens, total_tokens - overhead, len(filler))


def as_tensor(ids: list[int]) -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.long)
