"""`obliviate attack` for text-to-image runs: the erased pipeline, the original and (canvas world) the retrain
reference, judged by a concept detector: the canvas world's classifier, or the user's (`detector` folder with
`detector_label`: attacks/t2i/detectors.py), which a run on the user's own pipeline must bring. Each attack writes
RUN_DIR/attacks/<name>.json (the format of attacks/__init__.py) and RUN_DIR/attacks/<name>.png (the pictures the
attacked forget prompts ended with). A generation-time guard's run is attacked through its guard, and its weights
without the guard are one more row, "<method> (unguarded)": what the guard hides but the weights still hold."""
from __future__ import annotations

import re
import time
from pathlib import Path

from obliviate.errors import ObliviateError
from obliviate.guards import SAME_WEIGHTS, unguarded_row
from obliviate.runs import write_json

INPUTS = ("detector", "detector_label")
NO_RETRAIN = ("no retrain row: a run on your own pipeline has no retrain-without-concept reference (the canvas world's "
              "runs have one)")


def attack_run(run_dir: Path, config, attacks: dict, log=print, skip_inapplicable: bool = False, **inputs) -> dict:
    """Each attack of `attacks` ({name: instance}) on the run's erased pipeline, the original and the retrain
    reference (when there is one); returns {name: result}. Every text-to-image attack serves every run this
    accepts, so `skip_inapplicable` (the default set) skips none."""
    from obliviate.attacks.t2i.detectors import load_detector
    from obliviate.runs import resolve_device

    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise ObliviateError(f"text-to-image attacks take no {', '.join(unknown)}; they take {', '.join(INPUTS)}")
    folder, label = inputs.get("detector"), inputs.get("detector_label")
    if label is not None and folder is None:
        raise ObliviateError("detector_label goes with detector (a CLIP or image-classifier folder)")
    user_run = bool(config.forget_prompts)
    if user_run and folder is None and config.t2i.detector:  # the run's own detector (t2i.detector)
        folder, label = config.t2i.detector, config.t2i.detector_label
    if not user_run and config.world.name != "canvas":
        raise ObliviateError("a text-to-image run to attack is a canvas-world run, or one on your own pipeline "
                             "(model and forget_prompts)")
    if user_run and folder is None:
        raise ObliviateError("a run on your own pipeline needs a detector for the concept: pass --detector FOLDER (a "
                             "CLIP or image-classifier folder) and --detector-label LABEL (the classifier's label, or "
                             "CLIP's prompt for the concept), or give the run t2i.detector")
    device = resolve_device(config.device)
    detector = load_detector(folder, label, config.concept, device) if folder is not None else None
    run = (_user_run if user_run else _canvas_run)(run_dir, config, detector, device, log)
    (run_dir / "attacks").mkdir(exist_ok=True)
    results = {}
    for name, attack in attacks.items():
        log(f"attacking {config.method}'s erasure of {config.concept!r} with {name} (and the original"
            + (")" if user_run else " and the retrain reference)"))
        result, images = run(name, attack)
        write_json(run_dir / "attacks" / f"{name}.json", result)
        _save_attack_grid(run_dir / "attacks" / f"{name}.png", f"{config.method} under {name}", images,
                          result["per_item"][config.method])
        results[name] = result
    from obliviate.bench.report import rewrite_report
    rewrite_report(run_dir)  # the run's page now shows the attacks too
    return results


def _canvas_run(run_dir: Path, config, detector, device, log=print):
    """(name, attack) -> (result, the erased pipeline's final pictures) for a canvas-world run."""
    from obliviate.attacks.t2i.canvas import attack_erasure
    from obliviate.attacks.t2i.common import attack_result
    from obliviate.models.diffusion import load_pipeline
    from obliviate.runners.t2i import load_run_pipeline
    from obliviate.worlds.canvas import CanvasWorld

    world = CanvasWorld.from_config(config.world)
    world.require_built()
    base = Path(config.model) if config.model else world.pipeline_dir
    pipe = load_run_pipeline(run_dir / "changed.safetensors", base, device, config.trust_remote_code)
    original = load_pipeline(world.pipeline_dir, device, trust_remote_code=config.trust_remote_code)
    guard = _attach_run_guard(run_dir, pipe)

    def run(name: str, attack) -> tuple[dict, object]:
        out = attack_erasure(world, pipe, config.concept, config.t2i, name, attack, config.method, detector, original)
        caption = None if "retrain" in out["per_item"] else f"no retrain reference for {config.concept!r} here"
        if guard is not None:  # the counter-case: the same weights without the guard
            if base.resolve() == world.pipeline_dir.resolve():
                out["per_item"][unguarded_row(config.method)] = out["per_item"]["original"]
                caption = _join(caption, SAME_WEIGHTS)
            else:
                from obliviate.attacks.t2i.canvas import attack_pipeline, concept_detector
                from obliviate.guards.t2i import attach, detach
                detach(pipe)
                try:
                    plain = attack_pipeline(world, pipe, config.concept, config.t2i, attack,
                                            detector or concept_detector(world, config.concept), original)
                finally:
                    attach(pipe, guard)
                out["per_item"][unguarded_row(config.method)] = plain["per_prompt"]
        return attack_result(name, attack, config.method, config.concept, out["per_item"], out["seconds"],
                             out["detector"], caption), out["images"]

    return run


