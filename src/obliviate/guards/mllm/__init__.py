"""Vision-language guards: ICU (`icu.py`) and GUARD (`guard.py`), the family-neutral text guards of `guards/text/` on
a LLaVA-style model and its processor. Every question (with its picture or as text alone) is put in the processor's
tokenizer's prompt format and answered or scored by the model, so the guard acts where it does on a language model:
ICU in the prompt format (earlier text turns before the question, the picture with the question), GUARD in the
next-token distribution (`generate`'s logits processor; hooks on the model itself, which is what reads the token ids:
its language model is handed embeddings with the picture's features in place).

The run's items are MLLMU-Bench's (`data.VQAItem`: a question with a picture id or None, an answer, and for the
multiple-choice and cloze tasks the options and the right one). `as_questions` makes them the text guards'
question-answer items: the free answer, and wrong answers that differ from it by the value the options hold (the
multiple-choice options play TOFU's perturbed answers)."""
from __future__ import annotations

from pathlib import Path

from obliviate.errors import ObliviateError

LETTERS = "ABCD"


def wrong_answers(item) -> tuple[str, ...]:
    """The item's answer with its true value replaced by each wrong option ("This person was born in Lisbon." ->
    "... in Oslo."; the multiple-choice form's "B. Lisbon" -> "A. Oslo"); () when the item has no options or its answer
    does not hold the true value."""
    if not item.options or not item.correct or item.correct not in LETTERS[:len(item.options)] or not item.answer:
        return ()
    true = item.options[LETTERS.index(item.correct)]
    wrong = [(LETTERS[n], o) for n, o in enumerate(item.options) if o != true]
    if item.answer.strip() == f"{item.correct}. {true}":
        return tuple(f"{letter}. {o}" for letter, o in wrong)
    if true not in item.answer:
        return ()
    return tuple(item.answer.replace(true, o) for _, o in wrong)


def as_questions(items: list) -> list:
    """The items that have a free answer as question-answer items (`data.QAItem`), each (question, answer, subject)
    once: a fact asked with each of a person's pictures is one text turn."""
    from obliviate.data import QAItem

    out, seen = [], set()
    for item in items:
        if isinstance(item, QAItem):
            out.append(item)
            continue
        if getattr(item, "answer", None) is None:
            continue
        key = (item.question, item.answer, item.subject)
        if key not in seen:
            seen.add(key)
            out.append(QAItem(item.question, item.answer, perturbed_answers=wrong_answers(item),
                              subject=item.subject, source="mllm"))
    return out


def load_guarded(folder: str | Path, guard, record: dict, device: str = "cpu", trust_remote_code: bool = False,
                 dtype: str = "float32"):
    """(model, processor) of an exported vision-language guard run with the guard installed: `models/vlm.load`, the
    run's prompt format (recorded in obliviate_guard.json), then `guard.install` on the model and the processor's
    tokenizer. Ask through `models.vlm.VisionLanguageAdapter(processor, pictures)` (its `generate` and `encode_item`
    put the question in that format, with ICU's context, the picture beside it)."""
    from obliviate.models import prompt_format, vlm

    model, processor = vlm.load(folder, dtype, device, trust_remote_code)
    fmt = record.get("prompt_format") or {}
    if not isinstance(fmt, dict):
        raise ObliviateError(f"{Path(folder) / 'obliviate_guard.json'}: prompt_format must be a JSON object")
    tokenizer = processor.tokenizer
    prompt_format.use(tokenizer, prompt_format.resolve(tokenizer, fmt.get("name", "auto"), fmt.get("system_prompt"),
                                                       fmt.get("tags") or None))
    guard.install(model.eval(), tokenizer)
    return model, processor
