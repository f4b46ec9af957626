"""`obliviate attack` for vision-language runs: load the run's models (the unlearned one, the model it started from, the
retrain reference) as the run loaded them, run each attack on all of them, and write RUN_DIR/attacks/<name>.json (the
relearning curves also as attacks/<name>.png). A guard run's unlearned model asks, scores and is fine-tuned through
its guard (each load installs it afresh); its results gain the `(unguarded)` row, as a language-model guard run's do
(`attacks/running.py`)."""
from __future__ import annotations

from pathlib import Path

from obliviate.attacks.running import attack_folder
from obliviate.errors import ObliviateError
from obliviate.runs import resolve_device


# a guard run's relearning result says what it fine-tuned
RELEARNED_UNDER_GUARD = ("relearning fine-tunes the run's weights (a guard changes none) with the guard installed, "
                         "and scores them through it")


def attack_target(run_dir: Path, config, log=print):
    """The run as its attacks see it (attacks.mllm.common.Target)."""
    from obliviate.attacks.mllm.common import Target
    from obliviate.guards import read_guard
    from obliviate.runners.mllm import load_model, prepare
    from obliviate.runs import apply_changed

    device = resolve_device(config.device)
    model_dir, forget, retain, sets, pictures, _, world, _ = prepare(config, log=lambda *_: None)  # the run built it
    changed = Path(run_dir) / "changed.safetensors"
    guarded = read_guard(run_dir)

    def unlearned():
        model, processor = load_model(model_dir, config, device)
        apply_changed(model, changed)
        if guarded is not None:
            guarded[0].install(model, processor.tokenizer)
        return model.eval(), processor

    def loader(folder):
        def load():
            model, processor = load_model(folder, config, device)
            return model.eval(), processor
        return load

    models = {config.method: unlearned, "original": loader(model_dir)}
    retrain_dir = world.retrain_dir(config.split) if world is not None else config.retrain_model
    if retrain_dir:
        models["retrain"] = loader(retrain_dir)
    return Target(config.method, models, forget, retain, sets.get("forget", []), pictures,
                  biographies(config, world), batch_size=config.eval.batch_size,
                  max_new_tokens=config.mllm.max_new_tokens)


def biographies(config, world) -> dict[str, str]:
    """{forget person: profile text}: MLLMU-Bench's `biography` column, or the portraits world's biographies."""
    if world is None:
        from obliviate.benchmark_files import mllmu_biographies

        return mllmu_biographies(config.mllmu_dir, config.split)
    forget, _ = world.data().split_people(config.split)
    return {p.name: p.biography().text for p in forget}


def attack_run(run_dir: Path, config, attacks: dict, log=print, skip_inapplicable: bool = False, **inputs) -> dict:
    """Each attack of `attacks` ({name: instance}) on the run's models; returns {name: result}. With
    `skip_inapplicable` (the default set) an attack the run cannot serve is skipped, with its reason logged."""
    if inputs:
        raise ObliviateError(f"vision-language attacks take no {', '.join(inputs)} (a text-to-image detector)")
    return attack_folder(run_dir, config, attacks, attack_target, log, skip_inapplicable, "mllm", guarded_relearn_caption=RELEARNED_UNDER_GUARD)
