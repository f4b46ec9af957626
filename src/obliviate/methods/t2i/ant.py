"""ANT: auto-steering the denoising trajectory away from the concept (trajectory-aware fine-tuning).

Paper: Li, Lu, Ren, Kong 2025, "Set You Straight: Auto-Steering Denoising Trajectories to Sidestep Unwanted
Concepts", ACM MM 2025, https://arxiv.org/abs/2504.12782
Reference code read: github.com/lileyang1210/ANT (Single/train-scripts/train_ant_single.py, Single/train-scripts/
generate_mask.py, Single/configs/ant_gradient.yaml and ant_train.yaml); erase-eval's re-typing of it
(fmp453/erase-eval, train_methods/train_ant.py) is the same update.

The paper's insight: reversing the sign of classifier-free guidance's condition direction only in the mid-to-late
denoising steps removes the concept while the early steps, which lay out the picture's structure, still lead to the
natural-image manifold. With eps_0 the frozen original, c the concept prompt, "" the unconditional branch, and
x_t a point of the concept's own sampling trajectory at step t:

    early (t > t'):  eps_theta(x_t, c) -> eps_0(x_t, "") + eta (eps_0(x_t, c) - eps_0(x_t, ""))   (kept as it was)
    late  (t <= t'): eps_theta(x_t, c) -> eps_0(x_t, "") - eta (eps_0(x_t, c) - eps_0(x_t, ""))   (reversed)
    both:            eps_theta(x_t, "") -> eps_0(x_t, "")          (the unconditional score does not drift)

    L = L_late + alpha2 L_uncond(late) + alpha1 (L_early + alpha2 L_uncond(early))

Each step draws one early point (the DDIM walk from fresh noise stopped after one of the first `before_step` steps,
t' the boundary) and one late point (stopped after one of the remaining steps), both from the same noise, sampled
by the frozen original with `start_guidance`; t is the timestep reached.

Augmentation-enhanced weight saliency (single-concept erasure): before training, for each of several augmentations
(a forget prompt x a run), |sum of the ANT loss's gradient over `mask_iterations` draws| is ranked within each
tensor and its top `mask_fraction` kept; the map is the intersection over all augmentations; every gradient step
is multiplied by it (obliviate.methods.saliency ranks each tensor on its own here).

Reference defaults (ant_train.yaml / ant_gradient.yaml): negative_guidance (eta) 1.0, start_guidance 3.0,
before_step 7 of ddim_steps 50, alpha1 1.0, alpha2 0.5, the whole UNet trained (train_method "full"), lr 5e-4 for
250 iterations (the loop's train config; 250 is `default_steps`), batch 1; mask: threshold 0.5, 5 seeds x the
concept's prompt variants ("nudity", "naked", "erotic", "sexual" for nudity; the concept alone otherwise), 10
iterations each at lr 1e-2.

Where obliviate differs, and why:
- The boundary is a share of the loop's sampling steps (`early_share` 0.14 = 7/50, at least one step early and one
  late), since obliviate's sampling steps are the run's, not a fixed 50.
- Timesteps: the reference feeds the UNet a DDPM timestep drawn from [1000 s/50, 1000 (s+1)/50) for a latent that
  has been denoised s steps from pure noise (ESD's code convention), so its "early" latents (s < 7, nearly pure
  noise) are labelled with t < 140. Here each latent gets the timestep it is at, so early means high t.
- The reference computes the unconditional preservation terms from a no-grad pass of the model being trained, so
  they add to the logged loss but nothing to the gradient. Here they carry a gradient, as the paper states the
  objective ("ANT encourages that unconditional score functions remain unchanged"); `uncond_weight = 0` gives the
  reference's update exactly (tests/test_t2i_ant.py re-types it).
- x_t is sampled by the frozen original (obliviate's ESD convention); the reference samples with the model being
  trained (identical at the first step).
- Saliency map: the reference takes each augmentation's gradient along 10 Adam steps at lr 1e-2 from a fresh copy
  of the model; here it is summed at the original weights over `mask_iterations` draws (no copy of the model, no
  training before training). Its mask script sorts magnitudes in ascending order and keeps ranks below the
  threshold, i.e. the *smallest* half of each tensor; here the largest, as the paper describes the map ("the
  critical parameters that most significantly contribute to the unwanted concept") and as SalUn's corrected code
  does. The augmentations are up to `mask_prompts` distinct forget prompts (the task's own variants of the concept)
  x `mask_seeds` runs. `mask_fraction = 0` trains without a map (the paper's multi-concept setting, without its
  LoRA).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from obliviate.errors import ObliviateError
from obliviate.methods.common import check_number
from obliviate.methods.saliency import mask_fraction, saliency_mask
from obliviate.methods.t2i.base import DiffusionMethod, EraseContext, LossParts
from obliviate.models.diffusion import Cond, denoise


@dataclass
class ANTConfig:
    eta: float = 1.0  # negative_guidance: the size of the guidance direction, kept early and reversed late
    start_guidance: float = 3.0  # classifier-free guidance of the sampling that makes the trajectory's points
    early_share: float = 0.14  # the early stage: this share of the sampling steps (the reference's 7 of 50)
    early_weight: float = 1.0  # alpha1: weight of the early-stage terms
    uncond_weight: float = 0.5  # alpha2: weight of the unconditional preservation terms
    mask_fraction: float = 0.5  # share of each tensor an augmentation's map keeps (0: no saliency map)
    mask_prompts: int = 4  # distinct forget prompts used as augmentations for the map
    mask_seeds: int = 5  # runs per prompt
    mask_iterations: int = 10  # draws whose gradients one run sums

    def __post_init__(self):
        check_number("ANT", "eta", self.eta, positive=True)
        check_number("ANT", "start_guidance", self.start_guidance, min=0)
        check_number("ANT", "early_share", self.early_share, positive=True)
        if self.early_share >= 1:
            raise ObliviateError(f"ANT: early_share must be < 1, got {self.early_share!r}")
        check_number("ANT", "early_weight", self.early_weight, min=0)
        check_number("ANT", "uncond_weight", self.uncond_weight, min=0)
        check_number("ANT", "mask_fraction", self.mask_fraction, min=0)
        if self.mask_fraction > 1:
            raise ObliviateError(f"ANT: mask_fraction must be <= 1, got {self.mask_fraction!r}")
        for key in ("mask_prompts", "mask_seeds", "mask_iterations"):
            value = getattr(self, key)
            check_number("ANT", key, value, min=1)
            if int(value) != value:
                raise ObliviateError(f"ANT: {key} must be a whole number, got {value!r}")


class ANT(DiffusionMethod):
    name = "ANT"
    Config = ANTConfig
    needs_frozen = True
    needs_images = False  # the trajectory's points come from sampling at each step
    default_steps = 250

    def __init__(self, config=None):
        super().__init__(config)
        self.mask: list[torch.Tensor | None] | None = None
        self.mask_logs: dict[str, float] = {}

    def boundary(self, steps: int) -> int:
        """How many of the `steps` sampling steps are the early stage (at least one, and at least one left late)."""
        if steps < 2:
            raise ObliviateError(f"ANT: needs at least 2 sampling steps (an early and a late one), got {steps}")
        return min(max(1, round(self.config.early_share * steps)), steps - 1)

    def draw_stops(self, ctx: EraseContext) -> tuple[int, int]:
        """The early and the late stop (steps walked from noise), from the loop's generator."""
        k = self.boundary(ctx.sample_steps)
        early = int(torch.randint(0, k, (1,), generator=ctx.generator))
        late = int(torch.randint(k, ctx.sample_steps, (1,), generator=ctx.generator))
        return early, late

    @torch.no_grad()
    def trajectory_points(self, ctx: EraseContext, texts: list[str]):
        """(x_early, t_early, x_late, t_late): the prompts' DDIM walks by the frozen original from the same fresh
        noise, stopped early and late."""
        early, late = self.draw_stops(ctx)
        seeds = torch.randint(0, 2 ** 31 - 1, (len(texts),), generator=ctx.generator).tolist()
        walk = dict(steps=ctx.sample_steps, guidance=self.config.start_guidance, denoiser=ctx.frozen,
                    text_encoders=ctx.text_encoders)
        x_early, t_early = denoise(ctx.pipe, texts, seeds, stop_after=early, **walk)
        x_late, t_late = denoise(ctx.pipe, texts, seeds, stop_after=late, **walk)
        return x_early, t_early, x_late, t_late

    def trajectory_loss(self, ctx: EraseContext, unet, cond: Cond, x_early, t_early, x_late, t_late):
        """The ANT objective at one early and one late point of each prompt's trajectory. Returns (loss, logs)."""
        c = self.config
        n = len(cond)
        empty = ctx.unconditional(n)
        x = torch.cat([x_early, x_late])
        t = torch.tensor([t_early] * n + [t_late] * n, device=x.device)
        with torch.no_grad():  # the original's conditional and unconditional passes at both points: one call
            pred_c, pred_u = ctx.predict(ctx.frozen, torch.cat([x, x]), torch.cat([t, t]),
                                         Cond.cat([cond, cond, empty, empty])).chunk(2)
            direction = pred_c - pred_u
            sign = torch.tensor([1.0] * n + [-1.0] * n, device=x.device, dtype=direction.dtype).view(-1, 1, 1, 1)
            target = pred_u + sign * c.eta * direction  # kept early, reversed late
        use_uncond = c.uncond_weight > 0
        rows = Cond.cat([cond, cond, empty, empty]) if use_uncond else Cond.cat([cond, cond])
        pred = ctx.predict(unet, torch.cat([x, x]) if use_uncond else x, torch.cat([t, t]) if use_uncond else t,
                           rows).float()
        err = (pred[:2 * n] - target.float()).pow(2).flatten(1).mean(1)
        early, late = err[:n].mean(), err[n:].mean()
        if use_uncond:
            drift = (pred[2 * n:] - pred_u.float()).pow(2).flatten(1).mean(1)
            u_early, u_late = drift[:n].mean(), drift[n:].mean()
        else:
            u_early = u_late = torch.zeros((), device=x.device)
        loss = late + c.uncond_weight * u_late + c.early_weight * (early + c.uncond_weight * u_early)
        logs = {"ant_early": float(early.detach()), "ant_late": float(late.detach()),
                "uncond_early": float(u_early.detach()), "uncond_late": float(u_late.detach()),
                "t_early": float(t_early), "t_late": float(t_late)}
        return loss, logs

    def setup(self, ctx: EraseContext, forget: dict, params: list) -> None:
        c = self.config
        if c.mask_fraction == 0:
            return
        self.boundary(ctx.sample_steps)  # too few sampling steps: one line before any work
        unet = ctx.pipe.denoiser  # the denoiser being erased (setup runs before any change)
        prompts = list(dict.fromkeys(forget["texts"]))[:int(c.mask_prompts)]
        runs = [torch.zeros_like(p) for p in params]
        maps = None
        for text in prompts:
            cond = ctx.encode([text]).to(forget["context"].device, forget["context"].dtype)
            for _ in range(int(c.mask_seeds)):
                for acc in runs:
                    acc.zero_()
                for _ in range(int(c.mask_iterations)):
                    loss, _ = self.trajectory_loss(ctx, unet, cond, *self.trajectory_points(ctx, [text]))
                    for acc, g in zip(runs, torch.autograd.grad(loss, params, allow_unused=True)):
                        if g is not None:
                            acc.add_(g)
                maps = intersect(maps, tensorwise_mask(runs, c.mask_fraction))
        self.mask = maps
        self.mask_logs = {"mask_kept": mask_fraction(self.mask), "mask_augmentations": len(prompts) * c.mask_seeds}

    def gradient_mask(self) -> list | None:
        return self.mask

    def losses(self, ctx: EraseContext, unet, forget: dict, retain: dict) -> LossParts:
        points = self.trajectory_points(ctx, forget["texts"])
        loss, logs = self.trajectory_loss(ctx, unet, forget["context"], *points)
        return LossParts(forget=loss, logs={**logs, **self.mask_logs})


def tensorwise_mask(grads: list[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """One augmentation's map: within each tensor, its top `fraction` of entries by |grad| (saliency_mask's ranking
    applied to each tensor on its own, as the reference's mask script thresholds each tensor)."""
    return [saliency_mask([g], fraction)[0] for g in grads]


def intersect(maps: list[torch.Tensor] | None, new: list[torch.Tensor]) -> list[torch.Tensor]:
    """The entries kept by every augmentation's map so far."""
    return new if maps is None else [a * b for a, b in zip(maps, new)]
