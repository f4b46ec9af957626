"""`obliviate validate` for language-model runs: everything `run` (runners/lm.py `prepare`) would reject, checked
cheaply before any training: no model is loaded and no world is built."""
from __future__ import annotations

from obliviate.config import RunConfig, check_run_folder
from obliviate.data import check_disjoint, load_lines, load_tofu_utility
from obliviate.errors import ObliviateError
from obliviate.models import check_model_folder


def check_lm(config: RunConfig) -> None:
    from obliviate.runners.common import check_reference_run, refuse_world_material
    from obliviate.runners.lm_data import user_data, uses_user_data
    from obliviate.worlds.profiles_dp2 import check_run as check_dp2_run

    check_dp2_run(config, own_model=bool(uses_user_data(config) or config.model))

    sources = [k for k in ("forget_file", "tofu_dir", "muse_dir") if getattr(config, k)]
    if len(sources) > 1:
        raise ObliviateError(f"{' and '.join(sources)}: give one source of forget and retain data")
    if uses_user_data(config):
        if config.forgotten_before:
            raise ObliviateError("forgotten_before names a split of the built-in world; on your own files, start "
                                 "from the earlier request's model and give the files of this one")
        if (config.forget_file or config.retain_file) and not (config.forget_file and config.retain_file):
            raise ObliviateError("forget_file and retain_file go together, with `model` (the model to unlearn)")
        if not config.model:
            raise ObliviateError("a run on your own files needs `model` (the model to unlearn)")
        check_reference_run(config, own_model=True)
        refuse_world_material(config)
        forget, retain, _ = user_data(config)  # every file read, every set's role known
        check_disjoint(forget, retain)
    else:
        from obliviate.runners.lm import world_for
        from obliviate.worlds.profiles import check_forgotten_before, check_split

        for key in ("eval_sets", "retrain_model", "retrain_eval"):
            if getattr(config, key):
                raise ObliviateError(f"{key} is for runs on your own files (forget_file, tofu_dir or muse_dir); "
                                     "the built-in world has its own sets and retrain model")
        check_split(config.split)
        world = world_for(config)
        world.check_target(config.split)  # the corrupted world (RESTOR) takes its corrupted split only
        if config.forgotten_before and config.world.corrupt is not None:
            raise ObliviateError("forgotten_before: the corrupted world (world.corrupt) has one forget set, its "
                                 "corrupting documents; sequential requests are not defined on it")
        check_forgotten_before(config.split, config.forgotten_before, world.data().people)
        if config.world.tofu_dir:
            load_tofu_utility(config.world.tofu_dir)
    if config.retrain_model and config.retrain_eval:
        raise ObliviateError("retrain_model and retrain_eval: give one retrain reference")
    if config.retrain_model:
        check_model_folder(config.retrain_model)
    if config.retrain_eval:
        from obliviate.evals.reference_logs import read_retrain_eval
        read_retrain_eval(config.retrain_eval)
    if config.model:
        check_model_folder(config.model)
        from pathlib import Path

        from obliviate.guards import GUARD_FILE, LOAD_CALL
        if (Path(config.model) / GUARD_FILE).is_file():  # a run would drop the guard and score the bare weights
            raise ObliviateError(f"{config.model} carries a generation-time guard ({GUARD_FILE}); runs on a guarded "
                                 f"folder are not supported yet: ask it with {LOAD_CALL}, or run on its base")
        from obliviate.models import causal_lm, prompt_format

        # the template must serve this tokenizer (a "chat" template it lacks, a template that breaks the prefix)
        t = config.template
        prompt_format.resolve(causal_lm.load_tokenizer(config.model, config.trust_remote_code), t.name,
                              t.system_prompt, t.tags())
    if config.idk_file:
        load_lines(config.idk_file)
    if getattr(config, "harness", None) is not None:  # lm-evaluation-harness's files, every row, before training
        from obliviate.evals.harness import plan
        plan(config.harness)
    from obliviate import sharding

    sharding.check(config.train, config.lora)
    check_run_folder(config)
