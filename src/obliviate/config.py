"""One typed config for the CLI, config files (TOML/YAML) and the Python API. Unknown keys and bad values are errors
that name the key; `key=value` overrides use dotted paths (train.lr=1e-4, method_args.beta=0.2)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

from obliviate.errors import ObliviateError
from obliviate.families import FAMILIES, family_of_world


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorldConfig(_Strict):
    name: Literal["profiles", "canvas", "portraits"] = "profiles"
    n_people: int = Field(200, ge=10)  # profiles; portraits: its own 24 unless set to another value
    n_holdout: int = Field(20, ge=2)  # profiles; portraits: its own 6 unless set to another value
    seed: int = 0
    general_facts: int = Field(100, ge=0)  # profiles only
    tofu_dir: str | None = None  # profiles: folder with TOFU's world_facts_perturbed.json and real_authors_perturbed.json
    model: dict[str, Any] = Field(default_factory=dict)  # recipe overrides (profiles: LMRecipe; canvas: CanvasRecipe)
    cache_dir: str | None = None
    # profiles only: the DP2Unlearning variant of the world (worlds/profiles_dp2.py), its DP-SGD settings
    # (worlds/dp_train.py DPRecipe: epsilon, delta, noise_multiplier, max_grad_norm, ...); None: the plain world
    dp2: dict[str, Any] | None = None
    # profiles only: "moe" trains a mixture-of-experts model (Mixtral-shaped, worlds.train.MoERecipe) instead of the
    # dense Llama, with its own cache key; the dense world's key is the one it has always had
    arch: Literal["dense", "moe"] = "dense"
    # profiles only: RESTOR's corrupted variant of the world (worlds/profiles_corrupt.py CorruptRecipe: split, facts,
    # epochs, lr, replay, seed): wrong facts about the split's people trained into the plain world's model; None: the
    # plain world
    corrupt: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _known_recipe_keys(self):
        if self.model or self.arch != "dense":  # nothing to check otherwise, and no world's training code to import
            from obliviate.worlds import check_recipe_keys

            check_recipe_keys(self.name, self.model, self.arch)
        if self.dp2 is not None and self.arch != "dense":
            raise ObliviateError(f"world.dp2: the DP2Unlearning variant is built for the dense world, not arch = "
                                 f"{self.arch!r}")
        if self.corrupt is not None and (self.arch != "dense" or self.dp2 is not None):
            raise ObliviateError("world.corrupt: the corrupted variant is built on the plain dense world, not "
                                 "with world.arch or world.dp2")
        for key in ("dp2", "corrupt"):
            if getattr(self, key) is not None:
                from obliviate.worlds import check_variant_settings

                check_variant_settings(self.name, key, getattr(self, key))
        return self

    @model_serializer(mode="wrap")
    def _unset_variants_unsaid(self, handler):
        """A plain world's config dumps as it did before `dp2`, `arch` and `corrupt` existed (recorded only when
        set): run records and the bench's cell keys, which hash the resolved config, stay what they were."""
        data = handler(self)
        if isinstance(data, dict):
            if data.get("dp2") is None:
                data.pop("dp2", None)
            if self.arch == "dense":
                data.pop("arch", None)
            if data.get("corrupt") is None:
                data.pop("corrupt", None)
        return data


class TrainConfig(_Strict):
    """The training keys of every family. The language-model loop (which vision-language runs share) has more:
    LMTrainConfig."""
    epochs: float = Field(5.0, gt=0)  # passes over the forget set
    max_steps: int | None = Field(None, ge=1)  # overrides epochs when set
    lr: float = Field(1e-5, gt=0)
    batch_size: int = Field(32, ge=1)  # forget batch size; the retain batch has the same size
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    warmup_fraction: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float | None = 1.0
    seed: int = 0
    checkpoint_every: int | None = Field(None, ge=1)  # steps between checkpoints (`obliviate run --resume`)
    # training curves besides history.json, as HF Trainer's report_to: TensorBoard event files in
    # OUTPUT_DIR/tensorboard/<run>, or a Weights & Biases run (obliviate/tracking.py)
    report_to: Literal["none", "tensorboard", "wandb"] | list[Literal["tensorboard", "wandb"]] = "none"
    # optimiser steps between evaluations along the way (evaluations.json in the run folder); None: only at the end
    eval_every: int | None = Field(None, ge=1)


