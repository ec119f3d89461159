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


@lru_cache(maxsize=4)
def _bible_ids(tokenizer) -> tuple[int, ...] | None:
    text = bible_text()
    return None if text is None else tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def document_source() -> str:
    return "kjv" if bible_text() is not None else "essays"


def build_document(tokenizer, total_tokens: int, *, seed: int = 0, depth: float | None = None) -> TaskSample:
    """Exactly ``total_tokens`` tokens of running text from a seeded offset (``depth`` is ignored)."""
    check_total_tokens(total_tokens)
    rng = random.Random(seed)
    bible = _bible_ids(tokenizer)
    if bible is not None and len(bible) > total_tokens:
        start = rng.randrange(len(bible) - total_tokens)
        ids, source = list(bible[start : start + total_tokens]), "kjv"
    else:
        ids, source = haystack_ids(tokenizer, "essay", total_tokens, rng)[:total_tokens], "essays"
    return TaskSample("ppl", as_tensor(ids), (), 0, kind="perplexity", meta={"seed": seed, "source": source})
