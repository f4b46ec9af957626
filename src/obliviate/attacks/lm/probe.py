"""Probing: is the forgotten attribute still linearly readable from the model's hidden states? A logistic-regression
probe (scikit-learn) is trained on retain people's hidden states to read an attribute (an occupation, a birthplace)
from the question that asks for it, then applied to the forget people (Belinkov 2022, "Probing Classifiers",
https://arxiv.org/abs/2102.12452; the probing analyses of output-level unlearning). The retrain model, which never
saw the forget people, shows what a probe reads without any memory of them (about the majority baseline).

Features: the hidden state at the last prompt token of each question (the question and its paraphrase), at the layer
chosen by grouped cross-validation over the retain people (`layer` fixes it instead). The probe is refitted for
every model: it reads each model's own representation."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from obliviate.attacks.lm.common import Attack, Target
from obliviate.errors import ObliviateError


@dataclass
class ProbeConfig:
    attributes: tuple[str, ...] = ("occupation", "birthplace")
    layer: int | None = None  # hidden-state index (0: embeddings); None: chosen by cross-validation on retain people
    c: float = 1.0  # inverse regularisation strength of the logistic regression
    folds: int = 5

    def __post_init__(self):
        self.attributes = (self.attributes,) if isinstance(self.attributes, str) else tuple(self.attributes)
        if not self.attributes or self.folds < 2 or not self.c > 0:
            raise ObliviateError("probe needs at least one attribute, folds >= 2 and c > 0")


def last_token_states(model, tokenizer, questions: list[str], batch_size: int) -> torch.Tensor:
    """[layers + 1, N, D]: each layer's hidden state at the last prompt token of each question."""
    from obliviate.models import causal_lm as lm
    from obliviate.models.sequences import left_padded, model_device

    prompts = [lm.question_prompt(tokenizer, q) for q in questions]
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            ids, mask = left_padded(prompts[start:start + batch_size], tokenizer.pad_token_id)
            device = model_device(model)
            hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           output_hidden_states=True).hidden_states
            out.append(torch.stack([h[:, -1].float().cpu() for h in hidden]))
    return torch.cat(out, dim=1)


def fit_probe(features, labels, groups, c: float, folds: int, layer: int | None) -> tuple[object, int, float]:
    """(the probe fitted on every row, its layer, the grouped cross-validation accuracy at that layer)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def probe():
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))

    k = min(folds, len(set(groups)))
    layers = [layer] if layer is not None else range(features.shape[0])
    scores = {n: cross_val_score(probe(), features[n].numpy(), labels, groups=groups, cv=GroupKFold(k)).mean()
              for n in layers}
    best = max(scores, key=scores.get)
    return probe().fit(features[best].numpy(), labels), best, float(scores[best])


class Probe(Attack):
    Config = ProbeConfig
    headline, label = "accuracy", "probe (acc)"
    columns = ("chance", "accuracy", "retain_cv")
    percent = ("chance", "accuracy", "retain_cv")

    def rows(self, target: Target) -> dict[str, tuple[list, list]]:
        """attribute -> (retain rows, forget rows); a row is (subject, value, question)."""
        if not target.attributes:
            raise ObliviateError("the probe attack needs each person's attributes: it runs on the profiles world's "
                                 "runs (users' files name no attributes)")
        forget = {i.subject for i in target.forget}
        retain = {i.subject for i in target.retain} - forget
        out = {}
        for attr in self.config.attributes:
            rows = [(r["subject"], r["value"], q) for r in target.attributes if r["attribute"] == attr
                    for q in r["questions"]]
            if not rows:
                valid = sorted({r["attribute"] for r in target.attributes})
                raise ObliviateError(f"probe attribute {attr!r} is not known; valid: {', '.join(valid)}")
            out[attr] = ([r for r in rows if r[0] in retain], [r for r in rows if r[0] in forget])
        return out

    def check(self, target: Target) -> None:
        self.rows(target)

    def run(self, target: Target, log=print) -> dict:
        data = self.rows(target)
        models, per_item = {}, {}
        for name, load in target.models.items():
            model, tok = load()
            model.eval()
            aggregate, rows = {}, []
            for attr, (train, test) in data.items():
                states = last_token_states(model, tok, [q for *_, q in train + test], target.batch_size)
                x_train, x_test = states[:, :len(train)], states[:, len(train):]
                labels = [v for _, v, _ in train]
                probe, layer, cv = fit_probe(x_train, labels, [s for s, _, _ in train], self.config.c,
                                             self.config.folds, self.config.layer)
                predicted = probe.predict(x_test[layer].numpy())
                majority = Counter(labels).most_common(1)[0][0]
                rows += [{"subject": s, "attribute": attr, "question": q, "value": v, "predicted": str(p),
                          "correct": str(p) == v} for (s, v, q), p in zip(test, predicted)]
                aggregate.update({f"accuracy_{attr}": float((predicted == [v for _, v, _ in test]).mean()),
                                  f"chance_{attr}": sum(v == majority for _, v, _ in test) / len(test),
                                  f"layer_{attr}": layer, f"retain_cv_{attr}": cv})
            for key in ("accuracy", "chance", "retain_cv"):
                aggregate[key] = sum(aggregate[f"{key}_{a}"] for a in data) / len(data)
            aggregate["n"] = len(rows)
            models[name], per_item[name] = aggregate, rows
            log(f"  {name}: probe accuracy on forget people {aggregate['accuracy']:.1%} "
                f"(majority baseline {aggregate['chance']:.1%})")
        return {"models": models, "per_item": per_item}
