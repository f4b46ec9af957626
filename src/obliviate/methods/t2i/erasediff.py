"""EraseDiff: erasure as a constrained problem solved to first order.

Paper: Wu, Le, Hayat and Harandi 2024, "EraseDiff: Erasing Data Influence in Diffusion Models" (v4: "Erasing
Undesirable Influence in Diffusion Models", CVPR 2025), https://arxiv.org/abs/2401.05779
Reference code read: github.com/JingWu321/EraseDiff (sd/train_scripts/erasediff.py, erasediff_cls.py, train_cls.sh,
sd/README.md; ddpm/runners/diffusion.py `train_ours`), and UnlearnCanvas' port
(OPTML-Group/UnlearnCanvas, machine_unlearning/mu_erase_diff_ediff/train-erase.py).

The problem. Keep the denoising loss on the retained pictures, L_r(theta), as low as possible while the forget
objective f(theta) stays at its minimum:

    min_theta L_r(theta)   s.t.   q(theta) = f(theta) - min_phi f(phi) <= 0

f trains the forget pictures' denoising towards another noise distribution, so the model leaves their true
denoising trajectory (`forget_target`):
- "uniform" (the paper's): f = E || eps_f - eps_theta(x_t, c_f, t) ||^2 with eps_f ~ U(0, 1) elementwise, the
  forget latents noised with that same eps_f (x_t = backbone.noisy(x_0, eps_f, t), the target backbone.target(x_0,
  eps_f, t): eps_f for epsilon-prediction shapes). This is the objective the reference keeps, commented out, beside
  its code's default (ddpm/runners/diffusion.py: `noise = torch.rand_like(x_0)` into the ordinary conditional loss).
- "pseudo" (the reference's Stable Diffusion scripts): f = E || eps_theta(x_t, c_f, t) - sg[eps_theta(x_t, c', t)] ||^2,
  x_t the forget latents noised with Gaussian noise and c' another prompt: the scripts use "a photo of a pokemon",
  UnlearnCanvas the retain prompts; here a retain prompt drawn at random per picture.

The algorithm (the paper's Algorithm 1, after BOME!, Liu et al. 2022), per outer iteration i:
1. min_phi f is approximated by `inner_steps` (K) passes of Adam (`inner_lr`) on f over the forget set, from
   theta_i; f* is f's mean over the last pass; then theta_i is restored.
2. q(theta) = f(theta) - f*, and each outer step descends along
       g = grad L_r(theta) + lambda grad q(theta)
   with lambda = `lambda_weight` (fixed), or, with `eta` set, the reference's adaptive rule
       lambda = max(eta - cos(grad L_r, grad q), 0)
   (its `lambda_bome < 0` branch; BOME's own rule divides by ||grad q||^2 instead of taking the cosine).
   The loop calls `combine_gradients(grad q, grad L_r)` (LossParts forget = q, retain = L_r).
3. An outer iteration is one pass over the forget set (ceil(forget pictures / batch) steps), then step 1 again.

grad q = grad f: f* shifts q's value, not its gradient, so the inner passes decide the step only through the noise
they draw; q (the constraint's violation: >0 while f is above what K descent passes reach) is logged as
`constraint`, f* as `forget_min`. `inner_steps = 0` skips them (f* = 0): the same update rule, cheaper.

Reference defaults (sd/train_scripts/erasediff.py argparse): lambda 0.1 (`--lambda_bome`; train_cls.sh uses 1.0),
K = 2, lr 1e-5 (Adam), batch 8, 5 epochs; the train set `--train_method` is required: `full` in train_cls.sh,
`noxattn` in the README's nudity command, `xattn` in UnlearnCanvas (`parameter_group` here, default "full");
timesteps uniform over the training steps. The loop's `train` sets lr, steps and batch.

Where obliviate differs, and why:
- Step 1 uses its own Adam, started fresh each outer iteration, at `inner_lr` (a method does not see the loop's
  lr: set it to train.lr for the reference's); the reference reuses the outer optimiser for the K passes, so those
  steps also move the outer Adam's moment estimates (and then restores only the weights).
- The forget and retain pictures are the original pipeline's samples of the forget and retain prompts.
- The reference's outer steps draw one batch of each set per step over a pass of the forget loader; here the loop's
  batches (drawn at random from the loop's generator) and `default_steps` 200.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from obliviate.errors import ObliviateError
from obliviate.methods.common import check_choice, check_number
from obliviate.methods.t2i.base import DiffusionMethod, EraseContext, LossParts, denoising_loss, in_parameter_group


@dataclass
class EraseDiffConfig:
    lambda_weight: float = 0.1  # lambda on grad q (the reference's --lambda_bome)
    eta: float | None = None  # set: lambda = max(eta - cos(grad L_r, grad q), 0) instead of the fixed weight
    inner_steps: int = 2  # K: passes of descent on f over the forget set that estimate min f (0: skip)
    inner_lr: float = 1e-5  # their Adam's learning rate (the reference: its training lr, 1e-5: match train.lr)
    forget_target: str = "uniform"  # "uniform": eps_f ~ U(0, 1) (paper); "pseudo": another prompt's prediction
    parameter_group: str = "full"  # full | noxattn (ESD-u's set) | xattn

    def __post_init__(self):
        check_number("EraseDiff", "lambda_weight", self.lambda_weight, min=0)
        if self.eta is not None:
            check_number("EraseDiff", "eta", self.eta, positive=True)
        if isinstance(self.inner_steps, bool) or not isinstance(self.inner_steps, int) or self.inner_steps < 0:
            raise ObliviateError(f"EraseDiff: inner_steps must be a whole number >= 0, got {self.inner_steps!r}")
        check_number("EraseDiff", "inner_lr", self.inner_lr, positive=True)
        check_choice("EraseDiff", "forget_target", self.forget_target, ("uniform", "pseudo"))
        check_choice("EraseDiff", "parameter_group", self.parameter_group, ("full", "noxattn", "xattn"))


def combined_step(g_q: list, g_r: list, lambda_weight: float, eta: float | None) -> tuple[list, dict]:
    """g_r + lambda g_q per parameter (None where neither reaches it); lambda fixed, or max(eta - cos, 0) with the
    cosine of the flattened g_r and g_q (0 when either is zero)."""
    lam = float(lambda_weight)
    logs: dict[str, float] = {}
    if eta is not None:
        pairs = [(q, r) for q, r in zip(g_q, g_r) if q is not None and r is not None]
        dot = sum(float((q.double() * r.double()).sum()) for q, r in pairs)
        norm_q = math.sqrt(sum(float(q.double().pow(2).sum()) for q in g_q if q is not None))
        norm_r = math.sqrt(sum(float(r.double().pow(2).sum()) for r in g_r if r is not None))
        cos = dot / (norm_q * norm_r) if norm_q > 0 and norm_r > 0 else 0.0
        lam = max(eta - cos, 0.0) if norm_q > 0 else 0.0
        logs["grad_cosine"] = cos
    logs["lambda"] = lam
    out = []
    for q, r in zip(g_q, g_r):
        if q is None and r is None:
            out.append(None)
        elif q is None:
            out.append(r)
        else:
            out.append(lam * q if r is None else r + lam * q)
    return out, logs


class EraseDiff(DiffusionMethod):
    name = "EraseDiff"
    Config = EraseDiffConfig
    needs_images = True

    def __init__(self, config=None):
        super().__init__(config)
        self.forget_set: dict | None = None
        self.params: list = []
        self.forget_min = 0.0
        self.steps_left = 0  # outer steps before the next estimate of min f

    def trainable(self, name: str, param) -> bool:
        return in_parameter_group(self.config.parameter_group, name)

    def setup(self, ctx: EraseContext, forget: dict, params: list) -> None:
        self.forget_set, self.params = forget, params
        self.forget_min, self.steps_left = 0.0, 0

    def combine_gradients(self, g_forget: list, g_retain: list) -> tuple[list, dict]:
        return combined_step(g_forget, g_retain, self.config.lambda_weight, self.config.eta)

    def forget_loss(self, ctx: EraseContext, unet, batch: dict) -> torch.Tensor:
        """f on a batch of forget pictures (`forget_target`)."""
        latents, cond = batch["latents"], batch["context"]
        if self.config.forget_target == "uniform":
            pipe = ctx.pipe
            backbone = pipe.backbone
            t = backbone.train_timesteps(pipe, len(latents), ctx.generator).to(latents.device)
            eps_f = torch.rand(latents.shape, generator=ctx.generator).to(latents.device, latents.dtype)
            x_t = backbone.noisy(pipe, latents, eps_f, t)
            pred = ctx.predict(unet, x_t, t, cond)
            return F.mse_loss(pred.float(), backbone.target(pipe, latents, eps_f, t).float())
        pool = [r.text for r in ctx.task.retain_prompts]
        picks = torch.randint(0, len(pool), (len(latents),), generator=ctx.generator).tolist()
        other = ctx.encode([pool[i] for i in picks]).to(cond.device, cond.dtype)
        x_t, t, _ = ctx.noisy(latents)
        pred = ctx.predict(unet, x_t, t, cond)
        with torch.no_grad():
            target = ctx.predict(unet, x_t, t, other)
        return F.mse_loss(pred.float(), target.float())

    def estimate_forget_min(self, ctx: EraseContext, unet, batch_size: int) -> float:
        """Step 1: `inner_steps` passes of Adam on f over the forget set from the current weights, which are then
        restored; returns f's mean over the last pass (0 with no passes)."""
        K = self.config.inner_steps
        if K == 0:
            return 0.0
        saved = [p.detach().clone() for p in self.params]
        opt = torch.optim.Adam(self.params, lr=self.config.inner_lr)
        n = len(self.forget_set["texts"])
        try:
            for _ in range(K):
                order = torch.randperm(n, generator=ctx.generator).tolist()
                values = []
                for i in range(0, n, batch_size):
                    batch = _rows(self.forget_set, order[i:i + batch_size])
                    opt.zero_grad(set_to_none=True)
                    loss = self.forget_loss(ctx, unet, batch)
                    loss.backward()
                    opt.step()
                    values.append(float(loss.detach()) * len(batch["texts"]))
            return sum(values) / n
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)
                    p.grad = None

    def losses(self, ctx: EraseContext, unet, forget: dict, retain: dict) -> LossParts:
        if self.forget_set is None:  # called outside the loop (no setup): every step estimates afresh
            self.setup(ctx, forget, [p for p in unet.parameters() if p.requires_grad])
        if self.steps_left <= 0:
            self.forget_min = self.estimate_forget_min(ctx, unet, len(forget["texts"]))
            self.steps_left = math.ceil(len(self.forget_set["texts"]) / len(forget["texts"]))
        self.steps_left -= 1
        f = self.forget_loss(ctx, unet, forget)
        q = f - self.forget_min
        loss_r = denoising_loss(unet, ctx, retain)
        logs = {"forget_loss": float(f.detach()), "forget_min": self.forget_min, "constraint": float(q.detach()),
                "retain_mse": float(loss_r.detach())}
        return LossParts(forget=q, retain=loss_r, logs=logs)


def _rows(batch: dict, idx: list[int]) -> dict:
    return {k: [v[i] for i in idx] if isinstance(v, list) else v[torch.tensor(idx, device=v.device)]
            for k, v in batch.items()}
