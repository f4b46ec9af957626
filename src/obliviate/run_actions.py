"""What can be done to a finished run folder, whatever its family: export it as a full model folder, attack it.
Below `api` (which re-exports these) so that the bench's engine can call them without importing `api`."""
from __future__ import annotations

from pathlib import Path

from obliviate.errors import ObliviateError
from obliviate.runs import read_run_config


def is_run_folder(folder: Path) -> bool:
    """A run folder (its run config and changed tensors), as opposed to a model folder."""
    return (folder / "config.json").is_file() and (folder / "changed.safetensors").is_file()


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
    if not is_run_folder(run_dir):
        raise ObliviateError(f"{run_dir} is not a run folder (no config.json and changed.safetensors)")
    config = read_run_config(run_dir)
    family = get(config.family)
    if not family.attack:
        raise ObliviateError(f"{run_dir} is a {family.title} run; no attack serves that family yet")
    names = DEFAULT_ATTACKS[config.family] if attacks is None else [attacks] if isinstance(attacks, str) else attacks
    entries = [lookup(ATTACKS, n, "attack") for n in names]
    for e in entries:
        if e.family != config.family:
            own = ", ".join(n for n, a in ATTACKS.items() if a.family == config.family)
            raise ObliviateError(f"{run_dir} is a {family.title} run; the {e.name} attack is for "
                                 f"{get(e.family).title} runs ({family.title} attacks: {own})")
    instances = attack_instances(entries, options or {})  # every option's type, before any model is loaded
    config = _run_base(run_dir, config)
    _check_writable_attacks(run_dir)
    # the family's default set runs the attacks that apply to the run and names those it skips; a named one that
    # does not apply is an error
    return family.load("attack")(run_dir, config, instances, log=log, skip_inapplicable=attacks is None, **inputs)


def _run_base(run_dir: Path, config):
    """The run's config with its base model as the run recorded it (an absolute path, so a run made with relative
    paths is attacked from any folder), refusing a base whose weight files changed since the run, as `export`
    does."""
    from obliviate.data import read_json_file
    from obliviate.runs import check_base

    env_path = run_dir / "environment.json"
    recorded = read_json_file(env_path, "run record") if env_path.is_file() else {}
    if not isinstance(recorded, dict):
        raise ObliviateError(f"{env_path}: a run record must be a JSON object")
    base = recorded.get("base_model")
    if not isinstance(base, str) or not Path(base).is_dir():
        return config  # the world's model, rebuilt from its recipe when its cache is gone; or an older record
    check_base(recorded, base)
    return config.model_copy(update={"model": base}) if config.model else config


def _check_writable_attacks(run_dir: Path) -> None:
    """RUN_DIR/attacks can be written (a read-only run folder fails here, in one line, before any model loads);
    the probe leaves nothing behind."""
    from obliviate.runs import _cannot_write, _probe_write

    folder = run_dir / "attacks"
    try:
        _probe_write(folder if folder.is_dir() else run_dir)
    except OSError as e:
        raise _cannot_write(folder, e) from None


def attack_instances(entries: list, options: dict) -> dict:
    """{name: the attack built from its Config}: a plain key goes to every attack whose Config has it, `name.key`
    to that attack alone; a key no named attack takes, or a bad value, is one line naming it."""
    import dataclasses
    import typing

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
    for name, cls in classes.items():
        hints = typing.get_type_hints(cls.Config)
        for field, value in args[name].items():
            if not _conforms(value, hints.get(field, typing.Any)):
                raise ObliviateError(f"attack option {name}.{field} must be {_describe(hints[field])}, got {value!r}")
    built = {}
    for name, cls in classes.items():
        try:
            built[name] = cls(cls.Config(**args[name]))
        except (TypeError, ValueError) as e:
            raise ObliviateError(f"options of the {name} attack: {e}") from None
    return built


def _conforms(value, hint) -> bool:
    """Whether an option's value is of its Config field's type (YAML-parsed: an int serves a float; a single item
    serves a sequence of such items, as the attacks' configs accept)."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):
        item = args[0] if args else typing.Any
        if isinstance(value, (list, tuple)):
            return all(_conforms(v, item) for v in value)
        return _conforms(value, item)
    if origin is dict:
        return isinstance(value, dict)
    return True


def _describe(hint) -> str:
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))
