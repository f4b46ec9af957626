"""FLAT (Forget data only Loss AdjustmenT): maximise an f-divergence between a template answer ("I don't know.")
and the forget answer, on the forget questions alone: no retain data, no reference model.

Paper: Wang et al. 2025, "LLM Unlearning via Loss Adjustment with Only Forget Data", ICLR,
https://arxiv.org/abs/2410.11143 (code: UCSC-REAL/FLAT, dataloader.py: `get_contrastive_loss`, `ProbLossStable`,
the trainer's "cl" loss; config/forget.yaml)

The variational form of an f-divergence, D_f(P_e || P_f) >= sup_g E_e[g] - E_f[f*(g)], with the optimal
variational function g* applied to the model's score of each answer gives the loss (minimised)

    L = - mean_i g*(P(x_i, y_e,i)) + mean_i f*(g*(P(x_i, y_f,i)))

where P(x, y) is the mean probability the model gives the answer's tokens (each p(y_t | x, y_<t), averaged over
the answer's tokens), y_e the template answer (`forget["idk"]`, the loop's refusal for the same question) and y_f
the forget answer. Raising the first term teaches the template, lowering the second forgets the answer; the
divergence decides how each is weighted. The divergences the paper reports (its g* and f*, as the code writes them):

    KL       g*(x) = x                      f*(t) = exp(t - 1)
    JS       g*(x) = log 2 - log(1 + e^-x)   f*(g*(x)) = x + log(1 + e^-x) - log 2   (Jensen-Shannon)
    Pearson  g*(x) = x                      f*(t) = t^2 / 4 + t
    TV       g*(x) = tanh(x) / 2             f*(t) = t                              (total variation; the code's
                                                                                     default, config/forget.yaml)
(The code also has Reverse-KL, Jeffrey, Squared-Hellinger and Neyman, which the paper's tables do not report.)

Where obliviate differs from the reference, and why: the reference applies g* and f* once per batch, to the mean of
the token probabilities over every position of the batch (prompt and padding positions counting as probability 0),
so its P shrinks with the prompt's length and the batch's padding; here P is each answer's own mean token
probability and the expectations are means over the items, as the paper writes them, so a step's loss is the mean
over its global batch whatever its split into micro-batches or processes (`item_mean`). The reference's learning
rates (1e-5 TOFU, 2e-7 Harry Potter) and its weight decay belong to the run's settings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from obliviate.errors import ObliviateError
from obliviate.methods.lm.base import LossParts, Method, check_choice, item_mean, token_mean

LOG2 = math.log(2.0)


def _variational(x: torch.Tensor) -> torch.Tensor:  # g*(x) = x (KL, Pearson)
    return x


# divergence -> (g*(P) for the template answers, f*(g*(P)) for the forget answers), per item
DIVERGENCES = {
    "KL": (_variational, lambda x: torch.exp(x - 1.0)),
    "JS": (lambda x: LOG2 - F.softplus(-x), lambda x: x + F.softplus(-x) - LOG2),
    "Pearson": (_variational, lambda x: x * x / 4.0 + x),
    "TV": (lambda x: torch.tanh(x) / 2.0, lambda x: torch.tanh(x) / 2.0),
}


@dataclass
class FLATConfig:
    divergence: str = "TV"  # one of DIVERGENCES; TV is the reference code's default

    def __post_init__(self):
        check_choice("FLAT", "divergence", self.divergence, list(DIVERGENCES))


def answer_probability(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each answer's mean token probability ([B]) and the per-token log-probs' sum over the batch (for the NLL
    log)."""
    from obliviate.models.sequences import forward_logits, token_logprobs

    lp, mask = token_logprobs(forward_logits(model, batch), batch["labels"])
    prob = (lp.exp() * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return prob, lp.sum()


class FLAT(Method):
    name = "FLAT"
    Config = FLATConfig
    needs_reference = False

    def losses(self, model, reference, forget: dict, retain: dict) -> LossParts:
        idk = forget.get("idk")
        if idk is None:
            raise ObliviateError("FLAT needs forget['idk']: the forget questions with a template (refusal) answer")
        g, f_star_g = DIVERGENCES[self.config.divergence]
        p_forget, logp_forget = answer_probability(model, forget)
        p_template, _ = answer_probability(model, idk)
        loss = -item_mean(g(p_template), idk) + item_mean(f_star_g(p_forget), forget)
        logs = {"forget_nll": float(token_mean(-logp_forget.detach(), forget)),
                "forget_prob": float(item_mean(p_forget.detach(), forget)),
                "template_prob": float(item_mean(p_template.detach(), idk))}
        return LossParts(forget=loss, logs=logs)
