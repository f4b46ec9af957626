"""`obliviate run` for vision-language models: the portraits world (or the user's LLaVA-style folder with MLLMU-Bench's
files), unlearned through the language-model loop with the vision-language adapter, evaluated with MLLMU-Bench's
protocol next to the original and the retrain reference, written as one run folder atomically."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from obliviate.config import RunConfig
from obliviate.errors import ObliviateError
from obliviate.models import vlm
from obliviate.runners.common import FamilyRun, Prepared, Trained
from obliviate.runs import claim_run_dir, resolve_device, write_json


def load_model(folder, config: RunConfig, device: str):
    """(model, processor), the tokenizer set to the run's prompt format and the parts outside
    `mllm.train_parts` frozen."""
    from obliviate.models import prompt_format

    model, processor = vlm.load(folder, config.dtype, device, config.trust_remote_code)
    t = config.template
    tokenizer = processor.tokenizer
    prompt_format.use(tokenizer, prompt_format.resolve(tokenizer, t.name, t.system_prompt, t.tags()))
    vlm.train_only(model, config.mllm.train_parts)
    return model, processor


def world_for(config: RunConfig):
    from obliviate.worlds.portraits import PortraitsWorld

    return PortraitsWorld(config.world)


def benchmark_retain_people(config: RunConfig) -> int | None:
    """Benchmark files score all their retain people (MLLMU-Bench scores its 475) unless `eval.retain_people` is set;
    the default of 40 is a world's."""
    return config.eval.retain_people if "retain_people" in config.eval.model_fields_set else None


def prepare(config: RunConfig, log=print):
    """(model folder, forget items, retain items, evaluation sets, picture source, label, world or None, data notes:
    what a run on benchmark files records about its data)."""
    notes: dict = {}
    if config.mllmu_dir:
        from obliviate.benchmark_files import load_mllmu

        if not config.model:
            raise ObliviateError("a run on MLLMU-Bench's files needs `model` (the vision-language model to unlearn)")
        bench = load_mllmu(config.mllmu_dir, config.split, benchmark_retain_people(config), config.mllm.train_dir)
        model_dir = Path(config.model)
        forget, retain, sets, pictures, label, world = (bench.forget, bench.retain, bench.eval_sets, bench.picture,
                                                        f"MLLMU-Bench {config.split}", None)
        notes = {"unlearning_data": bench.unlearning_data, "retain_people_scored": bench.retain_people["scored"],
                 "retain_people": bench.retain_people["of"], "membership_inference": bench.membership}
    else:
        world = world_for(config)
        world.build(config.split, retrain=True, log=log)
        forget, retain = world.unlearning_sets(config.split, config.forgotten_before)
        sets = world.eval_sets(config.split, config.eval.retain_people)
        pictures, label = world.pictures, f"portraits {config.split}"
        model_dir = Path(config.model) if config.model else world.full_model_dir
    if not model_dir.is_dir():
        raise ObliviateError(f"model folder not found: {model_dir}")
    return model_dir, forget, retain, sets, pictures, label, world, notes


def note_lines(notes: dict) -> list[str]:
    """The data notes as the terminal and the report say them."""
    if not notes:
        return []
    return [f"unlearning on {notes['unlearning_data']}",
            f"retain set: {notes['retain_people_scored']} of {notes['retain_people']} people scored"
            + (" (eval.retain_people)" if notes["retain_people_scored"] < notes["retain_people"] else ""),
            notes["membership_inference"]]


def folder_evaluation(folder, config: RunConfig, sets, pictures, device: str) -> dict:
    """The evaluation of the model in `folder`, loaded in the run's format."""
    model, processor = load_model(folder, config, device)
    return evaluation_of(model, processor, sets, pictures, config)


def evaluation_of(model, processor, sets, pictures, config: RunConfig) -> dict:
    from obliviate.evals import mllmu

    adapter = vlm.VisionLanguageAdapter(processor, pictures)
    judge = None
    if config.mllm.judge_model:
        from obliviate.evals.judge import load_judge
        from obliviate.models.sequences import model_device

        judge = load_judge(config.mllm.judge_model, str(model_device(model)), config.trust_remote_code)
    result = mllmu.evaluate(model, adapter, processor.tokenizer, sets, config.eval.batch_size,
                            config.mllm.max_new_tokens, config.mllm.few_shot, judge)
    return {**result, "prompt_format": adapter.format_record(processor.tokenizer)}


def world_evaluation(world, name: str, folder, config: RunConfig, sets, device: str) -> dict:
    """A world model's evaluation depends only on the world, the split and the evaluation settings: cached."""
    from obliviate.evals import PROTOCOL

    settings = [config.split, config.eval.model_dump(), config.mllm.max_new_tokens, config.template.model_dump(),
                PROTOCOL]
    settings += [config.mllm.few_shot] if config.mllm.few_shot else []
    settings += [config.mllm.judge_model] if config.mllm.judge_model else []
    return world.cached_evaluation(name, config.split, settings,
                                   lambda: folder_evaluation(folder, config, sets, world.pictures, device))