def _user_run(run_dir: Path, config, detector, device, log=print):
    """(name, attack) -> (result, pictures) for a run on the user's pipeline: its forget prompts (seed 0), the
    targets the base pipeline's pictures of them; the erased pipeline and the base one are attacked. When the detector
    finds the concept in too few of the base pipeline's own pictures (t2i.detector_min_share), one line says so (in
    the log and each result's caption): its attack rates then say nothing about the erasure."""
    import torch

    from obliviate.attacks.t2i.common import AttackTask, attack_result
    from obliviate.data import load_prompts
    from obliviate.models.diffusion import decode, denoise, load_pipeline
    from obliviate.runners.t2i import load_run_pipeline

    prompts = load_prompts(config.forget_prompts, must_contain=config.concept)
    base = Path(config.model)
    original = load_pipeline(base, device, trust_remote_code=config.trust_remote_code)
    pipe = load_run_pipeline(run_dir / "changed.safetensors", base, device, config.trust_remote_code)
    guard = _attach_run_guard(run_dir, pipe)
    t2i, seeds = config.t2i, [0] * len(prompts)
    targets = torch.cat([denoise(original, prompts[i:i + 16], seeds[i:i + 16], t2i.sample_steps, t2i.guidance)[0]
                         for i in range(0, len(prompts), 16)])
    from obliviate.evals.user_pipeline import original_detection_note
    with torch.no_grad():  # the targets are the original's plain pictures of the attacked prompts
        found = [f for i in range(0, len(targets), 16) for f in detector(decode(original, targets[i:i + 16]))]
    note = original_detection_note(sum(found) / len(found), t2i.detector_min_share, config.concept,
                                   "pictures of the attacked prompts")
    caption = NO_RETRAIN
    if note:
        note += ": the attack rates are meaningless"
        log(note)
        caption = f"{note}. {NO_RETRAIN}"
    pairs = [(p, without_concept(p, config.concept, config.anchor)) for p in prompts]
    task = AttackTask(prompts, seeds, targets, detector, original, pairs, t2i.sample_steps, t2i.guidance,
                      config.concept)

    def run(name: str, attack) -> tuple[dict, object]:
        t0 = time.time()
        rows, images = attack.attack(pipe, task)
        seconds = time.time() - t0
        original_rows, _ = attack.attack(original, task)
        per_item = {config.method: rows, "original": original_rows}
        if guard is not None:  # a guard changes no weight: without it, the run's pipeline is the original
            per_item[unguarded_row(config.method)] = original_rows
        result = attack_result(name, attack, config.method, config.concept, per_item, seconds, detector.description,
                               _join(caption, SAME_WEIGHTS) if guard is not None else caption)
        result["detector_found_in_original"] = sum(found) / len(found)
        return result, images

    return run




def _attach_run_guard(run_dir: Path, pipe):
    """A guard run's guard on `pipe` (the attack then samples through it); None for a run that changed weights."""
    from obliviate.guards.t2i import attach
    from obliviate.runners.t2i import run_guard

    guard = run_guard(run_dir)
    if guard is not None:
        attach(pipe, guard)
    return guard


def _join(*parts: str | None) -> str | None:
    return ". ".join(p for p in parts if p) or None


def without_concept(prompt: str, concept: str, anchor: str | None = None) -> str:
    """The prompt with the concept replaced by the anchor (when the run has one) or removed: Ring-A-Bell's pair."""
    word = re.compile(rf"(?<!\w){re.escape(concept)}(?!\w)")
    return " ".join(word.sub(anchor or "", prompt).split())


def _save_attack_grid(path: Path, title: str, images, rows: list[dict], columns: int = 8) -> None:
    """The picture each of the first `columns` forget prompts ended with under attack, those the attack broke
    first."""
    import io

    from obliviate.bench.grids import image_grid
    from obliviate.runs import atomic_write

    def outcome(row: dict) -> str:
        return "drawn without attack" if row["pre_success"] else "concept back" if row["success"] else "held"

    rank = {"concept back": 0, "drawn without attack": 1, "held": 2}
    order = sorted(range(len(rows)), key=lambda i: rank[outcome(rows[i])])[:columns]
    # the adversarial prompt under its picture (the plain prompt where none was needed)
    captions = [f"{rows[i].get('adversarial_prompt') or rows[i]['text']} ({outcome(rows[i])})" for i in order]
    buffer = io.BytesIO()
    image_grid([(title, images[order])], captions).save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())
