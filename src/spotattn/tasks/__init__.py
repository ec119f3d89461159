"""Long-context tasks built offline from installed text, at any token length, from a seed.

Every task is a function ``(tokenizer, total_tokens, *, seed, depth) -> TaskSample``; :data:`TASKS`
names them for the evaluation runner and the CLI.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from .base import HAYSTACKS, TaskSample, chat_ids, fit_length, haystack_ids
from .needle import NEEDLE_VARIANTS, NeedlePrompt, build_needle_prompt, build_niah, essay_text
from .perplexity import build_document, document_source
from .synthetic import build_common_words, build_passkey, build_variable_tracking

TaskBuilder = Callable[..., TaskSample]

TASKS: dict[str, TaskBuilder] = {
    "niah_single": partial(build_niah, variant="single", haystack="essay"),
    "niah_multikey": partial(build_niah, variant="multikey", haystack="essay"),
    "niah_multivalue": partial(build_niah, variant="multivalue", haystack="essay"),
    "niah_single_noise": partial(build_niah, variant="single", haystack="noise"),
    "passkey": build_passkey,
    "vt": build_variable_tracking,
    "cwe": build_common_words,
    "ppl": build_document,
}
# New tokens each task may generate (0: scored by likelihood, nothing generated).
ANSWER_TOKENS: dict[str, int] = {
    "niah_single": 32, "niah_multikey": 32, "niah_multivalue": 64, "niah_single_noise": 32,
    "passkey": 16, "vt": 48, "cwe": 80, "ppl": 0,
}
# Tasks whose samples sweep the needle depth from 0 to 1 (the rest draw positions from the seed).
DEPTH_TASKS = frozenset({"niah_single", "niah_multikey", "niah_multivalue", "niah_single_noise", "passkey"})


def available_tasks() -> list[str]:
    return list(TASKS)


def build_task(
    name: str, tokenizer, total_tokens: int, *, seed: int = 0, depth: float | None = None
) -> TaskSample:
    """One sample of task ``name`` with ``total_tokens`` prompt tokens."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed tasks: {', '.join(TASKS)}")
    extra = {"max_new_tokens": ANSWER_TOKENS[name]} if ANSWER_TOKENS[name] else {}
    return TASKS[name](tokenizer, total_tokens, seed=seed, depth=depth, **extra)


__all__ = [
    "ANSWER_TOKENS",
    "DEPTH_TASKS",
    "HAYSTACKS",
    "NEEDLE_VARIANTS",
    "TASKS",
    "NeedlePrompt",
    "TaskSample",
    "available_tasks",
    "build_common_words",
    "build_document",
    "build_needle_prompt",
    "build_niah",
    "build_passkey",
    "build_task",
    "build_variable_tracking",
    "chat_ids",
    "document_source",
    "essay_text",
    "fit_length",
    "haystack_ids",
]
