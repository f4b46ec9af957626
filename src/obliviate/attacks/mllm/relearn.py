"""Relearning on a vision-language run (Hu et al. 2024, "Jogging the Memory of Unlearned LLMs",
https://arxiv.org/abs/2406.13356; Lynch et al. 2024, https://arxiv.org/abs/2402.16835): fine-tune the unlearned model
a few steps on a little data, with its pictures, and score the forget set again with MLLMU-Bench's protocol. The same
fine-tuning is run on the original and on the retrain model; the retrain model never knew the forget people, so the
gap between its scores and the unlearned model's after relearning is knowledge the unlearning hid, not removed.

What is fine-tuned on (`data`):
- "forget": the unlearning items (question, picture, answer) of `share` of the forget people, drawn with `seed`; the
  scores are measured on the other forget people's MLLMU-Bench items. A person's facts are asked in several forms
  (with each picture, by name, as a choice or a cloze), so the split is by person, not by item: no measured fact was
  fine-tuned on in another form. (The language-model attack splits each person's questions instead; MLLMU-Bench's
  release has one question per person.)
- "retain": retain people's items (benign relearning: no forget data at all); measured on every forget person.
After each of `steps` AdamW steps (batch `batch_size`, learning rate `lr`) the curve records the measured items'
multiple-choice accuracy with the picture (the headline) and as text, their cloze and ROUGE-L scores, and their mean
truth ratio (picture questions: P(true cloze value) over the wrong options', `evals/mllmu.truth_ratios`). Forget
quality at each point is the KS test of the model's truth ratios against the retrain model's at the same step (both
fine-tuned alike), as the run's forget quality compares the unlearned model with the retrain one.

Trained are the parts the run trained (`mllm.train_parts`: the run's model is loaded as the run loaded it). On a
guard run the guard is installed at load, so the weights are fine-tuned and scored under it; the `(unguarded)` row is
the same fine-tuning of the weights without it (the original's, as a guard changes no weight)."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from obliviate.attacks.mllm.common import SCORES, Target, forget_people, require_scored, score
from obliviate.attacks.running import Attack
from obliviate.errors import ObliviateError

DATA = ("forget", "retain")


@dataclass
class RelearnConfig:
    data: str = "forget"
    share: float = 0.5  # data = "forget": the share of the forget people fine-tuned on
    steps: int = 10
    lr: float = 1e-5  # a fine-tuning rate for a pretrained model (Hu et al. fine-tune at 1e-5 to 2e-5)
    batch_size: int = 8
    seed: int = 0
    eval_every: int = 1  # measure the curve every this many steps (and after the last)

    def __post_init__(self):
        if self.data not in DATA:
            raise ObliviateError(f"mllm_relearn data must be one of {', '.join(DATA)}, got {self.data!r}")
        if not 0 < self.share < 1:
            raise ObliviateError(f"mllm_relearn share must be between 0 and 1, got {self.share}")
        if min(self.steps, self.batch_size, self.eval_every) < 1 or not self.lr > 0:
            raise ObliviateError("mllm_relearn steps, batch_size and eval_every must be at least 1 and lr positive")


def split_people(people: list[str], share: float, seed: int) -> tuple[set[str], set[str]]:
    """(fine-tuned, measured) people: `share` of them drawn at random, at least one on each side."""
    people = people[:]
    random.Random(seed).shuffle(people)
    k = min(max(1, round(share * len(people))), len(people) - 1)
    return set(people[:k]), set(people[k:])


class Relearn(Attack):
    Config = RelearnConfig
    headline = "classification_image"
    columns = ("classification_image_before", "classification_image", "classification_text_before",
               "classification_text", "truth_ratio_before", "truth_ratio", "forget_quality")
    percent = ("classification_image_before", "classification_image", "classification_text_before",
               "classification_text")

    @property
    def label(self) -> str:
        return "relearned accuracy" if self.config.data == "forget" else f"relearned accuracy ({self.config.data})"

    def result_name(self, name: str) -> str:
        """Relearning on retain people is another attack: its result is kept beside the first."""
        return name if self.config.data == "forget" else f"{name}_{self.config.data}"

    def data(self, target: Target) -> tuple[list, list]:
        """(what is fine-tuned on, the forget set's items measured)."""
        require_scored(target, "mllm_relearn")
        if self.config.data == "retain":
            if not target.retain:
                raise ObliviateError("mllm_relearn data = 'retain': the run has no retain items")
            return target.retain, target.scored
        people = forget_people(target.forget)
        if len(people) < 2:
            raise ObliviateError(f"the mllm_relearn attack fine-tunes on some forget people and measures the others: "
                                 f"the run forgets {len(people)} person; use data=retain")
        trained, measured = split_people(people, self.config.share, self.config.seed)
        train = [i for i in target.forget if i.subject in trained]
        scored = [i for i in target.scored if i.subject in measured]
        if not scored:
            raise ObliviateError("the mllm_relearn attack found no forget-set items of the measured people "
                                 f"({', '.join(sorted(measured))})")
        return train, scored

    def check(self, target: Target) -> None:
        self.data(target)

    def run(self, target: Target, log=print) -> dict:
        from obliviate.evals.tofu import forget_quality

        train, measured = self.data(target)
        models, per_item, curves = {}, {}, {}
        for name, load in target.models.items():
            model, processor = load()
            curve, rows = self.relearn(model, processor, target, train, measured)
            before, after = curve[0], curve[-1]
            models[name] = {**{f"{k}_before": before[k] for k in (*SCORES, "truth_ratio")},
                            **{k: after[k] for k in (*SCORES, "truth_ratio")}, "n": len(measured),
                            "n_train": len(train)}
            per_item[name] = [{"subject": r["subject"], "image": r["image"], "question": r["question"],
                               **{f"{k}_before": b.get(k) for k in ("classification", "cloze", "rouge_l",
                                                                    "truth_ratio")},
                               **{k: r.get(k) for k in ("chosen", "classification", "filled", "cloze", "generated",
                                                        "rouge_l", "truth_ratio")}}
                              for b, r in zip(rows[0], rows[-1])]
            curves[name] = curve
            log(f"  {name}: multiple choice with the picture {_pct(before['classification_image'])} -> "
                f"{_pct(after['classification_image'])} after {self.config.steps} steps")
            del model
        reference = curves.get("retrain")
        for name, curve in curves.items():  # against the retrain model fine-tuned alike, point by point
            for k, point in enumerate(curve):
                ratios = point.pop("ratios")
                point["forget_quality"] = (forget_quality(ratios, reference[k]["ratios"] if name != "retrain"
                                                          else ratios)
                                           if reference is not None and ratios else None)
            models[name]["forget_quality_before"] = curve[0]["forget_quality"]
            models[name]["forget_quality"] = curve[-1]["forget_quality"]
        return {"models": models, "per_item": per_item, "curves": curves,
                "fine_tuned_people": sorted({i.subject for i in train}) if self.config.data == "forget" else [],
                "measured": "the other forget people's items" if self.config.data == "forget"
                else "every forget person's items"}

    def relearn(self, model, processor, target: Target, train: list, measured: list):
        """Fine-tune `model` in place; returns the curve (step 0 = before) and the measured rows at each point."""
        from obliviate.models.sequences import mean_nll, model_device, to_device

        c, tokenizer = self.config, processor.tokenizer
        adapter = target.adapter(processor)
        history: list[list[dict]] = []

        def measure(step: int, loss: float | None) -> dict:
            aggregate, rows = score(model, adapter, tokenizer, measured, target.batch_size, target.max_new_tokens)
            history.append(rows)
            # the ratios stay until forget quality is computed against the retrain model's (then dropped)
            return {"step": step, "loss": loss, **{k: aggregate[k] for k in (*SCORES, "truth_ratio")},
                    "ratios": aggregate["ratios"]}

        encoded = [adapter.encode_item(tokenizer, item) for item in train]
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ObliviateError("mllm_relearn: the run's model has no trainable parameter (mllm.train_parts)")
        opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=0.0)
        rng = random.Random(c.seed)
        order: list[int] = []
        curve = [measure(0, None)]
        for step in range(1, c.steps + 1):
            if len(order) < c.batch_size:  # epochs over the data, reshuffled
                more = list(range(len(encoded)))
                rng.shuffle(more)
                order += more * max(1, -(-c.batch_size // len(more)))
            picked, order = order[:c.batch_size], order[c.batch_size:]
            model.train()
            batch = to_device(adapter.collate([encoded[i] for i in picked], tokenizer.pad_token_id),
                              model_device(model))
            loss = mean_nll(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % c.eval_every == 0 or step == c.steps:
                curve.append(measure(step, loss.item()))
        return curve, history


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"
