"""GradDiff with SafeEraser's Prompt Decouple loss: forget the person, not the question.

Paper: Chen et al. 2025, "SafeEraser: Enhancing Safety in Multimodal Large Language Models through Multimodal Machine
Unlearning", https://arxiv.org/abs/2502.12520 (code: yuu250/SafeEraser, its "gdpd" objective)

    L = - NLL(forget) + alpha * NLL(retain) + lambda * NLL(decoupled)

A decoupled item is a forget question asked about an unrelated picture, with that picture's own true answer: a
retain item with a picture whose question is the same words ("What does this person do for a living?"), drawn at
random. Ascent on the forget items alone teaches the model to refuse or garble the question whatever the picture
(over-forgetting); the decoupled term keeps the question answered for other people. Defaults alpha = lambda = 0.5,
as the paper's gdpd (forget + 0.5 retain + 0.5 PD). A forget item without a picture, or whose question no retain
item with a picture shares, is paired with a random retain item with a picture.
"""
from __future__ import annotations

from dataclasses import dataclass

from obliviate.errors import ObliviateError
from obliviate.methods.lm.base import LossParts, Method, check_number, retain_nll_term
from obliviate.models.sequences import mean_nll


@dataclass
class PromptDecoupleConfig:
    alpha: float = 0.5  # weight of the retain NLL
    pd_weight: float = 0.5  # weight of the decoupled prompts' NLL (lambda)

    def __post_init__(self):
        check_number("PromptDecouple", "alpha", self.alpha, min=0)
        check_number("PromptDecouple", "pd_weight", self.pd_weight, min=0)


class PromptDecouple(Method):
    name = "PromptDecouple"
    Config = PromptDecoupleConfig
    needs_reference = False

    @staticmethod
    def companions(forget: list, retain: list, rng) -> list:
        """One decoupled item per forget item: a retain item with a picture and the same question, else any retain
        item with a picture."""
        pictured = [r for r in retain if getattr(r, "image", None) is not None]
        if not pictured:
            raise ObliviateError("PromptDecouple needs retain items with pictures (the decoupled prompts' images)")
        by_question: dict[str, list] = {}
        for r in pictured:
            by_question.setdefault(r.question, []).append(r)
        return [rng.choice(by_question.get(f.question) or pictured) for f in forget]

    def losses(self, model, reference, forget: dict, retain: dict) -> LossParts:
        c = self.config
        nll_f = mean_nll(model, forget)
        logs = {"forget_nll": float(nll_f.detach())}
        retain_term = retain_nll_term(model, retain, c.alpha, logs)
        if c.pd_weight:
            nll_pd = mean_nll(model, forget["companion"])
            logs["decoupled_nll"] = float(nll_pd.detach())
            retain_term = c.pd_weight * nll_pd + (retain_term if retain_term is not None else 0)
        return LossParts(forget=-nll_f, retain=retain_term, logs=logs)
