"""Long-context tasks built offline from installed text."""

from .needle import NeedlePrompt, build_needle_prompt, essay_text

__all__ = ["NeedlePrompt", "build_needle_prompt", "essay_text"]
