"""SimNPO: reference-free NPO on the length-normalised log-likelihood, plus a retain NLL term.

Paper: Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM Unlearning",
https://arxiv.org/abs/2410.07163

    L_f = -(2 / beta) * mean_f[ log sigmoid( -(beta / |y|) * log pi_theta(y|x) - delta ) ]
    L   = L_f + alpha * NLL_r

log pi_theta(y|x) is the sum of answer-token log-probs and |y| the number of answer tokens, so
-(1/|y|) log pi_theta = the sequence's mean answer NLL. No reference model.
Defaults (paper, TOFU forget10): beta 4.5, delta 0, retain weight alpha (the paper's lambda) 0.125.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from obliviate.methods.lm.base import LossParts, Method, check_number, item_mean, retain_nll_term, token_mean
from obliviate.models.sequences import sequence_logprob


@dataclass
class SimNPOConfig:
    beta: float = 4.5
    delta: float = 0.0  # reward margin (the paper's gamma)
    alpha: float = 0.125  # weight of the retain NLL (the paper's lambda)

    def __post_init__(self):
        check_number("SimNPO", "beta", self.beta, positive=True)
        check_number("SimNPO", "delta", self.delta)
        check_number("SimNPO", "alpha", self.alpha, min=0)


class SimNPO(Method):
    name = "SimNPO"
    Config = SimNPOConfig
    needs_reference = False

    def losses(self, model, reference, forget: dict, retain: dict) -> LossParts:
        c = self.config
        logp, count = sequence_logprob(model, forget)
        norm_logp = logp / count.clamp(min=1)  # = -(per-sequence mean answer NLL)
        loss_f = -(2.0 / c.beta) * item_mean(F.logsigmoid(-c.beta * norm_logp - c.delta), forget)
        logs = {"forget_nll": float(token_mean(-logp.detach().sum(), forget))}
        retain_term = retain_nll_term(model, retain, c.alpha, logs)
        return LossParts(forget=loss_f, retain=retain_term, logs=logs)
