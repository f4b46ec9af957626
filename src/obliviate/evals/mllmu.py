"""MLLMU-Bench's evaluation protocol (Liu et al., NAACL 2025), without its paid judge: every item of a set is asked
three ways, with its picture or as text alone, and scored as the benchmark scores it.

- classification: the question and its 4 options (A-D); correct when the first option letter of the greedy answer is
  the right one (the benchmark matches the first letter).
- generation: the question; ROUGE-L (rouge-score) of the greedy answer against the ground truth.
- cloze: the sentence with its blank; correct when the ground truth appears in the greedy answer (case-insensitive).

Greedy decoding, batched, through the adapter (`models/vlm.py`), so the pictures go beside the tokens. Per-item values
are kept; the aggregate of each set is split by form (with the image, as text)."""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from obliviate.evals.metrics import rouge_l

LETTERS = "ABCD"


def classification_question(item) -> str:
    options = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, item.options))
    return f"{item.question}\n{options}\nAnswer with the letter of the right option."


def cloze_question(item) -> str:
    return f"Fill in the blank: {item.cloze}"


def first_letter(text: str) -> str | None:
    """The first standalone option letter of an answer ("B", "B.", "(B) ...", "The answer is B"), else None."""
    match = re.search(r"\b([A-D])\b", text)
    return match.group(1) if match else None


def evaluate_items(model, adapter, tokenizer, items: Sequence, max_new_tokens: int = 32,
                   batch_size: int = 16) -> list[dict]:
    """Per-item results of the three tasks for items with `question`, `answer`, `options`, `correct`, `cloze`,
    `cloze_answer` and `image`."""
    items = list(items)
    generated = adapter.generate(model, tokenizer, items, None, max_new_tokens, batch_size)
    chosen = adapter.generate(model, tokenizer, items, [classification_question(i) for i in items], 8, batch_size)
    filled = adapter.generate(model, tokenizer, items, [cloze_question(i) for i in items], 16, batch_size)
    rows = []
    for item, g, c, f in zip(items, generated, chosen, filled):
        rows.append({"subject": item.subject, "fact": item.fact, "image": item.image, "question": item.question,
                     "generated": g, "rouge_l": float(rouge_l(g, item.answer).fmeasure),
                     "chosen": c, "classification": float(first_letter(c) == item.correct),
                     "filled": f, "cloze": float(item.cloze_answer.lower() in f.lower())})
    return rows


def aggregate(rows: Sequence[dict]) -> dict:
    """Mean classification accuracy, ROUGE-L and cloze accuracy, with the image and as text."""
    out = {}
    for form, keep in (("image", lambda r: r["image"] is not None), ("text", lambda r: r["image"] is None)):
        part = [r for r in rows if keep(r)]
        for key in ("classification", "rouge_l", "cloze"):
            out[f"{key}_{form}"] = float(np.mean([r[key] for r in part])) if part else None
    out["n_items"] = len(rows)
    return out
