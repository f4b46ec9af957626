"""RESTOR's measures (Rezaei et al. 2025, https://arxiv.org/abs/2411.00204) on the corrupted profiles world
(worlds/profiles_corrupt.py): after unlearning the corrupting documents, how much of the right knowledge came back,
next to how much of the wrong knowledge went.

- `restor_accuracy`: the share of the corrupted questions answered with the right fact (exact answer on the `restor`
  set: the true answers of the questions the corrupting documents answered wrongly). The paper's measure is this
  accuracy, read beside the clean and the corrupted model's.
- `restor_recovery` = (a - a_corrupted) / (a_clean - a_corrupted), a that accuracy: 0 is no better than the
  corrupted model (the run's original), 1 is the clean model's (the run's retrain reference); None when the
  corruption took nothing away (a_clean <= a_corrupted).
- `restor_forgetting` = 1 - w / w_corrupted, w the share of the corrupted questions still answered with the wrong
  fact (the forget set's accuracy on this world): 1 when none is, 0 when as many as the corrupted model; None when
  the corrupted model states none. High forgetting with low recovery is the paper's finding for GA and KL: the wrong
  facts gone, the right ones not back.
Formulas: docs/restor.md."""
from __future__ import annotations

from obliviate.evals.lm_metrics import SKIP, Evaluation

RESTOR_SET = "restor"  # the question-answer set of the right facts (never a utility set)


def restor_accuracy(e: Evaluation):
    block = e.aggregate.get(RESTOR_SET)
    return block["exact_answer"] if isinstance(block, dict) and "exact_answer" in block else SKIP


def recovery(accuracy, corrupted, clean) -> float | None:
    """(accuracy - corrupted) / (clean - corrupted); None when a value is missing or clean <= corrupted."""
    if accuracy is None or corrupted is None or clean is None or clean - corrupted <= 0:
        return None
    return (accuracy - corrupted) / (clean - corrupted)


def forgetting(wrong, wrong_corrupted) -> float | None:
    """1 - wrong / wrong_corrupted; None when a value is missing or the corrupted model states no wrong fact."""
    if wrong is None or wrong_corrupted is None or wrong_corrupted <= 0:
        return None
    return 1 - wrong / wrong_corrupted


def with_recovery(rows: dict[str, dict], original: dict | None, retrain: dict | None) -> None:
    """Each row that has `restor_accuracy` (a run on the corrupted world) gains restor_recovery (needs the original:
    the corrupted model, and the retrain reference: the clean model) and restor_forgetting (needs the original)."""
    original = original or {}
    for row in rows.values():
        if row.get("restor_accuracy") is None:
            continue
        if retrain is not None:
            row["restor_recovery"] = recovery(row["restor_accuracy"], original.get("restor_accuracy"),
                                              retrain.get("restor_accuracy"))
        row["restor_forgetting"] = forgetting(row.get("forget_accuracy"), original.get("forget_accuracy"))