def user_original_evaluation(config: RunConfig, model_dir: Path, base: dict, sets, pictures, device: str) -> dict:
    """The user's original model (the folder the run unlearns) evaluated as the unlearned one is: the same sets,
    pictures, prompt format and settings. Cached under the cache root by the folder's content and those settings
    (runs.evaluation_cache), so the next run on the same folder reads it instead of evaluating again."""
    import numpy as np

    from obliviate.runs import cached_json, content_key, evaluation_cache

    images = sorted({i.image for items in sets.values() for i in items if i.image is not None})
    drawn = hashlib.sha256()
    for image in images:  # the pictures' pixels, as the model sees them
        array = np.ascontiguousarray(pictures(image))
        drawn.update(f"{image}:{array.shape}:{array.dtype}".encode())
        drawn.update(array.tobytes())
    settings = {"eval": config.eval.model_dump(), "template": config.template.model_dump(),
                "mllm": config.mllm.model_dump(exclude={"train_parts"}), "dtype": config.dtype,
                "device": str(device).split(":")[0], "data": content_key(sets), "pictures": drawn.hexdigest()}
    return cached_json(evaluation_cache("mllm", base, settings, config.world.cache_dir),
                       lambda: folder_evaluation(model_dir, config, sets, pictures, device))


def run(config: RunConfig, log=print, resume: bool = False) -> Path:
    from obliviate.runners.common import run as run_family

    return run_family(VisionLanguageRun(config), log, resume)


class VisionLanguageRun(FamilyRun):
    """A vision-language run: the portraits world or the user's LLaVA-style folder with MLLMU-Bench's files,
    unlearned through the language-model loop with the vision-language adapter, evaluated with MLLMU-Bench's protocol
    next to the original and the retrain reference."""
    label: str = ""
    notes: dict = {}
    retrain_eval: dict | None = None
    routing: dict | None = None  # a mixture-of-experts language model's routing before and after (evals/routing.py)

    def subject(self) -> str | None:
        return self.config.split

    def prepare(self, log) -> Prepared:
        model_dir, forget, retain, sets, pictures, self.label, world, self.notes = prepare(self.config, log)
        for line in note_lines(self.notes):
            log(line)
        return Prepared(model_dir, world, (forget, retain, sets, pictures))

    guard = None  # a generation-time guard's run: the guard, bound to the run's forget and retain items

    def unlearn(self, prepared: Prepared, method, device: str, checkpoints) -> Trained:
        from obliviate.evals.routing import moe_routing
        from obliviate.guards import is_guard
        from obliviate.loops.lm import unlearn
        from obliviate.loops.step import changed_tensors

        config = self.config
        forget, retain, sets, pictures = prepared.data
        if is_guard(method):  # no training and no changed tensors: the model asks and scores through the guard
            self.guard = method.bind_items(forget, retain)
            model, processor = load_model(prepared.model_dir, config, device)
            self.guard.install(model.eval(), processor.tokenizer)
            return Trained((model, processor), truncated=0)
        self.along = mllm_along(config, sets, pictures)  # train.eval_every
        model, processor = load_model(prepared.model_dir, config, device)
        adapter = vlm.VisionLanguageAdapter(processor, pictures)
        lora = config.lora and config.lora.model_copy(update={"target_modules": vlm.lora_targets(
            model, config.lora.target_modules, config.mllm.train_parts)})
        # an MoE language model: where its routers send the items' tokens (the pictures' with the text's)
        routing = moe_routing(model, processor.tokenizer, forget, retain, config.eval.batch_size, adapter)
        result = unlearn(model, processor.tokenizer, forget, retain, method, config.train, lora, adapter=adapter,
                         checkpoints=checkpoints, on_eval=self.along and self.along.bind(processor))
        if routing:
            self.routing = routing(result.model, method)
        return Trained((result.model, processor), result.history, result.seconds, result.stopped,
                       changed_tensors(result.model, result.trainable_names), result.truncated)

    def load_reference(self, prepared: Prepared, folder: Path, device: str) -> Trained:
        return Trained(load_model(folder, self.config, device), truncated=0)

    def describe(self, prepared: Prepared, trained: Trained) -> tuple[dict, dict]:
        config, processor = self.config, trained.model[1]
        return ({"split": config.split, "forget_set": self.label, "train_parts": config.mllm.train_parts},
                {"prompt_format": vlm.VisionLanguageAdapter(processor, prepared.data[3]).format_record(
                    processor.tokenizer), **({"mllmu_data": self.notes} if self.notes else {}),
                 **({"guard": self.guard_record()} if self.guard else {})})

    def guard_record(self) -> dict:
        """obliviate_guard.json: the guard, its settings and material, the run's prompt format (an export asks in
        it: `guards/mllm.load_guarded`) and the call that loads an export with it."""
        from obliviate.guards import LOAD_CALL

        t = self.config.template
        return {**self.guard.describe(), "prompt_format": {"name": t.name, "system_prompt": t.system_prompt,
                                                           "tags": t.tags()},
                "load": f"{LOAD_CALL}(FOLDER)"}

    def evaluate(self, prepared: Prepared, trained: Trained, metrics: dict, device: str, log) -> dict:
        from obliviate.evals.mllmu import compare_to_retrain

        config, world = self.config, prepared.world
        _, _, sets, pictures = prepared.data
        model, processor = trained.model
        t0 = time.time()
        evaluation = evaluation_of(model, processor, sets, pictures, config)
        metrics["eval_seconds"] = round(time.time() - t0, 2)
        model = trained.model = None  # the references are loaded next (unless cached): one model in memory at a time
        retrain_eval = None
        if world is not None:
            retrain_eval = world_evaluation(world, "retrain", world.retrain_dir(config.split), config, sets, device)
        elif config.retrain_model:
            retrain_eval = folder_evaluation(config.retrain_model, config, sets, pictures, device)
        if world is not None and not config.model:  # the world's full model: cached with the world
            original = world_evaluation(world, "original", world.full_model_dir, config, sets, device)
        else:  # the user's folder: cached by its content
            original = user_original_evaluation(config, prepared.model_dir, prepared.base, sets, pictures, device)
        metrics["original"] = (compare_to_retrain(original, retrain_eval) if retrain_eval is not None
                               else original)["aggregate"]
        if retrain_eval is not None:
            evaluation = compare_to_retrain(evaluation, retrain_eval)
            metrics["retrain"] = compare_to_retrain(retrain_eval, retrain_eval)["aggregate"]
        metrics.update(evaluation["aggregate"])
        if self.routing is not None:  # an MoE language model: how far unlearning moved its routers
            from obliviate.evals.routing import routing_metrics
            metrics.update(routing_metrics(self.routing))
        self.retrain_eval = retrain_eval
        return evaluation

    def along_metrics(self, evaluation: dict, metrics: dict) -> dict:
        return mllm_metrics(evaluation, self.retrain_eval)

    def write_files(self, folder: Path, evaluation: dict | None, metrics: dict) -> dict:
        if self.guard is not None:
            from obliviate.guards import GUARD_FILE
            write_json(folder / GUARD_FILE, self.guard_record())
        if self.routing is None:
            return {"notes": note_lines(self.notes)}
        from obliviate.evals.routing import routing_files

        shown = routing_files(folder, self.routing, f"{self.config.method} on {self.label}")
        return {**shown, "notes": note_lines(self.notes) + shown["notes"]}

    def scorecard(self, metrics: dict, evaluation: dict | None, title: str) -> None:
        if evaluation is not None:
            from obliviate.bench.scorecard import print_mllmu_table, run_rows
            print_mllmu_table(run_rows(metrics), title=f"{title} on {self.label} (MLLMU-Bench)")


