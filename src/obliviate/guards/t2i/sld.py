"""SLD, Safe Latent Diffusion (Schramowski et al., CVPR 2023, https://arxiv.org/abs/2211.05105): a generation-time
guard. Each step predicts the noise for the prompt (c), the empty prompt (u) and a safety concept (s), and moves
classifier-free guidance away from the concept where the prompt's prediction is close to it:

    scale_i   = min(1, s_S |eps_c - eps_s|_i)   where eps_c - eps_s < lambda, else 0       (eq. 6, elementwise)
    gamma     = scale * (eps_s - eps_u) + s_m nu_t                                         (eq. 4 and 7)
    nu_{t+1}  = beta_m nu_t + (1 - beta_m) gamma                                           (eq. 8, nu_0 = 0)
    eps       = eps_u + s_g (eps_c - eps_u - gamma)     from step delta on (warm-up: plain CFG)   (eq. 3)

Reference code read: diffusers' `StableDiffusionPipelineSafe` (pipelines/deprecated/stable_diffusion_safe; the
authors' own pipeline, moved into diffusers). Its defaults and presets (`SafetyConfig`) are this file's: the default
is MEDIUM (s_S 1000, delta 10, lambda 0.01, s_m 0.3, beta_m 0.4); `preset` picks WEAK, MEDIUM, STRONG or MAX.
As in the reference, the momentum is updated during the warm-up too (only its use waits), and a guidance scale
s_S <= 1 turns safety guidance off (the three-way batch is then not even built, so the pictures are CFG's exactly).
Where obliviate differs: the safety concept is the run's erased concept (or `concept` when given), not the
reference's long list of inappropriate content; diffusers' WEAK preset has s_S 20 where the paper's table lists 200
(obliviate follows diffusers, the code people run). Weights: none change; the run records this config."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from obliviate.guards.t2i import T2IGuard

PRESETS = {  # diffusers' SafetyConfig
    "weak": dict(guidance_scale=20.0, warmup_steps=15, threshold=0.0, momentum_scale=0.0, momentum_beta=0.0),
    "medium": dict(guidance_scale=1000.0, warmup_steps=10, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4),
    "strong": dict(guidance_scale=2000.0, warmup_steps=7, threshold=0.025, momentum_scale=0.5, momentum_beta=0.7),
    "max": dict(guidance_scale=5000.0, warmup_steps=0, threshold=1.0, momentum_scale=0.5, momentum_beta=0.7),
}


@dataclass
class SLDConfig:
    preset: str = "medium"  # weak | medium | strong | max: the values below that are not given
    guidance_scale: float | None = None  # s_S: strength of the safety guidance (<= 1: off)
    warmup_steps: int | None = None  # delta: sampling steps of plain CFG before the safety guidance applies
    threshold: float | None = None  # lambda: where eps_c - eps_s is at least this, no safety guidance
    momentum_scale: float | None = None  # s_m
    momentum_beta: float | None = None  # beta_m
    concept: str = ""  # the safety concept; empty: the run's erased concept

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("preset", "concept"):
                if not isinstance(value, str):
                    raise ValueError(f"{f.name} must be a string, got {value!r}")
            elif f.name == "warmup_steps":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"warmup_steps must be an integer >= 0, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) == float(value) \
                    or abs(float(value)) == float("inf"):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.momentum_scale < 0:
            raise ValueError(f"momentum_scale must be >= 0, got {self.momentum_scale}")
        if not 0 <= self.momentum_beta < 1:
            raise ValueError(f"momentum_beta must be in [0, 1), got {self.momentum_beta}")


class SLD(T2IGuard):
    name = "SLD"
    Config = SLDConfig
    paper = ("Schramowski et al. 2023, Safe Latent Diffusion: Mitigating Inappropriate Degeneration in Diffusion "
             "Models, CVPR, https://arxiv.org/abs/2211.05105")

    def __init__(self, config=None):
        super().__init__(config)
        self.momentum = None

    @property
    def active(self) -> bool:
        return self.config.guidance_scale > 1  # as the reference: a scale <= 1 is no safety guidance

    def extra_prompts(self) -> list[str]:
        return [self.target()] if self.active else []

    def begin(self, pipe, unet, x, seeds, context, guidance, text_encoder=None, prompts=None):
        self.momentum = None  # nu_0 = 0 for every sampling call
        return super().begin(pipe, unet, x, seeds, context, guidance, text_encoder)

    def combine(self, step_index, t, x_t, pred_uncond, pred_cond, extra):
        if not self.active:
            return super().combine(step_index, t, x_t, pred_uncond, pred_cond, extra)
        c = self.config
        pred_safety = extra[self.target()]
        guidance = pred_cond - pred_uncond
        if self.momentum is None:
            self.momentum = torch.zeros_like(guidance)
        gap = pred_cond - pred_safety
        scale = torch.clamp(gap.abs() * c.guidance_scale, max=1.0)
        scale = torch.where(gap >= c.threshold, torch.zeros_like(scale), scale)
        safety = (pred_safety - pred_uncond) * scale + c.momentum_scale * self.momentum
        self.momentum = c.momentum_beta * self.momentum + (1 - c.momentum_beta) * safety
        if step_index >= c.warmup_steps:
            guidance = guidance - safety
        return pred_uncond + self.guidance * guidance
