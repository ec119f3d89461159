"""Long-document perplexity text: the King James Bible when the ``bible`` command is installed
(Debian's ``bible-kjv``), the Paul Graham essays otherwise."""

from __future__ import annotations

import random
import shutil
import subprocess
from functools import lru_cache

from .base import TaskSample, as_tensor, check_total_tokens, haystack_ids


@lru_cache(maxsize=1)
def bible_text() -> str | None:
    """The whole King James Bible from ``bible``, or None when the command is missing or fails."""
    exe = shutil.which("bible")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, "Gen1:1-Rev22:21"], capture_output=True, text=True, timeout=120, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if len(done.stdout) > 100_000 else None


def document_source() -> str:
    return "kjv" if bible_text() is not None else "essays"


def build_document(tokenizer, total_tokens: int, *, seed: int = 0, depth: float | None = None) -> TaskSample:
    """Exactly ``total_tokens`` tokens of running text from a seeded offset (``depth`` is ignored)."""
    check_total_tokens(total_tokens)
    rng = random.Random(seed)
    bible = bible_text()
    if bible is not None:
        ids = _slice_ids(tokenizer, bible, total_tokens, rng)
        if ids is not None:
            return _document(ids, seed, "kjv")
    return _document(haystack_ids(tokenizer, "essay", total_tokens, rng)[:total_tokens], seed, "essays")


def _document(ids: list[int], seed: int, source: str) -> TaskSample:
    return TaskSample("ppl", as_tensor(ids), (), 0, kind="perplexity", meta={"seed": seed, "source": source})


def _slice_ids(tokenizer, text: str, total_tokens: int, rng: random.Random) -> list[int] | None:
    """``total_tokens`` tokens from a seeded line start; only a slice is tokenised (the whole Bible
    takes seconds), growing until it holds enough tokens. None when the text is too short."""
    chars = 6 * total_tokens
    if len(text) < 2 * chars:
        return None
    start = text.find("\n", rng.randrange(len(text) - 2 * chars)) + 1
    while start + chars <= len(text):
        ids = tokenizer(text[start : start + chars], add_special_tokens=False)["input_ids"]
        if len(ids) > total_tokens:
            return ids[:total_tokens]
        chars *= 2
    return None
