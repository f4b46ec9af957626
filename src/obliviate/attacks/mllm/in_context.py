"""In-context recall on a vision-language run (UnUnlearning, Shumailov et al. 2024, https://arxiv.org/abs/2407.00106;
the language-model attack's idea, `attacks/lm/in_context.py`): the forget person's profile text (MLLMU-Bench's
`biography`, the portraits world's biography) is put in the prompt before each question, and the forget set is scored
with MLLMU-Bench's protocol: multiple choice, cloze and generation, with the picture (the picture still goes beside
the question) and as text. A model that unlearned the person can still use what it is told, and so can the retrain
model: what counts is the gap between the unlearned model and the retrain reference. The control puts another forget
person's profile there instead: a score that rises with the wrong profile came from the weights, not the context.

On a guard run every question is asked through the guard (ICU's examples come before the profile and the question;
GUARD restricts the answer), and the `(unguarded)` row asks the same weights without it."""
from __future__ import annotations

from dataclasses import dataclass

from obliviate.attacks.mllm.common import SCORES, Target, require_scored, score
from obliviate.attacks.running import Attack
from obliviate.errors import ObliviateError


@dataclass
class InContextConfig:
    control: bool = True  # also ask with another forget person's profile in the prompt


class InContext(Attack):
    Config = InContextConfig
    headline = "classification_image"
    label = "in-context accuracy"
    columns = ("classification_image_plain", "classification_image", "classification_text_plain",
               "classification_text", "cloze_image", "classification_image_other_profile")
    percent = columns

    def check(self, target: Target) -> None:
        require_scored(target, "mllm_in_context")
        missing = sorted({i.subject for i in target.scored if not target.biographies.get(i.subject)})
        if missing:
            raise ObliviateError(f"the mllm_in_context attack needs each forget person's profile text (MLLMU-Bench's "
                                 f"`biography`); none for {', '.join(missing[:3])}")

    def run(self, target: Target, log=print) -> dict:
        texts = target.biographies
        people = list(dict.fromkeys(i.subject for i in target.scored))
        other = {p: people[(n + 1) % len(people)] for n, p in enumerate(people)}
        contexts = {"own_profile": [texts[i.subject] for i in target.scored]}
        if self.config.control and len(people) > 1:
            contexts["other_profile"] = [texts[other[i.subject]] for i in target.scored]
        models, per_item = {}, {}
        for name, load in target.models.items():
            model, processor = load()
            plain, plain_rows = target.plain(name, model, processor)
            adapter = target.adapter(processor)
            scored = {v: score(model, adapter, processor.tokenizer, target.scored, target.batch_size,
                               target.max_new_tokens, context=c, truth_ratio=False) for v, c in contexts.items()}
            own, own_rows = scored["own_profile"]
            aggregate = {**{f"{k}_plain": plain[k] for k in SCORES}, **{k: own[k] for k in SCORES}, "n": own["n"]}
            if "other_profile" in scored:
                aggregate.update({f"{k}_other_profile": scored["other_profile"][0][k] for k in SCORES})
            models[name] = aggregate
            per_item[name] = [{"subject": r["subject"], "image": r["image"], "question": r["question"],
                               **{f"{k}_plain": p[k] for k in ("chosen", "classification", "filled", "cloze",
                                                                "generated", "rouge_l")},
                               **{k: r[k] for k in ("chosen", "classification", "filled", "cloze", "generated",
                                                    "rouge_l")}}
                              for p, r in zip(plain_rows, own_rows)]
            log(f"  {name}: multiple choice with the picture {_pct(aggregate['classification_image'])} with the "
                f"profile in the prompt (asked plainly {_pct(aggregate['classification_image_plain'])})")
            del model
        return {"models": models, "per_item": per_item}


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"