class LMTrainConfig(TrainConfig):
    """The training keys of the language-model loop (language-model and vision-language runs): TrainConfig's and
    these. A text-to-image run refuses them at validation."""
    # micro-batches of `batch_size` whose gradients are summed before each optimiser step (HF Trainer's
    # gradient_accumulation_steps). The effective batch is batch_size x grad_accum_steps, whatever the number of
    # processes (batch_size is the global batch of one forward pass; each process takes its share); every loss is a
    # mean over the effective batch, so 2 x 2 takes the step 1 x 4 does. Steps count optimiser steps.
    grad_accum_steps: int = Field(1, ge=1)
    # batch items of similar length together (HF Trainer's option of the same name): much less padding when short
    # answers and long documents share a set, at the cost of less mixed batches
    group_by_length: bool = False
    # which scored tokens of an answer each term counts: the answer's own tokens, or those plus the format's
    # end-of-turn / EOS tokens. Ascending the forget set's end token teaches the model never to stop (an instruct
    # model then rambles instead of answering empty), which is not forgetting the fact, so the forget term counts the
    # answer only; the retain term keeps the end, so the model keeps stopping. "answer+end" on both is what TOFU's
    # and OpenUnlearning's code do (docs/metrics.md, "Which tokens count").
    forget_tokens: Literal["answer", "answer+end"] = "answer"
    retain_tokens: Literal["answer", "answer+end"] = "answer+end"
    # for real checkpoints: the forward passes under autocast in bf16 while the weights and the optimiser stay in the
    # model's dtype (float32 master weights, as HF Trainer's bf16=True); `dtype` at the top of a run loads the
    # weights themselves in bf16 ("pure bf16"). Gradient checkpointing recomputes activations in the backward pass
    # (transformers' gradient_checkpointing_enable): less memory, about a third more time.
    mixed_precision: Literal["no", "bf16"] = "no"  # (no fp16: it would need loss scaling)
    gradient_checkpointing: bool = False
    # tokens of logits a forward pass of the loop may hold; a bigger batch runs the output head a slice at a time
    # under activation checkpointing (the likelihood-based methods; KL-based terms still hold the batch's logits).
    # None: the whole batch at once. The default holds 1024 tokens of logits (0.2 GB with a 49k vocabulary, 0.5 GB
    # with 128k, plus their gradient) however big the batch (benchmarks/README.md (p))
    max_logit_tokens: int | None = Field(1024, ge=16)
    # under several processes: "fsdp" shards the parameters, their gradients and the AdamW state over the processes
    # (PyTorch FSDP2, obliviate/sharding.py), so a model too big for one device trains; "no": data parallel, every
    # process holds the whole model
    shard: Literal["no", "fsdp"] = "no"

    @classmethod
    def of(cls, train: TrainConfig | None) -> LMTrainConfig:
        """`train` as the language-model loop takes it: a plain TrainConfig (the keys every family has) with the
        language-model keys at their defaults."""
        if isinstance(train, cls):
            return train
        return cls(**{k: getattr(train, k) for k in train.model_fields_set}) if train is not None else cls()


class LoraConfig(_Strict):
    r: int = Field(8, ge=1)
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"


class EvalSetConfig(_Strict):
    """One more evaluation set from a file (TOFU's format), with its role stated: forget, retain, utility,
    utility_normalised (TOFU's normalised probability) or holdout (membership inference). TOFU's published file
    names (world_facts_perturbed.json, ...) carry their role; any other file must state it."""
    file: str
    role: Literal["forget", "retain", "utility", "utility_normalised", "holdout"] | None = None
    name: str | None = None


