"""The table of model families. Each family fills one small contract in its own place: an adapter (`models/`), a loop
built from the shared gradient step (`loops/`), its methods in their own folder (`methods/<family>/`), a runner
(`runners/`) with its cheap pre-run checks (`obliviate validate`) and a demo part (`demo/`). The CLI, the API and
the config look a family up here and never branch on it; a family never imports another family's loop, runner or
adapter (tests/test_families.py keeps that true). Entries are "module:object" strings, imported only when used,
so reading this table is instant."""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from obliviate.errors import ObliviateError


def require_extra(extra: str, *modules: str) -> None:
    """One line naming the pip extra that brings `modules` when one is not installed (the core install serves
    language models; pyproject.toml's extras add the rest). Looks for the modules without importing them."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module without a spec
            found = False
        if not found:
            raise ObliviateError(f"{module.split('.')[0]} is not installed: pip install 'obliviate[{extra}]'")


@dataclass(frozen=True)
class Family:
    name: str  # the `family` field of a run config
    title: str
    adapter: str  # module: how metrics and methods talk to the model
    loop: str  # the unlearning loop
    method_base: str
    runner: str  # RunConfig -> run folder
    export: str  # (changed.safetensors, base folder, out folder) -> a full model folder
    check: str  # RunConfig -> None, or an ObliviateError for what `run` would reject (cheap: `obliviate validate`)
    demo: str  # the demo part: (folder, log, **options) -> its JSON-ready part of the demo's summary
    worlds: tuple[str, ...]  # the built-in worlds that serve it
    subject: str  # the RunConfig key that says what is forgotten
    reuses: tuple[str, ...] = ()  # families whose loop and methods it runs through its own adapter
    evaluate: str = ""  # (RunConfig, out file) -> evaluation, for `obliviate eval` (empty: the language-model one)
    attack: str = ""  # (run folder, attack name, options, log) -> result, for `obliviate attack` (empty: none yet)
    forgets: str = ""  # RunConfig -> what the run forgets, in words (empty: "<subject> <value>", e.g. "concept star")
    extra: str = ""  # the pip extra that installs `needs` (pyproject.toml); empty: the core install serves it
    needs: tuple[str, ...] = ()  # modules the family imports beyond the core install
    hub: tuple[str, str] = ("transformers", "text-generation")  # an export's library and pipeline tag on the Hub

    def describe(self, config) -> str:
        """What a run of this family forgets, in words: `obliviate validate`'s and the model card's."""
        if self.forgets:
            return self.load("forgets")(config)
        return f"{self.subject} {getattr(config, self.subject)}"

    def load(self, part: str):
        """The object behind one of the contract's parts, e.g. family.load("runner"); a family whose extra is not
        installed stops here with one line naming it."""
        require_extra(self.extra, *self.needs)
        module, _, attr = getattr(self, part).partition(":")
        mod = importlib.import_module(module)
        return getattr(mod, attr) if attr else mod


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("lm", "language model", adapter="obliviate.models.causal_lm", loop="obliviate.loops.lm:unlearn",
           method_base="obliviate.methods.lm.base:Method",
           runner="obliviate.runners.lm:run", export="obliviate.runners.lm:export",
           check="obliviate.runners.lm_checks:check_lm", demo="obliviate.demo.lm:run_part", worlds=("profiles",),
           subject="split",
           attack="obliviate.runners.lm_attack:attack_run", forgets="obliviate.runners.lm_data:forgets"),
    # reuses the language-model loop and methods through its own adapter (the loop takes an adapter)
    Family("mllm", "vision-language model", adapter="obliviate.models.vlm", loop="obliviate.loops.lm:unlearn",
           method_base="obliviate.methods.lm.base:Method",
           runner="obliviate.runners.mllm:run", export="obliviate.runners.mllm:export",
           check="obliviate.runners.mllm_checks:check_mllm", demo="obliviate.demo.mllm:run_part",
           worlds=("portraits",), subject="split", reuses=("lm",),
           evaluate="obliviate.runners.mllm:evaluate_model", attack="obliviate.runners.mllm_attack:attack_run",
           extra="mllm", needs=("pyarrow", "torchmetrics"),
           hub=("transformers", "image-text-to-text")),
    Family("t2i", "text-to-image", adapter="obliviate.models.diffusion", loop="obliviate.loops.t2i:erase",
           method_base="obliviate.methods.t2i.base:DiffusionMethod",
           runner="obliviate.runners.t2i:run", export="obliviate.runners.t2i:export",
           check="obliviate.runners.t2i_checks:check_t2i",
           demo="obliviate.demo.t2i:run_part", worlds=("canvas",), subject="concept",
           attack="obliviate.runners.t2i_attack:attack_run", extra="t2i", needs=("diffusers", "torchmetrics"),
           hub=("diffusers", "text-to-image")),
)}


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ObliviateError(f"unknown family '{name}'; valid: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_world(world: str) -> Family:
    return next(f for f in FAMILIES.values() if world in f.worlds)
