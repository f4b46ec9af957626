"""`obliviate run` for language models: resolve a config, get the model and data (a built-in world or the user's files), unlearn,
evaluate against the retrain reference, and write one run folder atomically."""
from __future__ import annotations

import time
from pathlib import Path

from obliviate.config import EvalConfig, RunConfig
from obliviate.data import load_lines
from obliviate.errors import ObliviateError
from obliviate.evals.restor import with_recovery
from obliviate.models import causal_lm as lm
from obliviate.runners.lm_data import subject_of, user_data, uses_user_data
from obliviate.runners.common import FamilyRun, Prepared, Trained
from obliviate.runs import claim_run_dir, resolve_device, write_json


def load_model(folder, config: RunConfig, device, dtype: str | None = None):
    """(model, tokenizer) of a folder, its tokenizer set to the run's prompt format (config.template), so the
    unlearning loop, every metric and every attack ask in that format."""
    model, tokenizer = lm.load(folder, dtype or config.dtype, device, config.trust_remote_code)
    return model, with_template(tokenizer, config)


def with_template(tokenizer, config: RunConfig):
    """The tokenizer set to the run's prompt format (config.template)."""
    from obliviate.models import prompt_format

    t = config.template
    prompt_format.use(tokenizer, prompt_format.resolve(tokenizer, t.name, t.system_prompt, t.tags()))
    return tokenizer


def format_record(tokenizer) -> dict:
    """The resolved prompt format, one rendered example and the ids that stop generation, as the run records them."""
    from obliviate.models import prompt_format

    fmt = prompt_format.of(tokenizer)
    return {**fmt.describe(), "example": prompt_format.example(tokenizer, fmt),
            **prompt_format.stops_record(tokenizer, fmt)}


def world_for(config: RunConfig):
    from obliviate.worlds import world_of

    return world_of(config.world)  # the profiles world, or its variant (DP2Unlearning's, RESTOR's) when one is set


def evaluation_of(model, tokenizer, qa_sets, texts, eval_config: EvalConfig, reference_model=None,
                  roles: dict[str, str] | None = None, sharded: bool = False, harness=None) -> dict:
    """texts: {"forget": membership members, "holdout": non-members, "verbmem": texts continued (default: the
    members)}; roles: each set's stated role (benchmark_files.ROLES), or None for the world's sets (named by source);
    harness: the run's HarnessConfig (lm-evaluation-harness's WMDP / MMLU on local files), or None."""
    from obliviate.benchmark_files import normalised_sets, utility_sets
    from obliviate.evals.evaluate import evaluate_lm

    utility, normalised = (utility_sets(roles), normalised_sets(roles)) if roles else (None, None)
    return evaluate_lm(model, tokenizer, qa_sets, texts.get("forget"), texts.get("holdout"),
                       verbmem_texts=texts.get("verbmem"), utility_set_names=utility, normalised_prob_sets=normalised,
                       reference_model=reference_model, batch_size=eval_config.batch_size,
                       gradnorm=eval_config.gradnorm, max_logit_tokens=eval_config.max_logit_tokens, sharded=sharded,
                       harness=harness)


def _world_evaluation(world, name: str, split: str, eval_config: EvalConfig, compute, harness=None) -> dict:
    """A world model's evaluation depends only on the world, the split and the evaluation settings (and the harness
    tasks' settings and files, when asked for): cached."""
    from obliviate.evals import PROTOCOL

    key = [split, eval_config.model_dump(), PROTOCOL]
    if harness is not None:  # appended only then: the evaluations cached without it keep their keys
        from obliviate.evals.harness import settings
        key.append({"harness": settings(harness)})
    return world.cached_evaluation(name, split, key, compute)


def retrain_evaluation(world, split: str, eval_config: EvalConfig, qa_sets, texts, device: str = "auto",
                       harness=None) -> dict:
    """The retrain model's evaluation, computed once per world, split and evaluation settings, then cached."""
    def compute():
        model, tok = lm.load(world.retrain_dir(split), device=resolve_device(device))
        return evaluation_of(model, tok, qa_sets, texts, eval_config, harness=harness)
    return _world_evaluation(world, "retrain", split, eval_config, compute, harness)


