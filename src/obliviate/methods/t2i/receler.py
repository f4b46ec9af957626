"""Receler, reliable concept erasing with lightweight erasers: a small adapter after every cross-attention, trained
with ESD's negatively guided target under adversarially learned prompt states, and kept off everything outside the
concept's region.

Paper: Huang, Chang, Tsai, Lai, Yang and Wang 2024, "Receler: Reliable Concept Erasing of Text-to-Image Diffusion
Models via Lightweight Erasers", ECCV, https://arxiv.org/abs/2311.17717. Reference code read:
github.com/jasper0314-huang/Receler (train_receler.py, receler/erasers/utils.py `AdapterEraser`,
receler/erasers/ldm_erasers.py, receler/erasers/diffusers_erasers.py `AttentionWithEraser`, receler/concept_reg.py
`get_mask`, README.md).

The eraser. After the cross-attention (`attn2`) of every transformer block, its output o becomes o + E(o) with
E(o) = up(GELU(down(o))), down: dim -> rank, up: rank -> dim, both with bias; `up` starts at zero, so the erased UNet
starts as the original. Only the erasers train. Here each eraser is a child module `eraser` of its `attn2`, applied by
a forward hook on that `attn2`.

One step, for the batch's forget prompts c (the reference: the bare concept word) and their text states:
    x_t     = DDIM with guidance `start_guidance` on c by the erased UNet, stopped at a random step (ESD's x_t)
    e_0, e_c = the original's predictions (erasers off) for "" and c; A = its cross-attention maps on the c pass
    mask    = the concept tokens' attention, averaged over heads, tokens and the layers at a quarter of the latent's
              side (SD's 16 x 16 maps of 64 x 64 latents, as the reference, which follows MasaCtrl; all layers when the
              UNet has none there), min-max normalised per picture, >= `mask_threshold`
    adversarial prompt: `adv_tokens` learned state vectors P written into c's states from its end token on; `adv_iters`
              Adam steps (lr `adv_lr`, weight decay `adv_weight_decay`) on || e_theta(x_t, c + P) - e_c ||^2, i.e. P
              learns to bring the concept back through the erasers; P persists across steps
    L_erase = || e_theta(x_t, c + P) - [e_0 - g (e_c - e_0)] ||^2            (the last adversarial pass's prediction)
    L_reg   = mean over erasers of  sum_pixels mean_channels (E(o) * (1 - mask))^2 / sum(1 - mask)
    L       = L_erase + concept_reg_weight * L_reg

Defaults from the reference (its argparse and README): eraser rank 128, g (negative guidance) 1, start guidance 3,
concept_reg_weight 0.1, mask_threshold 0.1, 16 adversarial prompt vectors (initialised U(0, 1)), 50 adversarial
iterations per step, Adam lr 0.1 and weight decay 0.1 for them, 500 iterations at lr 3e-4 (Adam), batch 1, 50 DDIM
steps. The loop's `train` sets lr, steps and batch (`default_steps` 500), `t2i.sample_steps` the DDIM steps.

The result needs the erasers: E is not linear (GELU), so it cannot be folded into the UNet's own weights (unlike
SPM's and MACE's LoRAs). The run's changed tensors are the erasers' ("unet.<...>.attn2.eraser.down.weight", ...);
evaluation and attacks of the run load the base pipeline, attach erasers of the saved shapes and load them
(the method's `attach_kept`, which `runners.t2i.load_run_pipeline` calls for a method with a `kept_file`). `obliviate export` writes the base pipeline's
folder unchanged (diffusers' `from_pretrained` alone gives the original, un-erased model) plus
`receler_erasers.safetensors`; `load_erased(folder)` loads that folder with the erasers on.

Where obliviate differs from the reference, and why:
- The adversarial states: the reference writes them with `emb_n[:, advrs_indices, :].data = ...`, which assigns into
  the copy that advanced indexing returns, so its prompts never carry them (the attack's gradient reaches the
  vectors, which are updated, but neither the attack nor the erase step sees them). obliviate writes them into the
  states, as the paper describes (its Eq. 5-6: erase under the adversarial prompt).
- Prompts: the forget prompts (which contain the concept) instead of the bare word; the adversarial vectors go from
  each prompt's end token on (the reference: right after the word, which is its end token), as many as fit.
- One eraser per cross-attention (per transformer block) rather than per `Transformer2DModel`; the same on SD 1.x,
  where each has one block.
- The adversarial vectors' optimiser state is not in the loop's checkpoints: a resumed run restarts them.
- A batch larger than 1 shares one set of adversarial vectors and normalises L_reg over the whole batch's pixels.

Refused on SD3/FLUX-shaped pipelines (`backbones`): the eraser sits after a UNet's text-only cross-attention, and the
mask reads its maps over the text tokens; joint attention has no such layer.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from obliviate.errors import ObliviateError
from obliviate.methods.common import check_number
from obliviate.methods.t2i.base import DiffusionMethod, EraseContext, LossParts, is_cross_attention
from obliviate.methods.t2i.attention_maps import concept_positions, every_map, recording
from obliviate.methods.t2i.mace import _grid
from obliviate.models.diffusion import Cond

ERASER = "eraser"  # the child module of each attn2
ERASERS_FILE = "receler_erasers.safetensors"  # beside an exported pipeline folder's components


@dataclass
class RecelerConfig:
    eraser_rank: int = 128  # the eraser's hidden width
    erase_guidance: float = 1.0  # g: how far beyond "" the target moves away from the concept (negative guidance)
    start_guidance: float = 3.0  # classifier-free guidance of the partial sampling that makes x_t
    concept_reg_weight: float = 0.1  # weight of the concept-localised regularisation
    mask_threshold: float = 0.1  # of the min-max normalised concept attention
    adv_tokens: int = 16  # adversarial prompt vectors (0: no adversarial prompt)
    adv_iters: int = 50  # adversarial updates per step
    adv_lr: float = 0.1
    adv_weight_decay: float = 0.1

    def __post_init__(self):
        for key in ("eraser_rank",):
            _whole("Receler", key, getattr(self, key), 1)
        for key in ("adv_tokens", "adv_iters"):
            _whole("Receler", key, getattr(self, key), 0)
        check_number("Receler", "erase_guidance", self.erase_guidance, min=0)
        check_number("Receler", "start_guidance", self.start_guidance, min=0)
        check_number("Receler", "concept_reg_weight", self.concept_reg_weight, min=0)
        check_number("Receler", "mask_threshold", self.mask_threshold, min=0)
        if self.mask_threshold > 1:
            raise ObliviateError(f"Receler: mask_threshold must be at most 1, got {self.mask_threshold!r}")
        check_number("Receler", "adv_lr", self.adv_lr, positive=True)
        check_number("Receler", "adv_weight_decay", self.adv_weight_decay, min=0)


def _whole(method: str, key: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ObliviateError(f"{method}: {key} must be a whole number >= {least}, got {value!r}")


# --- the eraser ------------------------------------------------------------------------------------------------------

class Eraser(torch.nn.Module):
    """E(o) = up(GELU(down(o))), `up` zero at first; `enabled` switches it off (the original's predictions) and
    `outputs`, when a list, collects E(o) of each call (the regularisation)."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = torch.nn.Linear(dim, rank)
        self.act = torch.nn.GELU()
        self.up = torch.nn.Linear(rank, dim)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)
        self.enabled = True
        self.outputs: list | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(hidden)))


