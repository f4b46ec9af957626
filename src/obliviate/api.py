"""Entry points shared by the CLI and notebooks that are more than a single call."""
from __future__ import annotations

import os
from pathlib import Path

from obliviate.errors import ObliviateError
from obliviate.runs import read_run_config, write_json


def evaluate_folder(model_dir: Path, out: Path, *, force: bool = False, split: str = "forget10",
                    world_tofu_dir: Path | None = None, world: str | None = None, **options) -> dict:
    """Evaluate a transformers folder: on the user's files (forget_file + retain_file, tofu_dir or muse_dir, plus
    eval_sets with their roles, against retrain_model or retrain_eval when given), or on the profiles world's sets
    against its retrain model; a vision-language folder with `mllmu_dir` (MLLMU-Bench's files) or `world =
    "portraits"` through its family's evaluation. `options` are run-config keys (batch size and max_logit_tokens
    go under `eval`,
    `template` is a name or a mapping, device, dtype, trust_remote_code), checked as a run config is. An existing
    `out` is replaced only with `force`; an input file never is."""
    from obliviate.config import build_config
    from obliviate.evals.evaluate import compare_to_retrain
    from obliviate.runners.lm import (evaluation_of, format_record, load_model, prepare, retrain_evaluation,
                                      user_retrain_evaluation)
    from obliviate.runners.lm_data import uses_user_data
    from obliviate.runners.lm_checks import check_lm
    from obliviate.runs import resolve_device

    eval_keys = {k: options.pop(k) for k in ("batch_size", "max_logit_tokens") if options.get(k) is not None}
    template = options.pop("template", None) or {}
    template = {"name": template} if isinstance(template, str) else dict(template)
    if (system_prompt := options.pop("system_prompt", None)) is not None:
        template["system_prompt"] = system_prompt
    data = {"method": "GradDiff",  # any method: evaluation trains nothing, the config only carries the options
            "model": str(model_dir), "split": split, "eval": eval_keys, **({"template": template} if template else {}),
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in options.items() if v not in (None, [], ())}}
    if world_tofu_dir:
        data["world"] = {"tofu_dir": str(world_tofu_dir)}
    if world:
        data["world"] = {**data.get("world", {}), "name": world}
    config = build_config(data, "eval options")
    inputs = [Path(f) for f in (config.forget_file, config.retain_file, config.retrain_eval) if f]
    _check_out_file(Path(out), inputs + [Path(s.file) for s in config.eval_sets], Path(model_dir), force)
    from obliviate.families import get

    family = get(config.family)
    if family.evaluate:  # a family with its own evaluation (vision-language: MLLMU-Bench's protocol)
        return family.load("evaluate")(config, Path(out))
    check_lm(config)
    device = resolve_device(config.device)
    model_path, _, _, (qa_sets, texts, roles, label), world = prepare(config, log=lambda *_: None)
    model, tok = load_model(model_path, config, device)
    result = evaluation_of(model, tok, qa_sets, texts, config.eval, roles=roles)
    if world is not None:
        reference = retrain_evaluation(world, split, config.eval, qa_sets, texts, config.device)
    else:
        reference = user_retrain_evaluation(config, qa_sets, texts, roles, device) if uses_user_data(config) else None
    if reference is not None:
        result = compare_to_retrain(result, reference)
    result["forget_set"], result["prompt_format"] = label, format_record(tok)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    return result


def _check_out_file(out: Path, inputs: list[Path], model_dir: Path, force: bool) -> None:
    """Before any model is loaded (minutes), so a bad --out fails at once: never an input, never a folder, and an
    existing file only with --force."""
    def same(a: Path, b: Path) -> bool:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))

    for f in inputs:
        if same(out, f):
            raise ObliviateError(f"--out {out} is the input file {f}; choose another output file")
    if out.is_dir():
        raise ObliviateError(f"--out {out} is a folder; give a file name")
    if out.exists() and model_dir.is_dir() and out.resolve().is_relative_to(model_dir.resolve()):
        raise ObliviateError(f"--out {out} is a file of the model folder {model_dir}; choose another output file")
    existing = next(p for p in out.absolute().parents if p.exists())  # the folders below it are made at the end
    if not existing.is_dir():
        raise ObliviateError(f"--out {out}: {existing} is not a folder")
    if out.exists() and not force:
        raise ObliviateError(f"--out {out} already exists; pass --force to overwrite it")