def original_evaluation(world, split: str, eval_config: EvalConfig, qa_sets, texts, device: str = "auto",
                        harness=None) -> dict:
    """The world's full model's evaluation (the retrain model as its MIA reference, as for every unlearned model),
    computed once per world, split and evaluation settings, then cached."""
    def compute():
        device_ = resolve_device(device)
        reference, _ = lm.load(world.retrain_dir(split), device=device_)
        model, tok = lm.load(world.full_model_dir, device=device_)
        return evaluation_of(model, tok, qa_sets, texts, eval_config, reference, harness=harness)
    return _world_evaluation(world, "original", split, eval_config, compute, harness)


def prepare(config: RunConfig, log=print):
    """Model folder, forget/retain items, what to evaluate (qa_sets, texts, roles, label) and the world (or None)."""
    world = None
    if uses_user_data(config):
        if not config.model:
            raise ObliviateError("a run on your own files needs `model` (the model to unlearn)")
        if (config.forget_file or config.retain_file) and not (config.forget_file and config.retain_file):
            raise ObliviateError("forget_file and retain_file go together, with `model` (the model to unlearn)")
        forget, retain, data = user_data(config)
        evaluation = (data.qa_sets, {"forget": data.member_texts, "holdout": data.holdout_texts,
                                     "verbmem": data.verbmem_texts}, data.roles, data.label)
        model_dir = Path(config.model)
    else:
        world = world_for(config)
        world.build(config.split, retrain=True, log=log)
        forget, retain = world.unlearning_sets(config.split, config.forgotten_before)
        qa_sets, texts = world.eval_sets(config.split, config.eval.retain_people)
        evaluation = (qa_sets, texts, None, config.split)
        model_dir = Path(config.model) if config.model else world.full_model_dir
    if not model_dir.is_dir():
        raise ObliviateError(f"model folder not found: {model_dir}")
    return model_dir, forget, retain, evaluation, world


def user_retrain_evaluation(config: RunConfig, qa_sets, texts, roles, device) -> dict | None:
    """The retrain reference's evaluation for a run on user files: from `retrain_model` (evaluated here, the same
    way, in the same prompt format) or `retrain_eval` (read); None without either."""
    if config.retrain_eval:
        from obliviate.evals.reference_logs import read_retrain_eval
        return read_retrain_eval(config.retrain_eval)
    if config.retrain_model:
        model, tok = load_model(config.retrain_model, config, device)
        return evaluation_of(model, tok, qa_sets, texts, config.eval, roles=roles, harness=config.harness)
    return None


def user_original_evaluation(config: RunConfig, model_dir: Path, base: dict, qa_sets, texts, roles,
                             device: str) -> dict:
    """The user's original model (the folder the run unlearns) evaluated as the unlearned one is: the same sets,
    prompt format and settings. Cached under the cache root by the folder's content and those settings
    (runs.evaluation_cache), so the next run on the same folder reads it instead of evaluating again."""
    from obliviate.runs import cached_json, content_key, evaluation_cache

    settings = {"eval": config.eval.model_dump(), "template": config.template.model_dump(), "dtype": config.dtype,
                "device": str(device).split(":")[0], "data": content_key([qa_sets, texts, roles])}
    if config.harness is not None:  # only then: the evaluations cached without it keep their keys
        from obliviate.evals.harness import settings as harness_settings
        settings["harness"] = harness_settings(config.harness)

    def compute():
        model, tokenizer = load_model(model_dir, config, device)
        return evaluation_of(model, tokenizer, qa_sets, texts, config.eval, roles=roles, harness=config.harness)
    return cached_json(evaluation_cache("lm", base, settings, config.world.cache_dir), compute)


def comparison_rows(original_eval: dict, retrain_eval: dict | None) -> dict[str, dict]:
    """The scorecard rows beside the unlearned model's, as metrics.json keeps them: "original" (and "retrain" when
    there is a reference), each scored against the retrain reference as the unlearned model is."""
    from obliviate.evals.evaluate import compare_to_retrain

    if retrain_eval is None:
        return {"original": original_eval["aggregate"]}
    return {"original": compare_to_retrain(original_eval, retrain_eval)["aggregate"],
            "retrain": compare_to_retrain(retrain_eval, retrain_eval)["aggregate"]}


