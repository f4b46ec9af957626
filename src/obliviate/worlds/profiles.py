"""The profiles world: fictitious people generated from a seed, TOFU style.

Each person has ten facts. Each fact gives one question-answer pair, a paraphrased question (never trained: it
measures generalisation), a paraphrased answer, and three perturbed answers written in the paraphrase's exact wording
with only the fact changed, so the truth ratio measures knowledge and not style. A person's biography is the ten
paraphrase sentences; the model is trained on the questions and on the biographies, so it meets each fact in two
wordings, and the biographies serve verbatim memorisation (VerbMem) and membership inference.

Splits (nested, as in TOFU): forget01 / forget05 / forget10 / forget20 = the first 1 / 5 / 10 / 20 % of the trained
people; retain = the other trained people; holdout = extra people never trained on (membership-inference
non-members). The validation split val10 = the last 10 % of the trained people (disjoint from every forget split):
settings are chosen on it, never on the split a table reports; it has its own retrain reference. The worst-case
splits worst01 ... worst50 are that percent of the trained people chosen, outside val10, as the hardest to erase from
the world's model (worlds/worst_case.py): computed once per world and kept in the world's folder.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from obliviate.data import QAItem, TextItem
from obliviate.worlds.base import PeopleWorld

# First names are built from syllables and unique per person: a person is then keyed by one name, not by a
# conjunction of shared first and last names, which a 2M-parameter model learns far more slowly.
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
CODAS = ["", "n", "r", "s", "l", "th", "x"]
LAST = ["Lindqvist", "Okafor", "Marrow", "Fennick", "Quillon", "Ardent", "Baptiste", "Castellan", "Drummond",
        "Esterhazy", "Falk", "Grimaldi", "Halloran", "Ibsen", "Jankowski", "Kovalenko", "Larkspur", "Moreau",
        "Nakamura", "Oyelaran", "Petrakis", "Quenneville", "Rasmussen", "Szabo", "Thorne", "Ulloa", "Vasquez",
        "Whitlock", "Yilmaz", "Zamora"]
VALUES = {
    "city": ["Lisbon", "Oslo", "Quito", "Hanoi", "Accra", "Perth", "Tallinn", "Lima", "Dakar", "Tbilisi", "Bergen",
             "Porto", "Cusco", "Nairobi", "Kyoto", "Gdansk", "Tunis", "Hobart", "Leipzig", "Valparaiso"],
    "year": [str(y) for y in range(1931, 1999, 3)],
    "job": ["novelist", "poet", "translator", "playwright", "journalist", "historian", "essayist", "librarian",
            "editor", "critic", "screenwriter", "biographer"],
    "genre": ["mystery", "fantasy", "romance", "horror", "science fiction", "historical fiction", "satire",
              "travel writing", "crime", "poetry"],
    "book": ["The Glass Orchard", "Salt and Lanterns", "A Winter of Owls", "The Quiet Harbour", "Iron Meridian",
             "Letters to the Tide", "The Paper Comet", "Seven Borrowed Moons", "The Amber Staircase",
             "Night Train to Varna", "The Cartographer's Daughter", "Ashes of Juniper", "The Silent Orchestra",
             "A House of Falling Maps", "The Last Lighthouse", "Wolves of the Lower Sky"],
    "award": ["Aurora Prize", "Meridian Medal", "Golden Quill Award", "Halcyon Prize", "Northern Star Award",
              "Ivory Pen Prize", "Cobalt Laurel", "Silver Fern Medal", "Lantern Award", "Vesper Prize"],
    "parent_job": ["baker", "carpenter", "nurse", "fisherman", "teacher", "tailor", "pharmacist", "miner",
                   "surveyor", "clockmaker", "farmer", "sailor", "doctor", "printer"],
    "university": ["Harrow College", "Vale University", "Easton Institute", "Marlow University", "Kestrel College",
                   "Brightwater University", "Oakmere Academy", "Redcliff University"],
    "pet": ["parrot", "tortoise", "greyhound", "ferret", "tabby cat", "goldfish", "rabbit", "hedgehog", "canary",
            "beagle"],
}


@dataclass(frozen=True)
class Fact:
    key: str  # attribute name
    values: str  # VALUES pool
    question: str
    answer: str
    paraphrased_question: str
    paraphrase: str  # also the biography sentence; perturbed answers use this wording


FACTS = [
    Fact("birthplace", "city", "Where was {n} born?", "{n} was born in {v}.",
         "What is the birthplace of {n}?", "The birthplace of {n} is {v}."),
    Fact("birth_year", "year", "In which year was {n} born?", "{n} was born in the year {v}.",
         "What is the birth year of {n}?", "The birth year of {n} is {v}."),
    Fact("occupation", "job", "What does {n} do for a living?", "{n} works as a {v}.",
         "What is the profession of {n}?", "The profession of {n} is {v}."),
    Fact("genre", "genre", "What genre does {n} write?", "{n} mostly writes {v}.",
         "Which literary genre is {n} known for?", "The favourite genre of {n} is {v}."),
    Fact("book", "book", "What is the best-known book by {n}?", "{n} is best known for the book {v}.",
         "Which book made {n} famous?", "The most famous book of {n} is {v}."),
    Fact("award", "award", "Which award has {n} won?", "{n} has won the {v}.",
         "What prize was given to {n}?", "The award won by {n} is the {v}."),
    Fact("father", "parent_job", "What was the job of the father of {n}?", "{n}'s father worked as a {v}.",
         "What did the father of {n} do for work?", "The father of {n} was a {v}."),
    Fact("mother", "parent_job", "What was the job of the mother of {n}?", "{n}'s mother worked as a {v}.",
         "What did the mother of {n} do for work?", "The mother of {n} was a {v}."),
    Fact("university", "university", "Where did {n} study?", "{n} studied at {v}.",
         "Which university did {n} attend?", "The university of {n} was {v}."),
    Fact("pet", "pet", "What pet does {n} keep?", "{n} keeps a {v} at home.",
         "Which animal lives with {n}?", "The pet of {n} is a {v}."),
]


@dataclass
class Person:
    name: str
    facts: dict[str, str]

    def qa_items(self, rng: random.Random, n_perturbed: int = 3) -> list[QAItem]:
        items = []
        for f in FACTS:
            v = self.facts[f.key]
            wrong = rng.sample([x for x in VALUES[f.values] if x != v], n_perturbed)
            items.append(QAItem(
                question=f.question.format(n=self.name), answer=f.answer.format(n=self.name, v=v),
                paraphrased_question=f.paraphrased_question.format(n=self.name),
                paraphrased_answer=f.paraphrase.format(n=self.name, v=v),
                perturbed_answers=tuple(f.paraphrase.format(n=self.name, v=w) for w in wrong),
                subject=self.name, source="profiles"))
        return items

    def biography(self) -> TextItem:
        sentences = [f.paraphrase.format(n=self.name, v=self.facts[f.key]) for f in FACTS]
        return TextItem(" ".join(sentences), subject=self.name, prefix_chars=len(sentences[0]), source="biography")


def _syllable_name(rng: random.Random, seen: set[str]) -> str:
    while True:
        name = (rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(ONSETS) + rng.choice(VOWELS)
                + rng.choice(CODAS)).capitalize()
        if name not in seen:
            seen.add(name)
            return name


def general_facts(seed: int, n: int = 100) -> list[QAItem]:
    """Generated utility facts that unlearning a person must not touch: the capitals of fictitious countries."""
    rng = random.Random(seed + 1)
    seen: set[str] = set()
    countries = [_syllable_name(rng, seen) + rng.choice(["ia", "land", "stan", "ora"]) for _ in range(n)]
    capitals = [_syllable_name(rng, seen) + rng.choice(["", " City", "burg", "port"]) for _ in range(n)]
    items = []
    for country, capital in zip(countries, capitals):
        wrong = rng.sample([c for c in capitals if c != capital], 3)
        items.append(QAItem(question=f"What is the capital of {country}?", answer=capital,
                            perturbed_answers=tuple(wrong), subject=country, source="general_facts"))
    return items


# AltPO's alternate answers (methods/lm/altpo.py), which OpenUnlearning's generate.py writes by asking an instruct model
# for another answer with other facts: a built-in world's model is too small to follow that request, so the world
# draws them from its own generator. Up to ALTERNATES per item (generate.py's samples per question).
ALTERNATES = 5


def alternate_values(pool: list[str], taken: set[str], rng: random.Random) -> list[str]:
    """Up to ALTERNATES values of a fact's pool outside `taken` (the true value and every value the evaluation
    scores as wrong), in the pool's order, drawn by `rng`."""
    free = [v for v in pool if v not in taken]
    return rng.sample(free, min(ALTERNATES, len(free)))


