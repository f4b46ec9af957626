"""Negative Preference Optimization (NPO), with a GD (retain NLL) or KL retain term.

Paper: Zhang et al. 2024, "Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning",
https://arxiv.org/abs/2404.05868

    L_f = -(2 / beta) * mean_f[ log sigmoid( -beta * ( log pi_theta(y|x) - log pi_ref(y|x) ) ) ]
    L   = L_f + alpha * R,   R = NLL_r ("gd", NPO-GD), KL(p_ref || p_theta) on retain answers ("kl", NPO-KL), or none

log pi(y|x) is the SUM of the answer-token log-probs (a sequence log-likelihood; MUSE's published baseline used raw
logits instead, a known bug). When theta == ref, L_f = (2/beta) log 2. As beta -> 0, L_f -> gradient ascent on
log pi_theta (up to a constant). Defaults: beta 0.1, alpha 1, retain "gd" (OpenUnlearning's TOFU recipe).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from obliviate.methods.lm.base import (LossParts, Method, check_choice, check_number, item_mean, retain_kl_term,
                                       retain_nll_term, token_mean)
from obliviate.models.sequences import sequence_logprob

RETAIN_CHOICES = ("none", "gd", "kl")


@dataclass
class NPOConfig:
    beta: float = 0.1
    retain: str = "gd"  # "none", "gd" (NPO-GD: retain NLL) or "kl" (NPO-KL: KL to the reference on retain answers)
    alpha: float = 1.0  # weight of the retain term

    def __post_init__(self):
        check_number("NPO", "beta", self.beta, positive=True)
        check_choice("NPO", "retain", self.retain, RETAIN_CHOICES)
        check_number("NPO", "alpha", self.alpha, min=0)


def npo_forget_loss(logp_theta, logp_ref, beta: float, batch: dict):
    """-(2/beta) * mean(log sigmoid(-beta * (logp_theta - logp_ref))) for per-sequence summed log-probs ([B]) of
    `batch`'s rows; the mean is over the items of the step's global batch (`item_mean`)."""
    return -(2.0 / beta) * item_mean(F.logsigmoid(-beta * (logp_theta - logp_ref)), batch)


def retain_term(kind: str, alpha: float, model, reference, retain: dict, logs: dict):
    """The NPO-style retain term: alpha * NLL_r ("gd"), alpha * KL(p_ref || p_theta) ("kl") or None ("none")."""
    if kind == "none":
        return None
    if kind == "gd":
        return retain_nll_term(model, retain, alpha, logs)
    return retain_kl_term(model, reference, retain, alpha, logs)


class NPO(Method):
    name = "NPO"
    Config = NPOConfig
    needs_reference = True

    def losses(self, model, reference, forget: dict, retain: dict) -> LossParts:
        c = self.config
        logp, _ = sequence_logprob(model, forget)
        with torch.no_grad():
            logp_ref, _ = sequence_logprob(reference, forget)
        loss_f = npo_forget_loss(logp, logp_ref, c.beta, forget)
        logs = {"forget_nll": float(token_mean(-logp.detach().sum(), forget)),
                "forget_log_ratio": float(item_mean((logp - logp_ref).detach(), forget))}
        return LossParts(forget=loss_f, retain=retain_term(c.retain, c.alpha, model, reference, retain, logs),
                         logs=logs)