class TemplateConfig(_Strict):
    """How questions are put to a language model (models/prompt_format.py): "auto" uses the tokenizer's chat
    template when it has one and the raw `Question: ... Answer:` format otherwise; "chat" insists on the chat
    template; "qa" is the raw format; llama2, llama3, chatml, zephyr, phi3 are those families' tags; "custom" takes
    the tags below (which also replace a named template's). The same format serves unlearning, every metric and
    every attack, and the run records it."""
    name: str = "auto"
    system_prompt: str | None = None
    system_start: str | None = None
    system_end: str | None = None
    user_start: str | None = None
    user_end: str | None = None
    assistant_start: str | None = None
    assistant_end: str | None = None

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        from obliviate.models.prompt_format import NAMES

        if name not in NAMES:
            raise ValueError(f"unknown template {name!r}; valid: {', '.join(NAMES)}")
        return name

    def tags(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if k not in ("name", "system_prompt") and v is not None}


class EvalConfig(_Strict):
    batch_size: int = Field(32, ge=1)
    # evaluate on the first N retain people: a world's default is 40; benchmark files (MLLMU-Bench) score all their
    # retain people unless this is set
    retain_people: int | None = Field(40, ge=1)
    gradnorm: bool = False  # the GradNorm attack needs one backward pass per text
    # tokens of full-vocabulary logits a forward pass may hold: a batch is split so that its logits take about this
    # times the vocabulary times 4 bytes (4096 x 128k vocabulary: 2 GiB), whatever the batch size
    max_logit_tokens: int = Field(4096, ge=16)


class HarnessConfig(_Strict):
    """lm-evaluation-harness's multiple-choice tasks on local files in the published formats (evals/harness.py,
    docs/harness.md): WMDP (cais/wmdp: question, choices, answer) and MMLU (cais/mmlu), scored on the run's model
    and on the original and retrain rows. The prompts, choices and metrics are the harness's own tasks'; only where
    the data comes from changes, so the real datasets give the standard numbers."""
    wmdp_dir: str | None = None  # cais/wmdp as downloaded: wmdp-bio/test-*.parquet, ... (or wmdp-bio.jsonl, ...)
    mmlu_dir: str | None = None  # cais/mmlu as downloaded: <subject>/test-*.parquet (dev-*: the few-shot examples)
    # tasks or groups to run (wmdp, wmdp_bio, wmdp_chem, wmdp_cyber, mmlu, mmlu_stem, mmlu_<subject>, ...); default:
    # the wmdp and mmlu groups, of the folders given
    tasks: list[str] | None = None
    num_fewshot: int | None = Field(None, ge=0)  # None: each task's own (0 for WMDP and MMLU, as the WMDP paper)
    limit: int | None = Field(None, ge=1)  # the first N questions of each task: a quick look, not the standard numbers
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _some_data(self):
        if not (self.wmdp_dir or self.mmlu_dir):
            raise ValueError("needs wmdp_dir or mmlu_dir (the folders of the downloaded datasets)")
        return self


class MLLMConfig(_Strict):
    """Vision-language runs: which parts of the model the method trains, and the evaluation's decoding."""
    # MLLMU-Bench's baselines train the language model only; MMUnlearner picks parts by saliency
    train_parts: list[Literal["language", "projector", "vision"]] = Field(default_factory=lambda: ["language"],
                                                                            min_length=1)
    max_new_tokens: int = Field(32, ge=1)  # greedy answers of the generation task (MLLMU-Bench: 50)
    # answered questions put before each multiple-choice one (MLLMU-Bench puts one other person's questions first)
    few_shot: int = Field(0, ge=0, le=8)
    # a causal LM folder that rates free answers 1-10 (MLLMU-Bench's factuality score, without its paid judge)
    judge_model: str | None = None
    # MLLMU-Bench's baselines' training split (hub MLLMMU/baseline_train_split: forget_N/ and retain_M/ parquet with
    # each person's many QA pairs), what unlearning trains on; default: mllmu_dir/baseline_train_split when there is
    # one, else the release's one QA pair per person (the run records which)
    train_dir: str | None = None

    @field_validator("train_parts", mode="before")
    @classmethod
    def _all_parts(cls, parts):
        return ["language", "projector", "vision"] if parts == "all" or parts == ["all"] else parts


