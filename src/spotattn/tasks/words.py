"""English word lists from the installed ``wonderwords`` package (nouns, adjectives, verbs)."""

from __future__ import annotations

import importlib.resources
from functools import cache

WORD_KINDS = ("noun", "adjective", "verb")


@cache
def word_list(kind: str) -> tuple[str, ...]:
    """Single lowercase alphabetic words of one kind, sorted, without duplicates or offensive words."""
    if kind not in WORD_KINDS:
        raise ValueError(f"kind must be one of {WORD_KINDS}, got {kind!r}")
    try:
        assets = importlib.resources.files("wonderwords") / "assets"
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "the word-list tasks need the wonderwords package: pip install wonderwords"
        ) from exc
    banned = set((assets / "profanitylist.txt").read_text(encoding="utf-8").split())
    words = {w.strip().lower() for w in (assets / f"{kind}list.txt").read_text(encoding="utf-8").splitlines()}
    return tuple(sorted(w for w in words if w.isalpha() and w.isascii() and w not in banned))
