"""The language-model metrics, one function per declaration in `registry.METRICS` (its `target`), called by
`evaluate.evaluate_lm` and `evaluate.compare_to_retrain` for the declarations whose inputs exist:

- an item metric takes the item's share of one shared input: `ItemLikelihood` (needs "logprobs": the one forward
  pass over the item's answer, paraphrase and perturbed answers) or `Generation` (needs "generations" or
  "paraphrased_generations": a greedy answer);
- a set metric takes the set's per-item rows (`SetRows`);
- a run metric takes the whole evaluation (`Evaluation`), and the retrain reference's when it needs "retrain".
A function returns SKIP when its key is not written (e.g. no truth ratios to compare). Formulas: docs/metrics.md."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from obliviate.evals import metrics as M
from obliviate.evals import tofu as TOFU
from obliviate.evals.metrics import ItemLikelihood

SKIP = object()  # a function's answer when its key is not written at all


def mean(values) -> float | None:
    """The mean of the values that are neither None nor NaN (None when none is left): an item metric's set mean."""
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else None


def _finite_or_none(x):
    return x if x is None or math.isfinite(x) else None


@dataclass
class Generation:
    """One greedy answer: its text, the true answer it is scored against, and whether it ran to the token limit."""
    text: str
    reference: str
    at_limit: bool


@dataclass
class SetRows:
    """A question-answer set's per-item rows, whether it is the forget set, and whether its probability score is
    normalised (TOFU's world facts / real authors)."""
    name: str
    rows: list[dict]
    forget: bool
    normalised: bool


@dataclass
class Evaluation:
    """What run metrics read: the per-item rows, the aggregate so far (the sets' blocks, the run metrics computed
    before), the evaluation's settings, the raw results of the shared inputs ("membership", "verbmem"), and the retrain
    reference's evaluation when compared with it."""
    per_item: Mapping[str, list[dict]]
    aggregate: dict
    config: Mapping
    inputs: Mapping = field(default_factory=dict)
    retrain: Mapping | None = None
    cache: dict = field(default_factory=dict)

    @property
    def forget(self) -> str:
        return self.config["forget_set_name"]

    @property
    def retain(self) -> str:
        return self.config["retain_set_name"]

    def once(self, key: str, compute):
        """A value several metrics read (model utility and its components), computed once."""
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]


# ---------------------------------------------------------------------------------------- items: the likelihood pass
def answer_nll(x: ItemLikelihood) -> float:
    return x.nll


def answer_prob(x: ItemLikelihood) -> float:
    return M.answer_prob(x.nll)


def paraphrase_nll(x: ItemLikelihood) -> float:
    return x.paraphrase_nll


def perturbed_nlls(x: ItemLikelihood) -> list[float]:
    return x.perturbed_nlls


def truth_ratio(x: ItemLikelihood) -> float | None:
    return M.truth_ratio(x.paraphrase_nll, x.perturbed_nlls) if x.perturbed_nlls else None


def answer_prob_normalised(x: ItemLikelihood) -> float | None:
    return M.normalised_prob(x.nll, x.perturbed_nlls) if x.perturbed_nlls else None


# memorisation and Min-K% read the answer's own tokens, not the format's end-of-turn token (`TokenStats.answer`)
def exact_memorization(x: ItemLikelihood) -> float:
    return float(M.exact_memorization(x.answer.preds, x.answer.targets, x.answer.answer)[0])


def extraction_strength(x: ItemLikelihood) -> float:
    return float(M.extraction_strength(x.answer.preds, x.answer.targets, x.answer.answer)[0])


def min_k(x: ItemLikelihood) -> float:
    return float(M.min_k(x.answer.logprobs, x.answer.answer, x.k)[0])


def min_k_plus_plus(x: ItemLikelihood) -> float:
    return float(M.min_k_plus_plus(x.answer.logprobs, x.answer.mu, x.answer.sigma, x.answer.answer, x.k)[0])


def n_answer_tokens(x: ItemLikelihood) -> int:
    return int(x.answer.answer.sum())


def n_end_tokens(x: ItemLikelihood) -> int:
    return int(x.answer.mask.sum() - x.answer.answer.sum())


# ------------------------------------------------------------------------------------------- items: greedy answers
def at_token_limit(g: Generation) -> bool:
    return g.at_limit


def rouge_l_recall(g: Generation) -> float:
    return M.rouge_l_recall(g.text, g.reference)


def rouge_l_f1(g: Generation) -> float:
    return M.rouge_l_f1(g.text, g.reference)


def exact_answer(g: Generation) -> float:
    return M.exact_answer(g.text, g.reference)


# ------------------------------------------------------------------------------------------------------------ sets
def n_items(s: SetRows) -> int:
    return len(s.rows)


def normalised_prob(s: SetRows) -> bool:
    return s.normalised


def probability_score(s: SetRows) -> float | None:
    return _finite_or_none(TOFU.set_scores(s.rows, forget=s.forget, normalised_prob=s.normalised)["prob"])


def truth_ratio_score(s: SetRows) -> float | None:
    return _finite_or_none(TOFU.set_scores(s.rows, forget=s.forget, normalised_prob=s.normalised)["truth_ratio"])


def paraphrased_rouge_l_recall(s: SetRows) -> float | None:
    return mean(r.get("rouge_l_recall_paraphrased") for r in s.rows)


def paraphrased_accuracy(s: SetRows) -> float | None:
    return mean(r.get("exact_answer_paraphrased") for r in s.rows)