class T2IConfig(_Strict):
    """Text-to-image runs: how the original pipeline draws the images the methods train on, and the evaluation."""
    images_per_prompt: int = Field(2, ge=1)  # images the original pipeline draws per forget/retain prompt
    sample_steps: int = Field(25, ge=2)  # DDIM steps, for training images and evaluation samples
    guidance: float = Field(4.0, ge=1)  # classifier-free guidance scale
    eval_seeds: int = Field(2, ge=1)  # samples per evaluation prompt
    grid_prompts: int = Field(6, ge=1)  # columns of the before/after image grid
    # a run on your own pipeline (`model` with forget_prompts and retain_prompts; evals/user_pipeline.py): the erased
    # pipeline's samples of the first `eval_prompts` forget and retain prompts (each with eval_seeds seeds) beside the
    # original's. Small defaults: a Stable Diffusion sample takes a while on a CPU
    eval_prompts: int = Field(4, ge=1)  # prompts of each set (forget, retain) that are sampled
    eval_steps: int | None = Field(None, ge=2)  # DDIM steps of those samples (default: sample_steps)
    clip_model: str | None = None  # a local CLIP folder: CLIP alignment of forget and retain prompts, and KID
    kid_subset_size: int = Field(50, ge=2)  # KID's subsets: this many images, or all when there are fewer
    detector: str | None = None  # a CLIP or image-classifier folder (as `obliviate attack --detector`): UA and the
    detector_label: str | None = None  # retain agreement; the label (or CLIP prompt) that means the concept
    # below this share of the original's own forget samples found by the detector, its rates say nothing (one line)
    detector_min_share: float = Field(0.5, ge=0, le=1)


