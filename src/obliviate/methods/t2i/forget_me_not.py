"""Forget-Me-Not: attention re-steering.

Paper: Zhang, Wang, Xu, Wang and Shi 2024, "Forget-Me-Not: Learning to Forget in Text-to-Image Diffusion Models"
(CVPR Workshops), https://arxiv.org/abs/2303.17591
Reference code read: github.com/SHI-Labs/Forget-Me-Not (src/train_attn.py, configs/attn.yaml, configs/ti.yaml, run.py,
README), and UnlearnCanvas' copy (OPTML-Group/UnlearnCanvas, machine_unlearning/mu_forget_me_not_fgm/README.md).

The loss. The concept's images x (here the original pipeline's samples of the forget prompts) are noised at a random
training timestep; one forward pass of the denoiser on (x_t, t, c) records, in every cross-attention layer l
(`attn2`), the attention probabilities A_l = softmax(Q_l K_l^T / sqrt(d)) of each picture position to the text
tokens, per head. With S the positions of the concept's tokens in the prompt (and, with `use_pooler`, of the
end-of-text token CLIP pools at), the loss is the Frobenius norm, not squared, of everything gathered:

    L = || concat_l A_l[:, :, :, S] ||_F      over layers, pictures, heads and picture positions

Minimising it makes no picture position attend to the concept's tokens: the concept's text can no longer steer the
picture. The maps come from diffusers' own `AttnProcessor` (`attn.get_attention_scores`, the softmax above),
installed on the cross-attention modules for one forward pass and removed after (`attention_maps.recording`).

Reference defaults (configs/attn.yaml): 35 steps, lr 2e-6, batch 1, AdamW (weight decay 0.01), gradient clipping 1,
`use_pooler: true`, `only_optimize_ca: false` (the whole UNet is trained; `train = "unet"` here, or
`"cross_attention"` for the `--only_xa` choice UnlearnCanvas recommends for styles), uniform timesteps, 10 real
pictures of the concept with the prompt "a photo of <concept>". The loop's `train` sets lr, steps and batch
(`default_steps` 35; set lr = 2e-6 for the reference's).

Where obliviate differs, and why:
- No textual-inversion stage. The reference (`use_ti: true`) first inverts the concept's pictures into 4 new tokens
  (500 steps, lr 1e-3, configs/ti.yaml) and re-steers attention away from those tokens; its README lists `use_ti:
  false`, the plain text of the concept, as the other setting, and that is what obliviate does: S is where the
  concept's own tokens stand in each forget prompt. Inversion would add tokens to the user's tokenizer and, on
  SDXL, two inverted embeddings per token; the concept's erased name is what an attack or evaluation prompts with.
- The prompts are the task's forget prompts (each contains the concept), not one "a photo of <concept>" template.
- `use_pooler` marks the first end-of-text token only (the one CLIP pools at). The reference marks every token id
  equal to <|endoftext|>: on its SD 2.1 tokenizer (padding "!") that is the same single token, on an SD 1.x
  tokenizer (padding with <|endoftext|>) it would mark all the padding too.
- The reference selects positions with a mask repeated as (head, picture), while the maps are laid out (picture,
  head): the same for its batch of 1, wrong pictures' rows for larger batches. Here each picture's rows are its own.

Shapes: the UNet pipelines (SD 1.x/2.x, SDXL: the maps are the `attn2` layers'; both SDXL tokenizers split words
alike, so S is read from the first). A DiT has no separate cross-attention: refused in one line.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from obliviate.errors import ObliviateError
from obliviate.methods.common import check_choice
from obliviate.methods.t2i.attention_maps import concept_positions, recording
from obliviate.methods.t2i.base import DiffusionMethod, EraseContext, LossParts, is_cross_attention


@dataclass
class ForgetMeNotConfig:
    train: str = "unet"  # the reference's only_optimize_ca: false; "cross_attention" for its --only_xa
    use_pooler: bool = True  # also steer attention away from the end-of-text token CLIP pools at

    def __post_init__(self):
        check_choice("ForgetMeNot", "train", self.train, ("unet", "cross_attention"))
        if not isinstance(self.use_pooler, bool):
            raise ObliviateError(f"ForgetMeNot: use_pooler must be true or false, got {self.use_pooler!r}")


def attention_loss(maps: dict[str, list[torch.Tensor]], positions: torch.Tensor) -> torch.Tensor:
    """|| concat over layers of the maps' entries at `positions` ||_F. A map is [batch * heads, pixels, tokens]
    with each picture's heads together (diffusers' head_to_batch_dim), so picture b's rows are b*heads .. +heads."""
    picked = []
    for per_call in maps.values():
        for probs in per_call:
            heads = probs.shape[0] // positions.shape[0]
            mask = positions.to(probs.device).repeat_interleave(heads, 0)[:, None, :]  # [batch * heads, 1, tokens]
            picked.append(probs.masked_select(mask.expand_as(probs)))
    if not picked:
        raise ObliviateError("ForgetMeNot: the denoiser has no cross-attention layer to re-steer")
    return torch.cat(picked).float().norm()


class ForgetMeNot(DiffusionMethod):
    name = "ForgetMeNot"
    Config = ForgetMeNotConfig
    needs_images = True
    default_steps = 35  # configs/attn.yaml max_train_steps
    backbones = ("sd", "sdxl")
    backbones_why = ("Forget-Me-Not re-steers a UNet's cross-attention maps (attn2); a DiT's joint attention has no "
                     "separate text-to-picture map")

    def trainable(self, name: str, param) -> bool:
        return self.config.train == "unet" or is_cross_attention(name)

    def losses(self, ctx: EraseContext, unet, forget: dict, retain: dict) -> LossParts:
        tokenizer = ctx.pipe.tokenizer
        positions = concept_positions(tokenizer, forget["texts"], ctx.task.concept, tokenizer.model_max_length,
                                      "first" if self.config.use_pooler else "none", required_by=self.name)
        x_t, t, _ = ctx.noisy(forget["latents"])
        with recording(unet) as maps:
            ctx.predict(unet, x_t, t, forget["context"])
        loss = attention_loss(maps, positions)
        return LossParts(forget=loss, logs={"attention_norm": float(loss.detach())})
