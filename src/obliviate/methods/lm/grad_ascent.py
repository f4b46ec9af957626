"""Gradient ascent (GA): raise the NLL of the forget answers.

Paper: Jang et al. 2023, "Knowledge Unlearning for Mitigating Privacy Risks in Language Models",
https://arxiv.org/abs/2210.01504

    L = - NLL_f,   NLL_f = mean over the forget batch's answer tokens of -log p_theta(y_t | x, y_<t)

No retain term and no reference model. The reference code's other defaults (lr 1e-5, 10 epochs on TOFU-scale models)
belong to the unlearning loop, not to this config.
"""
from __future__ import annotations

from dataclasses import dataclass

from obliviate.methods.lm.base import LossParts, Method
from obliviate.models.sequences import mean_nll


@dataclass
class GradAscentConfig:
    """Gradient ascent has no loss hyper-parameters."""


class GradAscent(Method):
    name = "GradAscent"
    Config = GradAscentConfig
    needs_reference = False

    def losses(self, model, reference, forget: dict, retain: dict) -> LossParts:
        nll_f = mean_nll(model, forget)
        return LossParts(forget=-nll_f, retain=None, logs={"forget_nll": float(nll_f.detach())})