class RunConfig(_Strict):
    """A run, of one family: "lm" (a transformers causal LM; the profiles world), "t2i" (a diffusers pipeline; the
    canvas world) or "mllm" (a LLaVA-style vision-language model; the portraits world). Each family has its class
    over these shared keys: LMRunConfig, T2IRunConfig, MLLMRunConfig. The family is stated: the `family` key, or the
    family of the named world (world.name), or "lm" when neither is given; it is never guessed from other keys.
    `RunConfig(**keys)` and `RunConfig.model_validate(keys)` return the family's class; a key of another family is
    an error that names it and the family that has it."""
    family: Literal["lm", "t2i", "mllm"]
    method: str
    method_args: dict[str, Any] = Field(default_factory=dict)
    model: str | None = None  # a transformers or diffusers folder; None: the world's full model
    world: WorldConfig = Field(default_factory=WorldConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: bool = True
    output_dir: str = "runs"
    name: str | None = None
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False

    def __new__(cls, *args, **data):
        # RunConfig(**keys) builds the family's class; pydantic's __init__ then validates the keys as that class
        return super().__new__(_family_class(cls, data))

    @classmethod
    def model_validate(cls, obj, **kwargs):
        if isinstance(obj, dict) and (family_class := _family_class(cls, obj)) is not cls:
            return family_class.model_validate(obj, **kwargs)
        return super().model_validate(obj, **kwargs)

    @field_validator("name")
    @classmethod
    def _plain_folder_name(cls, name: str | None) -> str | None:
        # the run folder is OUTPUT_DIR/NAME: a path in the name would write it elsewhere
        if name is not None and (name in ("", ".", "..") or "/" in name or "\\" in name or os.path.isabs(name)):
            raise ValueError(f"{name!r} is not a plain folder name (the run folder goes in output_dir; no '/', '..' "
                             "or absolute path)")
        return name

    @model_validator(mode="before")
    @classmethod
    def _own_keys_only(cls, data):
        if cls not in RUN_CONFIGS.values() or not isinstance(data, dict):
            return data
        return _without_other_families_keys(cls, data)

    @model_validator(mode="after")
    def _one_family(self):
        from obliviate.registry import lookup_method

        family = FAMILIES[self.family]
        world_given = "world" in self.model_fields_set and "name" in self.world.model_fields_set
        if world_given and family_of_world(self.world.name).name != self.family:
            raise ValueError(f"world.name = {self.world.name!r} is a {family_of_world(self.world.name).title} "
                             f"world; this is a {family.title} run")
        if not world_given and self.world.name not in family.worlds:
            self.world.name = family.worlds[0]
        if getattr(self, family.subject) is None:
            raise ValueError(f"a {family.title} run needs `{family.subject}`")
        self.method = lookup_method(self.family, self.method).name
        return self

    def dump(self) -> dict:
        """The config as a run records it (config.json): its family's keys and the shared ones."""
        return self.model_dump()


class LMLoopRunConfig(RunConfig):
    """The keys of the runs that train through the language-model loop and score answers: language-model and
    vision-language runs (the latter through their own adapter)."""
    family: Literal["lm", "mllm"]
    split: str = "forget10"  # the built-in world's forget split, or a benchmark's (TOFU's, MLLMU-Bench's)
    # the split an earlier request already forgot (MUSE's sustainability): the run trains on the people of `split`
    # without those, with `model` the earlier request's exported model; evaluation, retrain reference and retain set
    # are those of `split`
    forgotten_before: str | None = None
    retrain_model: str | None = None  # a model folder never trained on the forget set (forget quality, PrivLeak)
    idk_file: str | None = None  # refusal sentences, one per line (IdkPO)
    train: LMTrainConfig = Field(default_factory=LMTrainConfig)
    lora: LoraConfig | None = None
    template: TemplateConfig = Field(default_factory=TemplateConfig)  # the prompt format
    eval: EvalConfig = Field(default_factory=EvalConfig)


class LMRunConfig(LMLoopRunConfig):
    """A language-model run: a transformers causal LM, on the profiles world or the user's files."""
    family: Literal["lm"] = "lm"
    forget_file: str | None = None  # TOFU-format JSON lines; with `model`, replaces the world's data
    retain_file: str | None = None
    tofu_dir: str | None = None  # with `model`: TOFU's release folder; `split` picks forget01/05/10
    muse_dir: str | None = None  # with `model`: a MUSE corpus folder (the MUSE repository's data/<corpus> layout)
    eval_sets: list[EvalSetConfig] = Field(default_factory=list)  # more evaluation sets, each with its role
    retrain_eval: str | None = None  # retrain_model's evaluation (obliviate eval output, TOFU or OpenUnlearning logs)
    harness: HarnessConfig | None = None  # lm-evaluation-harness tasks (WMDP, MMLU) on local files

    def dump(self) -> dict:
        data = super().dump()
        if data.get("harness") is None:  # a run without it records (and keys bench cells) as before it existed
            data.pop("harness", None)
        return data


class MLLMRunConfig(LMLoopRunConfig):
    """A vision-language run: a LLaVA-style model, on the portraits world or MLLMU-Bench's files."""
    family: Literal["mllm"] = "mllm"
    mllm: MLLMConfig = Field(default_factory=MLLMConfig)
    mllmu_dir: str | None = None  # with `model`: MLLMU-Bench's release folder (parquet files)


class T2IRunConfig(RunConfig):
    """A text-to-image run: a diffusers pipeline, on the canvas world or the user's prompts."""
    family: Literal["t2i"] = "t2i"
    concept: str | None = None  # the concept to erase (a canvas style/object, or any words)
    anchor: str | None = None  # what the concept becomes (default: the world's anchor, or "")
    forget_prompts: str | None = None  # with `model`: prompts with the concept, one per line
    retain_prompts: str | None = None  # with `model`: prompts to keep, one per line
    t2i: T2IConfig = Field(default_factory=T2IConfig)


RUN_CONFIGS: dict[str, type[RunConfig]] = {"lm": LMRunConfig, "t2i": T2IRunConfig, "mllm": MLLMRunConfig}


def _family_class(cls: type[RunConfig], data: dict) -> type[RunConfig]:
    """The family class that validates `data` given to `cls`: `cls` itself when it is one, else the family `data`
    states (`family`, else the named world's, else "lm"). An unknown family, or one that is not a `cls`, gives `cls`,
    whose validation of `family` names the valid ones."""
    if cls in RUN_CONFIGS.values():
        return cls
    family = data.get("family")
    if family is None:
        world = data.get("world")
        name = (world.get("name") if isinstance(world, dict) else
                world.name if isinstance(world, WorldConfig) and "name" in world.model_fields_set else None)
        known = any(name == w for f in FAMILIES.values() for w in f.worlds)
        family = family_of_world(name).name if known else "lm"  # an unknown world: WorldConfig names the valid ones
    chosen = RUN_CONFIGS.get(family) if isinstance(family, str) else None
    return chosen if chosen is not None and issubclass(chosen, cls) else cls


def family_of_keys(keys) -> str | None:
    """The family whose run config alone has some of `keys` (mllmu_dir: "mllm"; forget_file: "lm"), or None when
    none of them, or keys of several families, say it. For commands whose options are one family's inputs
    (`obliviate eval --mllmu-dir`); a run config states its family."""
    owners = {name for key in keys for name, cls in RUN_CONFIGS.items()
              if key in cls.model_fields and sum(key in c.model_fields for c in RUN_CONFIGS.values()) == 1}
    return owners.pop() if len(owners) == 1 else None


def _without_other_families_keys(cls: type[RunConfig], data: dict) -> dict:
    """`data` for family class `cls`; a key of another family (at the top level, or a language-model training key in
    a text-to-image run's `train`) is an error that names it and the family that has it."""
    family = FAMILIES[cls.model_fields["family"].default]
    for key in [k for k in data if k not in cls.model_fields]:
        owners = [FAMILIES[name] for name, c in RUN_CONFIGS.items() if key in c.model_fields]
        if owners:  # a key of no family is pydantic's "unknown key"
            hint = f"; set family = {owners[0].name!r} for a {owners[0].title} run" if len(owners) == 1 else ""
            raise ValueError(f"{key} is a {' / '.join(f.title for f in owners)} key; this is a {family.title} run "
                             f"(family = {family.name!r}){hint}")
    own_train = cls.model_fields["train"].annotation
    train = data.get("train")
    if isinstance(train, TrainConfig) and type(train) is not own_train:  # e.g. a plain TrainConfig for LMTrainConfig
        data = {**data, "train": {k: getattr(train, k) for k in train.model_fields_set}}
    if isinstance(data.get("train"), dict):
        for key in data["train"]:
            if key not in own_train.model_fields and key in LMTrainConfig.model_fields:
                raise ValueError(f"train.{key} is a language-model key; this is a {family.title} run "
                                 f"(family = {family.name!r})")
    return data


def _recorded_family_keys(data: dict) -> dict:
    """A run's config.json as any version wrote it, with its own family's keys only: before one class per family, a
    run recorded every training key, and older ones every family's keys, at values that never applied to it."""
    cls = _family_class(RunConfig, data)
    if cls is RunConfig:
        return data  # an unknown family: validation names it
    others = {k for c in RUN_CONFIGS.values() for k in c.model_fields} - set(cls.model_fields)
    data = {k: v for k, v in data.items() if k not in others}
    own_train = cls.model_fields["train"].annotation
    if isinstance(data.get("train"), dict):
        data["train"] = {k: v for k, v in data["train"].items()
                         if k in own_train.model_fields or k not in LMTrainConfig.model_fields}
    return data


def parse_value(text: str):
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "1e-3" as a string; a number was meant (but "nan" or "inf" stay names)
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
        return float(value)
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ObliviateError(f"override '{item}' must look like key=value")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ObliviateError(f"override '{key}': '{p}' is not a section")
        node[parts[-1]] = parse_value(value)
    return data


def _toml():
    try:
        import tomllib  # novermin (tomli below on 3.10)
    except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package (a dependency there)
        import tomli as tomllib
    return tomllib


def read_config_file(path: str | Path) -> dict:
    import yaml

    from obliviate.data import read_text_file

    path = Path(path)
    text = read_text_file(path, "config file")
    tomllib = _toml()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text)
        else:
            raise ObliviateError(f"{path}: config must be .toml, .yaml/.yml or .json")
    except tomllib.TOMLDecodeError as e:  # its message ends with "(at line N, column M)"
        raise ObliviateError(f"{path}: malformed config: {str(e).splitlines()[0]}") from None
    except yaml.YAMLError as e:
        raise ObliviateError(f"{path}: malformed config: {_yaml_problem(e, text)}") from None
    if not isinstance(data, dict):
        raise ObliviateError(f"{path}: the config must be a mapping of keys to values")
    return data


