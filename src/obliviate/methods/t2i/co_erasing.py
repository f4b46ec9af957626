"""Co-Erasing: text-image collaborative concept erasing (negative guidance under a text + image prompt).

Paper: Li, Xu, Bao, Yang, Cao, Huang 2025, "One Image is Worth a Thousand Words: A Usability Preservable Text-Image
Collaborative Erasing Framework", ICML, https://arxiv.org/abs/2505.11131
Reference code read: github.com/Ferry-Li/Co-Erasing (train/image_trainer.py, utils/model_utils.py,
utils/diffusion_utils.py, utils/helpers.py, utils/training_utils.py, train.sh, readme.md).

The concept is described by its text c and by images of it that the original model draws (the "image prompts").
An image I enters the denoiser as k extra context tokens T(I) beside the text states, and the model being erased
learns ESD's negatively guided target under the joint text + image condition:

    eps* = eps_0(x_t, "") - eta * (eps_0(x_t, [c ; T(I)]) - eps_0(x_t, ""))        (eps_0: the frozen original)
    L    = || eps_theta(x_t, [c ; T(I)], t) - eps* ||^2

(the unconditional pass is text-only, `text_uncond`, as both of the reference's commands set; with it off the
image tokens go into the unconditional pass too). x_t comes from partially sampling the concept prompt (DDIM
stopped at a random step, t the timestep reached), then a Gaussian blur of the latent (`blur_kernel`).

Text-guided image concept refinement (`refine`): the image tokens attend over the concept's own text states and
are replaced by what they read, so only the part of the image that the concept's text describes is erased:

    T'(I) = softmax(T(I) G^T / sqrt(D)) G        G: the text states [L, D] of the concept word alone (text_guide)

This is the reference's rule exactly (query = image tokens, key = value = the guide's text states, scaled by the
state width); the refined tokens are mixtures of the concept's text states, weighted by how much each matches the
image.

Only the paper's abstract could be read here (its full text was not reachable), so the loss, the refinement and the
defaults are the reference code's (train/image_trainer.py), defaults from its argparse and train.sh:
eta (negative_guidance) 1.0; blur kernel 3 (train.sh and argparse; the readme's example uses 5); 4 image tokens
(IP-Adapter's `clip_extra_context_tokens`); refinement on and text-only unconditional pass (both commands pass
--text_guide and --text_uncond); the UNet minus cross-attention trained (`noxattn`, train.sh; the readme's example
trains `full`, offered as parameter_group = "full"); lr 1e-5, 1000 iterations, batch 1, 100 images, 50 DDIM steps
(obliviate's loop sets lr, steps, batch, the number of pictures and sampling steps, as for ESD).

Where obliviate differs, and why:
- Image encoder. The reference encodes each image with CLIP's vision tower and a pretrained IP-Adapter projection
  (4 tokens), read by IP-Adapter's decoupled cross-attention (its own to_k_ip/to_v_ip, a second softmax, added
  with scale 1). obliviate's pipelines (a user's SD folder, the canvas world) carry no image encoder or IP-Adapter,
  and a random one would carry no meaning. Here T(I) is found by inverting each image into k context tokens on the
  frozen original (as textual inversion, Gal et al. 2023, finds a word for images): minimise the original's
  denoising error ||eps - eps_0(x_t, ["" ; T], t)||^2 on that image over T (`inversion_steps` Adam steps at
  `inversion_lr`, from the mean state of the empty prompt), so T is what the original itself reads as "this image".
  Measured on the canvas world (16 pictures of `striped`, held-out noise): the original's denoising error is 0.252
  under the empty prompt, 0.207 under the pictures' own captions, and 0.191 under their tokens after the default
  200 steps at lr 5e-2 (0.217 after 50; at lr 5e-3 the tokens barely beat the empty prompt), so the tokens carry
  more of each picture than its caption does. It costs 200 forward/backward passes per picture, once, before the
  first step (about 25 s for 16 canvas pictures on 2 CPU cores).
  The tokens are appended to the text states and read by the same cross-attention (one softmax over text and image
  tokens) rather than by a decoupled adapter: IP-Adapter initialises its image key/value maps from to_k/to_v
  (model_utils.get_attn_processor), and plain concatenation keeps the method to the denoiser's ordinary call.
- The reference runs in two stages: ESD-u on text first, then this image stage starting from (and guided by) the
  text-erased UNet. Here one run is the image stage from the pipeline given (the joint condition already contains
  the text); for the reference's recipe, export an ESD-u run and erase that pipeline with Co-Erasing.
- x_t is sampled by the frozen original with `start_guidance` (ESD's convention in obliviate; the reference samples
  with the model being trained, unguided, which `start_guidance = 1` matches at the start). The reference walks the
  scheduler's timesteps in reverse order (`reversed(timesteps)`, from t=0 upward) and draws t_ddpm from the bucket
  of the step index, not of the timestep reached; here the DDIM steps run from noise and t is the timestep reached.
- One image token set per forget row, drawn at random from all the concept's pictures each step (the reference
  draws one picture per step, batch 1). Its optional `noise_factor` on the image embedding (default 0) is left out.
- The blur has torchvision's default sigma for the kernel size (0.3 ((k - 1) / 2 - 1) + 0.8) and reflect padding,
  written here so that torchvision is not needed.
- `noxattn`: ESD-u's set (no attn2, time embedding or output conv). The reference's filter, written for CompVis
  names ('out.'), keeps diffusers' conv_out trainable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from obliviate.errors import ObliviateError
from obliviate.methods.common import check_choice, check_number
from obliviate.methods.t2i.base import DiffusionMethod, EraseContext, LossParts, denoising_loss, in_parameter_group
from obliviate.models.diffusion import predict_noise


def _whole(key: str, value, min_value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < min_value:
        raise ObliviateError(f"Co-Erasing: {key} must be a whole number >= {min_value}, got {value!r}")


@dataclass
class CoErasingConfig:
    eta: float = 1.0  # negative guidance (the reference's --negative_guidance)
    start_guidance: float = 1.0  # CFG of the partial sampling that makes x_t (reference: unguided)
    blur_kernel: int = 3  # Gaussian blur of x_t, odd kernel size; 0 = no blur (reference --blur_factor)
    image_tokens: int = 4  # context tokens per image prompt (IP-Adapter's 4)
    refine: bool = True  # text-guided image concept refinement (reference --text_guide = the concept)
    text_uncond: bool = True  # the unconditional pass without the image tokens (reference --text_uncond)
    parameter_group: str = "noxattn"  # noxattn (ESD-u's set) | full | xattn
    inversion_steps: int = 200  # Adam steps that invert each picture into its image tokens
    inversion_lr: float = 5e-2
    inversion_batch_size: int = 16  # pictures per forward pass while inverting

    def __post_init__(self):
        check_number("Co-Erasing", "eta", self.eta, positive=True)
        check_number("Co-Erasing", "start_guidance", self.start_guidance, min=0)
        _whole("blur_kernel", self.blur_kernel, 0)
        if self.blur_kernel and self.blur_kernel % 2 == 0:
            raise ObliviateError(f"Co-Erasing: blur_kernel must be odd (or 0 for no blur), got {self.blur_kernel}")
        _whole("image_tokens", self.image_tokens, 1)
        for key in ("refine", "text_uncond"):
            if not isinstance(getattr(self, key), bool):
                raise ObliviateError(f"Co-Erasing: {key} must be true or false, got {getattr(self, key)!r}")
        check_choice("Co-Erasing", "parameter_group", self.parameter_group, ("noxattn", "full", "xattn"))
        _whole("inversion_steps", self.inversion_steps, 1)
        check_number("Co-Erasing", "inversion_lr", self.inversion_lr, positive=True)
        _whole("inversion_batch_size", self.inversion_batch_size, 1)


def gaussian_blur(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Per-channel Gaussian blur of [N, C, h, w] with torchvision's default sigma for `kernel`, reflect padding."""
    if kernel <= 1:
        return x
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    half = (kernel - 1) * 0.5
    g = torch.exp(-0.5 * (torch.linspace(-half, half, kernel, dtype=x.dtype, device=x.device) / sigma) ** 2)
    g = g / g.sum()
    c = x.shape[1]
    out = F.pad(x, [kernel // 2] * 4, mode="reflect")
    out = F.conv2d(out, g.view(1, 1, 1, kernel).expand(c, 1, 1, kernel), groups=c)
    return F.conv2d(out, g.view(1, 1, kernel, 1).expand(c, 1, kernel, 1), groups=c)


def refine_image_tokens(tokens: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """Text-guided image concept refinement: image tokens [N, k, D] attend over the guide's text states [L, D]
    (query = image tokens, key = value = text states, scaled by sqrt(D)) and become what they read."""
    weights = torch.softmax(tokens @ guide.T / math.sqrt(guide.shape[-1]), dim=-1)
    return weights @ guide


class CoErasing(DiffusionMethod):
    name = "Co-Erasing"
    Config = CoErasingConfig
    needs_frozen = True
    needs_images = True  # the forget pictures the original draws are the image prompts
    backbones = ("sd",)
    backbones_why = ("the image tokens are appended to a single text encoder's states, which the SDXL/DiT "
                     "conditioning (pooled embeddings, joint text stream) does not read the same way")

    def __init__(self, config=None):
        super().__init__(config)
        self.image_prompts: torch.Tensor | None = None  # [n_pictures, k, D], refined when `refine`
        self.setup_logs: dict[str, float] = {}

    def trainable(self, name: str, param) -> bool:
        return in_parameter_group(self.config.parameter_group, name)

    def setup(self, ctx: EraseContext, forget: dict, params: list) -> None:
        tokens = self.invert_images(ctx, forget["latents"])
        if self.config.refine:
            guide = ctx.encode([ctx.task.concept]).states[0].to(tokens.device, tokens.dtype)
            tokens = refine_image_tokens(tokens, guide)
        self.image_prompts = tokens

    def invert_images(self, ctx: EraseContext, latents: torch.Tensor) -> torch.Tensor:
        """Each picture's k context tokens: those under which the frozen original best denoises it, after the empty
        prompt's states (the image-prompt-only condition)."""
        c = self.config
        empty = ctx.encode([""]).states.to(latents.device, latents.dtype)
        n = len(latents)
        tokens = empty.mean(1, keepdim=True).expand(n, c.image_tokens, -1).clone().requires_grad_(True)
        opt = torch.optim.Adam([tokens], lr=c.inversion_lr)
        bs = c.inversion_batch_size
        first = last = 0.0
        with torch.enable_grad():
            for step in range(c.inversion_steps):
                opt.zero_grad()
                total = 0.0
                for i in range(0, n, bs):
                    rows = slice(i, i + bs)
                    context = torch.cat([empty.expand(len(latents[rows]), -1, -1), tokens[rows]], dim=1)
                    loss = denoising_loss(ctx.frozen, ctx, {"latents": latents[rows], "context": context})
                    (loss * (len(latents[rows]) / n)).backward()
                    total += float(loss.detach()) * len(latents[rows]) / n
                opt.step()
                first = total if step == 0 else first
                last = total
        self.setup_logs = {"inversion_mse_first": first, "inversion_mse_last": last}
        return tokens.detach()

    def losses(self, ctx: EraseContext, unet, forget: dict, retain: dict) -> LossParts:
        c = self.config
        texts, cond_text = forget["texts"], forget["context"].states
        n = len(texts)
        x_t, t = ctx.partial_sample(texts, c.start_guidance, ctx.frozen)
        pick = torch.randint(0, len(self.image_prompts), (n,), generator=ctx.generator)  # after: sampling draws none
        x_t = gaussian_blur(x_t, c.blur_kernel)
        image = self.image_prompts[pick].to(cond_text.device, cond_text.dtype)
        cond = torch.cat([cond_text, image], dim=1)
        empty = ctx.encode([""]).states.to(cond_text.device, cond_text.dtype).expand_as(cond_text)
        with torch.no_grad():
            if c.text_uncond:  # different token counts: two frozen calls
                eps_c = predict_noise(ctx.frozen, x_t, t, cond)
                eps_u = predict_noise(ctx.frozen, x_t, t, empty)
            else:
                eps_c, eps_u = predict_noise(ctx.frozen, torch.cat([x_t, x_t]), t,
                                             torch.cat([cond, torch.cat([empty, image], dim=1)])).chunk(2)
            target = eps_u - c.eta * (eps_c - eps_u)
        pred = predict_noise(unet, x_t, t, cond)
        loss = F.mse_loss(pred.float(), target.float())
        return LossParts(forget=loss, logs={"co_erasing_mse": float(loss.detach()), "t": float(t),
                                            **self.setup_logs})