def evaluate_model(config: RunConfig, out: Path) -> dict:
    """`obliviate eval` for a vision-language folder (`config.model`): MLLMU-Bench's protocol on the user's files or
    the portraits world, against `retrain_model` or the world's retrain model; written to `out` (JSON)."""
    from obliviate.evals.mllmu import compare_to_retrain
    from obliviate.runners.mllm_checks import check_mllm

    check_mllm(config)
    device = resolve_device(config.device)
    model_dir, _, _, sets, pictures, label, world, notes = prepare(config, log=lambda *_: None)
    result = folder_evaluation(model_dir, config, sets, pictures, device)
    reference = None
    if world is not None:
        reference = world_evaluation(world, "retrain", world.retrain_dir(config.split), config, sets, device)
    elif config.retrain_model:
        reference = folder_evaluation(config.retrain_model, config, sets, pictures, device)
    if reference is not None:
        result = compare_to_retrain(result, reference)
    result["forget_set"] = label
    result.update({"mllmu_data": notes} if notes else {})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    return result


def export(changed_path: Path, base: Path, out: Path) -> Path:
    """A full model folder (model + processor) that `AutoModelForImageTextToText` loads: the base with the run's
    changed tensors applied (the base is only read). A guard run's folder also holds its obliviate_guard.json:
    `obliviate.guards.load_guarded(out)` gives (model, processor) asking through the guard (transformers'
    `from_pretrained` alone gives the unguarded model)."""
    from obliviate.guards import GUARD_FILE, read_guard
    from obliviate.runs import apply_changed

    guarded = read_guard(Path(changed_path).parent)  # a bad record fails before anything is written
    model, processor = vlm.load(base)
    apply_changed(model, changed_path)
    with claim_run_dir(out) as folder:
        model.save_pretrained(folder.tmp)
        processor.save_pretrained(folder.tmp)
        if guarded is not None:
            write_json(folder.tmp / GUARD_FILE, guarded[1])
    return out


def mllm_along(config, sets, pictures):
    """A vision-language run's MLLMU-Bench evaluation (`runners.mllm.evaluation_of`); None without eval_every."""
    if not config.train.eval_every:
        return None
    from obliviate.runners.along import Along

    return Along(lambda model, processor: evaluation_of(model, processor, sets, pictures, config))


def mllm_metrics(evaluation: dict, retrain_eval: dict | None) -> dict:
    from obliviate.evals.mllmu import compare_to_retrain

    return (compare_to_retrain(evaluation, retrain_eval) if retrain_eval is not None else evaluation)["aggregate"]
