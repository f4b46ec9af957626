"""A retrain model's evaluation read from a file, so a user's run gets forget quality (and PrivLeak) without
retraining: an earlier `obliviate eval` / run output, or the per-item eval logs that TOFU and OpenUnlearning publish
for their retain models. Forget quality needs only the retain model's forget-set truth ratios, in obliviate's
orientation R = P(paraphrase) / P(perturbed): OpenUnlearning logs false/true = 1/R, so its values are inverted (the KS
test compares the two models' samples, so both must be in one orientation).

Formats read:
- obliviate: {"per_item": {"forget": [{"truth_ratio": ...}, ...]}, "aggregate": {"privleak_auc": ...}}
- OpenUnlearning (`TOFU_EVAL.json`): {"forget_truth_ratio": {"value_by_index": {"0": {"score": false/true}, ...}}}
  (older versions name the value "truth_ratio")
- TOFU (`eval_log_forget.json`, alone or inside an aggregated file under that key): {"avg_paraphrased_loss":
  {"0": nll, ...}, "average_perturb_loss": {"0": [nll, ...], ...}}, truth ratio exp(mean perturbed - paraphrased).
PrivLeak needs the retrain model's Min-K% AUC in obliviate's convention, so only an obliviate file gives it."""
from __future__ import annotations

import math
from pathlib import Path

from obliviate.data import read_json_file
from obliviate.errors import ObliviateError


def _by_index(d: dict, path: Path, key: str) -> list:
    try:
        return [d[k] for k in sorted(d, key=int)]
    except (TypeError, ValueError):
        raise ObliviateError(f"{path}: {key}: expected a mapping from item index to value") from None


def read_retrain_eval(path: str | Path, forget_set: str = "forget") -> dict:
    """An obliviate-shaped evaluation ({"per_item": {forget_set: [{"truth_ratio"}]}, "aggregate": {...},
    "config": {...}}) from any of the formats above; a file in none of them is one error naming it."""
    path = Path(path)
    data = read_json_file(path, "retrain evaluation")
    if not isinstance(data, dict):
        raise ObliviateError(f"{path}: a retrain evaluation must be a JSON object")
    if "per_item" in data:
        per_item = data["per_item"]
        if not isinstance(per_item, dict) or forget_set not in per_item:
            raise ObliviateError(f"{path}: per_item has no {forget_set!r} set")
        return {"per_item": {forget_set: per_item[forget_set]}, "aggregate": data.get("aggregate", {}),
                "config": {"forget_set_name": forget_set}, "source": f"obliviate ({path.name})"}
    if "eval_log_forget.json" in data:  # TOFU's aggregated file holds each log under its file name
        data = data["eval_log_forget.json"]
    if isinstance(data.get("forget_truth_ratio"), dict) and "value_by_index" in data["forget_truth_ratio"]:
        rows = _by_index(data["forget_truth_ratio"]["value_by_index"], path, "forget_truth_ratio.value_by_index")
        values = [r.get("score", r.get("truth_ratio")) if isinstance(r, dict) else None for r in rows]
        ratios = [1.0 / v if isinstance(v, (int, float)) and v > 0 else v for v in values]  # false/true -> R
        source = "OpenUnlearning"
    elif "avg_paraphrased_loss" in data and "average_perturb_loss" in data:
        para = _by_index(data["avg_paraphrased_loss"], path, "avg_paraphrased_loss")
        pert = _by_index(data["average_perturb_loss"], path, "average_perturb_loss")
        if len(para) != len(pert):
            raise ObliviateError(f"{path}: {len(para)} paraphrased losses but {len(pert)} perturbed ones")
        ratios = [math.exp(sum(q) / len(q) - p) for p, q in zip(para, pert)]
        source = "TOFU"
    else:
        raise ObliviateError(f"{path}: not an obliviate evaluation, an OpenUnlearning TOFU_EVAL.json (no "
                             "forget_truth_ratio.value_by_index) or a TOFU eval_log_forget.json (no "
                             "avg_paraphrased_loss / average_perturb_loss)")
    bad = [i for i, r in enumerate(ratios) if not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0]
    if bad:
        raise ObliviateError(f"{path}: item {bad[0]}: the truth ratio must be a positive number")
    return {"per_item": {forget_set: [{"truth_ratio": float(r)} for r in ratios]}, "aggregate": {},
            "config": {"forget_set_name": forget_set}, "source": f"{source} ({path.name})"}
