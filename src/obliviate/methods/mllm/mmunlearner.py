"""MMUnlearner: gradient ascent on the forget items, restricted to the parameters that matter more for them than for
the retained data, plus descent on the retain items.

Paper: Huo et al. 2025, "MMUnlearner: Reformulating Multimodal Machine Unlearning in the Era of Multimodal Large
Language Models", ACL Findings, https://arxiv.org/abs/2502.11051 (code: Z1zs/MMUnlearner, data_process/SFRon.py)

    F_D(w) = mean over batches of D of (dNLL/dw)^2          (a diagonal Fisher estimate, per weight)
    m(w)   = 1( (F_forget(w) + eps) / (F_retain(w) + eps) >= threshold )        eps = 1e-15, threshold = 1
    update = - gamma * m * grad NLL_forget + alpha * grad NLL_retain   (the mask acts on the forget gradient only)

The mask is taken once, before the first step, weight by weight over every trainable part (vision tower,
projector, language model: `mllm.train_parts`); the kept share of each part is logged. The reference computes the
language model's mask against the text-only questions of everyone (forget people included: it forgets the picture,
keeps the text) and the vision mask against the retain pictures; here both use the run's retain items, so the text
of the forget people is forgotten too, as MLLMU-Bench scores it. The reference alternates separate forget and
retain steps; here each step takes both, combined as above.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from obliviate.errors import ObliviateError
from obliviate.methods.lm.base import LossParts, Method, check_number, nll_gradients
from obliviate.models.sequences import mean_nll

EPS = 1e-15


@dataclass
class MMUnlearnerConfig:
    threshold: float = 1.0  # keep a weight when its forget Fisher is at least this times its retain Fisher
    gamma: float = 1.0  # weight of the (negated) forget NLL
    alpha: float = 1.0  # weight of the retain NLL
    fisher_batches: int = 16  # batches of each set the Fisher estimates average over

    def __post_init__(self):
        check_number("MMUnlearner", "threshold", self.threshold, positive=True)
        check_number("MMUnlearner", "gamma", self.gamma, positive=True)
        check_number("MMUnlearner", "alpha", self.alpha, min=0)
        check_number("MMUnlearner", "fisher_batches", self.fisher_batches, positive=True)


def fisher(model, params: list[torch.Tensor], batches, limit: int) -> list[torch.Tensor]:
    """The mean over up to `limit` batches of each parameter's squared NLL gradient."""
    total = [torch.zeros_like(p) for p in params]
    n = 0
    for grads in nll_gradients(model, params, batches, limit):
        for t, g in zip(total, grads):
            if g is not None:
                t.add_(g.detach() ** 2)
        n += 1
    if not n:
        raise ObliviateError("MMUnlearner: no batch to estimate the Fisher information from")
    return [t / n for t in total]


class MMUnlearner(Method):
    name = "MMUnlearner"
    Config = MMUnlearnerConfig
    needs_reference = False

    def __init__(self, config=None):
        super().__init__(config)
        self.masks: list[torch.Tensor] | None = None
        self.mask_logs: dict[str, float] = {}

    def fit(self, model, named: list, forget_batches, retain_batches) -> None:
        from obliviate.models.vlm import part_of

        c = self.config
        params = [p for _, p in named]
        f_forget = fisher(model, params, forget_batches, c.fisher_batches)
        f_retain = fisher(model, params, retain_batches, c.fisher_batches)
        self.masks = [((a + EPS) / (b + EPS) >= c.threshold).to(p.dtype) for a, b, p in zip(f_forget, f_retain, params)]
        kept: dict[str, list[float]] = {}
        for (name, _), m in zip(named, self.masks):
            k = kept.setdefault(part_of(name), [0.0, 0.0])
            k[0] += float(m.sum())
            k[1] += m.numel()
        self.mask_logs = {f"mask_kept_{part}": round(a / b, 4) for part, (a, b) in kept.items()}

    def losses(self, model, reference, forget: dict, retain: dict) -> LossParts:
        c = self.config
        nll_f = mean_nll(model, forget)
        nll_r = mean_nll(model, retain)
        logs = {"forget_nll": float(nll_f.detach()), "retain_nll": float(nll_r.detach())}
        return LossParts(forget=-c.gamma * nll_f, retain=c.alpha * nll_r, logs=logs)

    def combine_gradients(self, g_forget: list[torch.Tensor], g_retain: list[torch.Tensor]):
        if self.masks is None:
            raise ObliviateError("MMUnlearner: the saliency mask is taken before the first step (the loop's fit)")
        return [m * gf + gr for m, gf, gr in zip(self.masks, g_forget, g_retain)], dict(self.mask_logs)
