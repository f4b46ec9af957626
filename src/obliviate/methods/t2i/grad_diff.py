"""GradDiff, RG and RGD for text-to-image diffusion models.

GradDiff (Liu et al. 2022, https://arxiv.org/abs/2203.12817), on the denoising loss L_DM:

    L = - gamma * L_DM(forget images, forget prompts) + alpha * L_DM(retain images, retain prompts)

The images are the original pipeline's own samples of the prompts (drawn by the loop before any step).

RG and RGD: Ko et al. 2024, "Boosting Alignment for Post-Unlearning Text-to-Image Generative Models" (NeurIPS 2024),
https://arxiv.org/abs/2412.07808. The same two terms; their gradients g_f (of -L_f) and g_r (of alpha L_r) are
combined by the restricted-gradient rule (`gradient_surgery.restrict`, shared with the language-model RG):
when <g_f, g_r> < 0 each is projected onto the normal plane of the other (from the original vectors), and the step
follows g_f' + lambda g_r'. Paper defaults for Stable Diffusion: lambda 1.6, lr 1e-5, Adam, batch 8.
RGD adds the diversified retain set — a subset balanced across the remaining concepts (`RetainPrompt.source`, then
`.subject`), whose gradient is averaged over the WHOLE subset at every step — and the truncated forget loss: the
ascent stops once L_f exceeds m (1.1 for SD in the paper), so the model is not pushed into noise.
"""
from __future__ import annotations

from dataclasses import dataclass

from obliviate.errors import ObliviateError
from obliviate.methods.common import check_number
from obliviate.methods.t2i.base import DiffusionMethod, EraseContext, LossParts, denoising_loss
from obliviate.methods.gradient_surgery import balanced_subset, check_rgd_extras, restricted_sum


@dataclass
class GradDiffConfig:
    gamma: float = 1.0  # weight of the (negated) forget denoising loss
    alpha: float = 1.0  # weight of the retain denoising loss

    def __post_init__(self):
        check_number(self._method(), "gamma", self.gamma, positive=True)
        check_number(self._method(), "alpha", self.alpha, min=0)

    def _method(self) -> str:
        return type(self).__name__[:-len("Config")] or "GradDiff"


class GradDiff(DiffusionMethod):
    name = "GradDiff"
    Config = GradDiffConfig

    def forget_term(self, ctx: EraseContext, unet, forget: dict, logs: dict):
        loss_f = denoising_loss(unet, ctx, forget)
        logs["forget_mse"] = float(loss_f.detach())
        return -self.config.gamma * loss_f

    def losses(self, ctx: EraseContext, unet, forget: dict, retain: dict) -> LossParts:
        logs: dict = {}
        forget_term = self.forget_term(ctx, unet, forget, logs)
        retain_term = None
        if self.config.alpha > 0:
            loss_r = denoising_loss(unet, ctx, retain)
            logs["retain_mse"] = float(loss_r.detach())
            retain_term = self.config.alpha * loss_r
        return LossParts(forget=forget_term, retain=retain_term, logs=logs)


@dataclass
class RGConfig(GradDiffConfig):
    retain_weight: float = 1.6  # the paper's lambda for Stable Diffusion

    def __post_init__(self):
        super().__post_init__()
        check_number(self._method(), "retain_weight", self.retain_weight, min=0)
        if self.alpha == 0:
            raise ObliviateError(f"{self._method()}: alpha must be > 0 (the restricted gradient needs a retain term)")


class RG(GradDiff):
    name = "RG"
    Config = RGConfig

    def combine_gradients(self, g_forget: list, g_retain: list) -> tuple[list, dict]:
        return restricted_sum(g_forget, g_retain, self.config.retain_weight)


@dataclass
class RGDConfig(RGConfig):
    diverse_retain_size: int = 32  # retain prompts in the balanced subset (each drawn `images_per_prompt` times)
    forget_loss_cap: float | None = 1.1  # the paper's m for SD: no more ascent once the forget MSE exceeds it

    def __post_init__(self):
        super().__post_init__()
        check_rgd_extras(self)


class RGD(RG):
    name = "RGD"
    Config = RGDConfig
    full_retain_batch = True

    def retain_pool(self, items: list, rng) -> list:
        return balanced_subset(items, self.config.diverse_retain_size, rng)

    def forget_term(self, ctx: EraseContext, unet, forget: dict, logs: dict):
        term = super().forget_term(ctx, unet, forget, logs)
        cap = self.config.forget_loss_cap
        active = cap is None or logs["forget_mse"] < cap
        logs["forget_active"] = float(active)
        return term if active else term * 0.0  # zero gradient: a retain-only step
