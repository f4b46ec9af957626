"""The run routine every family shares (`run`): check the config, claim the run folder, get the run's model (the
method's unlearning, or the world's retrain reference), evaluate it, write the record, the changed tensors and the
report atomically, turn a non-finite loss into an error, finish the distributed processes and print the scorecard.
A family's runner fills in a `FamilyRun` with only what is its own: its data and model, its unlearning loop, its
evaluation and its extra files.

The retrain reference is no method: a run with `method = "Retrain"` (`method_args = {seed = S}`, default 0) takes
the built-in world's model trained without the forget set with training seed S, and is evaluated like any unlearned
model against the seed-0 reference (seed 1 against seed 0 is the noise floor)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from obliviate.errors import NonFiniteLoss, ObliviateError


@dataclass
class Prepared:
    """What a family's `prepare` found: the model folder the run starts from, the built-in world (None on the user's
    own model) and the family's data (forget and retain items, evaluation sets; its own shape)."""
    model_dir: Path
    world: object | None
    data: object = None
    base: dict | None = None  # the run's base record (runs.base_record), set by `run` before the unlearning


@dataclass
class Trained:
    """The run's model and what the run records of how it came about. `model` is what the family's evaluation takes
    (model and tokenizer, model and processor, a pipeline); `reference` is the retrain seed when the model is the
    world's retrain reference (None after a method)."""
    model: object
    history: list = field(default_factory=list)
    seconds: float = 0.0
    stopped: str | None = None
    tensors: dict = field(default_factory=dict)  # the changed tensors, as changed.safetensors names them
    truncated: int | None = None  # items cut to the model's context (None: the family has no context limit)
    reference: int | None = None


class FamilyRun:
    """What one family's runner supplies to `run`. Subclasses implement `prepare`, `unlearn`, `load_reference`,
    `describe` and `evaluate`; the rest has defaults."""

    def __init__(self, config):
        self.config = config

    def check(self) -> None:
        """The family's cheap checks (`obliviate validate`'s), before the claim, the world and the training."""
        from obliviate.families import get
        get(self.config.family).load("check")(self.config)

    def subject(self) -> str | None:
        """What the run folder's default name says is forgotten (None: the family's subject key)."""
        return None

    def prepare(self, log) -> Prepared:
        raise NotImplementedError

    def unlearn(self, prepared: Prepared, method, device: str, checkpoints) -> Trained:
        """The method's unlearning of `prepared.model_dir`, with its changed tensors."""
        raise NotImplementedError

    def load_reference(self, prepared: Prepared, folder: Path, device: str) -> Trained:
        """The retrain reference in `folder` as the run's model (no history, no changed tensors)."""
        raise NotImplementedError

    def describe(self, prepared: Prepared, trained: Trained) -> tuple[dict, dict]:
        """The family's fields of metrics.json: those before the run's status and those after it."""
        raise NotImplementedError

    def evaluate(self, prepared: Prepared, trained: Trained, metrics: dict, device: str, log) -> dict | None:
        """Evaluate the run's model (config.evaluate is set), adding the numbers to `metrics`; the evaluation's
        "per_item" rows become per_item.json. The model may be dropped (`trained.model = None`) once evaluated."""
        raise NotImplementedError

    def evaluate_share(self, prepared: Prepared, trained: Trained, device: str) -> None:
        """A data-parallel process other than the first: its share of the evaluation (families that run so)."""
        raise ObliviateError(f"{self.config.family} runs are not data parallel")

    def write_files(self, folder: Path, evaluation: dict | None, metrics: dict) -> dict:
        """The family's own files in the run folder, beside the ones every run writes; returns what the report shows
        besides the metrics (write_run_report's `grids` and `notes`)."""
        return {}

    def scorecard(self, metrics: dict, evaluation: dict | None, title: str) -> None:
        """The headline numbers on the terminal."""

    # evaluation along the way (train.eval_every; runners/along.py): the family's `unlearn` sets it
    along = None

    def along_metrics(self, evaluation: dict, metrics: dict) -> dict:
        """metrics.json's aggregate keys of an evaluation made along the way, once the run's references are known."""
        return evaluation["aggregate"]


