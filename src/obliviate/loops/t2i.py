"""The text-to-image erasure loop: short and visible, like the language-model one (obliviate.loops.lm). A method
supplies the losses (or a closed-form edit); this loop owns the images drawn by the original pipeline, batching,
the optimiser, the gradient step (shared with the language-model loop: restricted gradients, masks, NaN guard)
and the history. The denoiser (pipe.denoiser: a UNet for SD and SDXL) is changed in place, and so is the text encoder
for a method that trains it (AdvUnlearn's text-encoder mode, Few-shot unlearning; on one-text-encoder pipelines); the
VAE stays frozen.
The loop and the methods reach the pipeline only through its backbone (models/diffusion.py), never its shape."""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field

import torch

from obliviate import progress, tracking
from obliviate.config import TrainConfig
from obliviate.errors import ObliviateError
from obliviate.loops.step import (Checkpoints, StateGuard, UnlearnResult, changed_tensors, evaluate_along,
                                  evaluation_steps, gradient_step, make_optimizer)
from obliviate.methods.t2i.base import EraseContext, EraseTask
from obliviate.models.diffusion import Pipeline, check_concept_known, denoise


@dataclass
class EraseResult(UnlearnResult):
    """The loop's result: `model` is the UNet and `trainable_names` its trained tensors (as before), plus the text
    encoder's trained tensors when the method trains it."""
    text_encoder: torch.nn.Module | None = None
    text_encoder_names: list[str] = field(default_factory=list)
    # the denoiser's sub-folder in the pipeline folder: the prefix of its tensors in changed.safetensors, beside
    # "text_encoder." (`Pipeline.components()`)
    denoiser_folder: str = "unet"


class _Context(EraseContext):
    """The methods' context, whose prompt conditioning (cached: targets and batch contexts) always comes from the
    original text encoder, kept apart from the pipeline's own while a method trains that one."""

    def __init__(self, *args, frozen_text_encoder, **kwargs):
        super().__init__(*args, **kwargs)
        self.frozen_text_encoder = frozen_text_encoder
        self.text_encoders = [frozen_text_encoder] + self.pipe.text_encoders[1:]


def check_task(pipe: Pipeline, task: EraseTask) -> None:
    if not task.concept.strip():
        raise ObliviateError("the concept to erase is empty")
    if not task.forget_prompts:
        raise ObliviateError(f"no forget prompts for concept '{task.concept}'")
    if not task.retain_prompts:
        raise ObliviateError("no retain prompts")
    missing = [p for p in task.forget_prompts if task.concept not in p]
    if missing:
        raise ObliviateError(f"forget prompt {missing[0]!r} does not contain the concept '{task.concept}'")
    overlap = {p.text for p in task.retain_prompts} & set(task.forget_prompts)
    if overlap:
        raise ObliviateError(f"{len(overlap)} prompt(s) are both forget and retain prompts, e.g. {sorted(overlap)[0]!r}")
    check_concept_known(pipe.tokenizer, task.concept)


@torch.no_grad()
def draw_latents(ctx: EraseContext, texts: list[str], seed: int, batch_size: int = 64) -> torch.Tensor:
    """Clean latents the original UNet draws for these prompts (the images forget/retain losses train on)."""
    seeds = [seed * 100_003 + i for i in range(len(texts))]
    denoiser = ctx.frozen if ctx.frozen is not None else ctx.pipe.denoiser
    out = [denoise(ctx.pipe, texts[i:i + batch_size], seeds[i:i + batch_size], ctx.sample_steps, ctx.guidance,
                   denoiser=denoiser, text_encoders=ctx.text_encoders)[0] for i in range(0, len(texts), batch_size)]
    return torch.cat(out)


