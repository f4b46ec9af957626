"""Selective Amnesia: forgetting as continual learning, with EWC and generative replay.

Paper: Heng and Soh 2023, "Selective Amnesia: A Continual Learning Approach to Forgetting in Deep Generative
Models", NeurIPS, https://arxiv.org/abs/2305.10120
Reference code read: clear-nus/selective-amnesia, sd/ (ldm/models/diffusion/ddpm_fim.py: the Fisher;
ldm/models/diffusion/ddpm_forget.py: the forgetting loss; ldm/data/__init__.py: the datasets;
configs/stable-diffusion/forget_brad_pitt.yaml, forget_nudity.yaml, fim.yaml; README.md).

The paper's objective, for the forgotten concept c_f mapped to a surrogate distribution q(x | c_f), the remembered
prompts c_r, the original weights theta* and the diagonal Fisher F of the original model:

    max_theta  E_{q(x|c_f)} log p(x | theta, c_f)  -  lmbda/2 sum_i F_i (theta_i - theta*_i)^2
                                                    +  gamma E_{p(x|theta*, c_r)} log p(x | theta, c_r)

with log p replaced by the diffusion model's denoising loss (its ELBO). As a loss, per step:

    L = L_DM(x_s, c_f)  +  gamma * L_DM(x_r, c_r)  +  lmbda * sum_i F_i (theta_i - theta*_i)^2

- surrogate term: x_s are the anchor's images (the original pipeline's samples of the forget prompts with the
  concept replaced by the task's anchor, drawn in `setup`), learned under the forget prompts c_f: the SD experiments'
  q(x | c_f) ("a middle aged man" for Brad Pitt, "a person wearing clothes" for nudity). An empty anchor leaves the
  prompt without the concept word.
- generative replay: x_r are the original pipeline's own samples of the retain prompts (the loop's retain images,
  drawn before any step), not real data.
- EWC: theta* and F are kept for the trained parameters only (the others cannot move). The Fisher is a setup-time
  computation on samples of the original model, as the paper's "FIM from generated images": for each of
  `fisher_images_per_prompt` samples (x, c) per retain prompt, the per-sample gradient of the ELBO's timestep sum,

      g(x, c) = (T / K) sum_{k=1..K} grad_theta ||eps_k - eps_theta(x_{t_k}, c, t_k)||^2    (t_k, eps_k drawn anew),

  and F = mean over the samples of g(x, c)^2 (the empirical Fisher's diagonal, mean of squared per-sample
  gradients). T is the schedule's number of training timesteps; with K = T this is an unbiased estimate of the
  reference's sweep over every timestep, and K < T keeps its scale, so `lmbda` means the same at any K.

Defaults and where they come from (configs/stable-diffusion/forget_brad_pitt.yaml, fim.yaml):
- lmbda 50, gamma 1: the config's `lmbda: 50` and `gamma: 1 # keep this at 1`. The reference's penalty is
  lmbda * sum F (theta - theta*)^2 (no 1/2, unlike the paper's equation); obliviate follows the code, so lmbda is
  the reference's.
- parameter_group "full": the celebrity config's `train_method: 'full'` (the nudity config uses 'noxattn': every
  UNet weight but cross-attention, the time embedding and the output layer, as ESD-u).
- fisher_timesteps 1000: the reference sums every one of SD's 1000 timesteps per sample (in 20 chunks:
  fisher_batch_size 50). This is the method's cost: K denoiser passes per Fisher sample; lower K for a quick run.
- lr 1e-5 (AdamW), batch 4 per GPU on 4 GPUs, 200 epochs: the loop's TrainConfig.

Where obliviate differs, and why:
- The reference draws one Fisher/replay set from GPT-written generic prompts (fim_prompts.txt) and uses it for both;
  here both come from the task's retain prompts (what must be kept), the Fisher's samples drawn separately in setup
  (seed 11) so that the contract's `setup(ctx, forget, params)` suffices.
- The reference's timesteps are 0..T-1 exactly once with fresh noise each; here K timesteps are drawn through the
  backbone (`EraseContext.noisy`), so the same code serves SDXL and flow-matching shapes, scaled by T / K.
- The reference pairs the forget prompt with any of 1000 surrogate images; here each forget prompt with the anchor's
  images of that same prompt (the concept replaced), as Concept Ablation pairs them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from obliviate.errors import ObliviateError
from obliviate.methods.common import LossParts, check_choice, check_number
from obliviate.methods.t2i.base import DiffusionMethod, EraseContext, denoising_loss, in_parameter_group


@dataclass
class SelectiveAmnesiaConfig:
    lmbda: float = 50.0  # weight of the EWC penalty sum F (theta - theta*)^2
    gamma: float = 1.0  # weight of the generative replay of the retain prompts
    parameter_group: str = "full"  # full | xattn | noxattn (the reference's train_method)
    fisher_timesteps: int = 1000  # K: timesteps (with fresh noise) per Fisher sample's gradient
    fisher_batch_size: int = 50  # of those per denoiser pass
    fisher_images_per_prompt: int = 1  # original-model samples per retain prompt the Fisher averages over

    def __post_init__(self):
        check_number("SelectiveAmnesia", "lmbda", self.lmbda, min=0)
        check_number("SelectiveAmnesia", "gamma", self.gamma, min=0)
        check_choice("SelectiveAmnesia", "parameter_group", self.parameter_group, ("full", "xattn", "noxattn"))
        for key in ("fisher_timesteps", "fisher_batch_size", "fisher_images_per_prompt"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ObliviateError(f"SelectiveAmnesia: {key} must be a positive whole number, got {value!r}")


def diagonal_fisher(per_sample_loss, n: int, params: list) -> list[torch.Tensor]:
    """The empirical Fisher's diagonal: mean over samples i < n of grad_theta(per_sample_loss(i))^2, per parameter
    (a parameter the loss does not reach: zeros)."""
    fisher = [torch.zeros_like(p) for p in params]
    for i in range(n):
        grads = torch.autograd.grad(per_sample_loss(i), params, allow_unused=True)
        for f, g in zip(fisher, grads):
            if g is not None:
                f.add_(g.detach().pow(2), alpha=1.0 / n)
    return fisher


def ewc_penalty(params: list, anchors: list[torch.Tensor], fisher: list[torch.Tensor]) -> torch.Tensor:
    """sum_i F_i (theta_i - theta*_i)^2 over every entry of every parameter."""
    return sum(((p - a) ** 2 * f).sum() for p, a, f in zip(params, anchors, fisher))


class SelectiveAmnesia(DiffusionMethod):
    name = "SelectiveAmnesia"
    Config = SelectiveAmnesiaConfig
    needs_images = True

    def trainable(self, name: str, param) -> bool:
        return in_parameter_group(self.config.parameter_group, name)

    def setup(self, ctx: EraseContext, forget: dict, params: list) -> None:
        from obliviate.loops.t2i import draw_latents

        self.params = params
        self.anchors = [p.detach().clone() for p in params]  # theta*
        # the surrogate q(x | c_f): the anchor's images, one per forget image, by the original pipeline
        self.surrogate_latents = draw_latents(ctx, [ctx.task.anchor_prompt(t) for t in forget["texts"]], seed=7)
        self.surrogate_rows: dict[str, list[int]] = {}
        for i, t in enumerate(forget["texts"]):
            self.surrogate_rows.setdefault(t, []).append(i)
        self.fisher = self.compute_fisher(ctx, params)
        total = sum(f.numel() for f in self.fisher)
        self.fisher_logs = {"fisher_mean": float(sum(f.sum() for f in self.fisher) / max(total, 1))}

    def compute_fisher(self, ctx: EraseContext, params: list) -> list[torch.Tensor]:
        """F on the original model's samples of the retain prompts (see the module's docstring)."""
        from obliviate.loops.t2i import draw_latents

        c = self.config
        texts = [r.text for r in ctx.task.retain_prompts for _ in range(c.fisher_images_per_prompt)]
        latents = draw_latents(ctx, texts, seed=11)
        context = ctx.encode(texts).to(latents.device)
        scale = ctx.pipe.scheduler.config.num_train_timesteps / c.fisher_timesteps  # T / K: the ELBO's sum
        unet = ctx.pipe.denoiser

        def sample_loss(i: int) -> torch.Tensor:
            total = 0.0
            for start in range(0, c.fisher_timesteps, c.fisher_batch_size):
                k = min(c.fisher_batch_size, c.fisher_timesteps - start)
                batch = {"latents": latents[i:i + 1].expand(k, *latents.shape[1:]),
                         "context": context[i:i + 1].expand(k)}
                total = total + denoising_loss(unet, ctx, batch, reduce=False).sum()
            return scale * total

        return diagonal_fisher(sample_loss, len(texts), params)

    def losses(self, ctx: EraseContext, unet, forget: dict, retain: dict) -> LossParts:
        c = self.config
        pick = [self.surrogate_rows[t][int(torch.randint(0, len(self.surrogate_rows[t]), (1,),
                                                              generator=ctx.generator))] for t in forget["texts"]]
        surrogate = {"latents": self.surrogate_latents[torch.tensor(pick)].to(forget["context"].device),
                     "context": forget["context"]}
        loss_s = denoising_loss(unet, ctx, surrogate)
        logs = {"surrogate_mse": float(loss_s.detach()), **self.fisher_logs}
        retain_term = 0.0
        if c.gamma > 0:
            loss_r = denoising_loss(unet, ctx, retain)
            logs["replay_mse"] = float(loss_r.detach())
            retain_term = c.gamma * loss_r
        if c.lmbda > 0:
            ewc = ewc_penalty(self.params, self.anchors, self.fisher)
            logs["ewc"] = float(ewc.detach())
            retain_term = retain_term + c.lmbda * ewc
        return LossParts(forget=loss_s, retain=retain_term if torch.is_tensor(retain_term) else None, logs=logs)