# ------------------------------------------------------------------------------------------------------------- run
def mia(e: Evaluation) -> dict:
    return e.inputs["membership"]["auc"]


def privleak_auc(e: Evaluation):
    from obliviate.evals.mia import muse_auc

    auc = e.inputs["membership"]["auc"]
    return muse_auc(auc["min_k"]) if "min_k" in auc else SKIP  # MUSE's convention, for PrivLeak


def verbmem(e: Evaluation) -> float:
    return e.inputs["verbmem"]["value"]


def _utility(e: Evaluation) -> tuple:
    """(model utility, its components, the error that left it None)."""
    def compute():
        normalised = e.config["normalised_prob_sets"]
        scores = {n: TOFU.set_scores(e.per_item[n], forget=False, normalised_prob=n in normalised)
                  for n in e.config["utility_set_names"] if e.per_item.get(n)}
        try:
            mu, components = TOFU.model_utility(scores, return_components=True)
        except ValueError as err:  # e.g. a set without perturbed answers has no truth ratio
            return None, SKIP, str(err)
        return mu, components, SKIP
    return e.once("utility", compute)


def model_utility(e: Evaluation):
    return _utility(e)[0]


def model_utility_components(e: Evaluation):
    return _utility(e)[1]


def model_utility_error(e: Evaluation):
    return _utility(e)[2]


def forget_truth_ratio_score(e: Evaluation):
    return e.aggregate[e.forget]["truth_ratio_score"]


def forget_accuracy(e: Evaluation):
    return e.aggregate[e.forget]["exact_answer"]


def knowmem_forget(e: Evaluation):
    return mean(r["rouge_l_f1"] for r in e.per_item[e.forget])


def forget_paraphrased_accuracy(e: Evaluation):
    return e.aggregate[e.forget]["paraphrased_accuracy"]


def forget_paraphrased_rouge_l_recall(e: Evaluation):
    return e.aggregate[e.forget]["paraphrased_rouge_l_recall"]


def retain_accuracy(e: Evaluation):
    return e.aggregate[e.retain]["exact_answer"]


def knowmem_retain(e: Evaluation):
    return mean(r["rouge_l_f1"] for r in e.per_item[e.retain])


def _limit_flags(e: Evaluation) -> list:
    return [r[k] for rows in e.per_item.values() for r in rows
            for k in ("at_token_limit", "at_token_limit_paraphrased") if k in r]


def answers_generated(e: Evaluation) -> int:
    return len(_limit_flags(e))


def answers_at_token_limit(e: Evaluation) -> int:
    return sum(bool(f) for f in _limit_flags(e))


# ------------------------------------------------------------------------------------- run, against the retrain model
def _forget_quality(e: Evaluation) -> tuple:
    """(forget quality, its power keys), or (SKIP, {}) when either model has no forget truth ratios."""
    def compute():
        forget = e.forget
        if forget not in e.per_item or forget not in e.retrain["per_item"]:
            return SKIP, {}
        tr = [r["truth_ratio"] for r in e.per_item[forget] if r["truth_ratio"] is not None]
        tr_ref = [r["truth_ratio"] for r in e.retrain["per_item"][forget] if r["truth_ratio"] is not None]
        if not (tr and tr_ref):
            return SKIP, {}
        return TOFU.forget_quality(tr, tr_ref), TOFU.forget_quality_power(len(tr), len(tr_ref))
    return e.once("forget_quality", compute)


def forget_quality(e: Evaluation):
    return _forget_quality(e)[0]


def forget_quality_items(e: Evaluation):
    return _forget_quality(e)[1].get("forget_quality_items", SKIP)


def forget_quality_low_power(e: Evaluation):  # too few items: flagged, and warned of
    return _forget_quality(e)[1].get("forget_quality_low_power", SKIP)


def forget_quality_min_pvalue(e: Evaluation):
    return _forget_quality(e)[1].get("forget_quality_min_pvalue", SKIP)


def _privleak_aucs(e: Evaluation) -> tuple:
    return e.aggregate.get("privleak_auc"), e.retrain["aggregate"].get("privleak_auc")


def privleak(e: Evaluation):
    from obliviate.evals.muse import privleak as muse_privleak

    auc, auc_ref = _privleak_aucs(e)
    if auc is None or auc_ref is None:
        return SKIP
    # PrivLeak is undefined when the retrain model's AUC is 0 (tiny holdout sets)
    return muse_privleak(auc, auc_ref) if auc_ref > 0 else None


RETRAIN_BESIDE = ("verbmem", "knowmem_forget", "knowmem_retain", "forget_truth_ratio_score", "model_utility")


def retrain_comparison(e: Evaluation) -> dict:
    """Forget quality, the two PrivLeak AUCs and PrivLeak, and the retrain model's value of RETRAIN_BESIDE."""
    cmp: dict = {}
    quality = _forget_quality(e)[0]
    if quality is not SKIP:
        cmp["forget_quality"] = quality
    auc, auc_ref = _privleak_aucs(e)
    if auc is not None and auc_ref is not None:
        cmp["privleak_auc"], cmp["privleak_auc_retrain"] = auc, auc_ref
        cmp["privleak"] = privleak(e)
    for key in RETRAIN_BESIDE:
        if e.aggregate.get(key) is not None and e.retrain["aggregate"].get(key) is not None:
            cmp[f"{key}_retrain"] = e.retrain["aggregate"][key]
    return cmp
