"""`obliviate run` for text-to-image: resolve the pipeline and prompts (the canvas world, or the user's folder and
prompt files), erase the concept, evaluate against the original and the retrain reference (canvas world), and
write one run folder atomically: changed tensors ("unet.<name>", and "text_encoder.<name>" for a method that trains
the text encoder), metrics, per-image rows, an image grid and the report."""
from __future__ import annotations

import time
from pathlib import Path

from obliviate.config import RunConfig
from obliviate.errors import ObliviateError
from obliviate.methods.t2i.base import EraseTask, RetainPrompt
from obliviate.runners.common import FamilyRun, Prepared, Trained


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
    from obliviate.runners.common import run as run_family

    return run_family(TextToImageRun(config), log, resume)


class TextToImageRun(FamilyRun):
    """A text-to-image run: the canvas world's pipeline or the user's pipeline folder and prompt files, the concept
    erased by the text-to-image loop, evaluated against the original and the retrain reference (canvas world) or with
    the user's CLIP and detector; an image grid beside the report."""
    evaluators = None  # the user's CLIP and detector (a run on the user's pipeline that evaluates)

    def prepare(self, log) -> Prepared:
        pipeline_dir, task, world = prepare(self.config, log)
        self.on_world = world is not None
        return Prepared(pipeline_dir, world, task)

    def _pipeline(self, folder: Path, device: str):
        import torch

        from obliviate.models.diffusion import load_pipeline
        config = self.config
        return load_pipeline(folder, device, getattr(torch, config.dtype), config.trust_remote_code)

    guard = None  # a generation-time guard's run: the guard, bound to the run's concept

    def unlearn(self, prepared: Prepared, method, device: str, checkpoints) -> Trained:
        from obliviate.guards import is_guard
        from obliviate.loops.t2i import changed_pipeline_tensors, erase

        config, t = self.config, self.config.t2i
        pipe = self._pipeline(prepared.model_dir, device)
        if config.evaluate and prepared.world is None:  # the user's CLIP and detector load before the training:
            from obliviate.evals.user_pipeline import UserEvaluators  # a bad folder fails before it, not after
            self.evaluators = UserEvaluators(t, config.concept, device)
        if is_guard(method):  # no training and no changed tensors: the pipeline samples through the guard from now
            from obliviate.guards.t2i import attach
            self.guard = method.bind(config.concept)
            attach(pipe, self.guard)
            return Trained(pipe)
        self.along = t2i_along(config, prepared.world, prepared.data, prepared.model_dir, device,
                               self.evaluators)  # train.eval_every
        result = erase(pipe, prepared.data, method, config.train, t.images_per_prompt, t.sample_steps, t.guidance,
                       checkpoints=checkpoints, on_eval=self.along and self.along.bind())
        return Trained(pipe, result.history, result.seconds, result.stopped, changed_pipeline_tensors(result))

    def load_reference(self, prepared: Prepared, folder: Path, device: str) -> Trained:
        return Trained(self._pipeline(folder, device))

    def describe(self, prepared: Prepared, trained: Trained) -> tuple[dict, dict]:
        return {"concept": self.config.concept}, ({"guard": self.guard_record()} if self.guard else {})

    def guard_record(self) -> dict:
        """obliviate_guard.json: the guard and the sampling settings its pictures were evaluated with."""
        from obliviate.guards import LOAD_CALL
        t = self.config.t2i
        return {**self.guard.describe(), "sample_steps": t.sample_steps, "guidance": t.guidance,
                "load": f"{LOAD_CALL}(FOLDER)"}

    def evaluate(self, prepared: Prepared, trained: Trained, metrics: dict, device: str, log) -> dict | None:
        import torch

        config, t, world, pipe = self.config, self.config.t2i, prepared.world, trained.model
        if world is not None:
            from obliviate.evals.canvas import evaluate_erasure
            t0 = time.time()
            evaluation = evaluate_erasure(world, pipe, config.concept, t, label=config.method)
            metrics["eval_seconds"] = round(time.time() - t0, 2)
            metrics.update(evaluation["aggregate"])
            return evaluation
        if self.evaluators is None:
            return None
        from obliviate.evals.user_pipeline import evaluate_user_pipeline
        from obliviate.models.diffusion import load_pipeline
        t0 = time.time()
        task = prepared.data
        original = load_pipeline(prepared.model_dir, device, getattr(torch, config.dtype))
        evaluation = evaluate_user_pipeline(pipe, original, task.forget_prompts, [p.text for p in task.retain_prompts],
                                            config.concept, t, self.evaluators, label=config.method, log=log)
        del original
        metrics["eval_seconds"] = round(time.time() - t0, 2)
        metrics.update(evaluation["aggregate"])
        metrics["notes"] = evaluation["notes"]
        for note in evaluation["notes"]:
            log(note)
        return evaluation

    def write_files(self, folder: Path, evaluation: dict | None, metrics: dict) -> dict:
        grids = {}
        if self.guard is not None:
            from obliviate.guards import GUARD_FILE
            from obliviate.runs import write_json
            write_json(folder / GUARD_FILE, self.guard_record())
        if evaluation is not None:
            config = self.config
            evaluation["grid"].save(folder / "grid.png")
            grids[f"{config.concept}: original, retrain, {config.method}" if self.on_world else
                  f"{config.concept}: original and {config.method}, forget then retain prompts (seed 0)"] = "grid.png"
        return {"grids": grids, "notes": metrics.get("notes")}

    def scorecard(self, metrics: dict, evaluation: dict | None, title: str) -> None:
        if self.evaluators is not None:  # the headline numbers, the original beside the erased pipeline
            from obliviate.bench.scorecard import print_scorecard
            original_row = {k.removeprefix("original_"): v for k, v in metrics.items() if k.startswith("original_")}
            print_scorecard({"original": original_row, self.config.method: metrics},
                            title=f"{title} on {self.config.concept!r}: your pipeline, {metrics['n_images']} images "
                                  "each")