def _after_attention(attn, args, output):
    """attn2's forward hook: o + E(o) while the eraser is on."""
    eraser = getattr(attn, ERASER)
    if not eraser.enabled:
        return None
    erased = eraser(output)
    if eraser.outputs is not None:
        eraser.outputs.append(erased)
    return output + erased


def cross_attentions(denoiser) -> list[tuple[str, torch.nn.Module]]:
    """Every cross-attention module (`attn2`) of a UNet."""
    return [(n, m) for n, m in denoiser.named_modules() if n.endswith(".attn2") and is_cross_attention(f"{n}.")
            and hasattr(m, "to_out")]


def attach_erasers(denoiser, rank: int) -> list[str]:
    """An eraser after every cross-attention (identity at first); returns the attn2 module names."""
    names = []
    for name, attn in cross_attentions(denoiser):
        dim = attn.to_out[0].out_features
        weight = attn.to_out[0].weight
        attn.add_module(ERASER, Eraser(dim, rank).to(weight.device, weight.dtype))
        getattr(attn, ERASER).handle = attn.register_forward_hook(_after_attention)
        names.append(name)
    if not names:
        raise ObliviateError(f"Receler: the denoiser ({type(denoiser).__name__}) has no cross-attention (attn2)")
    return names


def erasers(denoiser) -> list[Eraser]:
    return [m for m in denoiser.modules() if isinstance(m, Eraser)]


@contextlib.contextmanager
def erasers_off(denoiser):
    """The original UNet: every eraser switched off inside the block."""
    found = erasers(denoiser)
    for e in found:
        e.enabled = False
    try:
        yield
    finally:
        for e in found:
            e.enabled = True


