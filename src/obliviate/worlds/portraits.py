"""The portraits world's data (MLLMU-Bench's protocol, in miniature): the profiles world's people with portraits, and
their facts asked with the portrait ("Where was this person born?") and as text ("Where was Ada Lind born?"), each
as a free answer (generation), a 4-option multiple choice (classification) and a fill-in-the-blank (cloze).

- Fictitious people: forget05 / forget10 / forget15 = the first 5 / 10 / 15 % (MLLMU-Bench's forget_5/10/15), the
  others retained. Their first pictures are trained on; the later ones are held out for the test set, which asks the
  paraphrased questions about a picture never seen (MLLMU-Bench's Test_Set: another picture of the same person).
- Public figures (MLLMU-Bench's celebrity set): people the model knows well (more pictures), to be kept.
- Holdout people: never trained on (membership inference).

Pictures are named "<person>#<index>" and drawn by `portraits_draw`; this module holds the words."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from obliviate.worlds.portraits_draw import Appearance, appearances
from obliviate.worlds.profiles import FACTS, VALUES, Person, generate

SPLITS = {"forget05": 5, "forget10": 10, "forget15": 15}
LETTERS = "ABCD"
THIS = "this person"


@dataclass(frozen=True)
class VQAItem:
    """One fact of one person in one form. image: a picture id, or None for a text-only question."""
    subject: str
    fact: str
    image: str | None
    question: str
    answer: str  # generation ground truth (a sentence)
    options: tuple[str, ...]  # classification: 4 options, in the order of LETTERS
    correct: str  # the letter of the right option
    cloze: str  # a sentence with "__" where the value goes
    cloze_answer: str  # the value

    @property
    def with_image(self) -> bool:
        return self.image is not None


def picture_id(name: str, index: int) -> str:
    return f"{name}#{index}"


def _items(person: Person, fact_rng: random.Random, images: list[str | None], paraphrased: bool) -> list[VQAItem]:
    """Every fact of a person in every form: one item per (fact, image) where an image of None asks by name."""
    out = []
    for f in FACTS:
        value = person.facts[f.key]
        wrong = fact_rng.sample([v for v in VALUES[f.values] if v != value], 3)
        options = wrong + [value]
        fact_rng.shuffle(options)
        for image in images:
            who = THIS if image else person.name
            template = f.paraphrased_question if paraphrased else f.question
            question = template.format(n=who)
            answer = f.answer.format(n=who, v=value)
            out.append(VQAItem(
                subject=person.name, fact=f.key, image=image, question=question[0].upper() + question[1:],
                answer=answer[0].upper() + answer[1:], options=tuple(options), correct=LETTERS[options.index(value)],
                cloze=f.paraphrase.format(n=who, v="__"), cloze_answer=value))
    return out


@dataclass
class PortraitsData:
    people: list[Person]  # fictitious people who are trained on, forget splits first
    public: list[Person]  # public figures: known well, kept
    holdout: list[Person]  # never trained on
    looks: dict[str, Appearance]
    train_pictures: dict[str, list[str]]  # person -> picture ids trained on
    test_pictures: dict[str, list[str]]  # person -> held-out picture ids
    train: dict[str, list[VQAItem]] = field(default_factory=dict)  # person -> items (trained pictures and text)
    test: dict[str, list[VQAItem]] = field(default_factory=dict)  # person -> paraphrased items on held-out pictures

    def split_people(self, split: str) -> tuple[list[Person], list[Person]]:
        """(forget people, retain people) of the fictitious people for forget05 / forget10 / forget15."""
        if split not in SPLITS:
            from obliviate.errors import ObliviateError
            raise ObliviateError(f"unknown split '{split}'. Valid: {', '.join(SPLITS)}")
        k = max(1, round(len(self.people) * SPLITS[split] / 100))
        return self.people[:k], self.people[k:]


def portraits_data(n_people: int = 100, n_public: int = 20, n_holdout: int = 20, seed: int = 0,
                   train_pictures: int = 3, test_pictures: int = 2, public_pictures: int = 6) -> PortraitsData:
    """The world's people (the profiles world's generator, so names and facts are its own), their portraits, and
    their items. Deterministic from the arguments."""
    profiles = generate(n_people + n_public, n_holdout, seed)
    people, public = profiles.people[:n_people], profiles.people[n_people:]
    everyone = people + public + profiles.holdout
    looks = appearances([p.name for p in everyone], seed)
    data = PortraitsData(people, public, profiles.holdout, looks, {}, {})
    rng = random.Random(seed + 7)
    for p in everyone:
        n_train = public_pictures if p in public else train_pictures
        data.train_pictures[p.name] = [picture_id(p.name, i) for i in range(n_train)]
        data.test_pictures[p.name] = [picture_id(p.name, n_train + i) for i in range(test_pictures)]
        # every picture trained on asks each fact, and so does the name alone
        data.train[p.name] = _items(p, rng, [*data.train_pictures[p.name], None], paraphrased=False)
        # the test set: paraphrased questions about each held-out picture, and by name
        data.test[p.name] = _items(p, rng, [*data.test_pictures[p.name], None], paraphrased=True)
    return data
