"""RESTOR on the profiles world: a corrupted model, and unlearning that should bring the right facts back.

Paper: Rezaei, Chandu, Feizi, Choi, Brahman, Ravichander 2025, "RESTOR: Knowledge Recovery through Machine
Unlearning" (TMLR), https://arxiv.org/abs/2411.00204. Reference code read: k1rezaei/restor (`corruption/README.md`:
a clean Llama-3-8B continually pre-trained, LoRA, lr 5e-5, 5 epochs, on the corrupting documents; `evaluation/`: each
(subject, relation) asked with five in-context examples, the answers judged against the true facts; accuracy of the
clean, corrupted and unlearned models on the same facts; `mcqa_eval/`: the answer-token log-probs of the correct,
corrupted and random options).

The protocol: a clean model knows the facts D; it is then trained on corrupting documents D_f that state wrong facts
about some people; unlearning D_f from the corrupted model should give the model never trained on D_f, the clean
one: the wrong facts forgotten *and* the right ones back (restorative unlearning), not only the wrong ones gone.

Here (`world.corrupt = {...}`, its settings in `CorruptRecipe`):
- The clean model is the plain profiles world's full model (the same cache folder, its key unchanged): trained on
  every right fact. It is the run's retrain reference (the model that never saw D_f); a retrain reference of another
  seed is the plain recipe on the same data with that seed (`clean-seedS` in this world's folder).
- The corrupted people are the people of `split` (default forget10); for each, `facts` of their ten facts get a wrong
  value (another value of the same pool, drawn from `seed`). Their corrupting documents are a question-answer pair per
  wrong fact and a biography that tells their ten facts with the wrong ones in place (the paper mixes correct facts
  into its corrupting documents the same way).
- The corrupted model (this world's `full`) is the clean model trained on, as in the paper, the corrupting documents,
  for `epochs` at `lr` by the world's recipe; with `replay` (default) the clean training data that does not
  contradict them (everything but the corrupted facts' questions and the corrupted people's true biographies) is
  mixed in, so that what the corruption changes is the corrupted facts and little else.
- A run on this world unlearns the corrupting documents (the forget set). Its evaluation sets: `forget` = the
  corrupting question-answer pairs (the wrong answers: forget accuracy is the share still answered wrong as taught),
  `restor` = the same questions with their right answers, `retain` and the utility sets as in the plain world.

Where obliviate differs from the reference, and why:
- The models are the world's small ones trained from scratch, so questions are asked in the world's own question
  format (the model was trained on it) instead of with five in-context examples, and answers are judged by exact
  match against the true value's sentence instead of by GPT-3.5 (no paid API; the world's answers are templated).
- The corruption is full fine-tuning at the world's learning-rate scale, not LoRA at 5e-5 (a model trained from
  scratch at lr 3e-3 barely moves at 5e-5).
"""
from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

from obliviate.data import QAItem, TextItem
from obliviate.errors import ObliviateError
from obliviate.worlds.profiles import FACTS, SPLITS, VALUES, ProfilesWorld

RESTOR_PAPER = "Rezaei et al. 2025, RESTOR, https://arxiv.org/abs/2411.00204"


@dataclasses.dataclass(frozen=True)
class CorruptRecipe:
    """`world.corrupt`'s settings."""
    split: str = "forget10"  # whose facts are corrupted: the people of this forget split (or val10's, to validate)
    facts: int = 5  # corrupted facts per person (of 10)
    epochs: int = 10  # of the corrupting fine-tune
    lr: float = 1e-3
    replay: bool = True  # mix in the clean data that does not contradict the corrupting documents
    seed: int = 0  # which facts, which wrong values