@contextlib.contextmanager
def collecting(denoiser):
    """E(o) of every eraser call made inside the block, in call order."""
    outputs: list[torch.Tensor] = []
    found = erasers(denoiser)
    for e in found:
        e.outputs = outputs
    try:
        yield outputs
    finally:
        for e in found:
            e.outputs = None


def eraser_tensors(denoiser) -> dict[str, torch.Tensor]:
    """The erasers' tensors by their names in the UNet's state dict."""
    return {k: v for k, v in denoiser.state_dict().items() if f".{ERASER}." in k}


def remove_erasers(denoiser) -> None:
    for _, attn in cross_attentions(denoiser):
        if hasattr(attn, ERASER):
            getattr(attn, ERASER).handle.remove()
            delattr(attn, ERASER)


def attach_saved_erasers(denoiser, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Erasers of the shapes `tensors` (UNet state-dict names) hold, attached where they were trained (their values
    are loaded by the caller); nothing when `tensors` holds none."""
    downs = {k: v for k, v in tensors.items() if k.endswith(f".{ERASER}.down.weight")}
    if not downs:
        return
    ranks = {int(v.shape[0]) for v in downs.values()}
    if len(ranks) != 1:
        raise ObliviateError(f"{source}: Receler erasers of several ranks {sorted(ranks)}")
    attach_erasers(denoiser, ranks.pop())


def split_erasers(pipe) -> dict[str, torch.Tensor]:
    """Take the erasers off the pipeline's UNet (so that it saves as the base's) and return their tensors, under the
    names `load_erased` reads ({} when it has none)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in eraser_tensors(pipe.denoiser).items()}
    remove_erasers(pipe.denoiser)
    return tensors


def load_erased(folder: str | Path, device: str = "cpu"):
    """A pipeline folder that `obliviate export` wrote from a Receler run, loaded with its erasers on."""
    from safetensors.torch import load_file

    from obliviate.models.diffusion import load_pipeline

    path = Path(folder) / ERASERS_FILE
    if not path.is_file():
        raise ObliviateError(f"{folder}: no {ERASERS_FILE} (not an export of a Receler run)")
    pipe = load_pipeline(folder, device)
    tensors = load_file(str(path))
    attach_saved_erasers(pipe.denoiser, tensors, str(path))
    missing = set(eraser_tensors(pipe.denoiser)) ^ set(tensors)
    if missing:
        raise ObliviateError(f"{path}: erasers do not fit this pipeline's UNet, e.g. {sorted(missing)[0]}")
    pipe.denoiser.load_state_dict(tensors, strict=False)
    pipe.denoiser.requires_grad_(False)
    return pipe


# --- the mask and the regularisation ---------------------------------------------------------------------------------

