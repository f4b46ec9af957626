"""GUARD, generation-time restriction, for language models: the family-neutral guard of `guards/text/guard.py` (the
paper, the rule, where obliviate differs) on a causal LM: the scoring hooks sit on its decoder and output head."""
from __future__ import annotations

from obliviate.guards.text import guard
from obliviate.guards.text.guard import (  # noqa: F401  (this family's names of them)
    GUARDConfig, Forbidden, GuardLogitsProcessor, Restriction, key_words, restrict)


class GUARD(guard.GUARD):
    family = "lm"