def kept_modules_method(changed_path: Path):
    """The class of the method whose run wrote `changed_path` when that method keeps modules the base pipeline lacks
    (`DiffusionMethod.kept_file`: Receler's erasers), else None; also None for a changed file outside a run folder
    (no config.json beside it: plain tensors of the base's own modules)."""
    from obliviate.registry import lookup_method
    from obliviate.runs import read_run_config

    if not (changed_path.parent / "config.json").is_file():
        return None
    entry = lookup_method("t2i", read_run_config(changed_path.parent).method)
    if entry.guard or not entry.target:  # a guard keeps no module; the retrain reference is no method
        return None
    cls = entry.load()
    return cls if cls.kept_file else None


def load_run_pipeline(changed_path: Path, base: Path, device: str = "cpu", trust_remote_code: bool = False):
    """The base pipeline with a run's changed tensors applied, each onto the component its prefix names ("unet.",
    "text_encoder.", ...: `Pipeline.components()`; older runs hold "unet." tensors only). A method that keeps modules
    the base lacks (`kept_modules_method`) re-creates them first. The base folder is only read."""
    import torch
    from safetensors import safe_open
    from torch import nn

    from obliviate.models.diffusion import load_pipeline
    from obliviate.runs import apply_changed

    pipe = load_pipeline(base, device, trust_remote_code=trust_remote_code)
    method = kept_modules_method(changed_path)
    if method is not None:
        prefix = f"{pipe.backbone.denoiser_folder}."
        with safe_open(str(changed_path), framework="pt") as f:
            shapes = {k[len(prefix):]: f.get_slice(k).get_shape() for k in f.keys() if k.startswith(prefix)}
        method.attach_kept(pipe, {k: torch.empty(v) for k, v in shapes.items()}, str(changed_path))
    # the components under their folder names: their state-dict names are the changed tensors' own
    apply_changed(nn.ModuleDict(pipe.components()), changed_path)
    return pipe


def export(changed_path: Path, base: Path, out: Path) -> Path:
    """A diffusers pipeline folder: the base pipeline with the run's changed UNet and text-encoder tensors applied.
    A guard run's folder also holds its obliviate_guard.json: `obliviate.guards.load_guarded(out)` samples through
    the guard (diffusers' `from_pretrained` alone gives the unguarded pipeline). A method's kept modules (Receler's
    erasers: they cannot be folded into the weights) go to its `kept_file` beside an unchanged pipeline, which the
    method's loader reads (`obliviate.methods.t2i.receler.load_erased(out)`)."""
    from safetensors.torch import save_file

    from obliviate.guards import GUARD_FILE, read_guard
    from obliviate.models.diffusion import save_pipeline
    from obliviate.runs import claim_run_dir

    guarded = read_guard(changed_path.parent)  # a bad record fails before anything is written
    pipe = load_run_pipeline(changed_path, base)
    method = kept_modules_method(changed_path)
    kept = method.split_kept(pipe) if method is not None else {}
    with claim_run_dir(out) as folder:
        save_pipeline(pipe, folder.tmp)
        if kept:
            save_file(kept, str(folder.tmp / method.kept_file))
        if guarded is not None:
            from obliviate.runs import write_json
            write_json(folder.tmp / GUARD_FILE, guarded[1])
    return out


def run_guard(run_dir: Path):
    """The guard of a guard run (its obliviate_guard.json), or None for a run that changed weights."""
    from obliviate.guards import read_guard

    found = read_guard(run_dir)
    return found[0] if found else None


def t2i_along(config, world, task, pipeline_dir, device: str, evaluators=None):
    """A text-to-image run's evaluation: the canvas world's (`evaluate_erasure`), or on a user's pipeline the one
    beside its original (`evaluate_user_pipeline`, the original loaded once); None without eval_every."""
    if not config.train.eval_every:
        return None
    from obliviate.runners.along import Along

    t = config.t2i
    only_numbers = lambda evaluation: {"aggregate": evaluation["aggregate"]}  # noqa: E731 (no images kept)
    if world is not None:
        from obliviate.evals.canvas import evaluate_erasure

        return Along(lambda pipe: evaluate_erasure(world, pipe, config.concept, t, label=config.method), only_numbers)
    import torch

    from obliviate.evals.user_pipeline import UserEvaluators, evaluate_user_pipeline
    from obliviate.models.diffusion import load_pipeline

    evaluators = evaluators or UserEvaluators(t, config.concept, device)
    original = []

    def evaluate(pipe):
        if not original:
            original.append(load_pipeline(pipeline_dir, device, getattr(torch, config.dtype)))
        return evaluate_user_pipeline(pipe, original[0], task.forget_prompts, [p.text for p in task.retain_prompts],
                                      config.concept, t, evaluators, label=config.method, log=lambda *_: None)
    return Along(evaluate, only_numbers)
