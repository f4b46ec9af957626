"""`obliviate validate` for vision-language runs: everything `run` (runners/mllm.py `prepare`) would reject, checked
cheaply before any training: no model is loaded (a folder's processor is, to render the prompt format) and no world
is built."""
from __future__ import annotations

from pathlib import Path

from obliviate.config import RunConfig, check_run_folder
from obliviate.errors import ObliviateError
from obliviate.models import check_model_folder


def check_vlm_folder(folder: str | Path) -> Path:
    """A transformers vision-language folder: config.json (a JSON object) and a processor's config beside it."""
    folder = check_model_folder(folder)
    if not any((folder / n).is_file() for n in ("processor_config.json", "preprocessor_config.json")):
        raise ObliviateError(f"{folder}: no processor (processor_config.json or preprocessor_config.json); a "
                             "vision-language run needs the model's AutoProcessor saved beside it")
    return folder


def check_prompt_format(folder: str | Path, config: RunConfig) -> None:
    """What `run` renders before it trains: the folder's processor (no model loaded) puts a question with a picture in
    the run's prompt format, so a template that drops the question or the image token fails here as it would there."""
    import numpy as np

    from obliviate.models import prompt_format, vlm

    processor = vlm.load_processor(folder, config.trust_remote_code)
    tokenizer, t = processor.tokenizer, config.template
    prompt_format.use(tokenizer, prompt_format.resolve(tokenizer, t.name, t.system_prompt, t.tags()))
    vlm.VisionLanguageAdapter(processor, lambda _: np.zeros((8, 8, 3), np.uint8)).format_record(tokenizer)


def check_mllm(config: RunConfig) -> None:
    from obliviate import distributed
    from obliviate.runners.common import check_reference_run, method_of, refuse_world_material

    if distributed.active():
        raise ObliviateError("vision-language runs are not data parallel yet: run them as one process (no torchrun)")
    if config.train.checkpoint_every:
        raise ObliviateError("train.checkpoint_every is not supported for vision-language runs yet")
    if config.method == "UOE" and "language" not in config.mllm.train_parts:  # its expert is the language model's
        raise ObliviateError(f"UOE trains one expert of the language model and its router: mllm.train_parts "
                             f"{config.mllm.train_parts} must include 'language'")
    if config.mllmu_dir:
        from obliviate.benchmark_files import load_mllmu

        if not config.model:
            raise ObliviateError("a run on MLLMU-Bench's files needs `model` (the vision-language model to unlearn)")
        check_reference_run(config, own_model=True)
        refuse_world_material(config)
        bench = load_mllmu(config.mllmu_dir, config.split, train_dir=config.mllm.train_dir)  # every file and row
        from obliviate.guards import is_guard
        method = method_of(config)
        if is_guard(method):  # what a guard takes from the items (no model needed): before the claim
            method.bind_items(bench.forget, bench.retain)
        if config.forgotten_before:
            raise ObliviateError("forgotten_before names a split of the portraits world; on MLLMU-Bench's files, "
                                 "start from the earlier request's model")
    else:
        if config.mllm.train_dir:
            raise ObliviateError("mllm.train_dir is MLLMU-Bench's training split, for runs on its files (mllmu_dir)")
        if config.retrain_model:
            raise ObliviateError("retrain_model is for runs on your own files (mllmu_dir); the portraits world has "
                                 "its own retrain model")
        from obliviate.worlds.portraits import SPLITS, PortraitsWorld
        from obliviate.worlds.profiles import check_forgotten_before

        if config.split not in SPLITS:
            raise ObliviateError(f"unknown split '{config.split}'. Valid: {', '.join(SPLITS)}")
        check_forgotten_before(config.split, config.forgotten_before, PortraitsWorld(config.world).data().people,
                               SPLITS)
    if config.model:
        from obliviate.guards import GUARD_FILE, LOAD_CALL
        if (Path(config.model) / GUARD_FILE).is_file():  # a run would drop the guard and score the bare weights
            raise ObliviateError(f"{config.model} carries a generation-time guard ({GUARD_FILE}); runs on a guarded "
                                 f"folder are not supported yet: ask it with {LOAD_CALL}, or run on its base")
    for folder in (config.model, config.retrain_model):
        if folder:
            check_vlm_folder(folder)
            check_prompt_format(folder, config)
    if config.mllm.judge_model:
        check_model_folder(config.mllm.judge_model)
    check_run_folder(config)
