"""Few-shot unlearning: erase a concept from the text encoder, by gradient ascent on the denoising loss of a few
pictures of the concept under its prompt, the UNet frozen.

Paper: Fuchi and Takagi 2024, "Erasing Concepts from Text-to-Image Diffusion Models with Few-shot Unlearning"
(BMVC), https://arxiv.org/abs/2405.07288. Reference code read: github.com/fmp453/few-shot-erasing (train.py,
data.py, utils.py, README.md).

With E_theta the text encoder being trained, x_0 the latent of a picture of the concept, c a prompt naming it,
eps ~ N(0, I) and t uniform over the training timesteps (textual inversion's loss, negated):

    L = - || target(x_0, eps, t) - eps_unet(x_t, E_theta(c), t) ||^2          (target: eps, or v for v-prediction)

The UNet and the VAE stay frozen; the text encoder's prompt for the concept stops explaining the concept's
pictures, so the concept's prompt drifts to whatever the model (or the pictures) hold next to it: the paper's
"implicit transition" to related concepts, with no anchor chosen by hand.

Which text-encoder weights (`parameter_group`, the reference's `freeze_and_unfreeze_text_encoder`):
"mlp-final-attn" (the reference's choice in train.py: every layer's feed-forward fc1/fc2 and the last layer's
self-attention), "mlp" (feed-forward only: the paper finds the knowledge mostly there), "attn" (every self-attention),
"mlp-attn", or "all" (every text-encoder parameter).

The pictures: `images`, a folder of the concept's pictures (png, jpg, jpeg; the reference's --data, e.g. 4 photos),
each resized to the pipeline's resolution and encoded by its VAE (the posterior mean), paired at random with the
batch's forget prompts; without it (the default), the latents the original pipeline draws for the forget prompts
(`t2i.images_per_prompt` per prompt), each with its own prompt.

Reference defaults: Adam at lr 1e-5 (betas 0.9/0.98, eps 1e-6, weight decay 1e-8), batch 2, 4 to 5 epochs over the
few pictures (about 10 steps for 4 pictures), prompts from textual inversion's templates around the concept word
("a photo of a {}", style templates for styles). Here `default_steps` is 10; the loop's `train` sets lr (its default
1e-5 is the reference's), the batch and the steps.

tests/test_t2i_few_shot.py checks one loop step against the reference's train.py step re-typed (its weights picked
by module name, its tokenization, add_noise and loss, one Adam step) to float precision, with the loop's Adam epsilon
and no weight decay.

Where obliviate differs, and why:
- The prompts are the run's forget prompts (they name the concept) rather than the templates, as every obliviate
  method trains on them.
- The optimiser is the loop's (AdamW, betas 0.9/0.999, no weight decay): the reference's betas and epsilon are not
  a config of the loop, and its weight decay of 1e-8 is negligible.
- Pictures from the folder are encoded with the posterior mean, not a sample, and not flipped at random (the
  reference flips each picture once, at load, with p = 0.5): the same folder gives the same latents.
- The reference's "final attention" is CLIP-L's layer 11 by name; here it is the encoder's last layer, whatever its
  depth. Its zero-shot variant (uniform noise for pictures) is not offered.
- Pipelines with several text encoders (SDXL, SD3, FLUX) are refused in one line by the loop, as for AdvUnlearn's
  text-encoder mode: the paper and its code train CLIP-L, SD 1.x's one encoder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from obliviate.errors import ObliviateError
from obliviate.methods.common import check_choice
from obliviate.methods.t2i.base import DiffusionMethod, EraseContext, LossParts
from obliviate.models.diffusion import encode, encode_images

GROUPS = ("mlp-final-attn", "mlp", "attn", "mlp-attn", "all")
PICTURES = (".png", ".jpg", ".jpeg")


@dataclass
class FewShotConfig:
    parameter_group: str = "mlp-final-attn"  # the text-encoder weights trained (the reference's train.py)
    images: str | None = None  # a folder of the concept's pictures; None: the original's samples of the prompts

    def __post_init__(self):
        check_choice("FewShotUnlearning", "parameter_group", self.parameter_group, GROUPS)
        if self.images is not None and not isinstance(self.images, str):
            raise ObliviateError(f"FewShotUnlearning: images must be a folder path, got {self.images!r}")


def _layer(name: str) -> int | None:
    """The transformer layer of a text-encoder tensor ("text_model.encoder.layers.3.mlp.fc1.weight": 3)."""
    found = re.search(r"(?:^|\.)encoder\.layers\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def load_pictures(pipe, folder: str) -> torch.Tensor:
    """The folder's pictures, resized to the pipeline's resolution, as VAE latents (posterior mean)."""
    from PIL import Image

    path = Path(folder).expanduser()
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in PICTURES) if path.is_dir() else []
    if not files:
        raise ObliviateError(f"FewShotUnlearning: images = {folder!r} is not a folder with .png/.jpg/.jpeg pictures")
    size = pipe.latent_shape[-1] * pipe.vae_scale_factor
    pictures = []
    for f in files:
        try:
            with Image.open(f) as image:
                pixels = image.convert("RGB").resize((size, size), Image.BICUBIC)
        except OSError as err:
            raise ObliviateError(f"FewShotUnlearning: {f} is not a readable picture ({err})") from err
        pictures.append(torch.frombuffer(bytearray(pixels.tobytes()), dtype=torch.uint8).view(size, size, 3))
    images = torch.stack(pictures).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return torch.cat([encode_images(pipe, images[i:i + 16]) for i in range(0, len(images), 16)])


class FewShotUnlearning(DiffusionMethod):
    name = "FewShotUnlearning"
    Config = FewShotConfig
    default_steps = 10  # the reference: 5 epochs over 4 pictures at batch 2

    def __init__(self, config=None):
        super().__init__(config)
        self.last_layer = -1
        self.pictures: torch.Tensor | None = None

    @property
    def needs_images(self) -> bool:  # the original's samples, unless the user gives pictures
        return self.config.images is None

    def trainable(self, name: str, param) -> bool:
        return False  # the UNet stays as it is

    def retain_pool(self, items: list, rng) -> list:
        return items[:1]  # no retain term: one prompt, so the loop draws no pictures the loss never reads

    def attach_text_encoder(self, text_encoder) -> None:
        layers = [_layer(n) for n, _ in text_encoder.named_parameters()]
        self.last_layer = max((i for i in layers if i is not None), default=-1)

    def text_encoder_trainable(self, name: str, param) -> bool:
        group = self.config.parameter_group
        if group == "all":
            return True
        layer = _layer(name)
        if layer is None:
            return False
        mlp = ".mlp.fc" in name and "mlp" in group
        attn = ".self_attn." in name and (group in ("attn", "mlp-attn")
                                          or (group == "mlp-final-attn" and layer == self.last_layer))
        return mlp or attn

    def setup(self, ctx: EraseContext, forget: dict, params: list) -> None:
        if self.config.images is not None:
            self.pictures = load_pictures(ctx.pipe, self.config.images)

    def losses(self, ctx: EraseContext, unet, forget: dict, retain: dict) -> LossParts:
        texts = forget["texts"]
        if self.pictures is None:
            latents = forget["latents"]
        else:  # the user's pictures, paired at random with the batch's prompts
            latents = self.pictures[torch.randint(0, len(self.pictures), (len(texts),), generator=ctx.generator)]
        x_t, t, target = ctx.noisy(latents)
        pred = ctx.predict(unet, x_t, t, encode(ctx.pipe, texts))  # through the text encoder being trained
        mse = F.mse_loss(pred.float(), target.float())
        return LossParts(forget=-mse, logs={"forget_mse": float(mse.detach())})
