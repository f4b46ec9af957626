"""What a text-to-image erasure method is: a config dataclass with the paper's defaults, which denoiser parameters
it trains, and a `losses` function over a forget and a retain batch (or, for closed-form methods, an `edit`).

The loop (obliviate.loops.t2i) owns the optimiser and the steps. A batch is a dict:
  texts    list[str]        the prompts
  context  Cond             their text conditioning (states [B, L, D], and pooled where the shape has one; the text
                            encoders stay frozen)
  latents  [B, C, h, w]     clean latents the original pipeline drew for those prompts (methods with needs_images)
The EraseContext gives the pipeline, the frozen original denoiser (methods with needs_frozen), the task, a cached
prompt encoder and the pipeline shape's calls (`predict`, `noisy`): a method never branches on the shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from obliviate.methods.common import LossParts  # noqa: F401  (re-exported for the diffusion methods)
from obliviate.models.diffusion import Cond, denoise, encode


@dataclass
class RetainPrompt:
    text: str
    source: str = ""  # what RGD balances over (the canvas world: the style)
    subject: str | None = None  # and within a source (the canvas world: the object)


@dataclass
class EraseTask:
    """What to erase and what to keep. `anchor` is what the concept should turn into ("" = nothing in particular):
    Concept Ablation's anchor concept, UCE's guide, SalUn's pseudo prompts fall back to retain prompts."""
    concept: str
    forget_prompts: list[str]
    retain_prompts: list[RetainPrompt]
    anchor: str = ""
    preserve: list[str] = field(default_factory=list)  # concepts UCE keeps where they are

    def anchor_prompt(self, text: str) -> str:
        """The forget prompt with the concept replaced by the anchor (collapsing the space when the anchor is "")."""
        return " ".join(text.replace(self.concept, self.anchor).split())


class EraseContext:
    def __init__(self, pipe, frozen, task: EraseTask, generator: torch.Generator, sample_steps: int = 25,
                 guidance: float = 4.0):
        self.pipe, self.frozen, self.task, self.generator = pipe, frozen, task, generator
        self.sample_steps, self.guidance = sample_steps, guidance
        self._cache: dict[str, Cond] = {}

    text_encoders = None  # the text encoders prompts are encoded with (None: the pipeline's own)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> Cond:
        """The prompts' conditioning by the original text encoders, cached per text."""
        missing = sorted({t for t in texts if t not in self._cache})
        for i in range(0, len(missing), 256):
            chunk = missing[i:i + 256]
            cond = encode(self.pipe, chunk, self.text_encoders)
            for j, t in enumerate(chunk):
                self._cache[t] = cond[j]
        return Cond.stack([self._cache[t] for t in texts])

    def unconditional(self, n: int) -> Cond:
        """The unconditional branch of guidance for n pictures (the empty prompt's encoding, or the shape's own)."""
        fixed = self.pipe.backbone.unconditional(self.pipe, 1, self.text_encoders)
        return (self.encode([""]) if fixed is None else fixed).expand(n)

    def predict(self, denoiser, x_t: torch.Tensor, t, cond: Cond) -> torch.Tensor:
        """The denoiser's raw output (noise for SD/SDXL) for latents x_t at timesteps t under `cond`."""
        return self.pipe.backbone.predict(self.pipe, denoiser, x_t, t, cond)

    def partial_sample(self, texts: list[str], guidance: float, denoiser, text_encoders=None):
        """ESD's x_t: each prompt sampled by `denoiser` (DDIM at `guidance`) from a fresh seed and stopped at a random
        step of the `sample_steps`, the step then the seeds drawn from the loop's generator. Returns (x_t, t)."""
        stop = int(torch.randint(1, self.sample_steps, (1,), generator=self.generator))
        seeds = torch.randint(0, 2 ** 31 - 1, (len(texts),), generator=self.generator).tolist()
        return denoise(self.pipe, texts, seeds, self.sample_steps, guidance, denoiser=denoiser, stop_after=stop,
                       text_encoders=text_encoders)

    def noisy(self, latents: torch.Tensor):
        """(x_t, t, target) for random training timesteps, drawn from the loop's generator: `target` is what the
        denoiser's prediction is trained towards (the noise eps for epsilon-prediction shapes)."""
        backbone = self.pipe.backbone
        t = backbone.train_timesteps(self.pipe, len(latents), self.generator).to(latents.device)
        eps = torch.randn(latents.shape, generator=self.generator).to(latents.device, latents.dtype)
        return backbone.noisy(self.pipe, latents, eps, t), t, backbone.target(self.pipe, latents, eps, t)


def denoising_loss(unet, ctx: EraseContext, batch: dict, reduce: bool = True) -> torch.Tensor:
    """The denoising loss ||target - pred_theta(x_t, c, t)||^2 (DDPM's ||eps - eps_theta||^2) on the batch's latents
    and prompts (per item when not reduce)."""
    x_t, t, target = ctx.noisy(batch["latents"])
    pred = ctx.predict(unet, x_t, t, batch["context"])
    err = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    return err.mean() if reduce else err


# The joint-attention blocks' context-stream key/value maps (SD3, FLUX's double-stream blocks): what reads the text
# into the attention the image tokens take part in, the transformers' stand-in for a UNet's cross-attention
# (docs/t2i_dit.md; `backbone.text_projections` lists the same modules). No SD/SDXL UNet has modules of these names.
DIT_TEXT_KEY_VALUE = (".add_k_proj.", ".add_v_proj.")


