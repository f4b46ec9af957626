"""`obliviate validate` for text-to-image runs: everything `run` (runners/t2i.py `prepare`, loops/t2i.py
`check_task`) would reject, checked cheaply before any training: no pipeline is loaded and no world is built."""
from __future__ import annotations

from obliviate.config import RunConfig, check_run_folder
from obliviate.errors import ObliviateError


def check_t2i(config: RunConfig) -> None:
    from obliviate import distributed
    from obliviate.data import load_prompts
    from obliviate.models.diffusion import check_folder
    from obliviate.runners.common import check_reference_run

    if distributed.active():  # every process would erase alone and write the same run folder
        raise ObliviateError("text-to-image runs are not data parallel yet: run them as one process (no torchrun)")
    if not config.concept.strip():
        raise ObliviateError("the concept to erase is empty")
    if config.forget_prompts or config.retain_prompts:
        if not (config.forget_prompts and config.retain_prompts and config.model):
            raise ObliviateError("forget_prompts and retain_prompts go together, with `model` (the pipeline folder)")
        check_reference_run(config, own_model=True)
        forget = load_prompts(config.forget_prompts, must_contain=config.concept)
        retain = load_prompts(config.retain_prompts)
        overlap = set(forget) & set(retain)
        if overlap:
            raise ObliviateError(f"{len(overlap)} prompt(s) are both forget and retain prompts, e.g. "
                                 f"{sorted(overlap)[0]!r}")
    else:
        if config.world.name != "canvas":
            raise ObliviateError("a text-to-image run needs world.name = 'canvas', or `model` with forget_prompts "
                                 "and retain_prompts files")
        from obliviate.worlds.canvas import concept_kind

        concept_kind(config.concept)
    if config.model:
        check_folder(config.model)
        from pathlib import Path

        from obliviate.guards import GUARD_FILE, LOAD_CALL
        if (Path(config.model) / GUARD_FILE).is_file():  # a run would drop the guard and score the bare weights
            raise ObliviateError(f"{config.model} carries a generation-time guard ({GUARD_FILE}); runs on a guarded "
                                 f"folder are not supported yet: sample it with {LOAD_CALL}, or run on its base")
        from obliviate.models import weights_load_errors
        from obliviate.models.diffusion import check_concept_known, load_tokenizer

        try:  # the pipeline's own tokenizer must know the concept, as `run` demands before training
            tokenizer = load_tokenizer(config.model, config.trust_remote_code)
        except weights_load_errors() + (KeyError,) as e:
            raise ObliviateError(f"{config.model}/tokenizer: cannot load the pipeline's tokenizer: "
                                 f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        check_concept_known(tokenizer, config.concept)
    _check_user_evaluation(config)
    check_run_folder(config)


def _check_user_evaluation(config: RunConfig) -> None:
    """The user-pipeline evaluation's folders (evals/user_pipeline.py), from their config.json alone."""
    t = config.t2i
    given = [k for k in ("clip_model", "detector", "detector_label") if getattr(t, k) is not None]
    if given and not config.forget_prompts:
        raise ObliviateError(f"t2i.{given[0]} is for runs on your own pipeline (model with forget_prompts and "
                             "retain_prompts); the canvas world's runs use its own CLIP and classifier")
    if t.detector_label is not None and t.detector is None:
        raise ObliviateError("t2i.detector_label goes with t2i.detector (a CLIP or image-classifier folder)")
    if t.clip_model:
        from obliviate.evals.user_pipeline import check_clip_folder
        check_clip_folder(t.clip_model)
    if t.detector:
        from obliviate.attacks.t2i.detectors import detector_kind
        try:
            detector_kind(t.detector, t.detector_label, config.concept)
        except ObliviateError as e:
            raise ObliviateError(f"t2i.detector: {e}") from None
