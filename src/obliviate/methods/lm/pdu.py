"""PDU (primal-dual unlearning): flatten the model's logits on the forget answers towards uniform, under the
constraint that the retain loss stays below a bound, solved by a primal-dual method.

Paper: Entesari et al. 2025, "Constrained Entropic Unlearning: A Primal-Dual Framework for Large Language Models",
https://arxiv.org/abs/2506.05314
Reference code read: OpenUnlearning (locuslab/open-unlearning) src/trainer/unlearn/pdu.py (`PDU.compute_loss`,
`final_loss_value`, `DualOptimizationCallback`), configs/trainer/PDU.yaml, community/methods/PDU (README.md, run.sh).

    min_theta  L_f = mean_t ( max_v z_t(v) - mean_v z_t(v) )^2      (z_t the logits at a forget answer position)
    s.t.       NLL_r <= eps
    Lagrangian L = gamma * L_f + lambda * (NLL_r - eps)
    dual step, after each optimiser step:  lambda <- max(0, lambda + eta * (NLL_r - eps))

The logit-margin loss is 0 exactly when every logit equals their mean, i.e. the next-token distribution is uniform
(maximum entropy); unlike gradient ascent it is bounded below. lambda starts at `alpha` (the reference's retain
"preference") and rises while the retain loss breaks the bound. With primal_dual false, lambda stays alpha (a fixed
weighted sum). Defaults (PDU.yaml): gamma 1, alpha 1, primal_dual true, dual_step_size 1, dual updates every step
after dual_warmup_epochs 5. The reference leaves retain_loss_eps unset (a run must give it; its README: a little
above the original model's retain loss); obliviate's default 0.3 is the authors' TOFU setting (run.sh, with
alpha 100, dual_step_size 5 and 10 epochs). With obliviate's default 5 epochs the warm-up covers the whole run and
lambda stays alpha: lower dual_warmup_epochs or train longer for the dual variable to move.

Differences from the reference:
- The dual step uses the retain loss of the whole optimiser step (the global mean over every micro-batch and every
  process: `Method.after_step` gets the step's logs), once per step. The reference updates lambda inside
  compute_loss, i.e. once per micro-batch under gradient accumulation, and on each process from its own
  micro-batch (the processes' lambdas can drift apart). With one process and no accumulation the two agree.
- The warm-up is counted in epochs of forget data at the start of a step (a step may straddle an epoch's end); the
  reference enables the updates at the end of the first epoch >= dual_warmup_epochs. dual_update_upon = "epoch" (a
  dual step per epoch from a pass over the retain data) is not offered.
- lambda is obliviate state that follows from the logs (`retain_preference`, `retain_nll`): a resumed run replays
  the dual steps of the steps already taken.
- The margin is averaged over the positions whose input token is an answer token, as the reference's mask does
  (labels != -100 without the shift: from the first answer token to the last, so the last position is the one that
  predicts what follows the answer), over the step's global batch; lambda * eps enters each share of the batch in
  proportion to its retain tokens, so the loss of a split batch sums to the whole batch's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from obliviate.methods.lm.base import (LossParts, Method, check_choice, check_number, nll_from_logits,
                                       token_mean)
from obliviate.models.sequences import IGNORE, forward_logits, mean_nll, scored_tokens


@dataclass
class PDUConfig:
    retain_loss_eps: float = 0.3  # the bound on the retain NLL (nats per token)
    gamma: float = 1.0  # weight of the forget (logit-margin) loss
    alpha: float = 1.0  # the retain weight lambda's starting value (the reference's retain preference)
    primal_dual: bool = True  # False: lambda stays alpha
    dual_step_size: float = 1.0  # eta
    dual_update_upon: str = "step"  # only "step" (a dual step after every optimiser step)
    dual_warmup_epochs: float = 5.0  # no dual step before this many epochs of forget data

    def __post_init__(self):
        check_number("PDU", "retain_loss_eps", self.retain_loss_eps, min=0)
        check_number("PDU", "gamma", self.gamma, positive=True)
        check_number("PDU", "alpha", self.alpha, min=0)
        check_choice("PDU", "primal_dual", self.primal_dual, (True, False))
        check_number("PDU", "dual_step_size", self.dual_step_size, min=0)
        check_choice("PDU", "dual_update_upon", self.dual_update_upon, ("step",))
        check_number("PDU", "dual_warmup_epochs", self.dual_warmup_epochs, min=0)


def logit_margin_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """mean_t (max_v z_t - mean_v z_t)^2 over the positions whose input token is an answer token (labels other than
    IGNORE, not shifted: the reference's mask), over the step's global batch."""
    logits = logits.float()
    margin = (logits.max(dim=-1).values - logits.mean(dim=-1)) ** 2
    mask = batch["labels"] != IGNORE
    return token_mean((margin * mask).sum(), batch, measure=lambda b: (b["labels"] != IGNORE).sum())


class PDU(Method):
    name = "PDU"
    Config = PDUConfig
    needs_reference = False

    def __init__(self, config=None):
        super().__init__(config)
        self.dual = float(self.config.alpha)  # lambda, the retain weight

    def losses(self, model, reference, forget: dict, retain: dict) -> LossParts:
        c = self.config
        logits = forward_logits(model, forget)
        loss_f = c.gamma * logit_margin_loss(logits, forget)
        logs = {"forget_nll": float(nll_from_logits(logits.detach(), forget)),
                "logit_margin": float(loss_f.detach()) / c.gamma}
        if not c.primal_dual and c.alpha == 0:
            return LossParts(forget=loss_f, logs=logs)
        # the retain NLL is needed even at lambda = 0: the dual step reads it
        nll_r = mean_nll(model, retain)
        logs["retain_nll"] = float(nll_r.detach())
        eps_share = c.retain_loss_eps * token_mean(scored_tokens(retain).float(), retain)  # sums to eps over shares
        return LossParts(forget=loss_f, retain=self.dual * (nll_r - eps_share), logs=logs)

    def after_step(self, logs: dict, epoch: float) -> None:
        """The dual step on the step's global retain NLL, once the warm-up is over; logs lambda as retain_preference
        (the reference's name)."""
        c = self.config
        if c.primal_dual and epoch >= c.dual_warmup_epochs and "retain_nll" in logs:
            self.dual = max(0.0, self.dual + c.dual_step_size * (logs["retain_nll"] - c.retain_loss_eps))
        logs["retain_preference"] = self.dual
