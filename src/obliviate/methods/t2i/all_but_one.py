"""All but One: surgical concept erasing with model preservation (guidance-term update, unconditional score held).

Paper: Hong, Lee, Woo 2024, "All but One: Surgical Concept Erasing with Model Preservation in Text-to-Image Diffusion
Models", AAAI 2024 (vol. 38, no. 19), https://arxiv.org/abs/2312.12807
Reference code: none public (no repository in the paper, in erase-eval's 24 re-implementations or in the surveys'
code lists; searched by title, arXiv id and phrases).

READ THIS FIRST: only the paper's abstract and its Figure 1 could be read here (its method section was not
reachable), so the objective below is the abstract's description written as a loss, not the paper's equations, and
the defaults are obliviate's, not the paper's. What the abstract states, and how each statement is written:

- "a surgical update on the classifier guidance term": the guidance term of a prompt c is, by Bayes' rule and
  classifier-free guidance, g(x_t, c) = eps(x_t, c) - eps(x_t, "") (proportional to -grad log p(c | x_t)). Only the
  concept's guidance term is trained, towards the frozen original's guidance term of the alternative:
      g_theta(x_t, c) -> (1 - eta) g_0(x_t, c) + eta g_0(x_t, a)
  (eta = 1: the concept's guidance is replaced by the alternative's; 0 < eta < 1 moves part of the way).
- "while constraining the drift of the unconditional score term":
      eps_theta(x_t, "") -> eps_0(x_t, "")
- "our algorithm empowers the user to select an alternative to the erasing concept" (Figure 1: "- Van Gogh style
  + dry brushing", "- desktop + laptop"): the alternative prompt a is the forget prompt with the concept replaced by
  the task's anchor (EraseTask.anchor_prompt; no anchor: the prompt without the concept, so only the concept's part
  of the guidance is removed and the rest of the prompt still guides).

    L = || g_theta(x_t, c) - [(1 - eta) g_0(x_t, c) + eta g_0(x_t, a)] ||^2
        + lambda || eps_theta(x_t, "") - eps_0(x_t, "") ||^2

with g_theta(x_t, c) = eps_theta(x_t, c) - eps_theta(x_t, "") differentiated through both predictions (the update
is on the guidance term itself; the second term is what keeps its unconditional half from drifting), x_t the
original pipeline's own pictures of the forget prompts noised at a random training timestep (the abstract blames
"sub-optimal training updates" for utility harm; how the paper draws x_t is not known here).

Defaults (obliviate's, to be checked against the paper): eta 1, lambda (`uncond_weight`) 1, cross-attention trained
(`parameter_group = "xattn"`, as ESD-x; "full" trains the whole UNet). With eta = 1 and the unconditional term held,
the concept prompt's prediction goes to eps_0(x_t, a) - eps_0(x_t, "") + eps_theta(x_t, ""), i.e. to the
original's prediction for the alternative prompt: Concept Ablation's model-based target, reached through the
guidance term rather than the prediction.

Not built: the paper's concept purification of real images by DDIM inversion (Figure 1b) is a use of the erased
model at generation time, not part of the erasure.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from obliviate.methods.common import check_choice, check_number
from obliviate.methods.t2i.base import DiffusionMethod, EraseContext, LossParts, is_cross_attention
from obliviate.models.diffusion import Cond


@dataclass
class AllButOneConfig:
    eta: float = 1.0  # share of the concept's guidance term replaced by the alternative's (1: all of it)
    uncond_weight: float = 1.0  # lambda: weight of the unconditional score's drift penalty
    parameter_group: str = "xattn"  # "xattn": cross-attention only; "full": the whole UNet

    def __post_init__(self):
        check_number("AllButOne", "eta", self.eta, positive=True)
        if self.eta > 1:
            from obliviate.errors import ObliviateError
            raise ObliviateError(f"AllButOne: eta must be <= 1 (1 replaces all of the guidance), got {self.eta!r}")
        check_number("AllButOne", "uncond_weight", self.uncond_weight, min=0)
        check_choice("AllButOne", "parameter_group", self.parameter_group, ("xattn", "full"))


class AllButOne(DiffusionMethod):
    name = "AllButOne"
    Config = AllButOneConfig
    needs_frozen = True
    needs_images = True  # x_t: the original's own pictures of the forget prompts, noised

    def trainable(self, name: str, param) -> bool:
        return self.config.parameter_group == "full" or is_cross_attention(name)

    def guidance_loss(self, ctx: EraseContext, unet, texts: list[str], cond: Cond, x_t, t):
        """The objective on noisy latents x_t at timesteps t of the prompts `texts` (conditioning `cond`)."""
        c = self.config
        n = len(texts)
        alternative = ctx.encode([ctx.task.anchor_prompt(p) for p in texts]).to(cond.states.device, cond.states.dtype)
        empty = ctx.unconditional(n)
        with torch.no_grad():  # the original's three passes in one call
            e0_c, e0_a, e0_u = ctx.predict(ctx.frozen, torch.cat([x_t] * 3), torch.cat([t] * 3),
                                           Cond.cat([cond, alternative, empty])).float().chunk(3)
            target = (1 - c.eta) * (e0_c - e0_u) + c.eta * (e0_a - e0_u)
        e_c, e_u = ctx.predict(unet, torch.cat([x_t, x_t]), torch.cat([t, t]), Cond.cat([cond, empty])).float().chunk(2)
        erase = F.mse_loss(e_c - e_u, target)
        drift = F.mse_loss(e_u, e0_u)
        loss = erase + c.uncond_weight * drift if c.uncond_weight > 0 else erase
        return loss, {"guidance_mse": float(erase.detach()), "uncond_drift": float(drift.detach())}

    def losses(self, ctx: EraseContext, unet, forget: dict, retain: dict) -> LossParts:
        x_t, t, _ = ctx.noisy(forget["latents"])
        loss, logs = self.guidance_loss(ctx, unet, forget["texts"], forget["context"], x_t, t)
        return LossParts(forget=loss, logs=logs)
