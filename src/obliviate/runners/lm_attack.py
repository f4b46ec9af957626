"""`obliviate attack` for language-model runs: load the run's models (the unlearned one, the model it started from,
the retrain reference), run each attack on all of them, and write RUN_DIR/attacks/<name>.json (the relearning
curves also as attacks/<name>.png)."""
from __future__ import annotations

from pathlib import Path

from obliviate.data import QAItem, TextItem
from obliviate.errors import ObliviateError
from obliviate.attacks.running import (attack_folder, run_attack, run_attacks, with_references,  # noqa: F401
                                       with_unguarded_row)
from obliviate.runs import resolve_device


def attack_target(run_dir: Path, config, log=print):
    """The run as its attacks see it (attacks.lm.common.Target). A guard run's model asks and scores through its
    guard (each load installs it afresh: an attack that fine-tunes or rounds the weights keeps the guard on)."""
    from obliviate.guards import read_guard
    from obliviate.runners.lm import load_model, prepare
    from obliviate.runs import apply_changed

    device = resolve_device(config.device)
    model_dir, forget, retain, _, world = prepare(config, log=lambda *_: None)  # the run built its world
    changed = Path(run_dir) / "changed.safetensors"
    guarded = read_guard(run_dir)

    def unlearned():
        model, tok = load_model(model_dir, config, device)
        apply_changed(model, changed)
        if guarded is not None:
            guarded[0].install(model, tok)
        return model.eval(), tok

    def original():
        model, tok = load_model(model_dir, config, device)
        return model.eval(), tok

    models = {config.method: unlearned, "original": original}
    retrain_dir = world.retrain_dir(config.split) if world is not None else config.retrain_model
    if retrain_dir:
        def retrain():
            model, tok = load_model(retrain_dir, config, device)
            return model.eval(), tok
        models["retrain"] = retrain
    return items_target(config.method, models, forget, retain, world, config.eval.batch_size)


def items_target(method: str, models: dict, forget: list, retain: list, world=None, batch_size: int = 32):
    """A Target from the unlearning sets (questions and texts) and, for the profiles world, its people's attributes."""
    from obliviate.attacks.lm.common import Target

    attributes = None
    if world is not None:
        from obliviate.worlds.profiles import FACTS

        attributes = [{"subject": p.name, "attribute": f.key, "value": p.facts[f.key],
                       "questions": [f.question.format(n=p.name), f.paraphrased_question.format(n=p.name)]}
                      for p in world.data().people for f in FACTS]
    forget_qa = [i for i in forget if isinstance(i, QAItem)]
    if not forget_qa:
        raise ObliviateError("the run's forget set has no questions: the language-model attacks ask questions")
    return Target(method, models, forget_qa, [i for i in retain if isinstance(i, QAItem)],
                  [i for i in forget if isinstance(i, TextItem)], [i for i in retain if isinstance(i, TextItem)],
                  attributes, batch_size=batch_size)


def attack_run(run_dir: Path, config, attacks: dict, log=print, skip_inapplicable: bool = False, **inputs) -> dict:
    """Each attack of `attacks` ({name: instance}) on the run's models; returns {name: result}. With
    `skip_inapplicable` (the default set) an attack the run cannot serve is skipped, with its reason logged."""
    if inputs:
        raise ObliviateError(f"language-model attacks take no {', '.join(inputs)} (a text-to-image detector)")
    return attack_folder(run_dir, config, attacks, attack_target, log, skip_inapplicable, "lm")