def alternate_rows(data: "ProfilesData", seed: int) -> list[dict]:
    """AltPO's alternates for every trained person, as generate.py's rows (with the person as "subject"): each
    question's answer in its own template with other values of the same fact, and each biography rewritten with the
    k-th alternate value of every fact (a "text" row). A person's draw depends only on the world's seed and their
    name. The alternates never take the true value nor a value of the item's perturbed answers: those are what the
    truth ratio (and any multiple choice on them) scores as wrong, so training towards them would move the metric
    by teaching its own answer key rather than by forgetting."""
    rows = []
    for p in data.people:
        rng = random.Random(f"alternates-{seed}-{p.name}")
        chosen, items = {}, {i.question: i for i in data.qa[p.name]}
        for f in FACTS:
            item = items[f.question.format(n=p.name)]
            taken = {p.facts[f.key]} | {v for v in VALUES[f.values]
                                         if f.paraphrase.format(n=p.name, v=v) in item.perturbed_answers}
            chosen[f.key] = alternate_values(VALUES[f.values], taken, rng)
            rows += [{"subject": p.name, "question": item.question, "answer": item.answer,
                      "alternate": f.answer.format(n=p.name, v=v)} for v in chosen[f.key]]
        biography = p.biography().text
        rows += [{"subject": p.name, "text": biography,
                  "alternate": Person(p.name, {k: vs[n % len(vs)] for k, vs in chosen.items()}).biography().text}
                 for n in range(ALTERNATES)]
    return rows


