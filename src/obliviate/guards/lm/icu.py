"""ICU, in-context unlearning, for language models: the family-neutral guard of `guards/text/icu.py` (the paper, the
recipe, where obliviate differs) asked through the causal LM's tokenizer."""
from __future__ import annotations

from obliviate.guards.text import icu
from obliviate.guards.text.icu import ICUConfig, flipped_answers  # noqa: F401  (this family's names of them)


class ICU(icu.ICU):
    family = "lm"