def with_utility_ratio(rows: dict[str, dict], original: dict) -> None:
    """Each row's model utility relative to the original's ("utility / original" on the scorecard)."""
    mu0 = original.get("model_utility")
    for row in rows.values():
        if mu0 and row.get("model_utility") is not None:
            row["utility_ratio"] = row["model_utility"] / mu0


def run(config: RunConfig, log=print, resume: bool = False) -> Path:
    from obliviate.runners.common import run as run_family

    return run_family(LanguageModelRun(config), log, resume)


class LanguageModelRun(FamilyRun):
    """A language-model run: the built-in profiles world or the user's model and files, unlearned by the language-model
    loop, evaluated with TOFU's and MUSE's metrics against the retrain reference, beside the original."""
    label: str = ""
    retrain_eval: dict | None = None
    routing: dict | None = None  # a mixture-of-experts model's routing before and after (evals/routing.py)

    def subject(self) -> str | None:
        return subject_of(self.config)

    def prepare(self, log) -> Prepared:
        model_dir, forget, retain, evaluation, world = prepare(self.config, log)
        self.label = evaluation[3]
        return Prepared(model_dir, world, (forget, retain, evaluation))

    guard = None  # a generation-time guard's run: the guard, bound to the run's forget and retain items

    def unlearn(self, prepared: Prepared, method, device: str, checkpoints) -> Trained:
        from obliviate import distributed
        from obliviate.evals.routing import moe_routing
        from obliviate.guards import is_guard
        from obliviate.loops.lm import unlearn
        from obliviate.loops.step import changed_tensors

        config = self.config
        if method is None:  # a world recipe (runners.common.method_of): DP2Unlearning
            return self._world_recipe(prepared, device)
        forget, retain, (qa_sets, texts, roles, _) = prepared.data
        if is_guard(method):  # no training and no changed tensors: the model asks and scores through the guard
            self.guard = method.bind_items(forget, retain)
            model, tokenizer = load_model(prepared.model_dir, config, device)
            self.guard.install(model.eval(), tokenizer)
            return Trained((model, tokenizer), truncated=0)
        self.along = lm_along(config, prepared.world, qa_sets, texts, roles, device)  # train.eval_every
        # sharded, the model waits on the CPU and each process moves only its shard to the device
        model, tokenizer = load_model(prepared.model_dir, config, "cpu" if config.train.shard == "fsdp" else device)
        refusals = load_lines(config.idk_file) if config.idk_file else None
        routing = distributed.is_main() and moe_routing(model, tokenizer, forget, retain, config.eval.batch_size)
        result = unlearn(model, tokenizer, forget, retain, method, config.train, config.lora, refusals=refusals,
                         checkpoints=checkpoints, on_eval=self.along and self.along.bind(tokenizer))
        if routing:  # a mixture-of-experts model: where its routers send the tokens, before and after
            self.routing = routing(result.model, method)
        tensors = changed_tensors(result.model, result.trainable_names) if distributed.is_main() else {}  # saved once
        return Trained((result.model, tokenizer), result.history, result.seconds, result.stopped, tensors,
                       result.truncated)

    dp2: dict | None = None  # a DP2Unlearning run's record: epsilon, delta, the stages' costs

    def _world_recipe(self, prepared: Prepared, device: str) -> Trained:
        """DP2Unlearning: the world's stage-1 DP model fine-tuned on the retained data (worlds/profiles_dp2.py); every
        tensor differs from the run's base (stage 2), so all are saved."""
        from obliviate import distributed
        from obliviate.loops.step import changed_tensors

        if distributed.active():
            raise ObliviateError("DP2Unlearning runs in one process (its fine-tune is the world's recipe)")
        out = prepared.world.unlearn(self.config.split, seed=self.config.train.seed)
        model = out["model"].to(device)
        self.dp2 = out["record"]
        names = [n for n, _ in model.named_parameters()]
        return Trained((model, with_template(out["tokenizer"], self.config)), seconds=out["stats"]["seconds"],
                       tensors=changed_tensors(model, names), truncated=0)

    def load_reference(self, prepared: Prepared, folder: Path, device: str) -> Trained:
        return Trained(lm.load(folder, self.config.dtype, device), truncated=0)

    def describe(self, prepared: Prepared, trained: Trained) -> tuple[dict, dict]:
        config = self.config
        extra = {}  # a guard's record; DP2Unlearning's epsilon, delta and costs
        if self.guard:
            extra["guard"] = self.guard_record()
        if self.dp2:
            extra["dp2"] = self.dp2
        return {"split": config.split if prepared.world is not None else None, "forget_set": self.label,
                "prompt_format": format_record(trained.model[1])}, extra

    def guard_record(self) -> dict:
        """obliviate_guard.json: the guard, its settings and material, and the call that loads an export with it."""
        from obliviate.guards import LOAD_CALL
        return {**self.guard.describe(), "load": f"{LOAD_CALL}(FOLDER)"}

    def evaluate(self, prepared: Prepared, trained: Trained, metrics: dict, device: str, log) -> dict:
        from obliviate import distributed
        from obliviate.evals.evaluate import compare_to_retrain

        config, world = self.config, prepared.world
        _, _, (qa_sets, texts, roles, _) = prepared.data
        if world is not None:
            retrain_eval = retrain_evaluation(world, config.split, config.eval, qa_sets, texts, config.device,
                                              config.harness)
        else:
            retrain_eval = user_retrain_evaluation(config, qa_sets, texts, roles, device)
        model, tokenizer = trained.model
        t0 = time.time()
        evaluation = evaluation_of(model, tokenizer, qa_sets, texts, config.eval,
                                   _mia_reference(config, world, trained.reference, device), roles,
                                   sharded=distributed.active(), harness=config.harness)
        if retrain_eval is not None:
            evaluation = compare_to_retrain(evaluation, retrain_eval)
            metrics["retrain_reference"] = retrain_eval.get("source") or (
                str(config.retrain_model) if config.retrain_model else "the world's retrain model")
        metrics["eval_seconds"] = round(time.time() - t0, 2)
        metrics["eval_processes"] = evaluation["config"]["processes"]
        metrics.update(evaluation["aggregate"])
        if self.routing is not None:  # a mixture-of-experts model: how far unlearning moved its routers
            from obliviate.evals.routing import routing_metrics
            metrics.update(routing_metrics(self.routing))
        model = trained.model = None  # the original is loaded next (unless cached): one model in memory at a time
        if world is not None and not config.model:  # the world's full model: cached with the world
            original_eval = original_evaluation(world, config.split, config.eval, qa_sets, texts, config.device,
                                                config.harness)
        else:  # the user's folder: cached by its content
            original_eval = user_original_evaluation(config, prepared.model_dir, prepared.base, qa_sets, texts,
                                                     roles, device)
        rows = comparison_rows(original_eval, retrain_eval)
        metrics.update(rows)
        with_utility_ratio({**rows, config.method: metrics}, rows["original"])
        with_recovery({**rows, config.method: metrics}, rows["original"], rows.get("retrain"))  # corrupted world
        self.retrain_eval = retrain_eval
        return evaluation

    def along_metrics(self, evaluation: dict, metrics: dict) -> dict:
        return lm_metrics(evaluation, self.retrain_eval, metrics.get("original"))

    def evaluate_share(self, prepared: Prepared, trained: Trained, device: str) -> None:
        _, _, (qa_sets, texts, roles, _) = prepared.data
        model, tokenizer = trained.model
        evaluation_of(model, tokenizer, qa_sets, texts, self.config.eval,
                      _mia_reference(self.config, prepared.world, trained.reference, device), roles, sharded=True,
                      harness=self.config.harness)

    def write_files(self, folder: Path, evaluation: dict | None, metrics: dict) -> dict:
        if self.guard is not None:
            from obliviate.guards import GUARD_FILE
            write_json(folder / GUARD_FILE, self.guard_record())
        if self.config.retrain_model and evaluation is not None and self.retrain_eval is not None:
            write_json(folder / "retrain_eval.json", self.retrain_eval)  # reusable as `retrain_eval` by the next run
        if evaluation is not None and "harness" in evaluation:  # lm-evaluation-harness's questions, scored
            write_json(folder / "harness.json", evaluation["harness"])
        if self.routing is None:
            return {}
        from obliviate.evals.routing import routing_files

        return routing_files(folder, self.routing, f"{self.config.method} on {self.label}")

    def scorecard(self, metrics: dict, evaluation: dict | None, title: str) -> None:
        if evaluation is not None:  # the headline numbers, without opening the folder
            from obliviate.bench.scorecard import print_scorecard, run_rows
            print_scorecard(run_rows(metrics), title=f"{title} on {self.label}" + (
                "" if self.retrain_eval is not None else " (no retrain reference: no forget quality or PrivLeak)"))