def reference_seed(config) -> int | None:
    """The retrain seed of a retrain-reference run (`method = "Retrain"`, `method_args = {seed = S}`, default 0),
    or None for a method's run; bad method_args fail in one line."""
    from obliviate.registry import RETRAIN, is_reference

    if not is_reference(config.method):
        return None
    args = dict(config.method_args or {})
    unknown = sorted(set(args) - {"seed"})
    if unknown:
        raise ObliviateError(f"method_args: unknown key(s) {unknown} for {RETRAIN.name}; valid: ['seed']")
    seed = args.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ObliviateError(f"method_args for {RETRAIN.name}: seed must be an integer >= 0, got {seed!r}")
    return seed


def method_of(config):
    """The run's method instance, or None for a retrain-reference run; either way the method and its method_args are
    checked (one line naming the key)."""
    from obliviate.methods.common import make_method
    from obliviate.registry import is_world_recipe

    if reference_seed(config) is not None or is_world_recipe(config.family, config.method):
        return None  # a world recipe's settings are the world's, checked by the family's check
    return make_method(config.family, config.method, config.method_args)


def world_material(method, world) -> dict:
    """What a method takes from the run's built-in world (None: the user's own data) before training, and the
    entries metrics.json keeps of it (AltPO's "alternates": where they came from); {} for most methods, for the
    retrain reference (None) and for a guard, which trains nothing."""
    from obliviate.guards import is_guard

    if method is None or is_guard(method):
        return {}
    return method.from_world(world) or {}


def refuse_world_material(config) -> None:
    """A run on the user's own data whose method asks for a built-in world's material (AltPO's alternates =
    "world"): the method's one line. The families' checks call it on such runs (`obliviate validate`)."""
    from obliviate.guards import is_guard

    method = method_of(config)
    if method is not None and not is_guard(method) and method.needs_world:
        method.from_world(None)


def check_reference_run(config, own_model: bool) -> None:
    """A retrain-reference run needs a built-in world: a user's own model has no recipe to repeat. Every family's
    check calls this, on whether the run is on the user's own model."""
    from obliviate.config import RUN_CONFIGS
    from obliviate.families import get
    from obliviate.registry import RETRAIN, is_reference

    if own_model and is_reference(config.method):
        family = get(config.family)
        own = ("; on your own model, give your retrain reference as `retrain_model` and run a method"
               if "retrain_model" in RUN_CONFIGS[config.family].model_fields else "")
        raise ObliviateError(f"{RETRAIN.name} needs a built-in world ({', '.join(family.worlds)}): it is the "
                             f"world's model retrained without the forget set{own}")


def reference_folder(config, world, seed: int, log=print) -> Path:
    """The folder of the world's retrain reference of the run's target (split or concept) trained with `seed`: seed 0
    is the reference the world's build made; another seed is built on demand (cached beside it)."""
    from obliviate.families import get

    if world is None:  # check_reference_run refused it before the claim
        raise ObliviateError("the retrain reference needs a built-in world")
    target = getattr(config, get(config.family).subject)
    return world.retrain_dir(target) if seed == 0 else world.ensure_retrain(target, seed, log=log)


def run_title(config) -> str:
    """The run's model in words: the method, or the retrain reference and its seed."""
    seed = reference_seed(config)
    return config.method if not seed else f"{config.method} (seed {seed})"