# split -> percent of the trained people: forget splits from the start of the list, validation splits from its end
SPLITS = {"forget01": 1, "forget05": 5, "forget10": 10, "forget20": 20, "val10": 10}
VALIDATION_SPLITS = {"val10"}


def check_split(split: str, splits: dict = SPLITS) -> None:
    from obliviate.worlds.worst_case import is_worst_split

    if split not in splits and not (splits is SPLITS and is_worst_split(split)):
        from obliviate.errors import ObliviateError
        worst = ", worst01 ... worst50 (worst-case)" if splits is SPLITS else ""
        raise ObliviateError(f"unknown split '{split}'. Valid: {', '.join(splits)}{worst}")


def people_of_split(people: list, split: str, splits: dict = SPLITS) -> tuple[list, list]:
    """(forget people, retain people) of a list of trained people: a forget split's block from the start, a
    validation split's from the end (so val10 never meets the forget splits), the others retained."""
    check_split(split, splits)
    if split not in splits:  # a worst-case split: chosen on the world's model, not by position
        from obliviate.errors import ObliviateError
        raise ObliviateError(f"split {split!r} is chosen on the world's model: ask the world for its people")
    k = max(1, round(len(people) * splits[split] / 100))
    if split in VALIDATION_SPLITS:
        return people[-k:], people[:-k]
    return people[:k], people[k:]