def erase(pipe: Pipeline, task: EraseTask, method, train: TrainConfig | None = None, images_per_prompt: int = 2,
          sample_steps: int = 25, guidance: float = 4.0, checkpoints: Checkpoints | None = None,
          on_eval=None) -> EraseResult:
    """Erase `task.concept` from `pipe.denoiser` (changed in place), or from `pipe.text_encoder` for a method that
    trains it (`text_encoder_trainable(name, param)` next to `trainable`). `method` is a DiffusionMethod or a
    registered name. `checkpoints` saves the loop's state every few steps and resumes from the last one.
    `on_eval(step, epoch, pipe)` evaluates the pipeline along the way (train.eval_every: before the first step, every
    eval_every steps, after the last; an epoch is a pass over the forget images), without changing the training."""
    train = train or TrainConfig()  # the keys every family has (a run config refuses the language-model ones)
    if isinstance(method, str):
        from obliviate.methods.common import make_method
        method = make_method("t2i", method)
    check_task(pipe, task)
    if method.backbones is not None and pipe.backbone.kind not in method.backbones:
        raise ObliviateError(f"{method.name} runs on {', '.join(method.backbones)} pipelines, not on this "
                             f"{pipe.backbone.pipeline_class}: {method.backbones_why}")
    rng = random.Random(train.seed)
    torch.manual_seed(train.seed)
    gen = torch.Generator().manual_seed(train.seed)
    unet, text_encoder = pipe.denoiser, pipe.text_encoder
    method.attach(unet)  # modules the method adds and trains (SPM's adapters), before the parameters are picked
    named = [(n, p) for n, p in unet.named_parameters() if method.trainable(n, p)]
    method.attach_text_encoder(text_encoder)
    text_named = [(n, p) for n, p in text_encoder.named_parameters() if method.text_encoder_trainable(n, p)]
    if text_named and len(pipe.text_encoders) > 1:  # the soft-prompt attack and the training are one encoder's
        raise ObliviateError(f"{method.name}: training the text encoder is for pipelines with one text encoder (SD "
                             f"1.x/2.x); this {pipe.backbone.pipeline_class} has {len(pipe.text_encoders)}: train the "
                             "denoiser instead")
    if not named and not text_named:
        raise ObliviateError(f"{method.name}: no trainable parameters selected")
    # the originals the methods' targets come from; a component the method leaves alone is its own original
    frozen = None
    if method.needs_frozen:
        frozen = copy.deepcopy(unet).eval().requires_grad_(False) if named else unet
    frozen_text = copy.deepcopy(text_encoder).eval().requires_grad_(False) if text_named else text_encoder
    ctx = _Context(pipe, frozen, task, gen, sample_steps, guidance, frozen_text_encoder=frozen_text)
    t0 = time.time()

    forget_texts = [p for p in task.forget_prompts for _ in range(images_per_prompt)]
    pool = method.retain_pool(task.retain_prompts, rng)
    retain_texts = [p.text for p in pool for _ in range(images_per_prompt)]
    forget = {"texts": forget_texts, "context": ctx.encode(forget_texts)}
    retain = {"texts": retain_texts, "context": ctx.encode(retain_texts)}
    if method.needs_images:  # drawn before any change, by the original model
        forget["latents"] = draw_latents(ctx, forget_texts, train.seed)
        retain["latents"] = draw_latents(ctx, retain_texts, train.seed + 1)

    trainable = {id(p) for _, p in named + text_named}
    for p in list(unet.parameters()) + list(text_encoder.parameters()):
        p.requires_grad_(id(p) in trainable)
    params = [p for _, p in named + text_named]
    trained = [m for m, picked in ((unet, named), (text_encoder, text_named)) if picked]
    history, stopped = [], None

    if method.closed_form:
        with torch.no_grad():
            history.append({"step": 0, **method.edit(ctx, unet)})
    else:
        method.setup(ctx, forget, params)
        mask = method.gradient_mask()
        steps = train.max_steps or method.default_steps
        opt, sched = make_optimizer(params, train, steps)
        checkpoints = checkpoints or Checkpoints(None, None, "")
        start, history, saved = checkpoints.resume(params, opt, sched)
        if saved:
            gen.set_state(saved["generator"])  # batches and noise come from this generator alone
        guard = StateGuard(params)
        for module in trained:
            module.train()
        evaluated = evaluation_steps(train, steps, start) if on_eval is not None else set()

        def evaluate(done: int) -> None:  # after `done` optimiser steps
            if done in evaluated:
                evaluate_along(on_eval, done, done * min(train.batch_size, len(forget_texts)) / len(forget_texts),
                               pipe, [unet, text_encoder])
        with progress.bar(f"erase {task.concept!r} with {method.name}", steps) as advance:
            advance(start)
            evaluate(start)
            for step in range(start, steps):
                f = _rows(forget, torch.randint(0, len(forget_texts), (min(train.batch_size, len(forget_texts)),),
                                                generator=gen))
                r = retain if method.full_retain_batch else _rows(
                    retain, torch.randint(0, len(retain_texts), (min(train.batch_size, len(retain_texts)),),
                                          generator=gen))
                parts = method.losses(ctx, unet, f, r)
                logs = {"step": step, "loss": parts.total.item(), **parts.logs}
                stopped = gradient_step(method, parts, params, opt, sched, train, logs, step, guard, grad_mask=mask)
                if stopped:
                    stopped = guard.restore(stopped, probe=lambda: method.losses(ctx, unet, f, r).total)
                    break
                history.append(logs)
                tracking.log(logs)  # train.report_to
                checkpoints.save(step, params, opt, sched, history, {"generator": gen.get_state()})
                advance(loss=logs["loss"])
                evaluate(step + 1)
            if not stopped and history:  # the last update has no later loss to prove it: probe it
                stopped = guard.check_final(lambda: method.losses(ctx, unet, f, r).total)
    merged = method.detach(unet)  # what attach added, folded into the UNet's own weights
    for module in (unet, text_encoder):
        module.eval().requires_grad_(False)
    return EraseResult(model=unet, trainable_names=[n for n, _ in named] if merged is None else merged,
                       history=history,
                       seconds=time.time() - t0, stopped=stopped,
                       text_encoder=text_encoder if text_named else None,
                       text_encoder_names=[n for n, _ in text_named],
                       denoiser_folder=pipe.backbone.denoiser_folder)


def _rows(batch: dict, idx: torch.Tensor) -> dict:
    out = {}
    for k, v in batch.items():
        out[k] = [v[i] for i in idx.tolist()] if isinstance(v, list) else v[idx.to(v.device)]
    return out


def changed_pipeline_tensors(result: UnlearnResult) -> dict[str, torch.Tensor]:
    """The tensors the method could change, named by component as in the pipeline folder ("unet.<name>",
    "text_encoder.<name>"): what a run saves and `obliviate export` applies to the base pipeline."""
    prefix = getattr(result, "denoiser_folder", "unet")
    out = {f"{prefix}.{k}": v for k, v in changed_tensors(result.model, result.trainable_names).items()}
    if getattr(result, "text_encoder", None) is not None:
        out.update({f"text_encoder.{k}": v
                    for k, v in changed_tensors(result.text_encoder, result.text_encoder_names).items()})
    return out

