"""What the vision-language recovery attacks share: the attacked run (`Target`: its models, the unlearning items, the
forget set as MLLMU-Bench scores it, the pictures) and the scoring of forget items with the family's own protocol
(`evals/mllmu.py`): multiple-choice accuracy, cloze and ROUGE-L, each with the picture and as text, and the truth
ratio of the items asked with their picture. The attacks report these numbers rather than the language-model attacks'
recall: they are what a vision-language run reports, so an attacked score reads against the run's own table."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from obliviate.errors import ObliviateError

# the scores every vision-language attack reports per model (mllmu.aggregate's keys it keeps), the headline first
SCORES = ("classification_image", "classification_text", "cloze_image", "cloze_text", "rouge_l_image",
          "rouge_l_text")


@dataclass
class Target:
    """The attacked run. `models` maps a row name to a loader of a fresh (model, processor) in the run's prompt format
    (a guard run's installs the guard): the run's method first, then "original" and "retrain" (absent when the run
    has none). `forget` / `retain`: the items the run unlearned on (questions with pictures and answers); `scored`:
    the forget set's MLLMU-Bench items (the three tasks, with the picture and as text); `pictures(image_id)`: an RGB
    array; `biographies`: {forget person: their profile text} where the data has one."""
    method: str
    models: dict[str, Callable[[], tuple]]
    forget: list
    retain: list
    scored: list
    pictures: Callable
    biographies: dict[str, str] = field(default_factory=dict)
    batch_size: int = 16
    max_new_tokens: int = 32
    _plain: dict = field(default_factory=dict, repr=False)

    def adapter(self, processor):
        from obliviate.models.vlm import VisionLanguageAdapter

        return VisionLanguageAdapter(processor, self.pictures)

    def plain(self, name: str, model, processor) -> tuple[dict, list[dict]]:
        """`name`'s model's scores on every forget item, asked plainly (cached: every question attack shows them)."""
        if name not in self._plain:
            self._plain[name] = score(model, self.adapter(processor), processor.tokenizer, self.scored,
                                      self.batch_size, self.max_new_tokens, truth_ratio=False)
        return self._plain[name]


def score(model, adapter, tokenizer, items: Sequence, batch_size: int, max_new_tokens: int,
          context: Sequence[str] | None = None, truth_ratio: bool = True) -> tuple[dict, list[dict]]:
    """(aggregate, per-item rows) of `items` under MLLMU-Bench's protocol (`mllmu.evaluate_items`; `context`: a text
    per item before its question), and with `truth_ratio` the mean truth ratio of the items asked with their picture
    (`mllmu.truth_ratios`, as the run's forget quality takes them; their values in the rows and in `ratios`)."""
    import torch

    from obliviate.evals import mllmu

    model.eval()
    with torch.no_grad():
        rows = mllmu.evaluate_items(model, adapter, tokenizer, items, max_new_tokens, batch_size, context=context)
    totals = mllmu.aggregate(rows)
    out: dict = {key: totals.get(key) for key in SCORES}
    if truth_ratio:
        pictured = [k for k, i in enumerate(items) if i.image is not None and i.options is not None]
        ratios = mllmu.truth_ratios(model, adapter, tokenizer, [items[k] for k in pictured], batch_size)
        for k, ratio in zip(pictured, ratios):
            rows[k]["truth_ratio"] = ratio
        out["truth_ratio"] = float(np.mean(ratios)) if ratios else None
        out["ratios"] = ratios
    out["n"] = len(rows)
    return out, rows


def forget_people(items: Sequence) -> list[str]:
    """The forget people in the order they first appear."""
    return list(dict.fromkeys(i.subject for i in items))


def require_scored(target: Target, attack: str) -> None:
    if not target.scored:
        raise ObliviateError(f"the {attack} attack scores the run's forget set, and the run has none")
