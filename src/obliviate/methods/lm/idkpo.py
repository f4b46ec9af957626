"""IdkPO (IdkDPO): direct preference optimisation that prefers a refusal ("I don't know.") to the true forget
answer, relative to the frozen original model, plus a retain NLL term.

Papers: Maini et al. 2024, TOFU (IdkDPO baseline), https://arxiv.org/abs/2401.06121;
DPO: Rafailov et al. 2023, https://arxiv.org/abs/2305.18290

    L_f = - mean_f[ log sigmoid( beta * ( log pi_theta(y_idk|x)/pi_ref(y_idk|x) - log pi_theta(y|x)/pi_ref(y|x) ) ) ]
    L   = L_f + alpha * NLL_r

Sequence log-probs are sums over answer tokens. y_idk comes from `forget["idk"]` (the same questions with a refusal
as the answer). Defaults: beta 0.1, alpha 1. (OpenUnlearning scales L_f by 2/beta as in NPO; we follow the DPO
formula as written in the formula sheet.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from obliviate.errors import ObliviateError
from obliviate.methods.lm.base import LossParts, Method, check_number, item_mean, retain_nll_term, token_mean
from obliviate.models.sequences import sequence_logprob


@dataclass
class IdkPOConfig:
    beta: float = 0.1
    alpha: float = 1.0  # weight of the retain NLL

    def __post_init__(self):
        check_number("IdkPO", "beta", self.beta, positive=True)
        check_number("IdkPO", "alpha", self.alpha, min=0)


def preference_margin(model, reference, lose_batch: dict, win_batch: dict):
    """DPO's margin per item, log pi(win)/pi_ref(win) - log pi(lose)/pi_ref(lose) on summed answer log-probs, and the
    model's own log-probs of the answer it should lose and the one it should win (IdkPO's refusal, AltPO's alternate)."""
    lose, _ = sequence_logprob(model, lose_batch)
    win, _ = sequence_logprob(model, win_batch)
    with torch.no_grad():
        lose_ref, _ = sequence_logprob(reference, lose_batch)
        win_ref, _ = sequence_logprob(reference, win_batch)
    return (win - win_ref) - (lose - lose_ref), lose, win


class IdkPO(Method):
    name = "IdkPO"
    Config = IdkPOConfig
    needs_reference = True

    def losses(self, model, reference, forget: dict, retain: dict) -> LossParts:
        c = self.config
        idk = forget.get("idk")
        if idk is None:
            raise ObliviateError("IdkPO needs forget['idk']: the forget questions with a refusal as the answer")
        margin, lose, win = preference_margin(model, reference, forget, idk)
        loss_f = -item_mean(F.logsigmoid(c.beta * margin), forget)
        logs = {"forget_nll": float(token_mean(-lose.detach().sum(), forget)),
                "idk_logp": float(item_mean(win.detach(), forget)), "margin": float(item_mean(margin.detach(), forget))}
        retain_term = retain_nll_term(model, retain, c.alpha, logs)
        return LossParts(forget=loss_f, retain=retain_term, logs=logs)