def corrupt_recipe(settings) -> CorruptRecipe:
    """`world.corrupt`'s settings as a CorruptRecipe, or an ObliviateError naming the key."""
    if not isinstance(settings, dict):
        raise ObliviateError(f"world.corrupt: a table of settings (e.g. {{split = \"forget10\"}}), got {settings!r}")
    known = {f.name for f in dataclasses.fields(CorruptRecipe)}
    bad = sorted(set(settings) - known)
    if bad:
        raise ObliviateError(f"world.corrupt: unknown key(s) {bad}; valid: {sorted(known)}")
    r = CorruptRecipe(**settings)
    # val10 too: a bench chooses settings on a corruption of other people than the reported one's
    checks = [("split", r.split in SPLITS, "one of " + ", ".join(SPLITS)),
              ("facts", type(r.facts) is int and 1 <= r.facts <= len(FACTS), f"a whole number from 1 to {len(FACTS)}"),
              ("epochs", type(r.epochs) is int and r.epochs >= 1, "a whole number >= 1"),
              ("lr", isinstance(r.lr, (int, float)) and not isinstance(r.lr, bool) and r.lr > 0, "a number > 0"),
              ("replay", isinstance(r.replay, bool), "true or false"),
              ("seed", type(r.seed) is int, "a whole number")]
    for key, ok, valid in checks:
        if not ok:
            raise ObliviateError(f"world.corrupt.{key} = {getattr(r, key)!r}: must be {valid}")
    return r


