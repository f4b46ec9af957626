"""KL minimisation: ascent on the forget answers plus a KL term that keeps the retain answers' next-token
distributions close to the original model's.

Paper: Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs", https://arxiv.org/abs/2401.06121

    L = - gamma * NLL_f + alpha * KL( p_ref(. | x_r, y_r,<t) || p_theta(. | x_r, y_r,<t) )

The KL is summed over the vocabulary and averaged over the positions that predict a retain answer token.
Defaults gamma = alpha = 1. Needs the frozen reference model.
"""
from __future__ import annotations

from dataclasses import dataclass

from obliviate.methods.lm.base import LossParts, Method, check_number, retain_kl_term
from obliviate.models.sequences import mean_nll


@dataclass
class KLConfig:
    gamma: float = 1.0  # weight of the (negated) forget NLL
    alpha: float = 1.0  # weight of the retain KL

    def __post_init__(self):
        check_number("KL", "gamma", self.gamma, positive=True)
        check_number("KL", "alpha", self.alpha, min=0)


class KL(Method):
    name = "KL"
    Config = KLConfig
    needs_reference = True

    def losses(self, model, reference, forget: dict, retain: dict) -> LossParts:
        c = self.config
        nll_f = mean_nll(model, forget)
        logs = {"forget_nll": float(nll_f.detach())}
        retain_term = retain_kl_term(model, reference, retain, c.alpha, logs)
        return LossParts(forget=-c.gamma * nll_f, retain=retain_term, logs=logs)