def is_cross_attention(name: str) -> bool:
    """A UNet's cross-attention (SD, SDXL: `attn2`), or a transformer's context-stream key/value maps (SD3, FLUX:
    `attn.add_k_proj`, `attn.add_v_proj`); `backbone.text_projections` names the key/value maps of either."""
    return ".attn2." in name or any(p in f"{name}." for p in DIT_TEXT_KEY_VALUE)


def is_text_key_value(name: str) -> bool:
    """A key or value map that reads the text: a UNet's `attn2.to_k`/`attn2.to_v`, a transformer's
    `add_k_proj`/`add_v_proj` (what Concept Ablation's "crossattn_kv" trains; a parameter or a module name)."""
    return is_cross_attention(name) and any(p in f"{name}." for p in (".to_k.", ".to_v.") + DIT_TEXT_KEY_VALUE)



# ESD-u's set leaves the time embedding and the output layers alone (reference code: a UNet's `time_embedding`,
# `conv_out`, `conv_norm_out`); on SD3/FLUX transformers the same roles are `time_text_embed`, `norm_out`, `proj_out`
NOT_TRAINED_BY_ESD_U = ("time_embedding", "conv_out", "conv_norm_out", "time_text_embed", "norm_out", "proj_out")


def in_parameter_group(group: str, name: str) -> bool:
    """Whether a denoiser parameter belongs to a method's `parameter_group`, as the reference codes name them:
    `full` every weight; `xattn`/`crossattn` the cross-attention; `crossattn_kv` its key/value maps (what reads the
    text); `noxattn` ESD-u's set, every weight but those and `NOT_TRAINED_BY_ESD_U`."""
    if group == "full":
        return True
    if group in ("xattn", "crossattn"):
        return is_cross_attention(name)
    if group == "crossattn_kv":
        return is_text_key_value(name)
    if group == "noxattn":
        return not (is_cross_attention(name) or name.startswith(NOT_TRAINED_BY_ESD_U))
    raise ValueError(f"unknown parameter group {group!r}")

class DiffusionMethod:
    """Base with the defaults; subclasses set `name`, `Config`, and implement `losses` (or `edit`)."""
    name: str = ""
    Config: type = object
    family = "t2i"
    needs_frozen: bool = False  # the frozen original UNet is built only for methods that read it
    needs_images: bool = True  # draw forget/retain latents with the original pipeline before the loop
    full_retain_batch: bool = False  # every step uses the whole retain pool as one batch (RGD)
    closed_form: bool = False  # `edit` changes the weights directly; no loop (UCE)
    default_steps: int = 200  # when train.max_steps is not set
    # the pipeline shapes (`Backbone.kind`) the method is written for, and why not the others (None: every shape)
    backbones: tuple[str, ...] | None = None
    backbones_why: str = ""
    combine_gradients = None  # optional: f(g_forget, g_retain) -> (grads, logs), as the language-model loop

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    def trainable(self, name: str, param: torch.nn.Parameter) -> bool:
        return True

    def text_encoder_trainable(self, name: str, param: torch.nn.Parameter) -> bool:
        """Which text-encoder parameters the method trains (none by default; AdvUnlearn's text-encoder mode)."""
        return False

    def retain_pool(self, items: list, rng) -> list:
        return items

    needs_world: bool = False  # as the language-model Method's: no text-to-image method takes a world's material

    def from_world(self, world) -> dict | None:
        """As the language-model Method's (the runner calls it for every method): nothing to take."""
        return None

    def attach(self, unet) -> None:
        """Called before the trainable parameters are picked: add the modules the method trains to the UNet (SPM's
        adapters); `trainable` then sees their parameters among the UNet's."""

    def attach_text_encoder(self, text_encoder) -> None:
        """Called before the text encoder's trainable parameters are picked, with that encoder (a method whose choice
        depends on its shape reads it here: Few-shot unlearning's last layer)."""

    def detach(self, unet) -> list[str] | None:
        """Called after the last step: fold what `attach` added into the UNet's own weights and return the names of
        the tensors that changed (the run's changed tensors); None: the trainable parameters themselves."""
        return None

    # Modules a run keeps that the base pipeline lacks and that cannot be folded into its weights (Receler's erasers:
    # they are not linear). Their tensors are among the run's changed tensors; `export` writes them to `kept_file`
    # beside the unchanged pipeline folders, and the method's own loader puts them back (None: nothing is kept).
    kept_file: str | None = None

    @classmethod
    def attach_kept(cls, pipe, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Before a run's changed tensors load onto its base pipeline: re-create, untrained, the kept modules whose
        tensors `tensors` holds (the denoiser's state-dict names and shapes; `source` names the file for errors)."""

    @classmethod
    def split_kept(cls, pipe) -> dict[str, torch.Tensor]:
        """Take the kept modules off the pipeline (so that it saves as the base's) and return their tensors."""
        return {}

    def setup(self, ctx: EraseContext, forget: dict, params: list) -> None:
        """Called once before the first step, with the whole forget set and the trainable parameters."""

    def gradient_mask(self) -> list | None:
        """Optional 0/1 mask per trainable parameter, applied to every gradient (SalUn)."""
        return None

    def losses(self, ctx: EraseContext, unet, forget: dict, retain: dict) -> LossParts:
        raise NotImplementedError

    def edit(self, ctx: EraseContext, unet) -> dict:
        raise NotImplementedError