def concept_mask(maps: list[torch.Tensor], words: torch.Tensor, latent: tuple[int, int], threshold: float
                 ) -> torch.Tensor:
    """[B, h, w] 0/1 at a quarter of the latent's side (or the finest grid the maps have): the concept tokens'
    attention averaged over heads, tokens and the layers at that grid, min-max normalised, >= threshold
    (the reference's `get_mask`)."""
    b = len(words)
    grids = [_grid(m.shape[1], tuple(latent)) for m in maps]
    quarter = ((latent[0] + 3) // 4, (latent[1] + 3) // 4)
    grid = quarter if quarter in grids else max(grids, key=lambda g: g[0] * g[1])
    chosen = [m for m, g in zip(maps, grids) if g == grid]
    per_word = words.float() / words.float().sum(1, keepdim=True).clamp(min=1)  # the mean over the concept tokens
    heat = torch.stack([(m.float().view(b, -1, *m.shape[1:]) * per_word[:, None, None, :]).sum(-1).mean(1)
                        for m in chosen]).mean(0).view(b, *grid)
    low = heat.flatten(1).min(1).values[:, None, None]
    high = heat.flatten(1).max(1).values[:, None, None]
    return ((heat - low) / (high - low) >= threshold).float()


def regularisation(outputs: list[torch.Tensor], mask: torch.Tensor, latent: tuple[int, int]) -> torch.Tensor:
    """Mean over erasers of sum_pixels mean_channels (E(o) (1 - mask))^2 / sum(1 - mask): each eraser's output
    [B, HW, C] off the concept's region, the mask resized (nearest) to the output's grid."""
    total = 0.0
    for out in outputs:
        grid = _grid(out.shape[1], tuple(latent))
        off = 1 - F.interpolate(mask[:, None], size=grid, mode="nearest").flatten(1)  # [B, HW]
        total = total + ((out.float() * off[..., None]) ** 2).mean(-1).sum() / (off.sum() + 1e-9)
    return total / max(len(outputs), 1)


def insert_prompt(states: torch.Tensor, adv: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """The text states [B, L, D] with the adversarial vectors adv [K, D] written from each row's `starts` position on
    (as many as fit)."""
    out = states.clone()
    for row, start in enumerate(starts):
        n = min(len(adv), states.shape[1] - start)
        out[row, start:start + n] = adv[:n].to(out.dtype)
    return out


# --- the method ------------------------------------------------------------------------------------------------------

class Receler(DiffusionMethod):
    name = "Receler"
    Config = RecelerConfig
    needs_images = False  # data-free: x_t from the erased model's own partial sampling, as ESD
    needs_frozen = False  # the original is the same UNet with its erasers off
    default_steps = 500
    backbones = ("sd", "sdxl")
    backbones_why = ("the erasers sit after a UNet's text-only cross-attention (attn2) and the mask reads its maps; "
                     "joint attention has none")

    kept_file = ERASERS_FILE

    @classmethod
    def attach_kept(cls, pipe, tensors: dict[str, torch.Tensor], source: str) -> None:
        attach_saved_erasers(pipe.denoiser, tensors, source)

    @classmethod
    def split_kept(cls, pipe) -> dict[str, torch.Tensor]:
        return split_erasers(pipe)

    def attach(self, unet) -> None:
        attach_erasers(unet, self.config.eraser_rank)

    def trainable(self, name: str, param) -> bool:
        return f".{ERASER}." in name

    def detach(self, unet) -> list[str]:
        """The erasers stay on the UNet (they cannot be folded: module docstring); their tensors are the run's."""
        return sorted(eraser_tensors(unet))

    def setup(self, ctx: EraseContext, forget: dict, params: list) -> None:
        cfg = self.config
        dim = forget["context"].states.shape[-1]
        self.adv = None
        if cfg.adv_tokens and cfg.adv_iters:
            self.adv = torch.rand(cfg.adv_tokens, dim, generator=ctx.generator).to(ctx.pipe.device).requires_grad_()
            self.adv_opt = torch.optim.Adam([self.adv], lr=cfg.adv_lr, weight_decay=cfg.adv_weight_decay)

    def losses(self, ctx: EraseContext, unet, forget: dict, retain: dict) -> LossParts:
        cfg, pipe = self.config, ctx.pipe
        texts, cond = forget["texts"], forget["context"]
        n = len(texts)
        x_t, t = ctx.partial_sample(texts, cfg.start_guidance, unet)
        words = concept_positions(pipe.tokenizer, texts, ctx.task.concept, cond.states.shape[1]).to(x_t.device)
        with torch.no_grad(), erasers_off(unet):  # the original's two predictions, and its maps on the concept pass
            e_0 = ctx.predict(unet, x_t, t, ctx.unconditional(n))
            with recording(unet) as maps:
                e_c = ctx.predict(unet, x_t, t, cond)
            mask = concept_mask(every_map(maps), words, x_t.shape[-2:], cfg.mask_threshold)
            target = e_0 - cfg.erase_guidance * (e_c - e_0)
        logs = {"t": float(t), "mask_share": float(mask.mean())}
        starts = self.prompt_starts(ctx, texts, cond.states.shape[1])
        iters = cfg.adv_iters if self.adv is not None else 1
        for i in range(iters):
            states = cond.states if self.adv is None else insert_prompt(cond.states, self.adv, starts)
            with collecting(unet) as outputs:
                pred = ctx.predict(unet, x_t, t, Cond(states, cond.pooled))
            if self.adv is not None:
                attack = F.mse_loss(pred.float(), e_c.float())
                grad, = torch.autograd.grad(attack, [self.adv], retain_graph=i == iters - 1)
                self.adv.grad = grad
                self.adv_opt.step()
                self.adv_opt.zero_grad(set_to_none=True)
                if i == 0:
                    logs["attack_mse_start"] = float(attack.detach())
                logs["attack_mse"] = float(attack.detach())
        erase = F.mse_loss(pred.float(), target.float())
        reg = regularisation(outputs, mask, x_t.shape[-2:])
        logs.update({"erase_mse": float(erase.detach()), "concept_reg": float(reg.detach())})
        return LossParts(forget=erase + cfg.concept_reg_weight * reg, logs=logs)

    @staticmethod
    def prompt_starts(ctx: EraseContext, texts: list[str], length: int) -> list[int]:
        """Each prompt's end-token position (where the adversarial vectors go)."""
        tok = ctx.pipe.tokenizer
        return [min(len(tok(t, truncation=True, max_length=length).input_ids) - 1, length - 1) for t in texts]
