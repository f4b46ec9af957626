"""NegToMe, negative token merging (Singh et al. 2024, "Negative Token Merging: Image-based Adversarial Feature
Guidance", https://arxiv.org/abs/2412.01339): a generation-time guard. A negative image (the guarded concept's prompt)
is sampled alongside each image; in the denoiser's attention layers, each output token of the image whose best match
among the negative image's tokens is similar enough is pushed away from that match:

    j*  = argmax_j cos(x_i, n_j)
    x_i <- (1 + alpha) x_i - alpha n_j*     where cos(x_i, n_j*) > threshold, and x_i unchanged elsewhere

(for the conditional and the unconditional pass alike), at the attention outputs of the chosen blocks, while the
timestep is in [t_end, t_start] of the training schedule (the first steps: the layout).

Reference code read: github.com/1jsingh/negtome (src/negtome/pipeline_negtome_sdxl.py: `negtome`,
`NegToMeAttnProcessor2_0`, `NegtomeArgs`). Its SDXL defaults are this file's: alpha 0.9, threshold 0.7, timesteps
1000..800 of 1000, the up blocks, attention maps of at least 32 tokens a side on SDXL's 128-latent (here: a share of
the latent side, 0.25), no dropout. Where obliviate differs, and why:
  - the reference takes, for each token of the negative image, the best token of the output (`max` over dim -2)
    and then indexes the negative image with that output position; obliviate takes, for each output token, its best
    match in the negative image, as the paper's text (and its Figure 2) says;
  - the reference batches one negative image for the whole batch (the first); obliviate samples one per image, from
    its own seed (the image's seed + NEGATIVE_SEED_OFFSET), so a prompt and seed give the same picture in any batch;
  - the negative image is the run's erased concept as a prompt (or `concept`), not a user-given picture;
  - the processors wrap the pipeline's own (they only add the merge), and act only inside the guard's own denoiser
    calls: a plain call to the same UNet (an attack's loss, training) is the plain UNet.
Weights: none change; the run records this config."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from obliviate.guards.t2i import T2IGuard, join_rows

NEGATIVE_SEED_OFFSET = 1_000_003  # the negative image's noise: another draw than its image's, as in a batch


@dataclass
class NegToMeConfig:
    alpha: float = 0.9  # merging strength (0: no change)
    threshold: float = 0.7  # cosine similarity above which a token is pushed away
    t_start: float = 1.0  # applied while t / num_train_timesteps is in [t_end, t_start]
    t_end: float = 0.8
    blocks: list[str] = field(default_factory=lambda: ["up_blocks"])  # attention layers under these UNet blocks
    min_resolution: float = 0.25  # attention maps at least this share of the latent side
    concept: str = ""  # the negative image's prompt; empty: the run's erased concept

    def __post_init__(self):
        for key in ("alpha", "threshold", "t_start", "t_end", "min_resolution"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                    or abs(value) == float("inf"):
                raise ValueError(f"{key} must be a finite number, got {value!r}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if not -1 <= self.threshold <= 1:
            raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {self.threshold}")
        if not 0 <= self.t_end <= self.t_start <= 1:
            raise ValueError(f"t_end and t_start must satisfy 0 <= t_end <= t_start <= 1, got {self.t_end} and "
                             f"{self.t_start}")
        if not 0 <= self.min_resolution <= 1:
            raise ValueError(f"min_resolution must be in [0, 1], got {self.min_resolution}")
        if not isinstance(self.blocks, list) or not self.blocks or not all(isinstance(b, str) for b in self.blocks):
            raise ValueError(f"blocks must be a non-empty list of UNet block names, got {self.blocks!r}")
        if not isinstance(self.concept, str):
            raise ValueError(f"concept must be a string, got {self.concept!r}")


def negative_merge(x: torch.Tensor, negative: torch.Tensor, alpha: float, threshold: float) -> torch.Tensor:
    """x, negative: [B, N, D] tokens of each image and of its negative image. Each token of x whose best match in
    its negative image has cosine similarity above `threshold` is pushed away from it: (1 + alpha) x - alpha match."""
    similarity = F.normalize(x, dim=-1) @ F.normalize(negative, dim=-1).transpose(1, 2)  # [B, N, M]
    best, index = similarity.max(dim=-1)
    match = torch.gather(negative, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.where((best > threshold).unsqueeze(-1), (1 + alpha) * x - alpha * match, x)


class _MergingProcessor:
    """A UNet attention processor: the pipeline's own, then NegToMe's merge on its output while the guard merges."""

    def __init__(self, inner, guard: NegToMe, tokens: int):
        self.inner, self.guard, self.tokens = inner, guard, tokens

    def __call__(self, attn, hidden_states, *args, **kwargs):
        out = self.inner(attn, hidden_states, *args, **kwargs)
        return self.guard.merge(out) if self.guard.merging_now and out.shape[1] >= self.tokens else out


class NegToMe(T2IGuard):
    name = "NegToMe"
    Config = NegToMeConfig
    backbones = ("sd", "sdxl")
    backbones_why = ("its processors merge a UNet attention layer's output tokens; SD3/FLUX's joint-attention "
                     "processors return the image and text streams together (the authors' FLUX pipeline, "
                     "pipeline_negtome_flux.py, is not ported yet)")
    paper = ("Singh et al. 2024, Negative Token Merging: Image-based Adversarial Feature Guidance, "
             "https://arxiv.org/abs/2412.01339")

    def __init__(self, config=None):
        super().__init__(config)
        self.merging_now = False
        self._installed: dict[int, dict] = {}  # id(unet) -> its own processors
        self._for_this_call = None

    def install(self, pipe, unet=None) -> None:
        self.check_backbone(pipe)
        unet = unet if unet is not None else pipe.unet
        if id(unet) in self._installed:
            return
        own = dict(unet.attn_processors)
        side = pipe.latent_shape[-1]
        tokens = int(self.config.min_resolution * side) ** 2
        chosen = {n: _MergingProcessor(p, self, tokens) if any(n.startswith(b + ".") for b in self.config.blocks)
                  else p for n, p in own.items()}
        if chosen == own:
            from obliviate.errors import ObliviateError
            raise ObliviateError(f"NegToMe: blocks {self.config.blocks} hold none of the UNet's attention layers "
                                 f"(its blocks: {sorted({n.split('.')[0] for n in own})})")
        unet.set_attn_processor(chosen)
        self._installed[id(unet)] = own

    def remove(self, pipe, unet=None) -> None:
        unet = unet if unet is not None else pipe.unet
        own = self._installed.pop(id(unet), None)
        if own is not None:
            unet.set_attn_processor(own)

    def begin(self, pipe, unet, x, seeds, context, guidance, text_encoder=None, prompts=None):
        from obliviate.models.diffusion import encode, initial_noise

        # a guard not attached to the pipeline (denoise's `guard` argument) puts its processors on for this call only
        self._for_this_call = None if id(unet) in self._installed else (pipe, unet)
        self.install(pipe, unet)
        self.guidance, self.rows, n = float(guidance), x.shape[0], x.shape[0]
        self.t_range = (self.config.t_end * pipe.scheduler.config.num_train_timesteps,
                        self.config.t_start * pipe.scheduler.config.num_train_timesteps)
        negative = initial_noise(pipe, [int(s) + NEGATIVE_SEED_OFFSET for s in seeds]).to(x.dtype)
        concept = encode(pipe, [self.target()] * n, text_encoder)
        cond, uncond = context[:n], context[n:]
        # rows: [images, negative images] of each pass: conditional [cond, concept], unconditional [uncond, uncond]
        return torch.cat([x, negative]), join_rows([cond, concept, uncond, uncond])

    def finish(self, x):
        if self._for_this_call is not None:
            self.remove(*self._for_this_call)
            self._for_this_call = None
        return super().finish(x)

    @contextlib.contextmanager
    def merging(self, t):
        self.merging_now = self.t_range[0] <= float(t) <= self.t_range[1]
        try:
            yield
        finally:
            self.merging_now = False

    def merge(self, hidden: torch.Tensor) -> torch.Tensor:
        """The denoiser batch is [images, negatives] per pass (chunks of `rows`): each image's tokens merge with its
        own negative image's; the negative images are left as they are."""
        n = self.rows
        if hidden.shape[0] % (2 * n):
            return hidden  # not the guard's batch
        chunks = hidden.reshape(-1, 2, n, *hidden.shape[1:])  # [passes, image | negative, n, tokens, dim]
        images = negative_merge(chunks[:, 0].flatten(0, 1), chunks[:, 1].flatten(0, 1), self.config.alpha,
                                self.config.threshold)
        return torch.stack([images.view_as(chunks[:, 0]), chunks[:, 1]], dim=1).reshape(hidden.shape)
