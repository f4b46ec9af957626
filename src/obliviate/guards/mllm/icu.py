"""ICU, in-context unlearning, for vision-language models: the family-neutral guard of `guards/text/icu.py` (the paper,
the recipe, where obliviate differs) asked through the processor's tokenizer.

The in-context examples are text turns: the forget items' questions with wrong answers (`guards/mllm.as_questions`:
the true value swapped for a wrong multiple-choice option; an item without options gets the refusal, not another
forget item's answer as on a language model: a picture question is worded alike for every person ("What is this
person's job?"), so another forget person's answer would be that person's true one, shown to their picture) and
L retain questions with their true answers, then the question, with its picture in the last turn only. The examples'
own pictures are left out: each would add the vision tower's hundreds of tokens (576 for LLaVA-1.5) per example, and
the adapter asks with one picture. A picture's question ("Where was this person born?") so gets, as its nearest
examples, the same question with wrong answers: read with the picture being asked about, as the paper's flipped
labels are read with the query."""
from __future__ import annotations

from obliviate.guards.mllm import as_questions
from obliviate.guards.text import icu


class ICU(icu.ICU):
    family = "mllm"

    def bind_items(self, forget: list, retain: list) -> ICU:
        from dataclasses import replace

        refused = (self.config.refusal,)  # the only wrong answer of an item without options
        questions = [i if i.perturbed_answers else replace(i, perturbed_answers=refused) for i in as_questions(forget)]
        return super().bind_items(questions, as_questions(retain))
