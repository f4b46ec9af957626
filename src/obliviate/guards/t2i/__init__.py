"""Text-to-image guards: how a guard takes part in sampling (`models/diffusion.py` `denoise`).

In `denoise`, with a guard (its `guard` argument, or the pipeline's `pipe.guard`):
  1. `begin(pipe, unet, x, seeds, context, guidance, text_encoder, prompts)` once: the guard resets its per-sampling
     state (SLD's momentum), reads the prompts (GoG's detection) and returns the latents and text context with its
     own rows added (NegToMe's negative images join the batch; SLD's safety concept and GoG's rewritten prompts join
     the context);
  2. each step, one denoiser call predicts every row: the conditional, the unconditional and one copy per
     `extra_prompts()` entry, inside `merging(t)` (NegToMe's attention processors act only there);
  3. `combine(step_index, t, x_t, pred_uncond, pred_cond, extra)` replaces classifier-free guidance's
     `u + g (c - u)`; the predictions are linear in the same way for a noise (epsilon) or a velocity (flow) model;
  4. `finish(x)` drops the guard's own rows.
A guard whose settings make it a no-op (SLD's guidance scale <= 1) adds no rows, so it samples exactly as CFG."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from obliviate.errors import ObliviateError
from obliviate.guards import LOAD_CALL, Guard

# the sampling settings a guard run records beside the guard, so the exported folder samples as the run evaluated
SAMPLING_KEYS = ("sample_steps", "guidance")


class T2IGuard(Guard):
    family = "t2i"
    # the pipeline shapes (`Backbone.kind`) the guard is written for, and why not the others (None: every shape)
    backbones: tuple[str, ...] | None = None
    backbones_why = ""

    def __init__(self, config=None):
        super().__init__(config)
        self.guidance = 1.0
        self.rows = 0  # the caller's images in the current sampling call

    def target(self) -> str:
        """The text the guard steers away from: its config's own, else the run's concept."""
        own = getattr(self.config, "concept", "")
        if own:
            return own
        if not self.concept:
            raise ObliviateError(f"{self.name}: no concept to guard against (bind the run's concept first)")
        return self.concept

    def extra_prompts(self) -> list[str]:
        """Prompts whose predictions at the same latents `combine` reads (one copy of the batch each)."""
        return []

    def begin(self, pipe, unet, x: torch.Tensor, seeds, context: torch.Tensor, guidance: float,
              text_encoder=None, prompts: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Start one sampling call: `context` is [conditional (N), unconditional (N)], `prompts` the N texts it
        encodes (None when the caller gave its own conditioning); returns (latents, context) with the guard's rows;
        the context then holds [conditional, unconditional, each extra prompt]."""
        from obliviate.models.diffusion import encode

        self.guidance, self.rows = float(guidance), x.shape[0]
        extra = [encode(pipe, [p] * x.shape[0], text_encoder) for p in self.extra_prompts()]
        return x, join_rows([context, *extra]) if extra else context

    def combine(self, step_index: int, t, x_t: torch.Tensor, pred_uncond: torch.Tensor, pred_cond: torch.Tensor,
                extra: dict) -> torch.Tensor:
        """The guided prediction (default: classifier-free guidance, written as in `denoise`)."""
        return pred_uncond + self.guidance * (pred_cond - pred_uncond)

    def merging(self, t):
        """The context a step's denoiser call runs in (NegToMe's processors act inside it only)."""
        return contextlib.nullcontext()

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return x[:self.rows]

    def check_backbone(self, pipe) -> None:
        """A pipeline shape the guard is not written for is refused in one line (as a method's `backbones`)."""
        kind = getattr(getattr(pipe, "backbone", None), "kind", "sd")
        if self.backbones is not None and kind not in self.backbones:
            raise ObliviateError(f"{self.name} runs on {', '.join(self.backbones)} pipelines, not on this "
                                 f"{pipe.backbone.pipeline_class}: {self.backbones_why}")

    def install(self, pipe) -> None:
        """Put what the guard needs on the pipeline's denoiser (attention processors); nothing by default."""

    def remove(self, pipe) -> None:
        """Undo `install`."""

    @contextlib.contextmanager
    def applied(self, pipe):
        """The pipeline samples through the guard inside the block: `pipe.guard` set and `install`ed."""
        previous = getattr(pipe, "guard", None)
        attach(pipe, self)
        try:
            yield pipe
        finally:
            detach(pipe)
            if previous is not None:
                attach(pipe, previous)


def join_rows(parts: list):
    """Rows of text conditioning, joined: tensors, or objects with a `cat` (the backbone API's `Cond.cat`)."""
    return torch.cat(parts) if torch.is_tensor(parts[0]) else type(parts[0]).cat(parts)


def attach(pipe, guard: T2IGuard) -> None:
    """From now on every `denoise`/`sample` on `pipe` goes through `guard` (evaluation, attacks)."""
    guard.check_backbone(pipe)
    guard.install(pipe)
    pipe.guard = guard


def detach(pipe) -> None:
    guard = getattr(pipe, "guard", None)
    if guard is not None:
        guard.remove(pipe)
        pipe.guard = None


class GuardedPipeline:
    """An exported guard run, loaded (`obliviate.guards.load_guarded(folder)`): the diffusers pipeline folder and
    the guard its obliviate_guard.json records. `pipe(prompts, seeds)` returns images [N, 3, H, W] in [0, 1], each
    prompt sampled with its seed through the guard, with the run's steps and guidance unless given."""

    def __init__(self, pipe, guard: T2IGuard, sampling: dict):
        self.pipe, self.guard, self.sampling = pipe, guard, dict(sampling)
        attach(pipe, guard)

    @classmethod
    def load(cls, folder: str | Path, guard: T2IGuard, record: dict, device: str = "cpu",
             trust_remote_code: bool = False) -> GuardedPipeline:
        from obliviate.models.diffusion import load_pipeline

        sampling = {k: record[k] for k in SAMPLING_KEYS if k in record}
        return cls(load_pipeline(folder, device, trust_remote_code=trust_remote_code), guard, sampling)

    def __call__(self, prompts: list[str], seeds: list[int], steps: int | None = None,
                 guidance: float | None = None, batch_size: int = 128) -> torch.Tensor:
        from obliviate.models.diffusion import sample

        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) != len(seeds):
            raise ObliviateError(f"{len(prompts)} prompts and {len(seeds)} seeds: give one seed per prompt")
        return sample(self.pipe, list(prompts), list(seeds), steps or self.sampling.get("sample_steps", 25),
                      guidance if guidance is not None else self.sampling.get("guidance", 4.0), batch_size)

    def __repr__(self) -> str:
        return f"GuardedPipeline({self.guard.name} against {self.guard.target()!r}, via {LOAD_CALL})"
