"""DoCo: concept domain correction with a domain discriminator, and the concept-preserving gradient.

Paper: Wu, Zhou, Yang, Wang, Chang, Zhu, Hu, Zhou and Yang, "Unlearning Concepts in Diffusion Model via Concept
Domain Correction and Concept Preserving Gradient", AAAI 2025, https://arxiv.org/abs/2405.15304
Reference code read: github.com/yongliang-wu/DoCo (train.py, DoCo/gan.py, DoCo/gradient_clip.py,
DoCo/scheduling_ddpm.py `step_batch`, the README's training commands).

Domain correction (adversarial training). On a picture x of the anchor concept (the original pipeline's sample of
the anchor prompt: the forget prompt with the concept replaced by `task.anchor`), noised to x_t at a random t, the
denoiser being erased predicts under the concept prompt c and the frozen original under the anchor prompt c_a. Both
predictions are mapped to the clean latents they imply (x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) on epsilon
shapes; the reference's `pred_original_sample`), and a small PatchGAN discriminator D (one logit per patch, "this
comes from the concept") learns to tell them apart while the denoiser learns to fool it:

    L_D   = BCE(D(x0_theta(x_t, c, t)), 1) + BCE(D(x0_orig(x_t, c_a, t)), 0)    (D's own Adam step; the denoiser's
                                                                               prediction detached)
    L_adv = BCE(D(x0_theta(x_t, c, t)), 0)                                     (the denoiser's unlearning loss)

so the concept's output domain is aligned with the anchor's (BCE: the mean over the patch logits of the binary cross
entropy with logits). The first `warmup_steps` steps train D alone. Order as in the reference: each step the denoiser
steps against the current D, then D steps on that step's two (detached) predictions (here at the start of the next
call, which is the same sequence). The discriminator is the method's own: its weights are not part of the run's
changed tensors, which are the denoiser's trained ones only (`parameter_group`: cross-attention key/value maps, as
the reference's "cross-attn").

Concept-preserving gradient (gradient surgery). The preservation loss L_p is the denoising loss of the anchor's
pictures under the anchor prompt (the reference's prior preservation; `preserve_on = "retain"`: the task's retain
prompts and pictures). With g_u the gradient of L_adv and g_p that of L_p, where <g_u, g_p> < 0

    g_u' = g_u - lambda <g_u, g_p> / ||g_p||^2 g_p        (lambda = `surgery_scale`, 1)

tested and applied for each trained tensor on its own (`per_tensor`, as the reference), and the denoiser steps on
g_u' + `preserve_weight` * g_p (0, as the reference with its surgery on: L_p steers the unlearning direction but is
not itself descended). `surgery = false` steps on g_u + `preserve_weight` g_p (the reference without its surgery
flag: 0.1 x its prior weight 1).

How this differs from the project's restricted gradient (RG, Ko et al. 2024, `gradient_surgery.restrict`, used by
the RG/RGD methods of both families): both act at every step whose two gradients have a negative inner product, but
(1) RG projects BOTH gradients, each onto the normal plane of the other, both from the original vectors
(g_f' = g_f - <g_f,g_r>/||g_r||^2 g_r and g_r' = g_r - <g_f,g_r>/||g_f||^2 g_f); DoCo projects only the unlearning
gradient, onto the normal plane of the preservation gradient (scaled by lambda), and never changes g_p; (2) RG steps
on g_f' + lambda_RG g_r' (lambda_RG 1.6: the retain loss is descended too, along its projected gradient); DoCo by
default steps on g_u' alone, and where `preserve_weight` > 0 it adds the unprojected g_p; (3) RG tests one inner
product over the flattened concatenation of all trained tensors; DoCo tests each tensor's own (so one tensor can be
projected while the whole gradients do not conflict, and the reverse; `per_tensor = false` tests the whole vector);
(4) DoCo's surgery starts only after the discriminator's warm-up (before it the denoiser takes no step). RG's step
has a non-negative inner product with both gradients; DoCo's (lambda 1, preserve_weight 0) is orthogonal to g_p
where they conflicted and keeps <g_u', g_u> = ||g_u||^2 - <g_u,g_p>^2/||g_p||^2 >= 0.
`tests/test_t2i_doco.py` shows both rules on the same hand-made vectors giving different steps.

Reference defaults (README commands, Stable Diffusion v1.4): 2000 steps, the first `--warm_up` 1000 training the
discriminator alone; AdamW lr 6e-6 scaled by the batch (`--scale_lr`, batch 8: 4.8e-5), weight decay 1e-2, gradient
norm 1; attn2.to_k/to_v trained; the discriminator a PatchGAN on the 4-channel latents (widths 64-128-256-512,
BatchNorm but in the first block, LeakyReLU 0.2, 4x4 convolutions of stride 2, then a 4x4 convolution to one logit
per patch), BCE with logits, Adam betas (0.5, 0.999) at `--dlr` 5e-4 (styles; 1e-4 for objects and nudity; 1e-2 the
argparse default); `--lambda_` 1 with `--gradient_clip` (the surgery). The step count, the denoiser's lr and batch are
the run's `train` keys here (default steps 2000).

Where obliviate differs, and why:
- The projection: the reference subtracts lambda cos(g_u, g_p) g_p/||g_p|| from the UNnormalised g_u, which removes
  the conflicting component only when ||g_u|| = 1; here the component itself, lambda <g_u, g_p>/||g_p||^2 g_p (the
  gradient surgery of PCGrad, Yu et al. 2020, which the abstract's "mitigates conflicting gradient components" names;
  the paper's method section was not at hand, only its abstract; the two agree for unit-norm g_u, as a test checks).
- The reference clips g_u and g_p to norm 1 each before the surgery and not the result; here the loop clips the step
  (`train.max_grad_norm`).
- The reference's backward of the denoiser's adversarial loss also reaches D's weights, and those gradients are not
  cleared before D's own loss is added, so D's step mixes in the opposite objective; here D descends L_D alone.
- Pictures: the original pipeline's samples of the anchor prompts (the reference: retrieved or generated anchor
  pictures with ChatGPT-written captions); the preservation loss uses the same pictures with fresh noise (the
  reference: a second batch of them).
- The discriminator's depth follows the latents' size (the reference's 4 blocks need 32x32 or more): as many of the
  4 stride-2 blocks as leave at least 2x2 for the last convolution. Its channels are the latents' (4 for SD/SDXL).
- x0 is solved from the backbone's own forward process and target (both linear in x0 and the noise at a timestep),
  so the same code gives DDPM's x0 on epsilon shapes and x_t - sigma v on flow-matching ones.
- A resumed run restarts the discriminator (its state is not in the loop's checkpoints), and the loop's learning-rate
  warm-up (`train.warmup_fraction`) counts the discriminator's warm-up steps. A run with no step past the warm-up
  changed nothing and is refused when it ends (the method is not told the run's step count before).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from obliviate.errors import ObliviateError
from obliviate.methods.common import check_choice, check_number
from obliviate.methods.gradient_surgery import project_conflict
from obliviate.methods.t2i.base import DiffusionMethod, EraseContext, LossParts, denoising_loss, in_parameter_group

DISC_BETAS = (0.5, 0.999)  # the reference's discriminator Adam


@dataclass
class DoCoConfig:
    parameter_group: str = "crossattn_kv"  # crossattn_kv (the reference's "cross-attn") | crossattn | full
    warmup_steps: int = 1000  # steps that train the discriminator alone, before the denoiser's first step
    disc_lr: float = 5e-4  # the discriminator's Adam lr (the README's styles; 1e-4 for objects and nudity)
    disc_width: int = 64  # channels of the discriminator's first block (doubled per block, up to 8x)
    discriminate: str = "x0"  # what D reads: "x0" (the clean latents each prediction implies) | "prediction"
    surgery: bool = True  # the concept-preserving gradient
    surgery_scale: float = 1.0  # lambda: the share of the conflicting component removed
    per_tensor: bool = True  # test and project each trained tensor on its own (the reference), else the whole vector
    preserve_on: str = "anchor"  # the preservation loss: "anchor" pictures and prompts | the task's "retain" ones
    preserve_weight: float = 0.0  # weight of the preservation gradient added to the step

    def __post_init__(self):
        check_choice("DoCo", "parameter_group", self.parameter_group, ("crossattn_kv", "crossattn", "full"))
        check_choice("DoCo", "discriminate", self.discriminate, ("x0", "prediction"))
        check_choice("DoCo", "preserve_on", self.preserve_on, ("anchor", "retain"))
        for key in ("warmup_steps", "disc_width"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "warmup_steps" else 1):
                raise ObliviateError(f"DoCo: {key} must be an integer >= {0 if key == 'warmup_steps' else 1}, "
                                     f"got {value!r}")
        check_number("DoCo", "disc_lr", self.disc_lr, positive=True)
        check_number("DoCo", "surgery_scale", self.surgery_scale, min=0)
        check_number("DoCo", "preserve_weight", self.preserve_weight, min=0)
        for key in ("surgery", "per_tensor"):
            if not isinstance(getattr(self, key), bool):
                raise ObliviateError(f"DoCo: {key} must be true or false, got {getattr(self, key)!r}")


class PatchDiscriminator(nn.Module):
    """The reference's PatchGAN: `blocks` 4x4 convolutions of stride 2 (widths w, 2w, 4w, 8w; BatchNorm in all but the
    first; LeakyReLU 0.2), then a 4x4 convolution to one logit per patch."""

    def __init__(self, channels: int, width: int, blocks: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = channels
        for i in range(blocks):
            c_out = width * 2 ** min(i, 3)
            layers.append(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1))
            if i > 0:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2))
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, 4, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @staticmethod
    def blocks_for(height: int, width: int) -> int:
        """The reference's 4 blocks, fewer where the latents are small: at least 2x2 must reach the last convolution."""
        side = min(height, width)
        if side < 4:
            raise ObliviateError(f"DoCo: the latents are {height}x{width}; the discriminator needs at least 4x4")
        return min(4, int(math.log2(side // 2)))


def clean_latents(ctx: EraseContext, x_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """The x0 a prediction implies at (x_t, t). The backbone's x_t = A x0 + B eps and its target C x0 + D eps are
    linear at a timestep; solving both for x0 gives (D x_t - B pred) / (A D - B C): DDPM's (x_t - sqrt(1 - abar) eps) /
    sqrt(abar) on epsilon shapes, x_t - sigma v under flow matching."""
    pipe, backbone = ctx.pipe, ctx.pipe.backbone
    one, zero = torch.ones_like(x_t), torch.zeros_like(x_t)
    a, b = backbone.noisy(pipe, one, zero, t), backbone.noisy(pipe, zero, one, t)
    c, d = backbone.target(pipe, one, zero, t), backbone.target(pipe, zero, one, t)
    return (d * x_t - b * pred) / (a * d - b * c)


class DoCo(DiffusionMethod):
    name = "DoCo"
    Config = DoCoConfig
    needs_frozen = True  # the anchor's predictions come from the original
    default_steps = 2000

    @property
    def needs_images(self) -> bool:  # the anchor's pictures are drawn in setup; retain ones only to preserve them
        return self.config.preserve_on == "retain"

    def trainable(self, name: str, param) -> bool:
        return in_parameter_group(self.config.parameter_group, name)

    def setup(self, ctx: EraseContext, forget: dict, params: list) -> None:
        """The anchor's pictures (the original's samples of the anchor prompts) and their prompts' conditioning, added
        to the forget rows so that each batch carries the rows' own; the discriminator and its optimiser."""
        from obliviate.loops.t2i import draw_latents

        anchor_texts = [ctx.task.anchor_prompt(t) for t in forget["texts"]]
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=ctx.generator))
        forget["anchor_latents"] = draw_latents(ctx, anchor_texts, seed)
        forget["anchor_context"] = ctx.encode(anchor_texts)
        _, channels, height, width = forget["anchor_latents"].shape
        with torch.random.fork_rng(devices=[]):  # its initialisation from the run's seed, the global state untouched
            torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=ctx.generator)))
            self.discriminator = PatchDiscriminator(channels, self.config.disc_width,
                                                    PatchDiscriminator.blocks_for(height, width)).to(ctx.pipe.device)
        self.disc_opt = torch.optim.Adam(self.discriminator.parameters(), lr=self.config.disc_lr, betas=DISC_BETAS)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.step, self.original = 0, ctx.frozen

    def domain(self, ctx: EraseContext, x_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """What the discriminator reads of a prediction."""
        pred = pred.float()
        return clean_latents(ctx, x_t.float(), t, pred) if self.config.discriminate == "x0" else pred

    def discriminator_loss(self, concept: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """L_D: the concept's domain labelled 1, the anchor's 0 (two passes, as the reference: BatchNorm's statistics
        are each batch's own)."""
        d_c, d_a = self.discriminator(concept), self.discriminator(anchor)
        return (F.binary_cross_entropy_with_logits(d_c, torch.ones_like(d_c))
                + F.binary_cross_entropy_with_logits(d_a, torch.zeros_like(d_a)))

    def adversarial_loss(self, concept: torch.Tensor) -> torch.Tensor:
        """L_adv: the denoiser's concept domain judged as the anchor's (D fixed: no gradient reaches its weights)."""
        self.discriminator.requires_grad_(False)
        try:
            d_c = self.discriminator(concept)
        finally:
            self.discriminator.requires_grad_(True)
        return F.binary_cross_entropy_with_logits(d_c, torch.zeros_like(d_c))

    def discriminator_step(self) -> float | None:
        """D's Adam step on the last call's two domains (after the denoiser's step on them); their L_D, or None."""
        if self.pending is None:
            return None
        concept, anchor = self.pending
        self.pending = None
        with torch.enable_grad():
            loss = self.discriminator_loss(concept, anchor)
            self.disc_opt.zero_grad(set_to_none=True)  # a plain backward of the denoiser's loss may have reached D
            loss.backward()
        self.disc_opt.step()
        return float(loss.detach())

    def losses(self, ctx: EraseContext, unet, forget: dict, retain: dict) -> LossParts:
        logs: dict = {}
        disc_loss = self.discriminator_step()
        if disc_loss is not None:
            logs["disc_loss"] = disc_loss
        adversarial = self.step >= self.config.warmup_steps
        self.step += 1
        logs["adversarial"] = float(adversarial)
        x0, anchor_context = forget["anchor_latents"], forget["anchor_context"]
        x_t, t, _ = ctx.noisy(x0)
        with torch.no_grad():
            anchor_domain = self.domain(ctx, x_t, t, ctx.predict(ctx.frozen, x_t, t, anchor_context))
        with torch.set_grad_enabled(adversarial and torch.is_grad_enabled()):
            concept_domain = self.domain(ctx, x_t, t, ctx.predict(unet, x_t, t, forget["context"]))
        self.pending = (concept_domain.detach(), anchor_domain)
        if not adversarial:  # the warm-up: no gradient reaches the denoiser, which takes no step
            return LossParts(forget=torch.zeros((), device=x0.device, requires_grad=True), logs=logs)
        adv = self.adversarial_loss(concept_domain)
        logs["adv_loss"] = float(adv.detach())
        if not self.config.surgery and self.config.preserve_weight == 0:
            return LossParts(forget=adv, logs=logs)
        if self.config.preserve_on == "anchor":  # the anchor's own denoising loss, fresh noise on its pictures
            xa_t, ta, target = ctx.noisy(x0)
            preserve = F.mse_loss(ctx.predict(unet, xa_t, ta, anchor_context).float(), target.float())
        else:
            preserve = denoising_loss(unet, ctx, retain)
        logs["preserve_mse"] = float(preserve.detach())
        return LossParts(forget=adv, retain=preserve, logs=logs)

    def combine_gradients(self, g_forget: list, g_retain: list) -> tuple[list, dict]:
        """The step: g_u' + preserve_weight g_p, g_u' the concept-preserving projection of g_u (or g_u itself)."""
        logs: dict = {}
        g_u = g_forget
        if self.config.surgery:
            g_u, logs = project_conflict(g_forget, g_retain, self.config.surgery_scale, self.config.per_tensor)
        w = self.config.preserve_weight
        if w == 0:
            return list(g_u), logs
        out = []
        for u, p in zip(g_u, g_retain):
            if p is None:
                out.append(u)
            else:
                out.append(w * p if u is None else u + w * p)
        return out, logs

    def detach(self, unet) -> None:
        """Refuse a run that changed nothing (its steps all the discriminator's warm-up): the trained tensors are
        compared with the original's, which also holds for a resumed run whose earlier steps changed them."""
        original = dict(self.original.named_parameters())
        if all(torch.equal(p, original[n]) for n, p in unet.named_parameters() if self.trainable(n, p)):
            raise ObliviateError(f"DoCo: the denoiser was not changed: were all the steps the discriminator's warm-up "
                                 f"(warmup_steps = {self.config.warmup_steps})? Set train.max_steps above "
                                 "warmup_steps, or lower warmup_steps")
        return None
