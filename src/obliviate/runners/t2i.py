"""`obliviate run` for text-to-image: resolve the pipeline and prompts (the canvas world, or the user's folder and
prompt files), erase the concept, evaluate against the original and the retrain reference (canvas world), and
write one run folder atomically: changed tensors ("unet.<name>", and "text_encoder.<name>" for a method that trains
the text encoder), metrics, per-image rows, an image grid and the report."""
from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from obliviate.config import RunConfig
from obliviate.errors import NonFiniteLoss, ObliviateError
from obliviate.methods.t2i.base import EraseTask, RetainPrompt
from obliviate.runs import write_json, write_run_record


def canvas_task(world, concept: str, anchor: str | None = None) -> EraseTask:
    from obliviate.worlds import canvas_draw as cd
    from obliviate.worlds.canvas import concept_kind

    kind = concept_kind(concept)
    others = cd.STYLES if kind == "style" else cd.OBJECTS
    # RGD balances its retain subset over the remaining concepts of the erased kind first, then the other kind
    retain = [RetainPrompt(p.text, source=getattr(p, kind), subject=p.style if kind == "object" else p.object)
              for p in world.retain_prompts(concept)]
    return EraseTask(concept=concept, forget_prompts=world.forget_prompts(concept), retain_prompts=retain,
                     anchor=world.anchor(concept) if anchor is None else anchor,
                     preserve=[c for c in others if c != concept])


def prepare(config: RunConfig, log=print):
    """(pipeline folder, task, world or None)."""
    from obliviate.data import load_prompts
    from obliviate.models.diffusion import check_folder

    if config.forget_prompts or config.retain_prompts:
        if not (config.forget_prompts and config.retain_prompts and config.model):
            raise ObliviateError("forget_prompts and retain_prompts go together, with `model` (the pipeline folder)")
        forget = load_prompts(config.forget_prompts, must_contain=config.concept)
        retain = [RetainPrompt(p) for p in load_prompts(config.retain_prompts)]
        task = EraseTask(concept=config.concept, forget_prompts=forget, retain_prompts=retain,
                         anchor=config.anchor or "")
        return check_folder(config.model), task, None
    if config.world.name != "canvas":
        raise ObliviateError("a text-to-image run needs world.name = 'canvas', or `model` with forget_prompts and "
                             "retain_prompts files")
    from obliviate.worlds.canvas import CanvasWorld
    world = CanvasWorld.from_config(config.world)
    task = canvas_task(world, config.concept, config.anchor)  # checks the concept before any long build
    world.build(log=log)
    if config.concept in CanvasWorld.VALIDATION_CONCEPTS.values():  # its retrain reference is built on demand
        world.ensure_retrain(config.concept, log=log)
    return check_folder(config.model or world.pipeline_dir), task, world


