"""WGA (weighted gradient ascent): gradient ascent on the forget answers with each token weighted by the model's own
probability of it, so the tokens already forgotten stop driving the update, plus a retain term.

Paper: Wang et al. 2025, "Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go Beyond" (ICLR 2025),
https://arxiv.org/abs/2502.19301
Reference code read: OpenUnlearning (locuslab/open-unlearning) src/trainer/unlearn/wga.py, `compute_wga_loss` in
src/trainer/utils.py, configs/trainer/WGA.yaml (community/methods/WGA).

    w_t = p_theta(y_t | x, y_<t) ^ beta              (no gradient through the weight)
    L_f = - mean_t [ w_t * (-log p_theta(y_t | x, y_<t)) ]      over the forget answer tokens
    L   = gamma * L_f + alpha * R,   R = NLL_r ("gd"), KL(p_ref || p_theta) on retain answers ("kl"), or none

Defaults (WGA.yaml): beta 1, gamma 1, alpha 1, retain NLL. beta = 0 is plain gradient ascent (GradDiff).

Differences from the reference: the forget mean is over the answer tokens of the optimiser step's global batch
(`token_mean`), where the reference averages each process's micro-batch; the same number for one process and one
micro-batch (the test checks it). The "kl" retain term is KL(p_ref || p_theta) on the retain answer tokens (NPO's in
obliviate), where the reference's GradDiff KL runs over every position of the padded batch, prompt and padding too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from obliviate.methods.lm.base import LossParts, Method, check_choice, check_number, token_mean
from obliviate.methods.lm.npo import RETAIN_CHOICES, retain_term
from obliviate.models.sequences import forward_logits, token_logprobs


@dataclass
class WGAConfig:
    beta: float = 1.0  # the weight's exponent: p^beta
    gamma: float = 1.0  # weight of the forget term
    alpha: float = 1.0  # weight of the retain term
    retain: str = "gd"  # "gd" (retain NLL, the reference's default), "kl" or "none"

    def __post_init__(self):
        check_number("WGA", "beta", self.beta, min=0)
        check_number("WGA", "gamma", self.gamma, positive=True)
        check_number("WGA", "alpha", self.alpha, min=0)
        check_choice("WGA", "retain", self.retain, RETAIN_CHOICES)


def weighted_ascent(model, batch: dict, weight) -> tuple[torch.Tensor, dict]:
    """-mean_t[w_t * NLL_t] over the answer tokens of the step's global batch, w_t = weight(p_t) computed from the
    detached token probability p_t (WGA, SatImp); and the logs (forget_nll)."""
    lp, mask = token_logprobs(forward_logits(model, batch), batch["labels"])  # log p_t, 0 where unscored
    nll = -lp
    w = weight(lp.detach().exp()) * mask
    loss = -token_mean((w * nll).sum(), batch)
    return loss, {"forget_nll": float(token_mean(nll.detach().sum(), batch)),
                  "forget_weight": float(token_mean(w.sum(), batch))}


class WGA(Method):
    name = "WGA"
    Config = WGAConfig

    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return self.config.retain == "kl"

    def losses(self, model, reference, forget: dict, retain: dict) -> LossParts:
        c = self.config
        loss_f, logs = weighted_ascent(model, forget, lambda p: p ** c.beta)
        return LossParts(forget=c.gamma * loss_f, retain=retain_term(c.retain, c.alpha, model, reference, retain, logs),
                         logs=logs)
