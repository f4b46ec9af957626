"""ICU, in-context unlearning (Pawelczyk, Neel and Lakkaraju, ICML 2024, "In-Context Unlearning: Language Models as
Few-Shot Unlearners", https://arxiv.org/abs/2310.07579): a generation-time guard. No weight changes; every question
is asked after a few earlier turns:

    [forget question 1] [flipped answer 1] ... [forget question k] [flipped answer k]
    [retain question 1] [its true answer]  ... [retain question L] [its true answer]      [the query]

The paper's recipe (its Section 4): (1) the points to forget, each with its label flipped to another one; (2) L
correctly labelled training points; (3) the query. Its classifiers' "flipped label" is another class; a question's
is a wrong answer: the item's perturbed answer (TOFU's wrong-but-plausible answers; `seed` picks one), else another
forget item's answer, else the refusal (`label = "refusal"` always uses the refusal, as TOFU's IdK variants do). The
paper's contexts hold up to 6 examples (ICUL(s), s in {2, 4, 6}); the default here is 2 forget examples and 4
correctly answered retain examples (6 in all).

Which forget examples: the paper deletes one point (or a few) and puts exactly those in the context. A forget set
of hundreds of answers does not fit a context, so each question gets the `forget_examples` forget items nearest to
it: those whose subject the question names first, then those sharing the most words with it (forget set order breaks
ties). A forget question so gets its own item with a wrong answer, as in the paper; a retain question gets the forget
items nearest to it. The L retain examples are drawn once (`seed`) and are the same for every question.

Where the turns go: through the run's prompt format (`models/prompt_format.py`): for a tokenizer with a chat template,
earlier user/assistant messages rendered by the template itself; for a named or custom template, its tags; for the
raw format, "Question: q\\nAnswer: a" blocks separated by a blank line. Every question-answer metric (likelihoods:
answer probability, truth ratio, ...; generations: ROUGE, exact answer) and every attack asks in that format, so all
of them read the context. Texts scored as texts (membership inference on biographies, VerbMem's continuations) have
no question and no prompt format: their numbers are the bare weights' (the report says what the guard changes).

RWKU (`jinzhuoran/RWKU`, its ICU baseline: `--use_prompt`) instead tells the model in the user's message "You are an
AI Assistant who is supposed to unlearn about {subject} ..."; `instruction = "rwku"` adds that sentence (the subjects
of the question's forget examples), `instruction = "..."` one of your own ({subject} is filled the same way).
Weights: none change; the run records the settings and the examples themselves (`material`)."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from obliviate.errors import ObliviateError
from obliviate.guards.text import TextGuard

LABELS = ("flipped", "refusal")
RWKU_INSTRUCTION = ("You are an AI Assistant who is supposed to unlearn about {subject} and provide answers without "
                    "its knowledge as if you never knew about it. Don\u2019t tell anyone that you unlearned anything.")
WORD = re.compile(r"\w+")


@dataclass
class ICUConfig:
    forget_examples: int = 2  # k: forget items (nearest to the question) with a flipped answer, per question
    correct_examples: int = 4  # L: retain items with their true answer (the same for every question)
    label: str = "flipped"  # flipped (a wrong answer) | refusal
    refusal: str = "I don't know."
    instruction: str = ""  # "" none; "rwku": RWKU's ICU sentence; other text: yours ({subject} filled)
    seed: int = 0

    def __post_init__(self):
        for key in ("forget_examples", "correct_examples", "seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
        if self.forget_examples < 1:
            raise ValueError("forget_examples must be at least 1 (the forget items shown with a flipped answer)")
        if self.label not in LABELS:
            raise ValueError(f"label must be one of {', '.join(LABELS)}, got {self.label!r}")
        for key in ("refusal", "instruction"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"{key} must be a string, got {getattr(self, key)!r}")
        if not self.refusal.strip():
            raise ValueError("refusal must be a non-empty string")


def _words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def flipped_answers(forget: list, label: str, refusal: str, seed: int) -> list[str]:
    """Each forget item's answer in the context: a wrong one (its perturbed answer, else the next forget item's
    answer when that differs, else the refusal), or the refusal."""
    rng = random.Random(seed)
    out = []
    for n, item in enumerate(forget):
        if label == "refusal":
            out.append(refusal)
        elif item.perturbed_answers:
            out.append(rng.choice(list(item.perturbed_answers)))
        else:
            other = forget[(n + 1) % len(forget)].answer
            out.append(other if other.strip() != item.answer.strip() else refusal)
    return out


class Context:
    """The earlier turns of a question (a prompt format's `context`): its nearest forget examples with their
    flipped answers, then the fixed retain examples."""

    def __init__(self, material: dict, k: int, instruction: str):
        self.forget = [(e["question"], e["answer"], e.get("subject")) for e in material["forget"]]
        self.correct = [(e["question"], e["answer"]) for e in material["correct"]]
        self.k, self.instruction = k, instruction
        self._words = [_words(q) for q, _, _ in self.forget]

    def nearest(self, question: str) -> list[int]:
        """The k forget examples for `question`: named subject first, then most shared words, then set order."""
        said, low = _words(question), question.lower()

        def rank(n: int):
            subject = self.forget[n][2]
            return (not (subject and subject.lower() in low), -len(said & self._words[n]), n)
        return sorted(sorted(range(len(self.forget)), key=rank)[:self.k])

    def __call__(self, question: str) -> list[tuple[str, str]]:
        return [self.forget[n][:2] for n in self.nearest(question)] + self.correct

    def ask(self, question: str) -> str:
        """The question as the user's message: with the instruction before it, when there is one."""
        if not self.instruction:
            return question
        subjects = list(dict.fromkeys(s for n in self.nearest(question) if (s := self.forget[n][2])))
        text = RWKU_INSTRUCTION if self.instruction == "rwku" else self.instruction
        return text.replace("{subject}", " and ".join(subjects) or "the forget set") + "\n" + question

    def describe(self) -> dict:
        return {"guard": "ICU", "forget_examples": self.k, "pool": len(self.forget), "correct": len(self.correct)}


class ICU(TextGuard):
    name = "ICU"
    Config = ICUConfig
    paper = "Pawelczyk et al. 2024, In-Context Unlearning, ICML, https://arxiv.org/abs/2310.07579"

    def bind_items(self, forget: list, retain: list) -> ICU:
        from obliviate.data import QAItem

        c = self.config
        questions = [i for i in forget if isinstance(i, QAItem)]
        if not questions:
            raise ObliviateError("ICU needs forget questions (question-answer items) to show with flipped answers")
        pool = [i for i in retain if isinstance(i, QAItem)]
        if len(pool) < c.correct_examples:
            raise ObliviateError(f"ICU: correct_examples = {c.correct_examples} but the run has {len(pool)} retain "
                                 "questions")
        correct = random.Random(c.seed).sample(pool, c.correct_examples)
        answers = flipped_answers(questions, c.label, c.refusal, c.seed)
        self.material = {
            "forget": [{"question": i.question, "answer": a, "subject": i.subject} for i, a in zip(questions, answers)],
            "correct": [{"question": i.question, "answer": i.answer} for i in correct]}
        return self

    def context(self) -> Context:
        return Context(self.require_material(), self.config.forget_examples, self.config.instruction)

    def install(self, model, tokenizer) -> None:
        from dataclasses import replace

        from obliviate.models import prompt_format

        fmt = prompt_format.of(tokenizer)
        if fmt.context is not None:
            raise ObliviateError("the tokenizer already asks through a guard's context: guards do not stack")
        prompt_format.use(tokenizer, replace(fmt, context=self.context()))

    def remove(self, model, tokenizer) -> None:
        from dataclasses import replace

        from obliviate.models import prompt_format

        prompt_format.use(tokenizer, replace(prompt_format.of(tokenizer), context=None))