def run(config: RunConfig, log=print, resume: bool = False) -> Path:
    import torch

    from obliviate.loops.step import Checkpoints
    from obliviate.loops.t2i import changed_pipeline_tensors, erase, make_t2i_method
    from obliviate.models.diffusion import load_pipeline
    from obliviate.runs import base_record, claim_run_dir, resolve_device, run_folder
    from obliviate.runners.t2i_checks import check_t2i

    check_t2i(config)  # what can be checked in a moment fails before the claim, the world and the training
    started = datetime.now(timezone.utc)
    device = resolve_device(config.device)
    method = make_t2i_method(config.method, config.method_args)
    out = run_folder(config, started)
    checkpoints = Checkpoints.for_run(config, resume)
    # the name is claimed and the output proven writable before any world build or training
    with claim_run_dir(out, log=log) as folder:
        pipeline_dir, task, world = prepare(config, log)
        base = base_record(pipeline_dir)
        pipe = load_pipeline(pipeline_dir, device, getattr(torch, config.dtype), config.trust_remote_code)
        t = config.t2i
        evaluators = None
        if config.evaluate and world is None:  # the user's CLIP and detector load before the training: a bad
            from obliviate.evals.user_pipeline import UserEvaluators  # folder fails before it, not after
            evaluators = UserEvaluators(t, config.concept, device)
        result = erase(pipe, task, method, config.train, t.images_per_prompt, t.sample_steps, t.guidance,
                       checkpoints=checkpoints)
        tensors = changed_pipeline_tensors(result)
        metrics: dict = {"method": config.method, "concept": config.concept,
                         "unlearn_seconds": round(result.seconds, 2),
                         "status": "stopped" if result.stopped else "completed", "stopped": result.stopped}
        evaluation = None
        if config.evaluate and world is not None:
            from obliviate.evals.canvas import evaluate_erasure
            t0 = time.time()
            evaluation = evaluate_erasure(world, pipe, config.concept, t, label=config.method)
            metrics["eval_seconds"] = round(time.time() - t0, 2)
            metrics.update(evaluation["aggregate"])
        elif evaluators is not None:
            from obliviate.evals.user_pipeline import evaluate_user_pipeline
            t0 = time.time()
            original = load_pipeline(pipeline_dir, device, getattr(torch, config.dtype))
            evaluation = evaluate_user_pipeline(pipe, original, task.forget_prompts,
                                                [p.text for p in task.retain_prompts], config.concept, t,
                                                evaluators, label=config.method, log=log)
            del original
            metrics["eval_seconds"] = round(time.time() - t0, 2)
            metrics.update(evaluation["aggregate"])
            metrics["notes"] = evaluation["notes"]
            for note in evaluation["notes"]:
                log(note)

        tmp = folder.tmp
        write_run_record(tmp, config, started, base, device, result.history, metrics)
        from safetensors.torch import save_file
        save_file(tensors, str(tmp / "changed.safetensors"), metadata={"base_model": base["base_model"]})
        grids = {}
        if evaluation is not None:
            write_json(tmp / "per_item.json", evaluation["per_item"])
            evaluation["grid"].save(tmp / "grid.png")
            grids[f"{config.concept}: original, retrain, {config.method}" if world is not None else
                  f"{config.concept}: original and {config.method}, forget then retain prompts (seed 0)"] = "grid.png"
        from obliviate.bench.report import write_run_report
        write_run_report(tmp, metrics, result.history, grids=grids, notes=metrics.get("notes"))
    checkpoints.done()  # the run folder is in place: its checkpoint is no longer needed
    if result.stopped:
        raise NonFiniteLoss(f"{config.method} stopped: {result.stopped}. Last good state saved in {out}")
    if evaluators is not None:  # the headline numbers, the original beside the erased pipeline
        from obliviate.bench.scorecard import print_scorecard
        original_row = {k.removeprefix("original_"): v for k, v in metrics.items() if k.startswith("original_")}
        print_scorecard({"original": original_row, config.method: metrics},
                        title=f"{config.method} on {config.concept!r}: your pipeline, {metrics['n_images']} images "
                              "each")
    log(f"run folder: {out}")
    return out


def load_run_pipeline(changed_path: Path, base: Path, device: str = "cpu", trust_remote_code: bool = False):
    """The base pipeline with a run's changed tensors applied, each onto the component its prefix names ("unet.",
    "text_encoder."; older runs hold "unet." tensors only). The base folder is only read."""
    from torch import nn

    from obliviate.loops.t2i import CHANGED_COMPONENTS
    from obliviate.models.diffusion import load_pipeline
    from obliviate.runs import apply_changed

    pipe = load_pipeline(base, device, trust_remote_code=trust_remote_code)
    # the components under their folder names: their state-dict names are the changed tensors' own
    apply_changed(nn.ModuleDict({c: getattr(pipe, c) for c in CHANGED_COMPONENTS}), changed_path)
    return pipe


def export(changed_path: Path, base: Path, out: Path) -> Path:
    """A diffusers pipeline folder: the base pipeline with the run's changed UNet and text-encoder tensors applied."""
    from obliviate.models.diffusion import save_pipeline
    from obliviate.runs import claim_run_dir

    pipe = load_run_pipeline(changed_path, base)
    with claim_run_dir(out) as folder:
        save_pipeline(pipe, folder.tmp)
    return out
