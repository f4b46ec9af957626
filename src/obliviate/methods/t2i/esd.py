"""Erased Stable Diffusion (ESD-x and ESD-u).

Paper: Gandikota et al. 2023, "Erasing Concepts from Diffusion Models" (ICCV), https://arxiv.org/abs/2303.07345

The fine-tuned UNet learns to predict, for the concept prompt c, the frozen model's noise moved away from c:

    eps* = eps_frozen(x_t, "", t) - eta * (eps_frozen(x_t, c, t) - eps_frozen(x_t, "", t))
    L    = || eps_theta(x_t, c, t) - eps* ||^2

x_t comes from partially sampling (DDIM with guidance `start_guidance`) the frozen model on c, stopped at a random
step; t is the timestep reached. The two frozen passes and ... are batched into one UNet call (conditional and
unconditional in one batch). ESD-x trains only cross-attention (`attn2`): the paper's choice for styles and
specific concepts. ESD-u trains everything but cross-attention (and, as the reference code, not the time embedding
or the output convolution): for broad concepts. Paper defaults: eta (negative guidance) 1, start guidance 3,
1000 iterations, lr 1e-5, batch 1, 50 DDIM steps (here the loop's sampling steps; the loop's `train` sets lr, steps
and batch).

SD3/FLUX (flow matching, docs/t2i_dit.md): the same target line on the velocities (the predictions are linear in
guidance there too, as EraseAnything's FLUX loss uses), x_t from the pipeline's own flow sampler; ESD-x's
"cross-attention" is the joint blocks' context-stream key/value maps (`add_k_proj`, `add_v_proj`: the maps
EraseAnything trains on FLUX), ESD-u everything else but the time/text embedding and the output layers. No ESD
release for these shapes exists from its authors: this is obliviate's port.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from obliviate.methods.common import check_number
from obliviate.methods.t2i.base import DiffusionMethod, EraseContext, LossParts, in_parameter_group, is_cross_attention
from obliviate.models.diffusion import Cond


@dataclass
class ESDConfig:
    eta: float = 1.0  # negative guidance: how far beyond "" the target moves away from the concept
    start_guidance: float = 3.0  # classifier-free guidance of the partial sampling that makes x_t

    def __post_init__(self):
        check_number("ESD", "eta", self.eta, positive=True)
        check_number("ESD", "start_guidance", self.start_guidance, min=0)


class ESDx(DiffusionMethod):
    name = "ESD-x"
    Config = ESDConfig
    needs_frozen = True
    needs_images = False  # x_t comes from the frozen model's own partial sampling at each step

    def trainable(self, name: str, param) -> bool:
        return is_cross_attention(name)

    def losses(self, ctx: EraseContext, unet, forget: dict, retain: dict) -> LossParts:
        texts = forget["texts"]
        x_t, t = ctx.partial_sample(texts, self.config.start_guidance, ctx.frozen)
        cond = forget["context"]
        empty = ctx.unconditional(len(cond))
        with torch.no_grad():  # the frozen conditional and unconditional passes: one denoiser call
            eps_c, eps_u = ctx.predict(ctx.frozen, torch.cat([x_t, x_t]), t, Cond.cat([cond, empty])).chunk(2)
            target = eps_u - self.config.eta * (eps_c - eps_u)
        pred = ctx.predict(unet, x_t, t, cond)
        loss = F.mse_loss(pred.float(), target.float())
        return LossParts(forget=loss, logs={"esd_mse": float(loss.detach()), "t": float(t)})


class ESDu(ESDx):
    name = "ESD-u"

    def trainable(self, name: str, param) -> bool:
        return in_parameter_group("noxattn", name)