def _yaml_problem(e, text: str) -> str:
    """yaml's message spreads over several lines ("in <unicode string>", a caret); keep the problem and its place,
    worded like tomllib's."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "context", None)
    if mark is not None:
        return f"{problem or 'invalid YAML'} (at line {mark.line + 1}, column {mark.column + 1})"
    position = getattr(e, "position", None)  # yaml.reader.ReaderError: a character YAML does not allow
    if position is not None:
        return f"{str(e).splitlines()[0]} (at line {text.count(chr(10), 0, position) + 1})"
    return str(e).splitlines()[0]


def build_config(data: dict, source: str = "config", recorded: bool = False) -> RunConfig:
    """The run config of `data` (its family's class), or one line naming the bad key. `recorded`: `data` is a run's
    config.json, whose keys of other families, as older versions recorded them, are dropped rather than refused."""
    try:
        return RunConfig.model_validate(_recorded_family_keys(data) if recorded else data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        # a check of the whole config names its keys itself
        raise ObliviateError(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}") from None


# the keys that name files or folders: (section, key), section None for the top level; "eval_sets" holds a list of
# {file, ...}
PATH_KEYS = ((None, "model"), (None, "forget_prompts"), (None, "retain_prompts"), (None, "mllmu_dir"),
             (None, "forget_file"), (None, "retain_file"), (None, "tofu_dir"), (None, "muse_dir"),
             (None, "retrain_model"), (None, "retrain_eval"), (None, "idk_file"), (None, "output_dir"),
             ("world", "tofu_dir"), ("world", "cache_dir"), ("mllm", "judge_model"), ("mllm", "train_dir"),
             ("t2i", "clip_model"), ("t2i", "detector"), ("eval_sets", "file"), ("harness", "wmdp_dir"),
             ("harness", "mmlu_dir"))


def resolve_paths(data: dict, base: str | Path) -> dict:
    """A copy of config `data` whose relative paths (PATH_KEYS) are made absolute against the folder `base`."""
    def absolute(value):
        if not isinstance(value, str) or not value:
            return value
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (Path(base) / path).absolute())

    out = dict(data)
    for section, key in PATH_KEYS:
        if section is None:
            if key in out:
                out[key] = absolute(out[key])
        elif section == "eval_sets" and isinstance(out.get(section), list):
            out[section] = [{**s, key: absolute(s[key])} if isinstance(s, dict) and key in s else s
                            for s in out[section]]
        elif isinstance(out.get(section), dict) and key in out[section]:
            out[section] = {**out[section], key: absolute(out[section][key])}
    return out


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """A config file's run: its relative paths are relative to the file's folder (as in docker-compose or a
    Makefile); `key=value` overrides are relative to the working directory, as any path typed in a shell."""
    data = resolve_paths(read_config_file(path), Path(path).absolute().parent)
    return build_config(apply_overrides(data, list(overrides)), str(path))


def check_run_folder(config: RunConfig) -> None:
    """What `run` would reject about where the run folder goes, checked before any work: an output_dir that is a
    file, or a named run folder that already exists."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ObliviateError(f"output_dir is not a folder: {out}")
    if config.name and (out / config.name).exists():
        raise ObliviateError(f"run folder already exists: {out / config.name} (choose another name)")
