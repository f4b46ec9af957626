"""TOFU aggregates: truth-ratio scores, probability scores, forget quality (KS test against the retrain model) and model
utility (harmonic mean over retain and utility sets). Maini et al. 2024, https://arxiv.org/abs/2401.06121.
Formulas: docs/metrics.md."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

# Sets whose probability score is normalised against the perturbed answers (TOFU does this for real authors and world
# facts). Only the default of `set_scores(normalised_prob=...)` / `evaluate_lm(normalised_prob_sets=...)`.
NORMALISED_PROB_SOURCES = frozenset({"world_facts", "real_authors", "general_facts"})
UTILITY_COMPONENTS = ("prob", "rouge", "truth_ratio")


def _values(xs: Iterable) -> np.ndarray:
    return np.asarray([float(x) for x in xs if x is not None], dtype=float)


def forget_truth_ratio_score(ratios: Iterable[float]) -> float:
    """Forget set: mean(min(R, 1/R)); 1 when paraphrase and perturbed answers are equally likely."""
    r = _values(ratios)
    return float(np.mean(np.minimum(r, 1.0 / r))) if r.size else float("nan")


def retain_truth_ratio_score(ratios: Iterable[float]) -> float:
    """Retain / utility sets: mean(max(0, 1 - 1/R)); near 1 when the paraphrase is far likelier than perturbed answers."""
    r = _values(ratios)
    return float(np.mean(np.maximum(0.0, 1.0 - 1.0 / r))) if r.size else float("nan")


def truth_ratio_score(ratios: Iterable[float], forget: bool) -> float:
    return forget_truth_ratio_score(ratios) if forget else retain_truth_ratio_score(ratios)


def probability_score(rows: Sequence[Mapping], normalised: bool) -> float:
    """Mean P(y|x), or mean P(y|x) / (P(y|x) + sum_j P(perturbed_j|x)) when `normalised`."""
    key = "answer_prob_normalised" if normalised else "answer_prob"
    v = _values(r[key] for r in rows)
    return float(v.mean()) if v.size else float("nan")


def set_scores(rows: Sequence[Mapping], *, forget: bool = False, normalised_prob: bool = False) -> dict[str, float]:
    """The three TOFU numbers of one set from its per-item rows: prob, rouge (ROUGE-L recall), truth_ratio (score)."""
    return {
        "prob": probability_score(rows, normalised_prob),
        "rouge": float(_values(r["rouge_l_recall"] for r in rows).mean()) if rows else float("nan"),
        "truth_ratio": truth_ratio_score((r["truth_ratio"] for r in rows), forget=forget),
    }


def forget_quality(tr_unlearned_forget: Sequence[float], tr_retrain_forget: Sequence[float]) -> float:
    """p-value of the two-sample Kolmogorov-Smirnov test between the forget-set truth ratios of the unlearned model and
    of the retrain model (`scipy.stats.ks_2samp`, two-sided, scipy's default method). Higher is better; 1 = same
    distribution."""
    from scipy.stats import ks_2samp

    a, b = _values(tr_unlearned_forget), _values(tr_retrain_forget)
    if a.size == 0 or b.size == 0:
        raise ValueError("forget_quality needs non-empty truth-ratio samples")
    return float(ks_2samp(a, b).pvalue)


# Below this many forget items (per model) forget quality is flagged: from 25 items on, a two-sample KS test at
# alpha = 0.05 rejects a one-standard-deviation shift of the truth ratios with power >= 0.8 at every size (n vs n,
# simulated; below it the power dips under 0.8, e.g. 0.78 at 24, 0.71 at 20), and with 3 items it cannot reject at all
# (its smallest p-value is 0.10). docs/metrics.md, "Few forget items", has the reasoning and the computation.
MIN_FORGET_ITEMS = 25


def smallest_ks_pvalue(n: int, m: int) -> float:
    """The smallest p-value a two-sided two-sample KS test of n vs m values can give: D = 1 (the samples fully apart),
    which 2 of the C(n + m, n) equally likely orderings reach under the null (what `ks_2samp(method="exact")` returns
    for such samples); with 3 vs 3 it is 0.10, so such a test never rejects at 0.05."""
    from scipy.special import comb

    return min(1.0, 2.0 / float(comb(n + m, n, exact=True)))


def forget_quality_power(n_unlearned: int, n_retrain: int) -> dict:
    """How many items forget quality rests on, and whether that is too few for it to mean much: the keys a result's
    aggregate carries next to forget_quality (`forget_quality_low_power` only when below MIN_FORGET_ITEMS)."""
    n = min(n_unlearned, n_retrain)
    out: dict = {"forget_quality_items": n}
    if n < MIN_FORGET_ITEMS:
        out["forget_quality_low_power"] = True
        out["forget_quality_min_pvalue"] = smallest_ks_pvalue(n_unlearned, n_retrain)
    return out


def forget_quality_warning(aggregate: Mapping) -> str | None:
    """One line for the terminal and the report when forget quality rests on too few items; None otherwise."""
    if not aggregate.get("forget_quality_low_power"):
        return None
    n, p_min = aggregate.get("forget_quality_items"), aggregate.get("forget_quality_min_pvalue")
    floor = (f"the KS test cannot go below p = {p_min:.2g}, so it cannot reject at 0.05 and forget quality passes "
             "whatever the model" if p_min is not None and p_min >= 0.05 else
             f"the KS test's smallest possible p-value is {p_min:.2g}" if p_min is not None else "")
    items = f"{n} forget item{'s' if n != 1 else ''}"
    return (f"warning: forget quality rests on {items}: {floor + '; ' if floor else ''}below "
            f"{MIN_FORGET_ITEMS} items it can miss a one-standard-deviation shift of the truth ratios more than 1 time "
            "in 5. Read it as a weak signal (docs/metrics.md, 'Few forget items').")


def model_utility(per_set_scores: Mapping[str, Mapping[str, float]], return_components: bool = False):
    """Harmonic mean (`scipy.stats.hmean`) of prob, rouge and truth_ratio of every set given (retain and every utility
    set present). A zero component makes the utility 0 (the harmonic-mean limit). With return_components=True returns
    (utility, {"<set>/<component>": value})."""
    from scipy.stats import hmean

    components = {f"{name}/{c}": float(scores[c]) for name, scores in per_set_scores.items() for c in UTILITY_COMPONENTS}
    if not components:
        raise ValueError("model_utility needs at least one set")
    vals = np.asarray(list(components.values()), dtype=float)
    if np.any(~np.isfinite(vals)) or np.any(vals < 0):
        raise ValueError(f"model utility components must be finite and non-negative: {components}")
    value = 0.0 if np.any(vals == 0) else float(hmean(vals))
    return (value, components) if return_components else value
