"""MUSE metrics: VerbMem, KnowMem, PrivLeak. Shi et al. 2024, https://arxiv.org/abs/2407.06460.

ROUGE-L here is MUSE's: `rouge_score` rougeL F-measure with use_stemmer=False (MUSE's reference logger; its default
aggregate key 'mean_rougeL' is the F-measure, for VerbMem and KnowMem alike). Formulas: docs/metrics.md."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from obliviate.data import QAItem, TextItem
from obliviate.errors import ObliviateError
from obliviate.evals.metrics import rouge_l_f1


def split_text(item: TextItem) -> tuple[str, str]:
    """(prompt, true continuation) of a text at its prefix_chars."""
    if not 0 < item.prefix_chars < len(item.text):
        raise ObliviateError(
            f"VerbMem needs TextItem.prefix_chars in 1..{len(item.text) - 1} (where the prompt ends); "
            f"got {item.prefix_chars} for text {item.text[:40]!r}")
    return item.text[:item.prefix_chars], item.text[item.prefix_chars:]


def verbmem(model, tokenizer, texts: Sequence[TextItem], max_new_tokens: int = 128, batch_size: int = 32,
            on_batch=None) -> dict:
    """VerbMem: mean ROUGE-L F1 between the greedy continuation (max_new_tokens tokens, batched) of each text's prefix
    text[:prefix_chars] and its true continuation text[prefix_chars:]. Returns {"value", "per_item"}."""
    from obliviate.models import causal_lm as lm

    pairs = [split_text(t) for t in texts]
    if not pairs:
        return {"value": float("nan"), "per_item": []}
    prompts = [lm.encode_prompt(tokenizer, p) for p, _ in pairs]
    generated = lm.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            on_batch=on_batch)
    per_item = [{"prefix": p, "continuation": c, "generated": g, "rouge_l_f1": rouge_l_f1(g, c.strip())}
                for (p, c), g in zip(pairs, generated)]
    return {"value": float(np.mean([r["rouge_l_f1"] for r in per_item])), "per_item": per_item}


def knowmem(generations: Sequence[str], items: Sequence[QAItem]) -> dict:
    """KnowMem: mean ROUGE-L F1 of greedy answers (already generated, e.g. the TOFU pass's) against the true answers.
    Returns {"value", "per_item"}."""
    if len(generations) != len(items):
        raise ValueError(f"{len(generations)} generations for {len(items)} items")
    scores = [rouge_l_f1(g, it.answer) for g, it in zip(generations, items)]
    return {"value": float(np.mean(scores)) if scores else float("nan"), "per_item": scores}


def privleak(auc: float, auc_retrain: float) -> float:
    """PrivLeak = (AUC - AUC_retrain) / AUC_retrain * 100.

    The AUCs are in MUSE's convention: Min-K% (k = 40 %) attack, forget texts the positive class, scored so that a
    model that memorised them gets AUC near 0 (hence a strongly negative PrivLeak means under-unlearning, positive
    means over-unlearning, 0 is ideal). `mia.muse_auc` converts obliviate's member-positive AUC (1 - AUC)."""
    if auc_retrain <= 0:
        raise ValueError(f"AUC of the retrain model must be positive, got {auc_retrain}")
    return float((auc - auc_retrain) / auc_retrain * 100.0)