def _mia_reference(config: RunConfig, world, reference_seed: int | None, device: str):
    """The model of the membership-inference 'reference' attack: the world's retrain model (none for user runs,
    whose retrain model may have another tokenizer, and none when the run's model is that retrain model itself)."""
    if world is None or reference_seed == 0:
        return None
    return lm.load(world.retrain_dir(config.split), device=device)[0]


def export(changed_path: Path, base: Path, out: Path) -> Path:
    """A full transformers folder: the base model with the run's changed tensors applied (the base is only read).
    A run that asked in a named or custom template exports it as the tokenizer's chat template, so the exported model
    is asked the way it was unlearned. A guard run's folder also holds its obliviate_guard.json:
    `obliviate.guards.load_guarded(out)` gives (model, tokenizer) asking through the guard (transformers'
    `from_pretrained` alone gives the unguarded model)."""
    from obliviate.guards import GUARD_FILE, read_guard
    from obliviate.models import prompt_format
    from obliviate.runs import apply_changed

    guarded = read_guard(Path(changed_path).parent)  # a bad record fails before anything is written
    model, tokenizer = lm.load(base)
    apply_changed(model, changed_path)
    config_path = Path(changed_path).parent / "config.json"
    if config_path.is_file():
        from obliviate.runs import read_run_config

        t = read_run_config(Path(changed_path).parent).template
        template = prompt_format.as_chat_template(
            tokenizer, prompt_format.resolve(tokenizer, t.name, t.system_prompt, t.tags()))
        if template is not None:
            tokenizer.chat_template = template
    with claim_run_dir(out) as folder:
        model.save_pretrained(folder.tmp)
        tokenizer.save_pretrained(folder.tmp)
        if guarded is not None:
            write_json(folder.tmp / GUARD_FILE, guarded[1])
    return out


def lm_along(config, world, qa_sets, texts, roles, device: str):
    """A language-model run's evaluation (`runners.lm.evaluation_of`, the world's retrain model as the membership
    reference as at the end); None without train.eval_every."""
    from obliviate.runners.along import Along

    if not config.train.eval_every:
        return None
    reference = []  # loaded at the first evaluation, kept for the next ones

    def evaluate(model, tokenizer):
        if not reference:
            reference.append(_mia_reference(config, world, None, device))
        return evaluation_of(model, tokenizer, qa_sets, texts, config.eval, reference[0], roles)
    return Along(evaluate)


def lm_metrics(evaluation: dict, retrain_eval: dict | None, original: dict | None) -> dict:
    """metrics.json's aggregate of a language-model evaluation: compared to the retrain reference when there is one,
    its model utility relative to the original's when known."""
    from obliviate.evals.evaluate import compare_to_retrain

    aggregate = dict((compare_to_retrain(evaluation, retrain_eval) if retrain_eval is not None
                      else evaluation)["aggregate"])
    if original:
        with_utility_ratio({"along": aggregate}, original)
        with_recovery({"along": aggregate}, original, retrain_eval and retrain_eval["aggregate"])
    return aggregate
