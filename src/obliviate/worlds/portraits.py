"""The portraits world's data (MLLMU-Bench's protocol, in miniature): the profiles world's people with portraits, and
their facts asked with the portrait ("Where was this person born?") and as text ("Where was Ada Lind born?"), each
as a free answer (generation), a 4-option multiple choice (classification) and a fill-in-the-blank (cloze).

- Fictitious people: forget05 / forget10 / forget15 = the first 5 / 10 / 15 % (MLLMU-Bench's forget_5/10/15; also
  forget20), the others retained; the validation split val10 = the last 10 % (disjoint from every forget split). Their first pictures are trained on; the later ones are held out for the test set, which asks the
  paraphrased questions about a picture never seen (MLLMU-Bench's Test_Set: another picture of the same person).
- Public figures (MLLMU-Bench's celebrity set): people the model knows well (more pictures, and their facts also in
  the paraphrased wording), to be kept.
- Holdout people: never trained on (membership inference).

Pictures are named "<person>#<index>" and drawn by `portraits_draw`; this module holds the words."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from obliviate.data import VQAItem
from obliviate.worlds.portraits_draw import Appearance, appearances
from obliviate.worlds.base import PeopleWorld
from obliviate.worlds.profiles import ALTERNATES, FACTS, LAST, VALUES, Person, _syllable_name, alternate_values, \
    check_forgotten_before, check_split, generate, people_of_split

SPLITS = {"forget05": 5, "forget10": 10, "forget15": 15, "forget20": 20, "val10": 10}  # as the profiles world's
LETTERS = "ABCD"
THIS = "this person"


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
    # public figures are known better: their facts are also trained in the paraphrased wording (on trained pictures)
    paraphrased: dict[str, list[VQAItem]] = field(default_factory=dict)

    def split_people(self, split: str) -> tuple[list[Person], list[Person]]:
        """(forget people, retain people) of the fictitious people for a split (SPLITS)."""
        return people_of_split(self.people, split, SPLITS)


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
        if p in public:
            data.paraphrased[p.name] = _items(p, rng, [*data.train_pictures[p.name], None], paraphrased=True)
    return data


def alternate_rows(data: PortraitsData, seed: int) -> list[dict]:
    """AltPO's alternates for every fictitious person (the forgettable ones), as generate.py's rows with the person
    as "subject" (a question about a picture, "Where was this person born?", is asked of everyone): for each fact up
    to ALTERNATES other values of the same kind, rendered in each trained form (the free answer in its template,
    the multiple-choice answer as the right letter with the other value, the cloze's value), and for "Who is this
    person?" other names drawn by the world's name generator, none a name of the world. A value is never the true
    one nor any option of the person's items, trained or test: those options are the wrong answers classification
    and the truth ratio score, so training towards one would teach the metric's own answer key. A person's draw
    depends only on the world's seed and their name."""
    from obliviate.worlds.portraits_train import WHO, all_forms

    def upper(text: str) -> str:
        return text[0].upper() + text[1:]

    rows: list[dict] = []
    seen_first = {p.name.split()[0] for p in data.people + data.public + data.holdout}
    for p in data.people:
        rng = random.Random(f"alternates-{seed}-{p.name}")
        values = {}
        for f in FACTS:
            items = [i for i in data.train[p.name] + data.test[p.name] if i.fact == f.key]
            values[f.key] = alternate_values(VALUES[f.values], {o for i in items for o in i.options}, rng)
        for item in data.train[p.name]:
            f = next(f for f in FACTS if f.key == item.fact)
            who = THIS if item.image else p.name
            free, choice, cloze = all_forms(item)
            for v in values[f.key]:
                rows += [{"subject": p.name, "question": free.question, "answer": free.answer,
                          "alternate": upper(f.answer.format(n=who, v=v))},
                         {"subject": p.name, "question": choice.question, "answer": choice.answer,
                          "alternate": f"{item.correct}. {v}"},
                         {"subject": p.name, "question": cloze.question, "answer": cloze.answer, "alternate": v}]
        seen = set(seen_first)  # this person's names only: another person's draw changes none of them
        names = [f"{_syllable_name(rng, seen)} {rng.choice(LAST)}" for _ in range(ALTERNATES)]
        rows += [{"subject": p.name, "question": WHO, "answer": f"This is {p.name}.", "alternate": f"This is {n}."}
                 for n in names]
    unique = {json.dumps(r, sort_keys=True): r for r in rows}  # a question asked of each picture: one row set
    return list(unique.values())


# ---------------------------------------------------------------------------------------------------------------
# The world on disk: the processor, the LLaVA trained on everyone, and the retrain reference per forget split.

# The world's own sizes (WorldConfig's n_people and n_holdout override them when set to other values): small enough that both models
# train within the family's build budget on 2 cores (benchmarks/README.md (m)).
DEFAULT_SIZES = {"n_people": 24, "n_public": 6, "n_holdout": 6, "train_pictures": 2, "public_pictures": 4}


class PortraitsWorld(PeopleWorld):
    """Builds (or loads from the cache) the portraits world of a `WorldConfig` (name "portraits")."""

    kind = "portraits"

    def __init__(self, config):
        self.config = config
        # n_people and n_holdout resize this world only when they differ from WorldConfig's defaults (the profiles
        # world's sizes): a config written out whole and read back (a run's config.json, a bench cell) sets every
        # field, and must still name the world of the config it came from
        from obliviate.config import WorldConfig

        defaults = {k: WorldConfig.model_fields[k].default for k in ("n_people", "n_holdout")}
        self.sizes = {**DEFAULT_SIZES, **{k: getattr(config, k) for k, v in defaults.items() if getattr(config, k) != v}}
        self._data: PortraitsData | None = None

    def recipe(self) -> dict:
        import dataclasses

        from obliviate.worlds.portraits_train import VLMRecipe

        return {"world": "portraits", "version": 1, **self.sizes, "seed": self.config.seed,
                "model": dataclasses.asdict(VLMRecipe(**self.config.model))}

    def key_data(self) -> dict:
        return self.recipe()

    @property
    def cache_dir(self):
        return self.config.cache_dir

    def check_target(self, split: str) -> None:
        check_split(split, SPLITS)

    def data(self) -> PortraitsData:
        if self._data is None:
            self._data = portraits_data(seed=self.config.seed, **self.sizes)
        return self._data

    def alternate_rows(self) -> list[dict]:
        """AltPO's alternates (`alternate_rows`; `alternates_file` writes them into the world's folder)."""
        return alternate_rows(self.data(), self.config.seed)

    def pictures(self, image_id: str):
        """The RGB array of a picture id ("<person>#<index>")."""
        from obliviate.worlds.portraits_draw import draw, picture

        name, _, index = image_id.rpartition("#")
        looks = self.data().looks
        if name not in looks or not index.isdigit():
            from obliviate.errors import ObliviateError
            raise ObliviateError(f"no picture {image_id!r} in the portraits world")
        return draw(looks[name], picture(name, int(index)))

    def adapter(self, processor):
        from obliviate.models.vlm import VisionLanguageAdapter

        return VisionLanguageAdapter(processor, self.pictures)

    # -- sets --------------------------------------------------------------------------------------------------
    def unlearning_sets(self, split: str, forgotten_before: str | None = None) -> tuple[list, list]:
        """Everything the model was trained on about the forget people (each fact in its three forms, with each
        trained picture and by name, and who their pictures show), and the same for the retain people: exactly what
        the retrain model did not / did see of the fictitious people. With `forgotten_before` (a split inside
        `split`, already forgotten by an earlier request) the forget set leaves its people out; the retain set stays
        the people outside `split`."""
        from obliviate.worlds.portraits_train import training_items

        forget, retain = self.data().split_people(split)
        check_forgotten_before(split, forgotten_before, self.data().people, SPLITS)
        if forgotten_before:
            done = {p.name for p in self.data().split_people(forgotten_before)[0]}
            forget = [p for p in forget if p.name not in done]
        return training_items(self.data(), forget), training_items(self.data(), retain)

    def eval_sets(self, split: str, retain_people: int | None = None) -> dict[str, list[VQAItem]]:
        """MLLMU-Bench's sets, each fact asked with one picture of the person (as the benchmark has one image per
        profile) and as text: forget (the first trained picture: efficacy), test (the first held-out picture, with
        paraphrased questions: generalisation), retain and public figures (utility), holdout (never trained on:
        membership inference). `retain_people` keeps the first N retain people (evaluation cost grows with it)."""
        d = self.data()
        forget, retain = d.split_people(split)
        if retain_people:
            retain = retain[:retain_people]

        def asked(people, items, pictures):
            keep = {p.name: {pictures[p.name][0], None} for p in people}
            return [i for p in people for i in items[p.name] if i.image in keep[p.name]]
        return {"forget": asked(forget, d.train, d.train_pictures), "test": asked(forget, d.test, d.test_pictures),
                "retain": asked(retain, d.train, d.train_pictures),
                "public": asked(d.public, d.train, d.train_pictures),
                "holdout": asked(d.holdout, d.train, d.train_pictures)}

    # -- building ------------------------------------------------------------------------------------------------
    def _build(self, split: str, retrain: bool, log) -> dict:
        import time

        record = self.read_record() or {"recipe": self.recipe()}
        t0 = time.time()
        todo = [("full", self.full_model_dir, set())]
        if retrain:
            forget, _ = self.data().split_people(split)
            todo.append((f"retrain-{split}", self.retrain_dir(split), {p.name for p in forget}))
        todo = [(label, folder, exclude) for label, folder, exclude in todo if not (folder / "config.json").is_file()]
        if todo:
            self.processor()  # made once, before the models that share it
        from obliviate.workers import can_start_processes

        # the full and the retrain model side by side, one process and one thread each (not from a demo part's
        # worker, which may not start processes of its own)
        together = len(todo) > 1 and can_start_processes()
        if together:
            record.update(self._train_side_by_side(todo, log))
        for label, folder, exclude in [] if together else todo:
            t1 = time.time()
            record[label] = self._train_model(folder, exclude, label, log)
            record[label]["wall_seconds"] = round(time.time() - t1, 1)
        if f"accuracy-{split}" not in record:
            record[f"accuracy-{split}"] = self.accuracy_report(split)
            record[f"build_seconds-{split}"] = round(time.time() - t0, 1)
        self.write_record(record)
        return record

    def processor(self):
        from transformers import AutoProcessor

        from obliviate.runs import atomic_dir
        from obliviate.worlds.portraits_train import VLMRecipe, new_processor, world_texts

        path = self.root / "processor"
        if not (path / "processor_config.json").is_file():
            processor = new_processor(world_texts(self.data()), VLMRecipe(**self.config.model))
            with atomic_dir(path) as tmp:
                processor.save_pretrained(tmp)
        return AutoProcessor.from_pretrained(path, trust_remote_code=False)

    def _train_side_by_side(self, todo: list, log) -> dict:
        """Train the models at once, one worker process and one thread each; an error in one stops all."""
        import time

        from obliviate import progress
        from obliviate.workers import side_by_side

        log(f"training the portraits {' and '.join(label for label, _, _ in todo)} models side by side")
        settings = self.config.model_dump(exclude_unset=True)  # unset sizes stay the world's own
        t0 = time.time()
        out = side_by_side({label: (_train_in_a_worker, (settings, str(folder), sorted(exclude), label,
                                                         progress.enabled()))
                            for label, folder, exclude in todo})
        return {label: {**stats, "wall_seconds": round(time.time() - t0, 1)} for label, stats in out.items()}

    def _train_model(self, out_dir, exclude: set[str], label: str, log, seed: int = 0) -> dict:
        from obliviate.models import quiet_transformers, sequences
        from obliviate.runs import atomic_dir
        from obliviate.worlds.portraits_train import VLMRecipe, new_model, training_items
        from obliviate.worlds.train import train

        quiet_transformers()
        recipe = VLMRecipe(**self.config.model)
        recipe.seed += seed  # a retrain reference's other seed: only the training seed changes
        processor = self.processor()
        tokenizer = processor.tokenizer
        sequences.prepare_tokenizer(tokenizer)
        d = self.data()
        adapter = self.adapter(processor)
        items = training_items(d, [p for p in d.people + d.public if p.name not in exclude])
        examples = [adapter.encode_item(tokenizer, i) for i in items]
        model = new_model(recipe, processor)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"training the portraits {label} model: {n_params / 1e6:.2f}M parameters, {len(examples)} sequences, "
            f"{recipe.epochs} epochs")
        stats = train(model, tokenizer, examples, recipe, description=f"train {label}", collate=adapter.collate)
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        return {"parameters": n_params, "sequences": len(examples), **stats}

    def accuracy_report(self, split: str) -> dict:
        """Multiple-choice accuracy (MLLMU-Bench's classification), with the image and as text, of the full and
        retrain models on every evaluation set but the holdout people, and on the forget people's trained questions
        about a held-out picture (with the image only)."""
        from obliviate.evals.mllmu import classification_accuracy
        from obliviate.models import vlm

        from dataclasses import replace

        sets = {k: v for k, v in self.eval_sets(split).items() if k != "holdout"}
        d = self.data()
        # the forget people's trained questions on a held-out picture: does the model know them by their look?
        sets["held_out_picture"] = [replace(i, image=d.test_pictures[i.subject][0]) for i in sets["forget"]
                                    if i.image is not None]
        report = {}
        for label, path in (("full", self.full_model_dir), ("retrain", self.retrain_dir(split))):
            if (path / "config.json").is_file():
                model, processor = vlm.load(path)
                adapter = self.adapter(processor)
                report[label] = {k: classification_accuracy(model, adapter, processor.tokenizer, v)
                                 for k, v in sets.items()}
        return report

    def _check_knowledge(self, report: dict, log) -> None:
        for label in ("full", "retrain"):
            if label in report:
                line = ", ".join(f"{k} " + " / ".join(f"{x:.0%}" for x in v.values()) for k, v in report[label].items())
                log(f"portraits {label} model, multiple-choice accuracy with the image / as text: {line}")
        full = report.get("full", {})
        if full and min(min(full[k].values()) for k in ("forget", "retain")) < 0.9:
            log("[warning] the full model answers fewer than 90% of its forget/retain questions: the benchmark is weak")


def _train_in_a_worker(world_config: dict, folder: str, exclude: list[str], label: str, show_progress: bool) -> dict:
    """One model of the world in a worker process: one torch thread, plain progress lines."""
    from pathlib import Path

    import torch

    from obliviate import progress
    from obliviate.config import WorldConfig

    torch.set_num_threads(1)
    progress.set_enabled(show_progress)
    progress.force_plain(True)
    config = WorldConfig(**world_config)
    return PortraitsWorld(config)._train_model(Path(folder), set(exclude), label, print)
