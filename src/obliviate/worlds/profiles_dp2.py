"""DP2Unlearning on the profiles world: a world recipe as much as a method.

Paper: Al Mahmud, Jebreel, Domingo-Ferrer, Sánchez 2025, "DP2Unlearning: An Efficient and Guaranteed Unlearning
Framework for LLMs", https://arxiv.org/abs/2504.13774. Reference code read: tamimalmahmud/LLM-Unlearning,
`DP2Unlearning/Train_dp_SGD.py` (stage 1: Opacus `make_private_with_epsilon`, Poisson sampling, SGD, max_grad_norm
1.0, target ε 0.5, δ 1e-12, 10 epochs on TOFU's full split) and `FT_BaseModel.py` (the stage-1 model fine-tuned with
HF Trainer on the full data, the model that is served, or on retain90/95/99 after a deletion request).

- Stage 1 (`dp-base`): the world's model trained from scratch on every training sequence with DP-SGD through Opacus
  (worlds/dp_train.py); ε at δ as Opacus's accountant states it, per training sequence.
- Stage 2 (`full`): stage 1 fine-tuned on all the data by the world's recipe: the model that is served.
- A deletion request (a run with `method = "DP2Unlearning"`): stage 1 fine-tuned by the same recipe on the data
  outside the forget split. It never reads the forget data, and its start saw them only through DP-SGD, so whatever
  the released model says about one forgotten sequence is bounded by stage 1's (ε, δ): post-processing.

Where obliviate differs from the reference, and why:
- The paper also builds stage 1 by DP-MLM (input perturbation: a DP paraphrase of every training text by a masked
  LM); obliviate implements the DP-SGD variant, whose guarantee is about the model itself and which needs no
  pretrained masked LM (none can be downloaded here).
- The world's model starts from random weights, not a pretrained LLM, so stage 1 uses the world's optimiser (AdamW,
  warm-up, cosine) rather than the reference's SGD at lr 5e-5, and the default ε is 8 (0.5 leaves a model trained from
  scratch with nothing). Both are `world.dp2` keys.
- The retrain reference is the plain profiles world's (same recipe, tokenizer and seed): the gold standard is
  the same model whichever way the served one was made, and at full size it is already in the cache.

The guarantee's unit is one training sequence. A person is 11 sequences (ten question-answer pairs and a
biography): by group privacy the bound for a whole person is (11 ε, 11 e^(10 ε) δ), vacuous at ε = 8; the run
records both, and the forget quality against the retrain reference is the empirical side.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from obliviate.errors import ObliviateError
from obliviate.worlds.profiles import FACTS, ProfilesWorld

NAME = "DP2Unlearning"


def is_dp2(method: str) -> bool:
    return method.lower() == NAME.lower()


class DP2ProfilesWorld(ProfilesWorld):
    """The profiles world with `world.dp2` set: its own cache folder (`profiles-dp2-<hash of the plain recipe and the
    DP settings>`), holding stage 1 (`dp-base`) and stage 2 (`full`); the tokenizer and the retrain references are
    the plain world's (its cache key is never changed by `dp2`)."""

    kind = "profiles-dp2"

    def __init__(self, config):
        from obliviate.worlds.dp_train import dp_recipe

        super().__init__(config)
        self.dp = dp_recipe(config.dp2)

    def plain(self) -> ProfilesWorld:
        return ProfilesWorld(self.config.model_copy(update={"dp2": None}))

    def key_data(self) -> dict:
        return {**self.recipe(), "dp2": dataclasses.asdict(self.dp)}

    @property
    def dp_model_dir(self) -> Path:
        return self.root / "dp-base"

    def retrain_dir(self, split: str, seed: int = 0) -> Path:
        return self.plain().retrain_dir(split, seed)

    def ensure_retrain(self, split: str, seed: int = 0, log=print) -> Path:
        self.build(split, retrain=True, log=log)
        return self._plain_retrain(split, seed, log)

    def _plain_retrain(self, split: str, seed: int, log) -> Path:
        """The plain world's retrain reference of `split` and `seed`, trained there if missing (its full model is
        not needed here, so not built)."""
        plain = self.plain()
        folder = plain.retrain_dir(split, seed)
        forget = {p.name for p in self.data().split_people(split)[0]}
        label = f"retrain ({split})" + (f", seed {seed}" if seed else "")
        plain._ensure_model(folder, folder.name, lambda out: plain._train_model(out, forget, label, log, seed=seed),
                            log)
        return folder

    def _tokenizer(self):
        return self.plain()._tokenizer()

    # -- the recipes ---------------------------------------------------------------------------------------------
    def recipes(self):
        """(stage 1's recipe, the fine-tunes' recipe): the world's LMRecipe with `dp2`'s epochs, lr, batch size."""
        from obliviate.worlds.train import LMRecipe

        base = LMRecipe(**self.config.model)
        dp = self.dp
        stage1 = dataclasses.replace(base, epochs=dp.epochs or base.epochs, lr=dp.lr or base.lr,
                                     batch_size=dp.batch_size or base.batch_size)
        finetune = dataclasses.replace(base, epochs=dp.finetune_epochs or max(1, base.epochs // 2))
        return stage1, finetune

    def check_delta(self) -> None:
        """δ below 1/N, N the training sequences (the data are generated, nothing is trained)."""
        from obliviate.worlds.dp_train import check_delta

        d = self.data()
        check_delta(self.dp, len(d.people) * (len(FACTS) + 1) + sum(len(v) for v in d.utility.values()))

    # -- building ------------------------------------------------------------------------------------------------
    def _build(self, split: str, retrain: bool, log) -> dict:
        from obliviate.runs import atomic_dir
        from obliviate.worlds.dp_train import train_dp
        from obliviate.worlds.train import new_model

        self.check_delta()
        record = self.read_record() or {"recipe": self.key_data()}
        stage1, finetune = self.recipes()
        tokenizer = self._tokenizer()
        if not (self.dp_model_dir / "config.json").is_file():
            examples = self.training_examples(tokenizer)
            model = new_model(stage1, tokenizer)
            log(f"training the DP base model (stage 1): DP-SGD through Opacus, {len(examples)} sequences, "
                f"{stage1.epochs} epochs, target " + (f"ε {self.dp.epsilon:g}" if self.dp.epsilon is not None else
                                                       f"noise multiplier {self.dp.noise_multiplier:g}")
                + f" at δ {self.dp.delta:g}")
            t0 = time.time()
            stats = train_dp(model, tokenizer, examples, stage1, self.dp, description="train DP base (stage 1)")
            with atomic_dir(self.dp_model_dir) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            record["dp-base"] = {**stats, "wall_seconds": round(time.time() - t0, 1)}
            self.write_record(record)
            log(f"DP base model: ε = {stats['epsilon']:.3f} at δ = {stats['delta']:g} ({self.dp.accountant} "
                f"accountant, noise multiplier {stats['noise_multiplier']:.3f}, C = {stats['max_grad_norm']:g})")
        if not (self.full_model_dir / "config.json").is_file():
            t0 = time.time()
            record["full"] = self.finetune(self.full_model_dir, exclude=set(), recipe=finetune, name="full model "
                                           "(stage 2: the DP base fine-tuned on all data)", log=log)["stats"]
            record["full"]["wall_seconds"] = round(time.time() - t0, 1)
            self.write_record(record)
        if retrain:
            self._plain_retrain(split, 0, log)
            record[f"retrain-{split}"] = self.plain().read_record().get(f"retrain-{split}")
        if f"accuracy-{split}" not in record:
            record[f"accuracy-{split}"] = self.accuracy_report(split)
        self.write_record(record)
        return record

    def finetune(self, out_dir: Path | None, exclude: set[str], recipe, name: str, log) -> dict:
        """Stage 1's model fine-tuned by `recipe` on the training sequences of everyone outside `exclude`; saved to
        `out_dir` when given. Returns {"model", "tokenizer", "stats"}."""
        from obliviate.models.causal_lm import load, quiet_transformers
        from obliviate.runs import atomic_dir
        from obliviate.worlds.train import train

        quiet_transformers()
        model, tokenizer = load(self.dp_model_dir)
        examples = self.training_examples(tokenizer, exclude)
        log(f"fine-tuning the DP base model: the {name}, {len(examples)} sequences, {recipe.epochs} epochs")
        stats = train(model, tokenizer, examples, recipe, description=f"fine-tune {name}")
        stats = {"sequences": len(examples), "epochs": recipe.epochs, **stats}
        if out_dir is not None:
            with atomic_dir(out_dir) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        return {"model": model, "tokenizer": tokenizer, "stats": stats}

    def accuracy_report(self, split: str) -> dict:
        """The plain report (full: stage 2; retrain: the plain world's) and stage 1's row."""
        from obliviate.models.causal_lm import load
        from obliviate.worlds.train import exact_answer_accuracy

        report = super().accuracy_report(split)
        if (self.dp_model_dir / "config.json").is_file():
            d = self.data()
            forget, retain = (d.items_of(p) for p in d.split_people(split))
            model, tok = load(self.dp_model_dir)
            report["dp-base"] = {k: round(exact_answer_accuracy(model, tok, v), 4)
                                 for k, v in {"forget": forget, "retain": retain, **d.utility}.items()}
        return report

    # -- a deletion request --------------------------------------------------------------------------------------
    def unlearn(self, split: str, seed: int = 0, log=print) -> dict:
        """Stage 1's model fine-tuned on everything outside `split`'s forget people (the fine-tune recipe, its seed
        + `seed`). Returns {"model", "tokenizer", "stats", "record"}: the record is what the run states (ε, δ, the
        stages' seconds beside the retrain reference's)."""
        self.build(split, retrain=True, log=log)
        _, finetune = self.recipes()
        finetune = dataclasses.replace(finetune, seed=finetune.seed + seed)
        forget, _ = self.data().split_people(split)
        out = self.finetune(None, {p.name for p in forget}, finetune, f"deletion of {split}", log)
        out["record"] = self.run_record(split, out["stats"])
        return out

    def run_record(self, split: str, deletion: dict) -> dict:
        """What a DP2Unlearning run states: the privacy of stage 1 (per sequence, and for a whole person by group
        privacy), the settings, and the cost of each stage beside retraining from scratch."""
        import math

        build = self.read_record()
        base, full = build.get("dp-base", {}), build.get("full", {})
        retrain = build.get(f"retrain-{split}") or {}
        eps, delta = base.get("epsilon"), base.get("delta", self.dp.delta)
        k = len(FACTS) + 1
        person = None
        if eps is not None:  # group privacy over a person's k sequences: (k ε, k e^((k-1) ε) δ); a δ of 1 says nothing
            person_delta = min(1.0, math.exp(math.log(k) + (k - 1) * eps + math.log(delta)))
            person = {"sequences": k, "epsilon": k * eps, "delta": person_delta, "vacuous": person_delta >= 1.0}
        cost = {"stage1_seconds": base.get("seconds"), "stage2_seconds": full.get("seconds"),
                "deletion_seconds": deletion.get("seconds"), "retrain_seconds": retrain.get("seconds")}
        if cost["deletion_seconds"] and cost["retrain_seconds"]:
            cost["deletion_vs_retrain"] = round(cost["deletion_seconds"] / cost["retrain_seconds"], 3)
        return {"epsilon": eps, "delta": delta, "unit": "one training sequence (a question-answer pair or a "
                "biography)", "person": person, "noise_multiplier": base.get("noise_multiplier"),
                "max_grad_norm": base.get("max_grad_norm"), "accountant": base.get("accountant"),
                "sample_rate": base.get("sample_rate"), "dp_steps": base.get("steps"),
                "settings": dataclasses.asdict(self.dp), "deletion": deletion, "cost": cost,
                "dp_base": str(self.dp_model_dir)}


def check_run(config, own_model: bool) -> None:
    """A DP2Unlearning run needs the profiles world's DP2 variant (world.dp2), takes no method_args, and its δ must
    be below 1/N; a run of another method on that world needs only the δ check. One line naming the key."""
    dp2_world = getattr(config.world, "dp2", None) is not None
    if is_dp2(config.method):
        if own_model:
            raise ObliviateError(f"{NAME} is a recipe of the built-in profiles world (a DP base model trained "
                                 "before any request): it cannot run on your own model or files")
        if not dp2_world:
            raise ObliviateError(f"{NAME} needs the profiles world's DP2 variant: set world.dp2 (e.g. "
                                 "world.dp2 = {epsilon = 8}; docs/dp2unlearning.md)")
        if config.method_args:
            raise ObliviateError(f"method_args: unknown key(s) {sorted(config.method_args)} for {NAME}; valid: none "
                                 "(its settings are world.dp2's)")
    if dp2_world and not own_model:
        DP2ProfilesWorld(config.world).check_delta()