def run(family_run: FamilyRun, log=print, resume: bool = False) -> Path:
    """Unlearn (or take the retrain reference), evaluate and write one run folder for `family_run.config`."""
    from obliviate import distributed
    from obliviate.loops.step import Checkpoints
    from obliviate.runs import base_record, claim_run_dir, resolve_device, run_folder, write_json, write_run_record

    config = family_run.config
    method = method_of(config)
    family_run.check()  # what can be checked in a moment fails before the claim, the world and the training
    seed = reference_seed(config)
    started = datetime.now(timezone.utc)
    state = distributed.setup()  # several processes (torchrun / accelerate launch): data parallel
    device = str(state.device) if state is not None else resolve_device(config.device)
    out = run_folder(config, started, family_run.subject())
    if state is not None and config.train.checkpoint_every:
        raise ObliviateError("train.checkpoint_every is not supported with several processes yet")
    if not distributed.is_main():
        return _run_on_a_worker(family_run, method, seed, device, out)
    checkpoints = Checkpoints.for_run(config, resume)
    # the name is claimed and the output proven writable before any world build or training
    with claim_run_dir(out, log=log) as folder:
        prepared = family_run.prepare(log)
        material = world_material(method, prepared.world)  # before the barrier: the workers read what it wrote
        reference = reference_folder(config, prepared.world, seed, log) if seed is not None else None
        distributed.barrier()  # the other processes read the world (and the reference) this one built
        # a reference run's model is the reference itself: its folder is the base and no tensor changes
        base = prepared.base = base_record(reference or prepared.model_dir)
        trained = (family_run.unlearn(prepared, method, device, checkpoints) if reference is None
                   else _reference(family_run, prepared, reference, seed, device))
        head, tail = family_run.describe(prepared, trained)
        metrics: dict = {"method": config.method, **head, "unlearn_seconds": round(trained.seconds, 2),
                         "status": "stopped" if trained.stopped else "completed", "stopped": trained.stopped,
                         **({"truncated_items": trained.truncated} if trained.truncated is not None else {}),
                         **tail, **material}
        evaluation = family_run.evaluate(prepared, trained, metrics, device, log) if config.evaluate else None
        trained.model = None  # one model in memory at a time from here

        tmp = folder.tmp
        write_run_record(tmp, config, started, base, device, trained.history, metrics)
        if family_run.along is not None:
            family_run.along.write(tmp, lambda evaluation: family_run.along_metrics(evaluation, metrics))
        if evaluation is not None:
            write_json(tmp / "per_item.json", evaluation["per_item"])
        shown = family_run.write_files(tmp, evaluation, metrics)
        from safetensors.torch import save_file
        # a reference run's file is empty: export and attack then take its base, the reference, as it is
        save_file(trained.tensors, str(tmp / "changed.safetensors"), metadata={"base_model": base["base_model"]})
        from obliviate.bench.report import write_run_report
        write_run_report(tmp, metrics, trained.history, **shown)
    checkpoints.done()  # the run folder is in place: its checkpoint is no longer needed
    distributed.finish()
    if trained.stopped:
        raise NonFiniteLoss(f"{config.method} stopped: {trained.stopped}. Last good state saved in {out}")
    family_run.scorecard(metrics, evaluation, run_title(config))
    log(f"run folder: {out}")
    return out


def _reference(family_run: FamilyRun, prepared: Prepared, folder: Path, seed: int, device: str) -> Trained:
    trained = family_run.load_reference(prepared, folder, device)
    trained.reference = seed
    return trained


def _run_on_a_worker(family_run: FamilyRun, method, seed: int | None, device: str, out: Path) -> Path:
    """A data-parallel process other than the first: the same unlearning on its share of each batch (the gradients
    are averaged, so its model ends as the first's), then its share of the evaluation; the first process gathers
    the evaluation and alone writes the run folder."""
    from obliviate import distributed

    quiet = lambda *_: None  # noqa: E731
    distributed.barrier()  # the first process has built the world and the reference
    prepared = family_run.prepare(quiet)
    world_material(method, prepared.world)  # the file the first process wrote
    if seed is None:
        trained = family_run.unlearn(prepared, method, device, None)
    else:
        folder = reference_folder(family_run.config, prepared.world, seed, quiet)
        trained = _reference(family_run, prepared, folder, seed, device)
    if family_run.config.evaluate:
        family_run.evaluate_share(prepared, trained, device)
    distributed.finish()  # waits for the first process to write the run folder
    return out
