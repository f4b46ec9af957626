"""WAGLE: weight attribution-guided unlearning, a rule over any base method. Before the first step, each weight gets
an attribution score from the forget and retain gradients; the base method then trains only the weights with the
largest scores, every other weight staying exactly as it was.

Paper: Jia et al. 2024, "WAGLE: Strategic Weight Attribution for Effective and Modular Unlearning in Large Language
Models", NeurIPS, https://arxiv.org/abs/2410.17509 (code: OPTML-Group/WAGLE, src/unlearn/generate_mask.py,
`snip_advanced`; configs/unlearn/Tofu/*+WAGLE.json)

    S_i = | (theta_i - [grad l_r(theta)]_i / mu) * [grad l_f(theta)]_i |          mu = 1e-6
    m_i = 1 for the `fraction` of all trained entries with the largest S_i (one ranking over every tensor), else 0
    each step: grad := m * grad (forget and retain terms alike), entries with m = 0 never change

l_f and l_r are the mean answer NLL over the forget and the retain items (whatever the base method minimises: the
score asks how much a weight's change moves the forget loss once the retain loss has adapted to it, to first order,
with mu standing for the retain loss's curvature). `fraction` is the share of weights UPDATED: the reference's mask
file `tofu_0.95.pt` keeps the 95 % with the largest score (its README: "tofu_0.8.pt ... 80% weights are selected
for unlearning"); its TOFU configs use 0.95 with GradDiff and NPO and 0.8 with PO (the refusal-answer method), its
WMDP configs 0.4 (GradDiff) and 0.6 (NPO). The paper's other settings (learning rates, epochs) belong to the base
method and the run.

Design: WAGLE wraps a base method as RG does (`method = "WAGLE"`, `method_args = {base = "NPO", base_args = {...},
fraction = 0.95}`): the base gives the losses, the reference model, the parameter selection, the retain pool and any
gradient combination; WAGLE adds the mask (`fit` takes it, `gradient_mask` hands it to the loop, whose shared
`gradient_step` multiplies every gradient by it and puts the masked-out entries back after the optimiser step, so
AdamW's weight decay cannot move them either). A base is any language-model method that is not itself such a rule
(not RG/RGD); the vision-language family gets it with the other language-model methods, the mask then spanning the
trained parts (`mllm.train_parts`).

Where obliviate differs from the reference, and why:
- the gradients are means over the batches (the reference sums them): the retain gradient is then the gradient of
  the retain loss the formula names, whatever the number of batches; with mu = 1e-6 the retain term outweighs
  theta either way;
- the retain gradient runs over the run's retain pool (the reference pairs one retain batch with each forget
  batch); `mask_batches` caps both sets at that many batches, taken in the sets' order;
- an entry with a zero score (no forget gradient reaches it, e.g. the embedding rows of tokens no forget answer
  uses) is never kept, so fewer than `fraction` may be updated (the reference fills the share with such entries in
  an arbitrary order); ties at the threshold are broken by position (`saliency.saliency_mask`);
- the mask acts before gradient clipping (the reference clips, then masks), so clipping sees the update taken.
Refused: LoRA (the adapter's A matrices have no gradient while B = 0, so no attribution can rank them; WAGLE
ranks the model's own weights) and `train.shard = "fsdp"` (the score needs whole gradients).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from obliviate.errors import ObliviateError
from obliviate.methods.common import check_number
from obliviate.methods.lm.base import RuleOverBase, nll_gradients, resolve_base
from obliviate.methods.saliency import mask_fraction, saliency_mask


@dataclass
class WAGLEConfig:
    base: str = "GradDiff"  # the language-model method trained under the mask
    base_args: dict = field(default_factory=dict)  # overrides of the base method's config
    fraction: float = 0.95  # share of the trained weight entries updated (largest scores); the paper's TOFU setting
    mu: float = 1e-6  # the retain loss's curvature stand-in in the score
    mask_batches: int | None = None  # batches of each set the gradients average over (None: every batch)

    def __post_init__(self):
        resolve_base("WAGLE", self.base)
        if not isinstance(self.base_args, dict):
            raise ObliviateError(f"WAGLE: base_args must be a table/dict, got {self.base_args!r}")
        check_number("WAGLE", "fraction", self.fraction, positive=True)
        if self.fraction > 1:
            raise ObliviateError(f"WAGLE: fraction must be in (0, 1] (the share of weights updated), "
                                 f"got {self.fraction!r}")
        check_number("WAGLE", "mu", self.mu, positive=True)
        if self.mask_batches is not None and (isinstance(self.mask_batches, bool)
                                              or not isinstance(self.mask_batches, int) or self.mask_batches < 1):
            raise ObliviateError(f"WAGLE: mask_batches must be a positive integer or null (every batch), "
                                 f"got {self.mask_batches!r}")


def mean_gradients(model, params: list, batches, limit: int | None, what: str) -> list[torch.Tensor]:
    """The mean over up to `limit` batches of each parameter's mean-NLL gradient (zeros where none reaches it)."""
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    n = 0
    for grads in nll_gradients(model, params, batches, limit):
        for t, g in zip(total, grads):
            if g is not None:
                t.add_(g.detach().float())
        n += 1
    if not n:
        raise ObliviateError(f"WAGLE: no {what} batch to take the attribution gradient from")
    return [t / n for t in total]


def attribution_scores(params: list, g_forget: list, g_retain: list, mu: float) -> list[torch.Tensor]:
    """|(theta - g_r / mu) * g_f| per entry, in float32."""
    return [((p.detach().float() - gr / mu) * gf).abs() for p, gf, gr in zip(params, g_forget, g_retain)]


class WAGLE(RuleOverBase):
    name = "WAGLE"
    Config = WAGLEConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.combine_gradients = self.base.combine_gradients  # None unless the base combines its gradients
        self.mask: list[torch.Tensor] | None = None
        self.kept: float | None = None  # the share of the trained entries the mask keeps

    def fit(self, model, named: list, forget_batches, retain_batches) -> None:
        """The mask, from the model as it is before the first step."""
        from obliviate import sharding

        lora = [n for n, _ in named if "lora_" in n]
        if lora:
            raise ObliviateError("WAGLE ranks the model's own weights and cannot rank LoRA adapters (their A "
                                 "matrices have no gradient while B = 0): run WAGLE without [lora]")
        params = [p for _, p in named]
        if sharding.is_sharded(params[0]):
            raise ObliviateError('WAGLE: train.shard = "fsdp" is not supported (the attribution score needs whole '
                                 "gradients); run without it")
        c = self.config
        was_training = model.training
        model.eval()  # the score is a property of the model, not of a dropout draw (the reference: model.eval())
        try:
            g_forget = mean_gradients(model, params, forget_batches, c.mask_batches, "forget")
            g_retain = mean_gradients(model, params, retain_batches, c.mask_batches, "retain")
        finally:
            model.train(was_training)
        scores = attribution_scores(params, g_forget, g_retain, c.mu)
        del g_forget, g_retain
        if not all(torch.isfinite(s).all() for s in scores):
            raise ObliviateError("WAGLE: the attribution score is not finite (a NaN or infinite gradient on the "
                                 "forget or retain set)")
        self.mask = [m.to(p.dtype) for m, p in zip(saliency_mask(scores, c.fraction), params)]
        self.kept = round(mask_fraction(self.mask), 6)

    def gradient_mask(self) -> list | None:
        if self.mask is None:
            raise ObliviateError("WAGLE: the attribution mask is taken before the first step (the loop's fit)")
        return self.mask
