"""UNDIAL: self-distillation towards the original model's logits with the true token's logit lowered.

Paper: Dong et al. 2024, "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in Large Language
Models" (NAACL 2025), https://arxiv.org/abs/2402.10052

At every position t that predicts a forget answer token y_t:
    q_t = softmax( z_ref,t - beta * onehot(y_t) )          (target; z_ref the frozen model's logits, no gradient)
    L_f = mean_t [ - sum_v q_t(v) log p_theta(v | x, y_<t) ]   (cross-entropy; equals KL(q || p_theta) + const)
    L   = L_f + alpha * NLL_r

Defaults: beta 10; alpha 0 (the paper uses no retain set; OpenUnlearning's UNDIAL README says the same and suggests
searching alpha when the retain set matters). With alpha 0 no retain forward pass is made and `retain` is None.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from obliviate.methods.lm.base import (LossParts, Method, check_number, nll_from_logits, reference_logits,
                                       retain_nll_term, token_mean)
from obliviate.models.sequences import forward_logits, shifted


@dataclass
class UNDIALConfig:
    beta: float = 10.0  # how far the true token's logit is lowered in the target
    alpha: float = 0.0  # weight of the optional retain NLL

    def __post_init__(self):
        check_number("UNDIAL", "beta", self.beta, min=0)
        check_number("UNDIAL", "alpha", self.alpha, min=0)


def undial_loss(logits: torch.Tensor, ref_logits: torch.Tensor, batch: dict, beta: float) -> torch.Tensor:
    """Cross-entropy of p_theta to softmax(z_ref - beta * onehot(y)), averaged over the answer-token positions of the
    step's global batch."""
    logits, targets, mask = shifted(logits, batch["labels"])
    ref = ref_logits[:, :-1, :].float()
    target = torch.softmax(ref - beta * F.one_hot(targets, ref.shape[-1]).to(ref.dtype), dim=-1)
    ce = -(target * torch.log_softmax(logits.float(), dim=-1)).sum(-1)
    return token_mean((ce * mask).sum(), batch)


class UNDIAL(Method):
    name = "UNDIAL"
    Config = UNDIALConfig
    needs_reference = True

    def losses(self, model, reference, forget: dict, retain: dict) -> LossParts:
        c = self.config
        logits_f = forward_logits(model, forget)
        loss_f = undial_loss(logits_f, reference_logits(reference, forget), forget, c.beta)
        logs = {"forget_nll": float(nll_from_logits(logits_f.detach(), forget))}
        retain_term = retain_nll_term(model, retain, c.alpha, logs)
        return LossParts(forget=loss_f, retain=retain_term, logs=logs)
