"""Gradient difference (GradDiff): ascent on the forget answers, descent on the retain answers.

Paper: Liu et al. 2022, "Continual Learning and Private Unlearning", https://arxiv.org/abs/2203.12817
(as used as a baseline in TOFU, https://arxiv.org/abs/2401.06121)

    L = - gamma * NLL_f + alpha * NLL_r

NLL = mean over the batch's answer tokens. Defaults gamma = alpha = 1 (TOFU / OpenUnlearning). No reference model.
"""
from __future__ import annotations

from dataclasses import dataclass

from obliviate.methods.lm.base import LossParts, Method, check_number, retain_nll_term
from obliviate.models.sequences import mean_nll


@dataclass
class GradDiffConfig:
    gamma: float = 1.0  # weight of the (negated) forget NLL
    alpha: float = 1.0  # weight of the retain NLL

    def __post_init__(self):
        check_number("GradDiff", "gamma", self.gamma, positive=True)
        check_number("GradDiff", "alpha", self.alpha, min=0)


class GradDiff(Method):
    name = "GradDiff"
    Config = GradDiffConfig
    needs_reference = False

    def losses(self, model, reference, forget: dict, retain: dict) -> LossParts:
        c = self.config
        nll_f = mean_nll(model, forget)
        logs = {"forget_nll": float(nll_f.detach())}
        retain_term = retain_nll_term(model, retain, c.alpha, logs)
        return LossParts(forget=-c.gamma * nll_f, retain=retain_term, logs=logs)
