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


def export_run(run_dir: Path, out: Path, base: Path | None = None, push_to_hub: str | None = None,
               private: bool = False) -> Path:
    """Apply a run's changed.safetensors to its base model and save the result as a full model folder (a
    transformers folder, or a diffusers pipeline folder), through the run's family, with a model card (README.md:
    the base, what was forgotten, the method and settings, the headline metrics). The base is the one the run
    recorded (its absolute path) or `base`; either way its weight files must be those the run started from.
    `push_to_hub`: a Hub repository id (USER/NAME) to upload the folder to (`private`: a new repository is private)."""
    import shutil

    from obliviate.data import read_json_file
    from obliviate.families import get
    from obliviate.hub import HUB_ID, model_card
    from obliviate.runs import atomic_write, check_base

    run_dir, out = Path(run_dir), Path(out)
    changed_path = run_dir / "changed.safetensors"
    if not changed_path.is_file():
        raise ObliviateError(f"no changed.safetensors in {run_dir} (is it a run folder?)")
    if out.exists():
        raise ObliviateError(f"output folder already exists: {out}")
    if push_to_hub is not None and not HUB_ID.fullmatch(push_to_hub):
        raise ObliviateError(f"--push-to-hub {push_to_hub!r}: a Hub repository id looks like USER/NAME")
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
    card = model_card(run_dir, Path(base), push_to_hub or out.name)  # before the export: a bad record fails at once
    get(family).load("export")(changed_path, Path(base), out)
    try:
        atomic_write(out / "README.md", str(card))
    except BaseException:  # an export without its card is not the one asked for: nothing half-written stays
        shutil.rmtree(out, ignore_errors=True)
        raise
    if push_to_hub is not None:
        from obliviate.hub import push_to_hub as push

        push(out, push_to_hub, private=private, commit_message=f"obliviate export of {run_dir.name}")
    return out


def attack_run(run_dir: Path, attacks: str | list[str] | None = None, options: dict | None = None, log=print,
               **inputs) -> dict:
    """Recovery attacks on a run folder through its family's attack runner, each next to the original model and the
    retrain reference; each writes RUN_DIR/attacks/NAME.json (every model's aggregate, per-item rows, its cost) and
    the run's report shows them. `attacks`: registered names (None: the family's default set); `options`: the
    attacks' config keys, `key` for every named attack that has it or `attack.key` for one; `inputs`: what the
    family's runner takes besides (text-to-image: `detector`, `detector_label`). Returns {name: result}."""
    from obliviate.families import get
    from obliviate.registry import ATTACKS, DEFAULT_ATTACKS, lookup

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or not (run_dir / "changed.safetensors").is_file():
        raise ObliviateError(f"{run_dir} is not a run folder (no config.json and changed.safetensors)")
    config = read_run_config(run_dir)
    family = get(config.family)
    if not family.attack:
        raise ObliviateError(f"{run_dir} is a {family.title} run; no attack serves that family yet")
    names = DEFAULT_ATTACKS[config.family] if attacks is None else [attacks] if isinstance(attacks, str) else attacks
    entries = [lookup(ATTACKS, n, "attack") for n in names]
    for e in entries:
        if e.family != config.family:
            raise ObliviateError(f"{run_dir} is a {family.title} run; the {e.name} attack is for "
                                 f"{get(e.family).title} runs")
    return family.load("attack")(run_dir, config, attack_instances(entries, options or {}), log=log, **inputs)


def attack_instances(entries: list, options: dict) -> dict:
    """{name: the attack built from its Config}: a plain key goes to every attack whose Config has it, `name.key`
    to that attack alone; a key no named attack takes, or a bad value, is one line naming it."""
    import dataclasses

    classes = {e.name: e.load() for e in entries}
    fields = {name: {f.name for f in dataclasses.fields(cls.Config)} for name, cls in classes.items()}
    args: dict[str, dict] = {name: {} for name in classes}
    for key, value in options.items():
        name, _, field = key.rpartition(".")
        targets = [name] if name else [n for n in classes if field in fields[n]]
        if name and name not in classes:
            raise ObliviateError(f"attack option {key!r}: {name!r} is not among the attacks run ({', '.join(classes)})")
        if not targets or (name and field not in fields[name]):
            valid = sorted({f"{n}.{f}" if name else f for n in (targets or classes) for f in fields[n]})
            raise ObliviateError(f"unknown attack option {key!r}; valid: {', '.join(valid)}")
        for n in targets:
            args[n][field] = value
    built = {}
    for name, cls in classes.items():
        try:
            built[name] = cls(cls.Config(**args[name]))
        except (TypeError, ValueError) as e:
            raise ObliviateError(f"options of the {name} attack: {e}") from None
    return built