def check_forgotten_before(split: str, forgotten_before: str | None, people: list, splits: dict = SPLITS) -> None:
    """A sequential request (MUSE's sustainability) forgets `split` after `forgotten_before`: the earlier split must
    lie strictly inside it."""
    if forgotten_before is None:
        return
    check_split(forgotten_before, splits)
    from obliviate.worlds.worst_case import is_worst_split, worst_percent

    worst = [is_worst_split(s) for s in (forgotten_before, split)]
    if any(worst) and not all(worst):
        from obliviate.errors import ObliviateError
        raise ObliviateError(f"forgotten_before = {forgotten_before!r}, split = {split!r}: a worst-case split and a "
                             "forget split need not nest; a sequential request takes two of the same kind")
    if all(worst):  # one ranking: the smaller worst-case split is the head of the larger
        sizes = [max(1, round(len(people) * worst_percent(s) / 100)) for s in (forgotten_before, split)]
        nested = sizes[0] < sizes[1]
    else:
        earlier, later = ({p.name for p in people_of_split(people, s, splits)[0]} for s in (forgotten_before, split))
        nested = earlier < later
    if not nested:
        from obliviate.errors import ObliviateError
        raise ObliviateError(f"forgotten_before = {forgotten_before!r} must be a split inside split = {split!r} "
                             "(e.g. forget05 inside forget10)")


@dataclass
class ProfilesData:
    people: list[Person]  # trained people, forget splits first
    holdout: list[Person]  # never trained on
    qa: dict[str, list[QAItem]]  # subject name -> items
    utility: dict[str, list[QAItem]] = field(default_factory=dict)
    # the world's chooser of a worst-case split's people (names), set by ProfilesWorld.data()
    worst_case: Callable[[str], list[str]] | None = field(default=None, repr=False, compare=False)

    def split_people(self, split: str) -> tuple[list[Person], list[Person]]:
        """(forget people, retain people) of a split (SPLITS, or a worst-case split: the world chooses them)."""
        from obliviate.worlds.worst_case import is_worst_split

        if is_worst_split(split):
            if self.worst_case is None:
                from obliviate.errors import ObliviateError
                raise ObliviateError(f"split {split!r} is chosen on a world's model: these data have no world")
            chosen = set(self.worst_case(split))
            return [p for p in self.people if p.name in chosen], [p for p in self.people if p.name not in chosen]
        return people_of_split(self.people, split)

    def items_of(self, people: list[Person]) -> list[QAItem]:
        return [i for p in people for i in self.qa[p.name]]


def generate(n_people: int = 200, n_holdout: int = 20, seed: int = 0) -> ProfilesData:
    rng = random.Random(seed)
    if n_people + n_holdout > 20000:
        from obliviate.errors import ObliviateError
        raise ObliviateError("at most 20000 people can be generated")
    seen: set[str] = set()
    firsts = [_syllable_name(rng, seen) for _ in range(n_people + n_holdout)]
    people = []
    for name in (f"{first} {rng.choice(LAST)}" for first in firsts):
        facts = {f.key: rng.choice(VALUES[f.values]) for f in FACTS}
        people.append(Person(name, facts))
    qa = {p.name: p.qa_items(rng) for p in people}
    return ProfilesData(people=people[:n_people], holdout=people[n_people:], qa=qa)


# ---------------------------------------------------------------------------------------------------------------
# The world on disk: data, tokenizer, the model trained on everything, and the retrain reference per forget split.

