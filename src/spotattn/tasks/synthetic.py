"""Synthetic long-context tasks that need no corpus: passkey retrieval and RULER-style variable tracking
and common-words extraction."""

from __future__ import annotations

import random

from .base import (
    TaskSample,
    as_tensor,
    chat_ids,
    check_total_tokens,
    haystack_ids,
    haystack_prompt,
)
from .words import word_list


def build_passkey(
    tokenizer, total_tokens: int, *, seed: int = 0, depth: float | None = None, max_new_tokens: int = 16
) -> TaskSample:
    """A five-digit pass key stated once, at ``depth``, inside noise sentences."""
    check_total_tokens(total_tokens)
    rng = random.Random(seed)
    depth = rng.random() if depth is None else depth
    key = str(rng.randrange(10_000, 100_000))

    def content(context: str) -> str:
        return ("There is an important piece of information hidden inside a lot of irrelevant text. "
                f"Find it and memorize it. I will quiz you about it.\n{context}\nWhat is the pass key?")

    filler = haystack_ids(tokenizer, "noise", total_tokens)
    ids = haystack_prompt(tokenizer, total_tokens, filler, [(depth, f"The pass key is {key}. Remember it.")],
                          content, "The pass key is")
    return TaskSample("passkey", as_tensor(ids), (key,), max_new_tokens, depth=depth, meta={"seed": seed})


def _variable_names(rng: random.Random, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    return names


def build_variable_tracking(
    tokenizer,
    total_tokens: int,
    *,
    seed: int = 0,
    depth: float | None = None,
    hops: int = 4,
    max_new_tokens: int = 48,
) -> TaskSample:
    """RULER variable tracking: ``VAR A = 12345``, then ``VAR B = VAR A`` ... ``hops`` times, spread in
    order through noise; the answer is every name that ends up holding the value. ``depth`` places the
    first assignment (the rest follow at evenly spaced depths after it)."""
    check_total_tokens(total_tokens)
    if hops < 1:
        raise ValueError(f"hops must be >= 1, got {hops}")
    rng = random.Random(seed)
    depth = rng.uniform(0.0, 0.5) if depth is None else depth
    value = str(rng.randrange(10_000, 100_000))
    names = _variable_names(rng, hops + 1)
    statements = [f"VAR {names[0]} = {value}."]
    statements += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:], strict=False)]
    step = (1.0 - depth) / len(statements)
    inserts = [(depth + i * step, s) for i, s in enumerate(statements)]

    def content(context: str) -> str:
        return ("Memorize and track the chain of variable assignments hidden in the following text.\n\n"
                f"{context}\nQuestion: Find all variables that are assigned the value {value} "
                "in the text above.")

    filler = haystack_ids(tokenizer, "noise", total_tokens)
    prefix = (f"According to the chain of variable assignments in the text above, {len(names)} variables are "
              f"assigned the value {value}, they are:")
    ids = haystack_prompt(tokenizer, total_tokens, filler, inserts, content, prefix)
    return TaskSample("vt", as_tensor(ids), tuple(names), max_new_tokens, depth=depth,
                      meta={"seed": seed, "hops": hops})


def build_common_words(
    tokenizer,
    total_tokens: int,
    *,
    seed: int = 0,
    depth: float | None = None,
    num_common: int = 10,
    rare_repeats: int = 3,
    max_new_tokens: int = 80,
) -> TaskSample:
    """RULER common-words extraction: a numbered list where ``num_common`` words each appear often and
    many other words ``rare_repeats`` times; the answer is the frequent words. The list length fills
    ``total_tokens``; a common word appears about five times as often as a rare one (at least 6 times,
    at most 30), scaled so common words take about a quarter of the list."""
    check_total_tokens(total_tokens)
    rng = random.Random(seed)
    pool = list(word_list("noun") + word_list("adjective") + word_list("verb"))
    rng.shuffle(pool)
    common, rare = pool[:num_common], pool[num_common:]
    entries_estimate = total_tokens // 4  # "123. word\n" is about four tokens
    common_repeats = max(2 * rare_repeats, min(30, entries_estimate // (4 * num_common)))
    rare_entries = [w for w in rare for _ in range(rare_repeats)]

    def content_of(n_rare: int) -> str:
        words = [w for w in common for _ in range(common_repeats)] + rare_entries[:n_rare]
        random.Random(seed * 7919 + n_rare).shuffle(words)  # deterministic in (seed, n)
        listing = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return ("Below is a numbered list of words. In these words, some appear more often than others. "
                f"Memorize the ones that appear most often.\n{listing}\n"
                f"Question: What are the {num_common} most common words in the above list?")

    prefix = f"The top {num_common} words that appear most often in the list are:"

    def render(n: int) -> list[int]:
        return chat_ids(tokenizer, content_of(n), prefix)

    overhead = len(render(0))
    if overhead + 16 > total_tokens:
        raise ValueError(f"total_tokens={total_tokens} is too short for common-words extraction "
                         f"({overhead} tokens for the frequent words alone)")
    per_entry = max(1.0, (len(render(64)) - overhead) / 64)
    guess = int((total_tokens - overhead) / per_entry)
    if guess > len(rare_entries):
        raise ValueError(f"total_tokens={total_tokens} needs more distinct words than the word lists hold")
    ids = _fit_entries(render, total_tokens, guess, len(rare_entries), per_entry)
    return TaskSample("cwe", as_tensor(ids), tuple(common), max_new_tokens,
                      meta={"seed": seed, "common_repeats": common_repeats, "rare_repeats": rare_repeats})


def _fit_entries(render, total_tokens: int, guess: int, upper: int, per_entry: float) -> list[int]:
    """Largest list (in entries) whose prompt fits ``total_tokens``: steps scaled by the tokens per
    entry, then single entries (an entry is several tokens, so this lands within one entry)."""
    n = max(0, min(guess, upper))
    ids = render(n)
    for _ in range(6):
        if len(ids) == total_tokens:
            return ids
        nxt = max(0, min(upper, n + int((total_tokens - len(ids)) / per_entry)))
        if nxt == n:
            break
        n, ids = nxt, render(nxt)
    while len(ids) > total_tokens and n > 0:
        n -= 1
        ids = render(n)
    while n < upper:
        more = render(n + 1)
        if len(more) > total_tokens:
            break
        n, ids = n + 1, more
    return ids
