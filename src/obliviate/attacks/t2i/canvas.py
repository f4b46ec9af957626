"""The text-to-image attacks on the canvas world: attack an erased pipeline's forget prompts, next to the same attack
on the original pipeline (the ceiling) and on the retrain reference (the floor: how often the attack makes a model
that never saw the concept draw it anyway).

Attacked prompts: every canonical forget prompt of the concept, with seed 0; the target of each is the original
pipeline's picture for that prompt and seed (its cached evaluation sample). The detector is the world classifier,
or a user's (attacks/t2i/detectors.py). Ring-A-Bell's concept vector comes from the forget prompts paired with the
same prompts naming each other concept of the same kind. The original's and the reference's results depend only on
the world, the concept, the attack, the detector and the settings, so they are cached in the world folder."""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict

import torch

from obliviate.attacks.t2i.common import AttackTask, summarize
from obliviate.errors import ObliviateError
from obliviate.runs import cached_json


def attack_targets(world, concept: str, t2i) -> tuple[list[int], list[str], list[int], torch.Tensor]:
    """(their indices among the evaluation samples, prompt texts, seeds, the original pipeline's images for them)
    for every canonical forget prompt with seed 0."""
    from obliviate.evals.canvas import eval_prompts, world_samples

    prompts, seeds = eval_prompts(world, t2i.eval_seeds)
    original = world_samples(world, "original", world.pipeline_dir, t2i)
    chosen = [i for i, (p, s) in enumerate(zip(prompts, seeds)) if p.kind == "train" and s == 0 and p.has(concept)]
    if not chosen:
        raise ObliviateError(f"no forget prompt of the canvas world has {concept!r}")
    return chosen, [prompts[i].text for i in chosen], [seeds[i] for i in chosen], original[chosen]


def concept_detector(world, concept: str):
    """The world classifier as a detector: images -> [does it see `concept` in each]."""
    from obliviate.attacks.t2i.detectors import Detector
    from obliviate.evals.canvas import classify
    from obliviate.worlds.canvas import concept_kind

    kind, classifier = concept_kind(concept), world.load_classifier()
    return Detector(lambda images: [name == concept for name in classify(classifier, images)[kind]], "",
                    f"the canvas world's classifier ({kind} {concept!r})")


def concept_pairs(concept: str, prompts: list[str]) -> list[tuple[str, str]]:
    """Each forget prompt with the concept, and the same prompt naming each other concept of its kind instead."""
    from obliviate.worlds import canvas_draw as cd
    from obliviate.worlds.canvas import concept_kind

    others = [c for c in (cd.STYLES if concept_kind(concept) == "style" else cd.OBJECTS) if c != concept]
    word = re.compile(rf"\b{re.escape(concept)}\b")
    return [(p, word.sub(other, p)) for p in prompts for other in others]


def concept_paraphrases(concept: str, prompts: list[str]) -> list[list[str]]:
    """Each canonical forget prompt in the world's other wording of the concept (concept arithmetic's paraphrase
    composition): the object's synonym ("a red pentagram in striped style") or the style's phrase ("a red star with
    stripes")."""
    from obliviate.worlds import canvas_draw as cd
    from obliviate.worlds.canvas import concept_kind

    triples = {p.text: p for p in cd.canonical_prompts()}
    template = "synonym" if concept_kind(concept) == "object" else "phrase"
    return [[cd.prompt_text(template, triples[t].colour, triples[t].object, triples[t].style)] for t in prompts]


def attack_pipeline(world, pipe, concept: str, t2i, attack, detect, original) -> dict:
    """{"aggregate": pre_asr, asr, ua_attacked, n_attacked; "per_prompt": rows; "eval_indices": where the attacked
    prompts stand among the evaluation samples; "seconds"; "images": the attack's final picture per prompt (a
    tensor: left out of what is written as JSON)} for one pipeline."""
    from obliviate.models.diffusion import encode_images

    indices, texts, seeds, images = attack_targets(world, concept, t2i)
    with torch.no_grad():
        targets = encode_images(pipe, images)
    task = AttackTask(texts, seeds, targets, detect, original, concept_pairs(concept, texts), t2i.sample_steps,
                      t2i.guidance, concept, concept_paraphrases(concept, texts))
    t0 = time.time()
    rows, images = attack.attack(pipe, task)
    return {"aggregate": summarize(rows), "per_prompt": rows, "eval_indices": indices,
            "seconds": round(time.time() - t0, 2), "images": images}


def reference_attack(world, model: str, folder, concept: str, t2i, name: str, attack, detect, original) -> dict:
    """`attack_pipeline` on one of the world's own pipelines (original, retrain-<concept>), cached by settings."""
    from obliviate.models.diffusion import load_pipeline

    settings = {"attack": asdict(attack.config), "steps": t2i.sample_steps, "guidance": t2i.guidance,
                "eval_seeds": t2i.eval_seeds}
    if detect.key:  # a user's detector; the world classifier keeps the key its results had before
        settings["detector"] = detect.key
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    # prompt_attack keeps the file names its cached results had before the other attacks came
    stem = f"{model}-{concept}-{key}" if name == "prompt_attack" else f"{model}-{concept}-{name}-{key}"

    def attack_without_images() -> dict:
        pipe = original if model == "original" else load_pipeline(folder, original.device)
        result = attack_pipeline(world, pipe, concept, t2i, attack, detect, original)
        del result["images"]
        return result

    return cached_json(world.root / "attacks" / f"{stem}.json", attack_without_images)


def attack_erasure(world, pipe, concept: str, t2i, name: str, attack, method: str, detector=None,
                   original=None) -> dict:
    """The attack on the erased pipeline `pipe`, then on the original and (when the world has one) the retrain
    reference: {"per_item": {method: rows, "original": rows, "retrain": rows}, "seconds" (the erased pipeline's),
    "images" (its final picture per prompt), "eval_indices", "detector" (its description)}."""
    from obliviate.models.diffusion import load_pipeline

    detect = detector or concept_detector(world, concept)
    original = original or load_pipeline(world.pipeline_dir, pipe.device)
    mine = attack_pipeline(world, pipe, concept, t2i, attack, detect, original)
    per_item = {method: mine["per_prompt"]}
    references = [("original", world.pipeline_dir)]
    try:
        references.append((f"retrain-{concept}", world.retrain_dir(concept)))
    except ObliviateError:
        pass  # no reference for this concept: the attack still runs
    for model, folder in references:
        ref = reference_attack(world, model, folder, concept, t2i, name, attack, detect, original)
        per_item["original" if model == "original" else "retrain"] = ref["per_prompt"]
    return {"per_item": per_item, "seconds": mine["seconds"], "images": mine["images"],
            "eval_indices": mine["eval_indices"], "detector": detect.description}