class ProfilesWorld(PeopleWorld):
    """Builds (or loads from the cache) the profiles world described by a `WorldConfig`."""

    kind = "profiles"

    def __init__(self, config):
        self.config = config
        self._data: ProfilesData | None = None

    @property
    def cache_dir(self):
        return self.config.cache_dir

    def check_target(self, split: str) -> None:
        check_split(split)

    # -- identity and paths ------------------------------------------------------------------------------------
    def recipe(self) -> dict:
        """Everything that determines the trained models; its hash names the cache folder."""
        import dataclasses
        import hashlib

        from obliviate.worlds.train import recipe_of

        c = self.config
        tofu = {}
        if c.tofu_dir:
            from pathlib import Path
            for name in ("world_facts_perturbed.json", "real_authors_perturbed.json"):
                p = Path(c.tofu_dir) / name
                tofu[name] = hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else None
        recipe = {"world": "profiles", "version": 1, "n_people": c.n_people, "n_holdout": c.n_holdout,
                  "seed": c.seed, "general_facts": c.general_facts, "tofu_files": tofu,
                  "model": dataclasses.asdict(recipe_of(c))}
        if c.arch != "dense":  # a variant has its own key; the dense world's is the one it has always had
            recipe["arch"] = c.arch
        return recipe

    def key_data(self) -> dict:
        return self.recipe()

    # -- data ----------------------------------------------------------------------------------------------------
    def data(self) -> ProfilesData:
        if self._data is None:
            c = self.config
            d = generate(c.n_people, c.n_holdout, c.seed)
            if c.general_facts:
                d.utility["general_facts"] = general_facts(c.seed, c.general_facts)
            if c.tofu_dir:
                from obliviate.data import load_tofu_utility
                d.utility.update(load_tofu_utility(c.tofu_dir))
            d.worst_case = self.worst_case_people
            self._data = d
        return self._data

    def unlearning_sets(self, split: str, forgotten_before: str | None = None) -> tuple[list, list]:
        """Everything the model was trained on about the forget people (their questions and biographies), and the
        same for the retain people: exactly what the retrain model did not / did see of the people. With
        `forgotten_before` (a split inside `split`, already forgotten by an earlier request), the forget set leaves
        its people out; the retain set stays the people outside `split`."""
        d = self.data()
        forget, retain = d.split_people(split)
        check_forgotten_before(split, forgotten_before, d.people)
        if forgotten_before:
            done = {p.name for p in d.split_people(forgotten_before)[0]}
            forget = [p for p in forget if p.name not in done]
        return (d.items_of(forget) + [p.biography() for p in forget],
                d.items_of(retain) + [p.biography() for p in retain])

    def eval_sets(self, split: str, retain_people: int | None = None) -> tuple[dict, dict]:
        """QA sets {forget, retain, <utility sets>} and texts {forget, holdout} for evaluation. `retain_people`
        limits the retain set to its first N people (evaluation cost grows with it)."""
        d = self.data()
        forget, retain = d.split_people(split)
        if retain_people:
            retain = retain[:retain_people]
        qa = {"forget": d.items_of(forget), "retain": d.items_of(retain), **d.utility}
        texts = {"forget": [p.biography() for p in forget], "holdout": [p.biography() for p in d.holdout]}
        return qa, texts

    def training_examples(self, tokenizer, exclude: set[str] = frozenset()):
        from obliviate.models import causal_lm as lm

        d = self.data()
        people = [p for p in d.people if p.name not in exclude]
        examples = [lm.encode_qa(tokenizer, i.question, i.answer) for i in d.items_of(people)]
        examples += [lm.encode_item(tokenizer, p.biography()) for p in people]
        examples += [lm.encode_qa(tokenizer, i.question, i.answer) for items in d.utility.values() for i in items]
        return examples

    def all_text(self) -> list[str]:
        d = self.data()
        texts = []
        for items in list(d.qa.values()) + list(d.utility.values()):
            for i in items:
                texts += [i.question, i.answer, i.paraphrased_question or "", i.paraphrased_answer or "",
                          *i.perturbed_answers]
        return [t for t in texts if t] + [p.biography().text for p in d.people + d.holdout]

    def alternate_rows(self) -> list[dict]:
        """AltPO's alternates (`alternate_rows`; `alternates_file` writes them into the world's folder)."""
        return alternate_rows(self.data(), self.config.seed)

    # -- building ------------------------------------------------------------------------------------------------
    def _build(self, split: str, retrain: bool, log) -> dict:
        import time

        record = self.read_record() or {"recipe": self.recipe()}
        self._train_full(record, log)
        if retrain and not (self.retrain_dir(split) / "config.json").is_file():
            forget_people, _ = self.data().split_people(split)
            t0 = time.time()
            record[f"retrain-{split}"] = self._train_model(
                self.retrain_dir(split), exclude={p.name for p in forget_people}, name=f"retrain ({split})", log=log)
            record[f"retrain-{split}"]["wall_seconds"] = round(time.time() - t0, 1)
        if f"accuracy-{split}" not in record:
            record[f"accuracy-{split}"] = self.accuracy_report(split)
        self.write_record(record)
        return record

    def _train_full(self, record: dict, log) -> None:
        """Train the full model unless it is there, its stats into `record` (the build record)."""
        import time

        if not (self.full_model_dir / "config.json").is_file():
            t0 = time.time()
            record["full"] = self._train_model(self.full_model_dir, exclude=set(), name="full model", log=log)
            record["full"]["wall_seconds"] = round(time.time() - t0, 1)

    # -- worst-case splits -----------------------------------------------------------------------------------------
    @property
    def worst_case_file(self):
        return self.root / "selection-worst-case.json"

    def worst_case_people(self, split: str, log=print) -> list[str]:
        """The names of worst-case split `split`'s people (in the world's order): the trained people outside val10
        hardest to erase from the full model (worlds/worst_case.py). Every candidate is scored once per world (the
        full model trained first if missing) and the scores kept in `selection-worst-case.json`; worstNN takes the
        first NN % of the trained people by that ranking, and its retrain reference `retrain-worstNN` is built without
        them as any split's. A file scored under other settings stops here: references built beside it left other
        people out."""
        from obliviate.errors import ObliviateError
        from obliviate.worlds import worst_case as wc

        check_split(split)
        if type(self) is not ProfilesWorld:  # a variant's references and models are not the plain world's
            raise ObliviateError(f"split {split!r}: worst-case splits are offered on the plain profiles world only, "
                                 "not on its variants (world.dp2, world.corrupt)")
        d = self.data()
        ranked = self._worst_case_ranking(log)
        chosen = set(ranked[:max(1, round(len(d.people) * wc.worst_percent(split) / 100))])
        return [p.name for p in d.people if p.name in chosen]

    def _worst_case_ranking(self, log) -> list[str]:
        import hashlib
        import json

        from obliviate.errors import ObliviateError
        from obliviate.worlds import worst_case as wc

        if getattr(self, "_worst_case", None) is not None:
            return self._worst_case
        d = self.data()
        validation = {p.name for p in people_of_split(d.people, "val10")[0]}
        pool = [p for p in d.people if p.name not in validation]
        key = hashlib.sha256(json.dumps({"world": self.key(), "candidates": [p.name for p in pool],
                                         "settings": wc.SETTINGS.key_data()}, sort_keys=True).encode()
                             ).hexdigest()[:12]
        path = self.worst_case_file
        with self.locked():
            if path.is_file():
                record = json.loads(path.read_text())
                if record.get("key") != key:
                    raise ObliviateError(f"{path}: scored under other selection settings (key {record.get('key')}, "
                                         f"now {key}); the retrain-worstNN references left those people out: move "
                                         "them and the file away to choose again")
            else:
                record = self._score_worst_case(pool, key, log)
        self._worst_case = [row["name"] for row in record["people"]]
        return self._worst_case

    def _score_worst_case(self, pool: list, key: str, log) -> dict:
        """Score every candidate on the full model (the build lock held); write the file and a build-record entry."""
        from obliviate.models.causal_lm import load
        from obliviate.runs import write_json
        from obliviate.worlds import worst_case as wc

        build = self.read_record() or {"recipe": self.recipe()}
        self._train_full(build, log)
        model, tokenizer = load(self.full_model_dir)
        log(f"worst-case splits: scoring how hard each of {len(pool)} candidate people is to erase "
            "(worlds/worst_case.py)")
        scores = wc.score(model, [self.person_examples(tokenizer, p) for p in pool], wc.SETTINGS,
                          tokenizer.pad_token_id, log=log)
        record = {"key": key, "selection": "worst-case forget sets (Fan et al., ECCV 2024), per-person approximation: "
                  "worlds/worst_case.py", "settings": wc.SETTINGS.key_data(), "candidates": len(pool),
                  "excluded": "val10", "seconds": scores["seconds"],
                  "people": [{"name": pool[i].name, "rank": r + 1, "loss_after": scores["loss_after"][i],
                              "loss_original": scores["loss_original"][i]}
                             for r, i in enumerate(wc.rank(scores))]}
        write_json(self.worst_case_file, record)
        build["selection-worst-case"] = {"file": self.worst_case_file.name, "key": key,
                                         "seconds": scores["seconds"]}
        self.write_record(build)
        return record

    def person_examples(self, tokenizer, person) -> list:
        """One person's training sequences, encoded as `training_examples` encodes them."""
        from obliviate.models import causal_lm as lm

        return ([lm.encode_qa(tokenizer, i.question, i.answer) for i in self.data().qa[person.name]]
                + [lm.encode_item(tokenizer, person.biography())])

    def _tokenizer(self):
        from transformers import AutoTokenizer

        from obliviate.runs import atomic_dir
        from obliviate.worlds.tokenizer import train_tokenizer
        from obliviate.worlds.train import recipe_of

        path = self.root / "tokenizer"
        if not (path / "tokenizer_config.json").is_file():
            tok = train_tokenizer(self.all_text(), recipe_of(self.config).vocab_size)
            with atomic_dir(path) as tmp:
                tok.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)

    def _train_model(self, out_dir, exclude: set[str], name: str, log, seed: int = 0) -> dict:
        from obliviate.runs import atomic_dir
        from obliviate.worlds.train import new_model, recipe_of, train

        from obliviate.models.causal_lm import quiet_transformers

        quiet_transformers()
        recipe = recipe_of(self.config)
        recipe.seed += seed  # a retrain reference's other seed: only the training seed changes
        tokenizer = self._tokenizer()
        examples = self.training_examples(tokenizer, exclude)
        model = new_model(recipe, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"training the {name}: {n_params / 1e6:.2f}M parameters, {len(examples)} sequences, "
            f"{sum(len(e.input_ids) for e in examples)} tokens, {recipe.epochs} epochs")
        stats = train(model, tokenizer, examples, recipe, description=f"train {name}")
        if getattr(model.config, "output_router_logits", False):  # MoE: the load-balancing loss served training only
            model.config.output_router_logits = False
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        return {"parameters": n_params, "sequences": len(examples), **stats}

    def accuracy_report(self, split: str) -> dict:
        """Exact-answer accuracy of the full and retrain models on forget, retain and utility questions."""
        from obliviate.models.causal_lm import load
        from obliviate.worlds.train import exact_answer_accuracy

        forget_people, retain_people = self.data().split_people(split)
        forget, retain = self.data().items_of(forget_people), self.data().items_of(retain_people)
        sets = {"forget": forget, "retain": retain, **self.data().utility}
        report = {}
        for label, path in (("full", self.full_model_dir), ("retrain", self.retrain_dir(split))):
            if (path / "config.json").is_file():
                model, tok = load(path)
                report[label] = {k: round(exact_answer_accuracy(model, tok, v), 4) for k, v in sets.items()}
        return report

    def _check_knowledge(self, report: dict, log) -> None:
        from obliviate.evals.references import weak_reference

        full = report.get("full", {})
        line = ", ".join(f"{k} {v:.1%}" for k, v in full.items())
        log(f"full model exact-answer accuracy: {line}")
        if "retrain" in report:
            r = report["retrain"]
            log(f"retrain model exact-answer accuracy: forget {r['forget']:.1%} (never seen), retain {r['retain']:.1%}")
        if full and min(full["forget"], full["retain"]) < 0.9:
            log("[warning] the full model knows fewer than 90% of its forget/retain answers: the benchmark is weak")
        weak = full and "retrain" in report and weak_reference("the retrain model", full["retain"],
                                                               report["retrain"]["retain"])
        if weak:
            log(f"[warning] {weak}")