def export_run(run_dir: Path, out: Path, base: Path | None = None) -> Path:
    """Apply a run's changed.safetensors to its base model and save the result as a full model folder (a
    transformers folder, or a diffusers pipeline folder), through the run's family. The base is the one the run
    recorded (its absolute path) or `base`; either way its weight files must be those the run started from."""
    from obliviate.data import read_json_file
    from obliviate.families import get
    from obliviate.runs import check_base

    run_dir, out = Path(run_dir), Path(out)
    changed_path = run_dir / "changed.safetensors"
    if not changed_path.is_file():
        raise ObliviateError(f"no changed.safetensors in {run_dir} (is it a run folder?)")
    if out.exists():
        raise ObliviateError(f"output folder already exists: {out}")
    family = read_run_config(run_dir).family
    env_path = run_dir / "environment.json"
    recorded = read_json_file(env_path, "run record") if env_path.is_file() else {}
    if not isinstance(recorded, dict):
        raise ObliviateError(f"{env_path}: a run record must be a JSON object")
    if base is None:
        if "base_model" not in recorded:
            raise ObliviateError(f"{run_dir} records no base model; pass --base")
        base = Path(recorded["base_model"])
    if not Path(base).is_dir():
        raise ObliviateError(f"base model folder not found: {base}")
    check_base(recorded, base)
    return get(family).load("export")(changed_path, Path(base), out)


def attack_run(run_dir: Path, attack=None, log=print) -> dict:
    """The adversarial prompt attack (UnlearnDiffAtk) on a canvas-world text-to-image run, next to the original
    pipeline and the retrain reference; writes RUN_DIR/attack.json and returns it."""
    import json

    from obliviate.attacks.canvas import attack_erasure
    from obliviate.families import get
    from obliviate.registry import ATTACKS
    from obliviate.runners.t2i import load_run_pipeline
    from obliviate.runs import resolve_device
    from obliviate.worlds.canvas import CanvasWorld

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or not (run_dir / "changed.safetensors").is_file():
        raise ObliviateError(f"{run_dir} is not a run folder (no config.json and changed.safetensors)")
    config = read_run_config(run_dir)
    entry = ATTACKS["prompt_attack"]
    if config.family != entry.family:
        raise ObliviateError(f"{run_dir} is a {get(config.family).title} run; the prompt attack is for "
                             f"{get(entry.family).title} runs")
    if config.world.name != "canvas" or config.forget_prompts:
        raise ObliviateError("the prompt attack needs a detector for the concept: only canvas-world runs can be "
                             "attacked (the world's classifier is the detector)")
    world = CanvasWorld.from_config(config.world)
    world.require_built()
    base = Path(config.model) if config.model else world.pipeline_dir
    pipe = load_run_pipeline(run_dir / "changed.safetensors", base, resolve_device(config.device))
    log(f"attacking {config.method}'s erasure of {config.concept!r} (and the original and retrain reference)")
    result = {"method": config.method, "concept": config.concept,
              **attack_erasure(world, pipe, config.concept, config.t2i, attack)}
    _save_attack_grid(run_dir, config.method, result.pop("images"), result["per_prompt"])
    write_json(run_dir / "attack.json", result)
    from obliviate.bench.report import rewrite_report
    rewrite_report(run_dir)  # the run's page now shows the attack's pictures too
    return result


def _save_attack_grid(run_dir: Path, method: str, images, rows: list[dict], columns: int = 8) -> None:
    """attack.png: the picture each of the first `columns` forget prompts ended with under attack, those the attack
    broke first."""
    from obliviate.bench.grids import image_grid

    def outcome(row: dict) -> str:
        return "drawn without attack" if row["pre_success"] else "concept back" if row["success"] else "held"

    rank = {"concept back": 0, "drawn without attack": 1, "held": 2}
    order = sorted(range(len(rows)), key=lambda i: rank[outcome(rows[i])])[:columns]
    captions = [f"{rows[i]['text']} ({outcome(rows[i])})" for i in order]
    import io

    from obliviate.runs import atomic_write

    buffer = io.BytesIO()
    image_grid([(f"{method} attacked", images[order])], captions).save(buffer, format="PNG")
    atomic_write(run_dir / "attack.png", buffer.getvalue())
