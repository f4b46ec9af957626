"""CE-U (cross-entropy unlearning): cross-entropy of the model towards its own next-token distribution with the true
token removed, on the forget answers.

Paper: Yang 2025, "CE-U: Cross Entropy Unlearning", https://arxiv.org/abs/2503.01224
Reference code read: OpenUnlearning (locuslab/open-unlearning) src/trainer/unlearn/ceu.py
(`cross_entropy_unlearning_loss`, `compute_batch_ceu`), configs/trainer/CEU.yaml, community/methods/CEU/run.sh.

At every position t that predicts a forget answer token y_t, except the first n answer tokens of each sequence:
    q_t = softmax( z_t with z_t[y_t] = -inf )         (z_t the model's own logits, no gradient through q_t)
    L_f = mean_t [ - sum_v q_t(v) log p_theta(v | x, y_<t) ]
    L   = L_f + alpha * NLL_r

The gradient of L_f with respect to z_t is p_theta - q_t: it moves the mass of y_t onto the other tokens in their own
proportions, bounded where gradient ascent's 1/p explodes. The first n answer tokens are left out (the paper's
footnote in its training settings; the reference's `ignore_first_n_answer_tokens`): the first token of an answer
is often a template word ("The", the person's name) the model must keep. No reference model.
Defaults (CEU.yaml): ignore_first_n_answer_tokens 1; no retain term (alpha 0: the reference's CEU trainer has none;
alpha > 0 adds obliviate's retain NLL, as UNDIAL's alpha).

Differences from the reference: the mean is over the kept positions of the optimiser step's global batch
(`token_mean` with the kept positions as the count), not each micro-batch's (the same for one process and one
micro-batch); a step with no kept position gives 0, where the reference's mean of nothing is NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from obliviate.errors import ObliviateError
from obliviate.methods.lm.base import LossParts, Method, check_number, nll_from_logits, retain_nll_term, token_mean
from obliviate.models.sequences import IGNORE, forward_logits, shifted


@dataclass
class CEUConfig:
    ignore_first_n_answer_tokens: int = 1  # answer tokens at the start of each sequence left out of the loss
    alpha: float = 0.0  # weight of an optional retain NLL (none in the reference)

    def __post_init__(self):
        check_number("CEU", "ignore_first_n_answer_tokens", self.ignore_first_n_answer_tokens, min=0)
        if int(self.ignore_first_n_answer_tokens) != self.ignore_first_n_answer_tokens:
            raise ObliviateError(f"CEU: ignore_first_n_answer_tokens must be a whole number, got "
                                 f"{self.ignore_first_n_answer_tokens!r}")
        check_number("CEU", "alpha", self.alpha, min=0)


def without_first_answer_tokens(labels: torch.Tensor, n: int) -> torch.Tensor:
    """The labels with the first n scored tokens of each row unscored (IGNORE)."""
    scored = labels != IGNORE
    return labels.masked_fill(scored & (scored.cumsum(-1) <= n), IGNORE)


def ceu_loss(logits: torch.Tensor, batch: dict, n: int) -> torch.Tensor:
    """Cross-entropy of p_theta to softmax(logits with the true token at -inf), averaged over the kept answer
    positions of the step's global batch."""
    logits, targets, mask = shifted(logits, without_first_answer_tokens(batch["labels"], n))
    logits = logits.float()
    target = torch.softmax(logits.detach().scatter(-1, targets.unsqueeze(-1), float("-inf")), dim=-1)
    ce = -(target * torch.log_softmax(logits, dim=-1)).sum(-1)
    kept = lambda b: (without_first_answer_tokens(b["labels"], n)[:, 1:] != IGNORE).sum()  # noqa: E731
    return token_mean((ce * mask).sum(), batch, measure=kept)


class CEU(Method):
    name = "CEU"
    Config = CEUConfig
    needs_reference = False

    def losses(self, model, reference, forget: dict, retain: dict) -> LossParts:
        c = self.config
        logits = forward_logits(model, forget)
        loss_f = ceu_loss(logits, forget, int(c.ignore_first_n_answer_tokens))
        logs = {"forget_nll": float(nll_from_logits(logits.detach(), forget))}
        return LossParts(forget=loss_f, retain=retain_nll_term(model, retain, c.alpha, logs), logs=logs)
