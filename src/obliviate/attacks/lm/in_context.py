"""In-context recall (UnUnlearning, Shumailov et al. 2024, https://arxiv.org/abs/2407.00106): the forgotten person's
own text (their biography) is put in the prompt before the question. A model that unlearned the fact can still use
it when it is given back, and so can the retrain model: what counts is the gap between the unlearned model and the
retrain reference. The control puts another forget person's biography there instead: an answer recalled with the
wrong biography came from the weights, not from the context."""
from __future__ import annotations

from dataclasses import dataclass

from obliviate.attacks.lm.common import QuestionAttack, Target
from obliviate.errors import ObliviateError


@dataclass
class InContextConfig:
    control: bool = True  # also ask with another forget person's biography in the prompt
    max_new_tokens: int = 48


class InContext(QuestionAttack):
    Config = InContextConfig
    controls = ("other_biography",)
    label = "in-context"
    columns = percent = ("recall_plain", "recall", "recall_other_biography")

    @staticmethod
    def texts(target: Target) -> dict[str, str]:
        texts: dict[str, str] = {}
        for t in target.forget_texts:
            if t.subject:
                texts[t.subject] = f"{texts[t.subject]} {t.text}" if t.subject in texts else t.text
        return texts

    def check(self, target: Target) -> None:
        texts = self.texts(target)
        missing = sorted({i.subject or "(no subject)" for i in target.forget if i.subject not in texts})
        if missing:
            raise ObliviateError(f"the in_context attack needs each forget subject's text (a biography); none for "
                                 f"{', '.join(missing[:3])}")

    def prompts(self, target: Target, model, tokenizer):
        texts = self.texts(target)
        variants = {"own_biography": ([f"{texts[i.subject]}\n{i.question}" for i in target.forget], None)}
        people = list(texts)
        if self.config.control and len(people) > 1:
            other = {p: people[(n + 1) % len(people)] for n, p in enumerate(people)}
            variants["other_biography"] = ([f"{texts[other[i.subject]]}\n{i.question}" for i in target.forget], None)
        return variants
