"""Concept Ablation: make the concept prompt produce what the anchor prompt produces.

Paper: Kumari et al. 2023, "Ablating Concepts in Text-to-Image Diffusion Models" (ICCV),
https://arxiv.org/abs/2303.13516

Model-based variant: on images x of the anchor concept (drawn by the original pipeline from the anchor prompts,
the concept replaced by the anchor), with c* the concept prompt and c_anchor the anchor prompt,

    L = || eps_theta(x_t, c*, t) - sg eps_theta(x_t, c_anchor, t) ||^2

plus, optionally, the regulariser `retain_weight * ||eps - eps_theta(x_t, c_anchor, t)||^2` on the same images so
the anchor itself stays intact (the paper's "with regularisation" runs). Paper defaults: lr 2e-6, 100 steps
(batch 8), cross-attention key/value projections trained ("crossattn_kv"; "crossattn" and "full" also offered).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from obliviate.methods.common import check_choice, check_number
from obliviate.methods.t2i.base import DiffusionMethod, EraseContext, LossParts, in_parameter_group


@dataclass
class ConceptAblationConfig:
    parameter_group: str = "crossattn_kv"  # crossattn_kv | crossattn | full
    retain_weight: float = 0.0  # weight of the anchor's own denoising loss (the paper's regularised variant)

    def __post_init__(self):
        check_choice("ConceptAblation", "parameter_group", self.parameter_group, ("crossattn_kv", "crossattn", "full"))
        check_number("ConceptAblation", "retain_weight", self.retain_weight, min=0)


class ConceptAblation(DiffusionMethod):
    name = "ConceptAblation"
    Config = ConceptAblationConfig
    default_steps = 100

    def trainable(self, name: str, param) -> bool:
        return in_parameter_group(self.config.parameter_group, name)

    def setup(self, ctx: EraseContext, forget: dict, params: list) -> None:
        """The anchor's images: the original pipeline's samples of the forget prompts with the concept replaced."""
        from obliviate.loops.t2i import draw_latents
        self.anchor_texts = [ctx.task.anchor_prompt(t) for t in forget["texts"]]
        self.anchor_latents = draw_latents(ctx, self.anchor_texts, seed=7)
        self.index = {t: i for i, t in enumerate(forget["texts"])}

    def losses(self, ctx: EraseContext, unet, forget: dict, retain: dict) -> LossParts:
        idx = torch.tensor([self.index[t] for t in forget["texts"]])
        x0 = self.anchor_latents[idx]
        anchor_context = ctx.encode([self.anchor_texts[i] for i in idx.tolist()])
        x_t, t, eps = ctx.noisy(x0)
        with torch.no_grad():
            target = ctx.predict(unet, x_t, t, anchor_context)
        pred = ctx.predict(unet, x_t, t, forget["context"])
        loss = F.mse_loss(pred.float(), target.float())
        logs = {"ablation_mse": float(loss.detach())}
        retain_term = None
        if self.config.retain_weight > 0:
            anchor_loss = F.mse_loss(ctx.predict(unet, x_t, t, anchor_context).float(), eps.float())
            logs["anchor_mse"] = float(anchor_loss.detach())
            retain_term = self.config.retain_weight * anchor_loss
        return LossParts(forget=loss, retain=retain_term, logs=logs)
