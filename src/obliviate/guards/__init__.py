"""Generation-time guards, for every family: methods that leave the weights alone and change how a model generates
(text-to-image: SLD, NegToMe, GoG in `guards/t2i/`; language and vision-language models: ICU and GUARD, shared in
`guards/text/`, each family's in `guards/lm/` and `guards/mllm/`).

A guard's result is a configuration, not changed tensors: its run records `describe()` in metrics.json and in
RUN_DIR/obliviate_guard.json, writes an empty changed.safetensors, and evaluates and attacks its model through the
guard. `obliviate export` writes the model folder with the same obliviate_guard.json beside it; `load_guarded(folder)`
loads that folder with the guard applied (the one documented call: diffusers' own `from_pretrained` gives the
unguarded model). Each family's guards live in `guards/<family>/` and are registered in the family's method table with
the guard marker (`registry.GuardEntry`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from obliviate.errors import ObliviateError

GUARD_FILE = "obliviate_guard.json"
LOAD_CALL = "obliviate.guards.load_guarded"


class Guard:
    """Base of every guard: `name`, a `Config` dataclass with the paper's defaults, the family it serves, and the
    concept it guards against (bound from the run's task: `bind`)."""
    name: str = ""
    Config: type = object
    family: str = ""
    guard = True  # what a runner asks to tell a guard from a method that changes weights
    paper: str = ""

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()
        self.concept: str | None = None

    def bind(self, concept: str) -> Guard:
        """The run's concept: what the guard steers away from (unless its config names its own)."""
        self.concept = concept
        return self

    def describe(self) -> dict:
        """The guard's record: enough to rebuild it (`from_record`)."""
        return {"guard": self.name, "family": self.family, "concept": self.concept,
                "config": dataclasses.asdict(self.config), "paper": self.paper}


def is_guard(method) -> bool:
    """Whether a method instance (or registry entry) is a generation-time guard."""
    return bool(getattr(method, "guard", False))


def from_record(record: dict, where: str = GUARD_FILE) -> Guard:
    """The guard a record (`describe()`'s dict) describes, its settings checked as a run's method_args are."""
    from obliviate.families import get
    from obliviate.methods.common import make_method

    if not isinstance(record, dict) or not {"guard", "family", "config"} <= set(record):
        raise ObliviateError(f"{where}: a guard record is a JSON object with guard, family and config")
    try:
        get(record["family"])
        guard = make_method(record["family"], record["guard"], record["config"])
    except ObliviateError as e:  # the file named, as for any bad input
        raise ObliviateError(f"{where}: {e}") from None
    if not is_guard(guard):
        raise ObliviateError(f"{where}: {record['guard']} is not a generation-time guard")
    if record.get("concept"):
        guard.bind(record["concept"])
    if record.get("material") is not None:  # what a language-model guard took from the run's items
        if not isinstance(record["material"], dict):
            raise ObliviateError(f"{where}: material must be a JSON object")
        guard.restore(record["material"])
    return guard


def read_guard(folder: str | Path) -> tuple[Guard, dict] | None:
    """(the guard, its whole record) of a run or exported folder holding obliviate_guard.json; None without one."""
    from obliviate.data import read_json_file

    path = Path(folder) / GUARD_FILE
    if not path.is_file():
        return None
    record = read_json_file(path, "guard record")
    return from_record(record, str(path)), record


def load_guarded(folder: str | Path, device: str = "cpu", **options):
    """The model in `folder` (an `obliviate export` of a guard run) with its guard applied: for a text-to-image
    folder a `GuardedPipeline`, whose `__call__(prompts, seeds)` returns images sampled through the guard; for a
    language model (model, tokenizer), whose every question and scoring pass goes through the guard
    (`guards/lm/__init__.py`); for a vision-language model (model, processor), the same with the run's prompt format
    (`guards/mllm/__init__.py`)."""
    found = read_guard(folder)
    if found is None:
        raise ObliviateError(f"{folder}: no {GUARD_FILE} (not an export of a guard run); load it as it is")
    guard, record = found
    if guard.family == "lm":
        from obliviate.guards.lm import load_guarded as load_lm
        return load_lm(folder, guard, device, **options)
    if guard.family == "mllm":
        from obliviate.guards.mllm import load_guarded as load_mllm
        return load_mllm(folder, guard, record, device, **options)
    if guard.family != "t2i":
        raise ObliviateError(f"{folder}: loading a {guard.family} guard is not supported yet")
    from obliviate.guards.t2i import GuardedPipeline
    return GuardedPipeline.load(folder, guard, record, device, **options)


def unguarded_row(method: str) -> str:
    """An attack result's row of a guard run's weights without the guard."""
    return f"{method} (unguarded)"


# an attack's caption on a guard run whose weights are the original's (every language-model guard run)
SAME_WEIGHTS = ("the guard changes no weight: its unguarded row is the same weights without the guard (here the "
                "original's), what the guard hides but the weights still hold")
