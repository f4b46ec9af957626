"""Restricted gradient (RG) and restricted gradient with a diversified retain set (RGD).

Paper: Ko et al. 2024, "Boosting Alignment for Post-Unlearning Text-to-Image Generative Models" (NeurIPS 2024),
https://arxiv.org/abs/2412.07808

The rule, on the flattened concatenation of all trainable parameters' gradients. Here g_f is the gradient of the
forget term the loop MINIMISES (`LossParts.forget`, e.g. -NLL_f, so g_f = -grad NLL_f as in the paper) and g_r the
gradient of the (weighted) retain term `LossParts.retain`:

    s = <g_f, g_r>
    if s < 0:   g_f' = g_f - s / ||g_r||^2 * g_r ;   g_r' = g_r - s / ||g_f||^2 * g_f   (both from the ORIGINAL vectors)
    else:       g_f', g_r' = g_f, g_r
    grad := g_f' + lambda * g_r'      -> the optimiser step

With plain SGD and s < 0, <grad, g_f> = ||g_f||^2 (1 - cos^2) >= 0 and <grad, g_r> = lambda ||g_r||^2 (1 - cos^2) >= 0,
so to first order neither term gets worse. Adam's per-coordinate scaling voids that guarantee (the loop should offer
SGD).

RG wraps a base language-model method (default GradDiff) built from its own defaults plus `base_args`; the base's
`losses` give the two terms, the loop takes their gradients separately and calls `combine_gradients`, which returns the combined gradients and a
dict of floats to log (cosine, conflict). The base's own
retain weight (e.g. GradDiff alpha) is already inside `LossParts.retain`, so the effective retain weight is
`retain_weight * base alpha` (both default 1). The paper's lambda: 1.6 for Stable Diffusion, 5 for CIFAR-10; our
default 1.0 keeps the base method's balance.

RGD adds the two other ingredients of the paper:
- a diversified retain set: `retain_pool` picks `diverse_retain_size` items balanced across `item.source`
  (round-robin over sources, then over subjects within a source), and `full_retain_batch = True` makes the loop use
  that whole pool as the retain batch at every step (the paper averages the retain gradient over the whole subset);
- a truncated forget loss: the ascent stops for forget sequences already forgotten. The paper stops the SD forget
  term once its MSE exceeds m = 1.1 (CIFAR clips the per-element loss at 0.1); for language models we use the answer
  NLL, with default cap 3.0 nats per token (p(true token) ~ 5 %, far above the ~0 NLL of a memorised answer and below
  a small vocabulary's uniform NLL, ~7.6 for 2,048 tokens). Sequences whose mean answer NLL is at or above the cap
  are dropped from the forget batch handed to the base (their rows stay but count in no sum or mean, so the means
  are over the sequences kept in the step's global batch); if none is left the forget term is 0, so its gradient
  is zero and the step is retain-only. `forget_loss_cap=None` disables truncation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from obliviate.errors import ObliviateError
from obliviate.methods.common import LossParts, check_number
from obliviate.methods.gradient_surgery import balanced_subset, check_rgd_extras, restricted_sum
from obliviate.methods.lm.base import RuleOverBase, resolve_base
from obliviate.models.sequences import item_mean, items, keep_rows

@dataclass
class RGConfig:
    base: str = "GradDiff"  # the language-model method whose forget/retain terms are restricted
    retain_weight: float = 1.0  # the paper's lambda: multiplies the restricted retain gradient
    base_args: dict = field(default_factory=dict)  # overrides of the base method's config

    def __post_init__(self):
        resolve_base(type(self).__name__[:-len("Config")], self.base)
        check_number(type(self).__name__[:-len("Config")], "retain_weight", self.retain_weight, min=0)
        if not isinstance(self.base_args, dict):
            raise ObliviateError(f"{type(self).__name__[:-len('Config')]}: base_args must be a table/dict, "
                                 f"got {self.base_args!r}")


class RG(RuleOverBase):
    name = "RG"
    Config = RGConfig
    wraps_base = True

    def __init__(self, config=None):
        super().__init__(config)
        self.last_cosine: float | None = None  # cosine of g_f and g_r at the last combine (for logging)
        self.last_conflict: bool | None = None  # whether the last step projected (s < 0)

    def combine_gradients(self, g_forget: list, g_retain: list) -> tuple[list, dict]:
        """g_f' + lambda * g_r' per parameter (None where neither term reaches the parameter), and logs: the cosine
        of the original g_f and g_r and whether they conflicted (s < 0, so the projection was applied)."""
        out, logs = restricted_sum(g_forget, g_retain, self.config.retain_weight)
        self.last_cosine, self.last_conflict = logs["grad_cosine"], logs["grad_conflict"] > 0
        return out, logs


@dataclass
class RGDConfig(RGConfig):
    diverse_retain_size: int = 64  # size of the balanced retain subset used whole at every step
    forget_loss_cap: float | None = 3.0  # stop ascent on forget sequences whose answer NLL reaches this (nats/token)

    def __post_init__(self):
        super().__post_init__()
        check_rgd_extras(self)


class RGD(RG):
    name = "RGD"
    Config = RGDConfig
    full_retain_batch = True

    def retain_pool(self, items: list, rng) -> list:
        return balanced_subset(items, self.config.diverse_retain_size, rng)

    def select_forget(self, model, forget: dict) -> dict:
        """The forget batch with the sequences already forgotten (mean answer NLL at or above the cap) dropped from
        every sum and count (`keep_rows`), and the share of items kept. The loop calls it on each micro-batch of a
        step before taking the step's counts, so that the base's means are over the rows kept in the whole step."""
        from obliviate.models.sequences import answer_nll

        if self.config.forget_loss_cap is None:
            return forget
        with torch.no_grad():
            nll = answer_nll(model, forget)
        kept = keep_rows(forget, nll < self.config.forget_loss_cap)
        kept["truncation"] = {"forget_active": float(item_mean(items(kept), forget)),
                              "forget_seq_nll": float(item_mean(nll, forget))}
        return kept

    def losses(self, model, reference, forget: dict, retain: dict) -> LossParts:
        if self.config.forget_loss_cap is None:
            return self.base.losses(model, reference, forget, retain)
        if "truncation" not in forget:  # called outside the loop, which selects first
            forget = self.select_forget(model, forget)
        # with no sequence kept the base's forget term is 0 (no token, no item counts), its gradient zero: the step
        # is retain-only
        parts = self.base.losses(model, reference, forget, retain)
        parts.logs.update(forget["truncation"])
        return parts
