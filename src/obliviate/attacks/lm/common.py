"""What every language-model recovery attack shares: the attacked run (`Target`: its models and items), the test of
whether an answer recalls a forgotten fact, and the batched greedy questioning.

A forget item counts as *recalled* when every word that carries its fact is in the model's answer. The fact's words
are those of the paraphrased answer that none of the perturbed answers has (TOFU-style items differ from their
perturbed answers only in the fact); an item without perturbed answers needs every word of its answer. Recall,
unlike exact match, credits an answer worded another way or wrapped in a longer text (a jailbreak, a chain of
reasoning), and only the fact itself can make it true."""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from obliviate.attacks.running import Attack  # noqa: F401  (the families' shared base; attacks/lm/ imports it here)
from obliviate.data import QAItem, TextItem
from obliviate.errors import ObliviateError

WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def fact_words(item: QAItem) -> list[str]:
    """The words that carry the item's fact (see the module's docstring)."""
    if item.paraphrased_answer and item.perturbed_answers:
        wrong = set().union(*(words(p) for p in item.perturbed_answers))
        key = [w for w in words(item.paraphrased_answer) if w not in wrong]
        if key:
            return key
    return words(item.answer)


def recalled(text: str, item: QAItem) -> bool:
    said = set(words(text))
    return all(w in said for w in fact_words(item))


@dataclass
class Target:
    """The attacked run. `models` maps a row name to a loader of a fresh (model, tokenizer) in the run's prompt
    format: the run's method first, then "original" (the model it started from) and "retrain" (the reference
    that never saw the forget set; absent when the run has none). Fresh, because some attacks change weights."""
    method: str
    models: dict[str, Callable[[], tuple]]
    forget: list[QAItem]
    retain: list[QAItem]
    forget_texts: list[TextItem] = field(default_factory=list)
    retain_texts: list[TextItem] = field(default_factory=list)
    # subject -> {attribute: value}: the built-in world's people (the probe needs them); None for users' files
    attributes: dict[str, dict[str, str]] | None = None
    batch_size: int = 32
    _plain: dict = field(default_factory=dict, repr=False)

    def plain_recall(self, name: str, model, tokenizer, max_new_tokens: int = 48) -> list[bool]:
        """Per forget item, whether `name`'s model recalls it when simply asked (cached: every attack shows it)."""
        if name not in self._plain:  # the first attack's length serves them all
            answers = ask(model, tokenizer, [i.question for i in self.forget], self.batch_size, max_new_tokens)
            self._plain[name] = [recalled(a, i) for a, i in zip(answers, self.forget)]
        return self._plain[name]


def ask(model, tokenizer, questions: Sequence[str], batch_size: int = 32, max_new_tokens: int = 48,
        prefills: Sequence[str] | None = None) -> list[str]:
    """Batched greedy answers in the tokenizer's prompt format. `prefills`: the start of each reply, written for the
    model (the answer continues it; the returned text includes it)."""
    import torch

    from obliviate.models import causal_lm as lm

    prompts = [lm.question_prompt(tokenizer, q) for q in questions]
    if prefills is not None:
        prompts = [p + tokenizer(" " + f.strip(), add_special_tokens=False)["input_ids"] if f else p
                   for p, f in zip(prompts, prefills)]
    if not prompts:
        return []
    with torch.no_grad():
        answers = lm.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [f"{f} {a}".strip() if f else a for a, f in zip(answers, prefills or [None] * len(answers))]


def recall_aggregate(rows: Sequence[dict]) -> dict:
    """recall (share of items recalled under the attack), recall_plain (asked plainly), asr (of the items not
    recalled plainly, the share the attack brings back), n."""
    n = len(rows)
    hidden = [r for r in rows if not r["recalled_plain"]]
    return {"recall": sum(r["recalled"] for r in rows) / n if n else None,
            "recall_plain": sum(r["recalled_plain"] for r in rows) / n if n else None,
            "asr": sum(r["recovered"] for r in hidden) / len(hidden) if hidden else None, "n": n}


class QuestionAttack(Attack):
    """An attack that only changes how the forget questions are asked. `prompts(target, model, tokenizer)` gives,
    per variant, a question (and optionally the start of the reply) for every forget item; an item is recalled when
    any variant recalls it, except the `controls` (shown in their own column only: a baseline, not an attack)."""
    controls: tuple[str, ...] = ()

    @property
    def max_new_tokens(self) -> int:
        return getattr(self.config, "max_new_tokens", 48)

    def prompts(self, target: Target, model, tokenizer) -> dict[str, tuple[list[str], list[str] | None]]:
        raise NotImplementedError

    def run(self, target: Target, log=print) -> dict:
        models, per_item = {}, {}
        for name, load in target.models.items():
            model, tok = load()
            plain = target.plain_recall(name, model, tok, self.max_new_tokens)
            variants = self.prompts(target, model, tok)
            answers = {v: ask(model, tok, qs, target.batch_size, self.max_new_tokens, prefills)
                       for v, (qs, prefills) in variants.items()}
            attacks = [v for v in variants if v not in self.controls]
            rows = []
            for n, item in enumerate(target.forget):
                hits = {v: recalled(a[n], item) for v, a in answers.items()}
                best = next((v for v in attacks if hits[v]), attacks[0])
                hit = any(hits[v] for v in attacks)
                rows.append({"subject": item.subject, "question": variants[best][0][n], "answer": answers[best][n],
                             "variant": best, "recalled": hit, "recalled_plain": plain[n],
                             "recovered": hit and not plain[n], "by_variant": hits})
            aggregate = recall_aggregate(rows)
            if len(variants) > 1:
                aggregate.update({f"recall_{v}": sum(r["by_variant"][v] for r in rows) / len(rows) for v in variants})
            models[name], per_item[name] = aggregate, rows
            log(f"  {name}: recall {aggregate['recall']:.1%} (asked plainly {aggregate['recall_plain']:.1%})")
        return {"models": models, "per_item": per_item}


def require(items: Sequence, what: str, attack: str) -> None:
    if not items:
        raise ObliviateError(f"the {attack} attack needs {what}, and the run's forget set has none")