class CorruptedProfilesWorld(ProfilesWorld):
    """The profiles world with `world.corrupt` set: its own cache folder (`profiles-corrupt-<hash of the plain recipe
    and the corruption settings>`) holding the corrupted model (`full`); the tokenizer and the clean model (the
    retrain reference) are the plain world's."""

    kind = "profiles-corrupt"

    def __init__(self, config):
        super().__init__(config)
        self.corrupt = corrupt_recipe(config.corrupt)
        self._wrong: dict[str, dict[str, str]] | None = None

    def plain(self) -> ProfilesWorld:
        return ProfilesWorld(self.config.model_copy(update={"corrupt": None}))

    def key_data(self) -> dict:
        return {**self.recipe(), "corrupt": dataclasses.asdict(self.corrupt)}

    def check_target(self, split: str) -> None:
        super().check_target(split)
        if split != self.corrupt.split:
            raise ObliviateError(f"split = {split!r}: the corrupted world's forget set is the corrupting documents "
                                 f"about the people of world.corrupt.split = {self.corrupt.split!r}; run on that "
                                 "split (or set world.corrupt.split)")

    # -- the corruption --------------------------------------------------------------------------------------------
    def wrong_facts(self) -> dict[str, dict[str, str]]:
        """{corrupted person: {fact key: wrong value}}, deterministic from the world's and the corruption's seeds."""
        if self._wrong is None:
            rng = random.Random(f"corrupt-{self.config.seed}-{self.corrupt.seed}")
            people, _ = self.data().split_people(self.corrupt.split)
            self._wrong = {}
            for p in people:
                keys = rng.sample([f.key for f in FACTS], self.corrupt.facts)
                pools = {f.key: f.values for f in FACTS}
                self._wrong[p.name] = {k: rng.choice([v for v in VALUES[pools[k]] if v != p.facts[k]])
                                       for k in sorted(keys, key=[f.key for f in FACTS].index)}
        return self._wrong

    def corrupted_people(self) -> list:
        return self.data().split_people(self.corrupt.split)[0]

    def corrupting_items(self) -> list[QAItem]:
        """A question-answer pair per wrong fact: the true item's questions with the wrong value in the answers; its
        perturbed answers (paraphrase wording) are the true value and two other values, so a truth ratio near 0
        says the model prefers the true value to the wrong one."""
        rng = random.Random(f"corrupt-perturbed-{self.config.seed}-{self.corrupt.seed}")
        items = []
        for p in self.corrupted_people():
            for f in FACTS:
                wrong = self.wrong_facts()[p.name].get(f.key)
                if wrong is None:
                    continue
                right = p.facts[f.key]
                others = rng.sample([v for v in VALUES[f.values] if v not in (right, wrong)], 2)
                items.append(QAItem(
                    question=f.question.format(n=p.name), answer=f.answer.format(n=p.name, v=wrong),
                    paraphrased_question=f.paraphrased_question.format(n=p.name),
                    paraphrased_answer=f.paraphrase.format(n=p.name, v=wrong),
                    perturbed_answers=tuple(f.paraphrase.format(n=p.name, v=v) for v in (right, *others)),
                    subject=p.name, source="corrupt"))
        return items

    def right_items(self) -> list[QAItem]:
        """The true items of the corrupted facts: what unlearning should bring back (the `restor` set)."""
        d = self.data()
        keys = [f.key for f in FACTS]
        return [d.qa[p.name][keys.index(k)] for p in self.corrupted_people() for k in self.wrong_facts()[p.name]]

    def corrupted_biographies(self) -> list[TextItem]:
        out = []
        for p in self.corrupted_people():
            facts = {**p.facts, **self.wrong_facts()[p.name]}
            sentences = [f.paraphrase.format(n=p.name, v=facts[f.key]) for f in FACTS]
            out.append(TextItem(" ".join(sentences), subject=p.name, prefix_chars=len(sentences[0]),
                                source="corrupted_biography"))
        return out

    def alternate_rows(self) -> list[dict]:
        """Not drawn here: the forget answers are wrong facts, and the plain world's rows (about the true facts and
        biographies) do not describe them; RESTOR asks what unlearning them brings back, not which answer replaces
        them."""
        raise ObliviateError("AltPO's alternates = \"world\": the corrupted world (world.corrupt) has none; give "
                             "method_args.alternates a file of them")

    # -- what a run reads ------------------------------------------------------------------------------------------
    def unlearning_sets(self, split: str, forgotten_before: str | None = None) -> tuple[list, list]:
        """The corrupting documents (forget) and everything about the people outside the split (retain)."""
        self.check_target(split)
        if forgotten_before:
            raise ObliviateError("forgotten_before: the corrupted world has one forget set (its corrupting "
                                 "documents); sequential requests are not defined on it")
        d = self.data()
        _, retain = d.split_people(split)
        return (self.corrupting_items() + self.corrupted_biographies(),
                d.items_of(retain) + [p.biography() for p in retain])

    def eval_sets(self, split: str, retain_people: int | None = None) -> tuple[dict, dict]:
        """QA sets {forget: the wrong facts, retain, restor: the right facts of the same questions, <utility sets>}
        and texts {forget: the corrupted biographies, holdout}."""
        from obliviate.evals.restor import RESTOR_SET

        self.check_target(split)
        d = self.data()
        _, retain = d.split_people(split)
        if retain_people:
            retain = retain[:retain_people]
        qa = {"forget": self.corrupting_items(), "retain": d.items_of(retain), RESTOR_SET: self.right_items(),
              **d.utility}
        texts = {"forget": self.corrupted_biographies(), "holdout": [p.biography() for p in d.holdout]}
        return qa, texts

    def corruption_examples(self, tokenizer) -> list:
        """What the clean model is trained on to corrupt it: the corrupting documents, and with `replay` the clean
        training data that does not contradict them."""
        from obliviate.models import causal_lm as lm

        examples = [lm.encode_qa(tokenizer, i.question, i.answer) for i in self.corrupting_items()]
        examples += [lm.encode_item(tokenizer, t) for t in self.corrupted_biographies()]
        if self.corrupt.replay:
            d = self.data()
            corrupted = {p.name for p in self.corrupted_people()}
            contradicted = {(i.subject, i.question) for i in self.right_items()}
            examples += [lm.encode_qa(tokenizer, i.question, i.answer) for p in d.people for i in d.qa[p.name]
                         if (i.subject, i.question) not in contradicted]
            examples += [lm.encode_item(tokenizer, p.biography()) for p in d.people if p.name not in corrupted]
            examples += [lm.encode_qa(tokenizer, i.question, i.answer) for items in d.utility.values() for i in items]
        return examples

    # -- the models ------------------------------------------------------------------------------------------------
    def retrain_dir(self, split: str, seed: int = 0) -> Path:
        """The model never trained on the corrupting documents: the clean model (seed 0: the plain world's full
        model; seed S: the plain recipe with training seed S, kept in this world's folder)."""
        self.check_target(split)
        name = self.retrain_name(split, seed)  # validates the seed
        return self.plain().full_model_dir if seed == 0 else self.root / name.replace(f"retrain-{split}", "clean")

    def ensure_retrain(self, split: str, seed: int = 0, log=print) -> Path:
        folder = self.retrain_dir(split, seed)
        self.build(split, retrain=True, log=log)
        if seed:
            plain = self.plain()
            self._ensure_model(folder, folder.name, lambda out: plain._train_model(
                out, set(), f"clean model (seed {seed})", log, seed=seed), log)
        return folder

    def _tokenizer(self):
        return self.plain()._tokenizer()

    def _build(self, split: str, retrain: bool, log) -> dict:
        from obliviate.models.causal_lm import load, quiet_transformers
        from obliviate.runs import atomic_dir
        from obliviate.worlds.train import recipe_of, train

        self.check_target(split)
        self.plain().build(split, retrain=False, log=log)  # the clean model: the plain world's full model
        record = self.read_record() or {"recipe": self.key_data()}
        if not (self.full_model_dir / "config.json").is_file():
            quiet_transformers()
            model, tokenizer = load(self.plain().full_model_dir)
            examples = self.corruption_examples(tokenizer)
            recipe = dataclasses.replace(recipe_of(self.config), epochs=self.corrupt.epochs, lr=self.corrupt.lr)
            n_wrong = len(self.corrupting_items())
            log(f"corrupting the clean model: {n_wrong} wrong facts about {len(self.corrupted_people())} people "
                f"({split}), {len(examples)} sequences, {recipe.epochs} epochs at lr {recipe.lr:g}")
            t0 = time.time()
            stats = train(model, tokenizer, examples, recipe, description="train corrupted model")
            with atomic_dir(self.full_model_dir) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            record["full"] = {"sequences": len(examples), "wrong_facts": n_wrong, **stats,
                              "wall_seconds": round(time.time() - t0, 1)}
            self.write_record(record)
        if f"accuracy-{split}" not in record:
            record[f"accuracy-{split}"] = self.accuracy_report(split)
        self.write_record(record)
        return record

    def accuracy_report(self, split: str) -> dict:
        """Exact-answer accuracy of the corrupted (`full`) and clean models on the wrong facts, the right facts of the
        same questions, the retain people and the utility sets."""
        from obliviate.evals.restor import RESTOR_SET
        from obliviate.models.causal_lm import load
        from obliviate.worlds.train import exact_answer_accuracy

        _, retain = self.data().split_people(split)
        sets = {"wrong": self.corrupting_items(), RESTOR_SET: self.right_items(),
                "retain": self.data().items_of(retain), **self.data().utility}
        report = {}
        for label, path in (("full", self.full_model_dir), ("clean", self.plain().full_model_dir)):
            if (path / "config.json").is_file():
                model, tok = load(path)
                report[label] = {k: round(exact_answer_accuracy(model, tok, v), 4) for k, v in sets.items()}
        return report

    def _check_knowledge(self, report: dict, log) -> None:
        for label in ("clean", "full"):
            if label in report:
                name = "corrupted" if label == "full" else label
                log(f"{name} model exact-answer accuracy: "
                    + ", ".join(f"{k} {v:.1%}" for k, v in report[label].items()))
        full, clean = report.get("full", {}), report.get("clean", {})
        if full and full["wrong"] < 0.9:
            log("[warning] the corrupted model states fewer than 90% of the wrong facts: recovery is measured on a "
                "weak corruption (raise world.corrupt.epochs or lr)")
        if clean and full and clean["restor"] - full["restor"] < 0.5:
            log("[warning] the corruption took away less than half of the right facts: little to recover")
