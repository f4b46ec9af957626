"""Relearning (Hu et al. 2024, "Jogging the Memory of Unlearned LLMs", https://arxiv.org/abs/2406.13356; Lynch et al.
2024): fine-tune the unlearned model for a few steps on a little data, and watch the forget set come back. The same
fine-tuning is run on the retrain model, which never knew the forget set and so learns it from scratch: the gap
between the two curves is knowledge the unlearning hid rather than removed.

What is fine-tuned on (`data`):
- "forget": part of the forget items (`share` of each subject's questions, drawn with `seed`); the curve is measured
  on the other questions of the same people, so a rise there can only come from what the model still held;
- "biographies": the forget people's texts (the same facts in other words); measured on every forget question;
- "retain": retain people's questions (benign relearning: no forget data at all); measured on every forget question.
After each of `steps` AdamW steps (batch `batch_size`, learning rate `lr`) the curve records the share of measured
items recalled (greedy answer holds the fact) and their mean truth ratio (TOFU: P(paraphrased answer) over the
geometric mean of P(perturbed answers), per token; above 1 the model prefers the truth)."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from obliviate.attacks.lm.common import Attack, Target, ask, recalled, require
from obliviate.errors import ObliviateError

DATA = ("forget", "biographies", "retain")


@dataclass
class RelearnConfig:
    data: str = "forget"
    share: float = 0.5  # data = "forget": the share of each subject's questions fine-tuned on
    steps: int = 10
    lr: float = 1e-5  # a fine-tuning rate for a pretrained LLM (Hu et al. fine-tune at 1e-5 to 2e-5)
    batch_size: int = 8
    seed: int = 0
    eval_every: int = 1  # measure the curve every this many steps (and after the last)
    max_new_tokens: int = 48

    def __post_init__(self):
        if self.data not in DATA:
            raise ObliviateError(f"relearn data must be one of {', '.join(DATA)}, got {self.data!r}")
        if not 0 < self.share < 1:
            raise ObliviateError(f"relearn share must be between 0 and 1, got {self.share}")
        if min(self.steps, self.batch_size, self.eval_every, self.max_new_tokens) < 1 or not self.lr > 0:
            raise ObliviateError("relearn steps, batch_size, eval_every and max_new_tokens must be at least 1 and lr "
                                 "positive")


def split_by_subject(items: list, share: float, seed: int) -> tuple[list, list]:
    """(fine-tuned, measured): `share` of each subject's items, drawn at random, and the rest; every subject with
    at least two items keeps at least one on each side."""
    by_subject: dict = {}
    for item in items:
        by_subject.setdefault(item.subject, []).append(item)
    rng = random.Random(seed)
    train, held = [], []
    for group in by_subject.values():
        group = group[:]
        rng.shuffle(group)
        k = min(max(1, round(share * len(group))), len(group) - 1) if len(group) > 1 else 0
        train += group[:k]
        held += group[k:]
    return train, held


class Relearn(Attack):
    Config = RelearnConfig
    headline = "recall"
    columns = ("recall_before", "recall", "truth_ratio_before", "truth_ratio")
    percent = ("recall_before", "recall")

    def data(self, target: Target) -> tuple[list, list]:
        """(what is fine-tuned on, the forget items the curve measures)."""
        c = self.config
        if c.data == "forget":
            train, measured = split_by_subject(target.forget, c.share, c.seed)
            require(train, "subjects with at least two questions", "relearn")
            return train, measured
        train = target.forget_texts if c.data == "biographies" else target.retain
        if not train:
            raise ObliviateError(f"relearn data = {c.data!r}: the run has no " + (
                "texts of the forget subjects" if c.data == "biographies" else "retain items"))
        return train, target.forget

    @property
    def label(self) -> str:
        return "relearned" if self.config.data == "forget" else f"relearned ({self.config.data})"

    def result_name(self, name: str) -> str:
        """Relearning on other data is another attack: its result is kept beside the first (relearn_retain.json)."""
        return name if self.config.data == "forget" else f"{name}_{self.config.data}"

    def check(self, target: Target) -> None:
        self.data(target)

    def run(self, target: Target, log=print) -> dict:
        train, measured = self.data(target)
        models, per_item, curves = {}, {}, {}
        for name, load in target.models.items():
            model, tok = load()
            curve, answers = self.relearn(model, tok, train, measured, target.batch_size)
            rows = [{"subject": i.subject, "question": i.question, "answer_before": before, "answer": after,
                     "recalled_before": recalled(before, i), "recalled": recalled(after, i)}
                    for i, before, after in zip(measured, answers[0], answers[-1])]
            hidden = [r for r in rows if not r["recalled_before"]]
            models[name] = {"recall_before": curve[0]["recall"], "recall": curve[-1]["recall"],
                            "truth_ratio_before": curve[0]["truth_ratio"], "truth_ratio": curve[-1]["truth_ratio"],
                            "asr": sum(r["recalled"] for r in hidden) / len(hidden) if hidden else None,
                            "n": len(rows), "n_train": len(train)}
            per_item[name], curves[name] = rows, curve
            log(f"  {name}: recall {curve[0]['recall']:.1%} -> {curve[-1]['recall']:.1%} after "
                f"{self.config.steps} steps")
        return {"models": models, "per_item": per_item, "curves": curves,
                "measured": "held-out questions of the forget subjects" if self.config.data == "forget"
                else "every forget question"}

    def relearn(self, model, tokenizer, train: list, measured: list, eval_batch: int):
        """Fine-tune `model` in place; returns the curve (step 0 = before) and the answers at each point."""
        from obliviate.evals.metrics import likelihood_metrics
        from obliviate.models import causal_lm as lm
        from obliviate.models.sequences import collate, mean_nll, model_device, to_device

        c = self.config

        def measure(step: int, loss: float | None) -> dict:
            model.eval()
            answers = ask(model, tokenizer, [i.question for i in measured], eval_batch, c.max_new_tokens)
            with torch.no_grad():
                ratios = [s["truth_ratio"] for s in likelihood_metrics(model, tokenizer, measured, eval_batch)
                          if s["truth_ratio"] is not None]
            history.append(answers)
            return {"step": step, "loss": loss, "recall": sum(recalled(a, i) for a, i in zip(answers, measured))
                    / len(measured), "truth_ratio": sum(ratios) / len(ratios) if ratios else None}

        encoded = [lm.encode_item(tokenizer, item) for item in train]
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=0.0)
        rng = random.Random(c.seed)
        order: list[int] = []
        history: list[list[str]] = []
        curve = [measure(0, None)]
        for step in range(1, c.steps + 1):
            if len(order) < c.batch_size:  # epochs over the data, reshuffled
                more = list(range(len(encoded)))
                rng.shuffle(more)
                order += more * max(1, -(-c.batch_size // len(more)))
            picked, order = order[:c.batch_size], order[c.batch_size:]
            model.train()
            batch = to_device(collate([encoded[i] for i in picked], tokenizer.pad_token_id), model_device(model))
            loss = mean_nll(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % c.eval_every == 0 or step == c.steps:
                curve.append(measure(step, loss.item()))
        return curve, history
