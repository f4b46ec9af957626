"""The benchmarks' real files, read from a user's folder in their published formats, each set with a stated role.

- TOFU (Maini et al. 2024; hub `locuslab/TOFU`): `forget01/05/10.json` and `retain99/95/90.json` (what unlearning
  trains on), `forget01/05/10_perturbed.json` (the forget set's evaluation: paraphrased and perturbed answers),
  `retain_perturbed.json`, `real_authors_perturbed.json`, `world_facts_perturbed.json` (model utility), and the
  holdout sets OpenUnlearning adds (`holdout01/05/10.json`: never-trained authors, for membership inference).
  JSON lines or a JSON array; rows `question`, `answer`, and for `_perturbed` `paraphrased_answer`,
  `perturbed_answer` (list), `paraphrased_question`.
- MUSE (Shi et al. 2024; the layout of the MUSE repository's `data/<corpus>/` folder, News or Books): `raw/forget`,
  `raw/retain1` (training, a JSON array of texts or a .txt file), `verbmem/forget.json` (`prompt`, `gt`),
  `knowmem/forget_qa.json` and, where the release has it, `knowmem/retain_qa.json` (or `retain2_qa.json`)
  (`question`, `answer`), `privleak/forget.json` and `privleak/holdout.json` (arrays of texts). KnowMem is asked
  zero-shot in the run's format; MUSE's own scorer puts the `_icl` examples before each question (not done here).
- MLLMU-Bench (Liu et al. 2025; hub `MLLMMU/MLLMU-Bench`, and the baselines' training split, hub
  `MLLMMU/baseline_train_split`): parquet folders with embedded pictures, for the vision-language family
  (`load_mllmu`, below).

A set's role decides how it is scored, so it is never guessed from a name it does not have: TOFU's published file
names carry theirs (`TOFU_ROLES`), and any other file needs `role` stated (`eval_sets` in a run config).
Roles: forget, retain (TOFU's retain probability), utility (scored as retain), utility_normalised (TOFU's normalised
probability, as for real authors and world facts), holdout (never-trained items: membership inference)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from obliviate.data import QAItem, TextItem, load_qa_jsonl, read_json_file, read_text_file
from obliviate.errors import ObliviateError

ROLES = ("forget", "retain", "utility", "utility_normalised", "holdout")
TOFU_SPLITS = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
TOFU_ROLES = {"retain_perturbed": "retain", "real_authors_perturbed": "utility_normalised",
              "world_facts_perturbed": "utility_normalised"}


def tofu_role(path: str | Path) -> str | None:
    """The role TOFU's release gives a file, from its published name (None for any other name)."""
    stem = Path(path).stem
    if stem in TOFU_ROLES:
        return TOFU_ROLES[stem]
    if re.fullmatch(r"forget\d\d_perturbed", stem):
        return "forget"
    if re.fullmatch(r"holdout\d\d", stem):
        return "holdout"
    return None


@dataclass
class EvalData:
    """What an evaluation scores. qa_sets: name -> items; roles: name -> role; member_texts / holdout_texts: the
    membership-inference pair (texts or question-answer items); verbmem_texts: texts whose prefix is continued."""
    qa_sets: dict[str, list[QAItem]]
    roles: dict[str, str]
    member_texts: list = field(default_factory=list)
    holdout_texts: list = field(default_factory=list)
    verbmem_texts: list[TextItem] = field(default_factory=list)
    label: str = ""  # what was unlearned, for titles ("TOFU forget10", "forget.json")


def utility_sets(roles: dict[str, str]) -> list[str]:
    """The sets in model utility: every retain and utility set."""
    return [n for n, r in roles.items() if r in ("retain", "utility", "utility_normalised")]


def normalised_sets(roles: dict[str, str]) -> list[str]:
    """The sets scored with TOFU's normalised probability."""
    return [n for n, r in roles.items() if r == "utility_normalised"]


@dataclass
class BenchmarkData:
    forget: list  # what the forget term trains on
    retain: list  # what the retain term trains on
    evaluation: EvalData


def _file(folder: Path, *names: str) -> Path:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    raise ObliviateError(f"{folder}: none of {', '.join(names)} found")


def load_tofu(folder: str | Path, split: str) -> BenchmarkData:
    """TOFU's release from `folder` for a split (forget01, forget05 or forget10)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ObliviateError(f"TOFU folder not found: {folder}")
    if split not in TOFU_SPLITS:
        raise ObliviateError(f"split: TOFU's splits are {', '.join(TOFU_SPLITS)}; got {split!r}")
    pct = split.removeprefix("forget")
    forget = load_qa_jsonl(_file(folder, f"{split}.json", f"{split}.jsonl"), "forget")
    retain = load_qa_jsonl(_file(folder, f"{TOFU_SPLITS[split]}.json", f"{TOFU_SPLITS[split]}.jsonl"), "retain")
    qa = {"forget": load_qa_jsonl(_file(folder, f"{split}_perturbed.json"), "forget"),
          "retain": load_qa_jsonl(_file(folder, "retain_perturbed.json"), "retain"),
          "real_authors": load_qa_jsonl(_file(folder, "real_authors_perturbed.json"), "real_authors"),
          "world_facts": load_qa_jsonl(_file(folder, "world_facts_perturbed.json"), "world_facts")}
    roles = {"forget": "forget", "retain": "retain", "real_authors": "utility_normalised",
             "world_facts": "utility_normalised"}
    holdout_path = folder / f"holdout{pct}.json"
    holdout = load_qa_jsonl(holdout_path, "holdout") if holdout_path.is_file() else []
    return BenchmarkData(forget, retain, EvalData(qa, roles, member_texts=forget if holdout else [],
                                                  holdout_texts=holdout, label=f"TOFU {split}"))


def _texts(path: Path, source: str) -> list[str]:
    """A MUSE text file: a JSON array of strings, JSON lines with a "text" key, or plain text."""
    if path.suffix == ".txt":
        return [read_text_file(path, "MUSE text file")]
    text = read_text_file(path, "MUSE file")
    data = _json_lines(path, text) if not text.lstrip().startswith("[") else read_json_file(path, "MUSE file")
    if not isinstance(data, list) or not all(isinstance(t, str) or (isinstance(t, dict) and isinstance(
            t.get("text"), str)) for t in data):
        raise ObliviateError(f"{path}: expected a JSON array of texts (or of objects with a \"text\" key)")
    return [t if isinstance(t, str) else t["text"] for t in data]


def _json_lines(path: Path, text: str) -> list:
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # "\n" only: JSON strings may hold U+2028
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ObliviateError(f"{path}:{n}: malformed JSON ({e.msg})") from None
    return rows


def is_text_corpus(path: str | Path) -> bool:
    """Whether a forget or retain file is a text corpus (a .txt file, or JSON whose first row is a string or an
    object with "text" and no "question", as WMDP's corpora and MUSE's raw texts) rather than question-answer lines."""
    path = Path(path)
    if path.suffix == ".txt":
        return True
    if not path.is_file():
        read_text_file(path, "data file")  # its one line: not found, or not a file
    with open(path, encoding="utf-8", errors="replace") as f:
        line = next((line for line in f if line.strip()), "")  # the first row of JSON lines (a corpus may be GBs)
    if line.lstrip().startswith("["):
        rows = read_json_file(path, "data file")
        first = rows[0] if isinstance(rows, list) and rows else None
    else:
        first = _json_lines(path, line)[0] if line.strip() else None
    return isinstance(first, str) or (isinstance(first, dict) and "text" in first and "question" not in first)


def load_corpus(path: str | Path, source: str, chunk_words: int = 256) -> list[TextItem]:
    """A text corpus as forget or retain data, each text cut into chunks of `chunk_words` words as MUSE's are."""
    items = [TextItem(chunk, source=source) for t in _texts(Path(path), source) for chunk in chunk_text(t, chunk_words)
             if chunk.strip()]
    if not items:
        raise ObliviateError(f"{path}: no texts")
    return items


def chunk_text(text: str, max_words: int) -> list[str]:
    """Consecutive pieces of at most `max_words` words (MUSE trains on fixed-length chunks of its corpora)."""
    words = text.split()
    return [" ".join(words[i:i + max_words]) for i in range(0, len(words), max_words)]


def load_muse(folder: str | Path, chunk_words: int = 256) -> BenchmarkData:
    """A MUSE corpus folder (News or Books) in the MUSE repository's layout."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ObliviateError(f"MUSE folder not found: {folder}")
    raw = folder / "raw"

    def corpus(name: str) -> list[TextItem]:
        path = _file(raw, f"{name}.json", f"{name}.txt")
        return [TextItem(chunk, source=f"muse_{name}") for t in _texts(path, name) for chunk in
                chunk_text(t, chunk_words)]

    verbmem = []
    vm_path = _file(folder / "verbmem", "forget.json")
    rows = read_json_file(vm_path, "MUSE verbmem file")
    if not isinstance(rows, list):
        raise ObliviateError(f"{vm_path}: expected a JSON array of {{\"prompt\", \"gt\"}} objects")
    for n, row in enumerate(rows, 1):
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("gt"), str)
                and row["prompt"] and row["gt"]):
            raise ObliviateError(f"{vm_path}: item {n}: needs non-empty string fields 'prompt' and 'gt'")
        verbmem.append(TextItem(row["prompt"] + row["gt"], prefix_chars=len(row["prompt"]), source="muse_verbmem"))
    knowmem = folder / "knowmem"
    qa = {"forget": load_qa_jsonl(_file(knowmem, "forget_qa.json"), "forget")}
    retain_qa = [knowmem / n for n in ("retain_qa.json", "retain2_qa.json") if (knowmem / n).is_file()]
    if retain_qa:  # some releases ship the forget questions only: then no KnowMem on retain
        qa["retain"] = load_qa_jsonl(retain_qa[0], "retain")
    privleak = folder / "privleak"
    members = [TextItem(t, source="muse_privleak") for t in _texts(_file(privleak, "forget.json"), "forget")]
    holdout = [TextItem(t, source="muse_privleak") for t in _texts(_file(privleak, "holdout.json"), "holdout")]
    return BenchmarkData(corpus("forget"), corpus("retain1"),
                         EvalData(qa, {name: name for name in qa}, members, holdout, verbmem,
                                  label=f"MUSE {folder.name} forget"))


def load_eval_set(path: str | Path, role: str | None, name: str | None = None) -> tuple[str, str, list[QAItem]]:
    """(name, role, items) of a user's evaluation file; its role as stated, or TOFU's for TOFU's file names."""
    path = Path(path)
    if role is None:
        role = tofu_role(path)
        if role is None:
            raise ObliviateError(f"{path}: state the set's role (one of {', '.join(ROLES)}): only TOFU's "
                                 "published file names carry one")
    if role not in ROLES:
        raise ObliviateError(f"{path}: unknown role {role!r}; valid: {', '.join(ROLES)}")
    name = name or re.sub(r"_perturbed$", "", path.stem)
    return name, role, load_qa_jsonl(path, name)


# ---------------------------------------------------------------------------------------------------------------
# MLLMU-Bench (Liu et al., NAACL 2025; data hub MLLMMU/MLLMU-Bench), as its eval.py reads it: one folder per set
# (forget_5/10/15, retain_95/90/85, Test_Set, Retain_Set = the celebrities), each holding parquet files whose rows are
# one profile: `ID`, `image` {bytes}, `biography`, `question` and `answer` (one QA pair), `Classification_Task`
# {Image_Textual_Questions, Pure_Text_Questions: [{Question, Options {A..D}, Correct_Answer}]}, `Generation_Task` and
# `Mask_Task` ([{Question, Ground_Truth, Type}], Type "Image_Textual" or "Pure_Text"). Test_Set rows hold `images`
# (other pictures of the person) instead of `image`; eval.py falls back to `image` when a row has no `images`.
# The baselines train on another release (MLLMMU/baseline_train_split, which GA.py, GA_Difference.py, ... read): the
# same forget_N / retain_M folders, rows `image`, `ID`, `metadata` (a JSON list of {Question, Answer}: the many
# fine-tuning QA pairs of each person, as in ft_Data), which is what unlearning should train on.

MLLMU_RATIOS = {"forget05": 5, "forget10": 10, "forget15": 15}


# Why an MLLMU-Bench run has no membership inference (recorded in the run): PrivLeak and the MIA AUC need people the
# model never saw, and the release has none that fit. The vanilla model is fine-tuned on all 500 fictitious profiles
# (ft_Data), the Test_Set asks about the forget people themselves (other pictures, paraphrased questions), and the
# celebrities are real people a base model may know from pretraining, another distribution: neither the paper nor
# the README offers a holdout, so none is made up here.
MLLMU_NO_MEMBERSHIP = ("no membership AUC or PrivLeak: MLLMU-Bench has no never-trained people (the vanilla model is "
                       "fine-tuned on all 500 fictitious profiles; the Test_Set asks about the forget people, the "
                       "celebrities are real people a base model may know)")
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"


@dataclass
class MLLMUData:
    forget: list  # VQAItems the model is unlearned on (the forget profiles' QA, with their picture)
    retain: list
    eval_sets: dict[str, list]  # forget, test, retain, public: the three tasks' items
    images: dict[str, bytes] = field(default_factory=dict)  # picture id -> encoded image
    unlearning_data: str = ""  # which QA pairs unlearning trains on, as the run records it
    retain_people: dict = field(default_factory=dict)  # {"scored": n, "of": all}: the retain set's evaluated people
    membership: str = MLLMU_NO_MEMBERSHIP  # why there is no membership inference

    def picture(self, image_id: str):
        import io

        import numpy as np
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(self.images[image_id])).convert("RGB"))


def _parquet_rows(folder: Path) -> tuple[list[tuple[Path, int, dict]], Path]:
    import pyarrow.parquet as pq

    if not folder.is_dir():
        raise ObliviateError(f"MLLMU-Bench folder not found: {folder}")
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise ObliviateError(f"no parquet files in {folder}")
    rows = []
    for path in files:
        with open(path, "rb") as f:
            if f.read(len(LFS_POINTER)) == LFS_POINTER:
                raise ObliviateError(f"{path}: a git-lfs pointer file, not the data (the clone was made without "
                                     "git-lfs): run `git lfs install && git lfs pull` in the clone, or download it "
                                     "with huggingface_hub's snapshot_download")
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a broken file
            raise ObliviateError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
        rows += [(path, n, row) for n, row in enumerate(table.to_pylist())]
    return rows, folder


def _need(row: dict, key: str, where: str):
    if row.get(key) is None:
        raise ObliviateError(f"{where}: no '{key}'")
    return row[key]


def _image_bytes(value, where: str) -> bytes:
    import io

    from PIL import Image

    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, (bytes, bytearray)):
        raise ObliviateError(f"{where}: the image holds no bytes")
    try:
        Image.open(io.BytesIO(data)).verify()
    except Exception:
        raise ObliviateError(f"{where}: the image bytes are not a readable picture") from None
    return bytes(data)


def _profile_items(row: dict, where: str, image_id: str) -> list:
    """The three tasks' items of one profile row (each item carries one task)."""
    from obliviate.data import VQAItem

    subject = str(_need(row, "ID", where))
    items = []
    classification = _need(row, "Classification_Task", where)
    for key, image in (("Image_Textual_Questions", image_id), ("Pure_Text_Questions", None)):
        for n, q in enumerate(classification.get(key) or []):
            at = f"{where}: Classification_Task.{key}[{n}]"
            options = _need(q, "Options", at)
            if isinstance(options, dict):
                options = [options.get(letter) for letter in "ABCD"]
            correct = str(_need(q, "Correct_Answer", at)).strip()[:1].upper()
            if len(options) != 4 or any(o is None for o in options) or not correct or correct not in "ABCD":
                raise ObliviateError(f"{at}: needs Options A-D and a Correct_Answer letter")
            items.append(VQAItem(subject, "classification", image, str(_need(q, "Question", at)),
                                 options=tuple(str(o) for o in options), correct=correct))
    for task, kind in (("Generation_Task", "generation"), ("Mask_Task", "cloze")):
        for n, q in enumerate(_need(row, task, where)):
            at = f"{where}: {task}[{n}]"
            question, truth = str(_need(q, "Question", at)), str(_need(q, "Ground_Truth", at))
            image = image_id if q.get("Type") == "Image_Textual" else None
            if kind == "generation":
                items.append(VQAItem(subject, kind, image, question, answer=truth))
            else:
                if "__" not in question:
                    raise ObliviateError(f"{at}: a Mask_Task question needs a '__' blank")
                items.append(VQAItem(subject, kind, image, question, cloze=question, cloze_answer=truth))
    return items


def _unlearning_items(row: dict, where: str, image_id: str) -> list:
    """The profile's fine-tuning QA (`metadata`: the baselines' training split; or the release's one
    `question`/`answer`), asked with its picture."""
    import json

    from obliviate.data import VQAItem

    if row.get("metadata") is not None:
        try:
            pairs = json.loads(row["metadata"]) if isinstance(row["metadata"], str) else row["metadata"]
        except json.JSONDecodeError as e:
            raise ObliviateError(f"{where}: metadata is not JSON ({e.msg})") from None
    elif row.get("question") is not None and row.get("answer") is not None:
        pairs = [{"Question": row["question"], "Answer": row["answer"]}]
    else:
        raise ObliviateError(f"{where}: no 'metadata' (nor 'question' and 'answer') to unlearn")
    if not isinstance(pairs, list):
        raise ObliviateError(f"{where}: metadata is not a list of {{Question, Answer}}")
    subject = str(_need(row, "ID", where))
    return [VQAItem(subject, "qa", image_id, str(p["Question"]), answer=str(p["Answer"]))
            for p in pairs if isinstance(p, dict) and p.get("Question") and p.get("Answer")]


def mllmu_train_dir(folder: str | Path, train_dir: str | Path | None = None) -> Path | None:
    """The baselines' training split to unlearn on: `train_dir` when given (it must exist), else the release folder's
    `baseline_train_split` when there is one, else None (the release's one QA pair per person)."""
    if train_dir is not None:
        if not Path(train_dir).is_dir():
            raise ObliviateError(f"mllm.train_dir: folder not found: {train_dir}")
        return Path(train_dir)
    inside = Path(folder) / "baseline_train_split"
    return inside if inside.is_dir() else None


def _train_split(train_dir: Path, ratio: int, release_ids: dict[str, set[str]], data: "MLLMUData") -> None:
    """Unlearning items from the baselines' training split (forget_N / retain_M, rows with `metadata`), each person
    asked with the split's own picture; its forget and retain people must be the release's."""
    for name, folder_name in (("forget", f"forget_{ratio}"), ("retain", f"retain_{100 - ratio}")):
        rows, _ = _parquet_rows(train_dir / folder_name)
        items, people = [], set()
        for path, n, row in rows:
            where = f"{path}: row {n}"
            _need(row, "metadata", where)
            subject = str(_need(row, "ID", where))
            image_id = f"train_{name}:{subject}"
            data.images[image_id] = _image_bytes(_need(row, "image", where), where)
            items += _unlearning_items(row, where, image_id)
            people.add(subject)
        if people != release_ids[name]:
            raise ObliviateError(f"{train_dir / folder_name}: its {len(people)} people are not the release's "
                                 f"{len(release_ids[name])} {name} people ({len(people & release_ids[name])} "
                                 "shared); give the training split of the same release")
        setattr(data, name, items)
    n_people = len({i.subject for i in data.forget})
    data.unlearning_data = (f"the baselines' training split {train_dir} ({len(data.forget)} QA pairs of {n_people} "
                            f"forget people, {len(data.retain)} retain pairs)")


def load_mllmu(folder: str | Path, split: str = "forget10", retain_people: int | None = None,
               train_dir: str | Path | None = None) -> MLLMUData:
    """MLLMU-Bench's files for a forget split (forget05 / forget10 / forget15): the forget and retain profiles' QA to
    unlearn and keep, and the evaluation sets (forget, test = the forget people on another picture, retain, public =
    the celebrity set). Unlearning trains on the baselines' training split (`mllmu_train_dir`) when there is one,
    else on the release's one QA pair per person (`unlearning_data` says which). `retain_people` keeps the first N
    retain people for evaluation (None: all, as MLLMU-Bench scores). A Test_Set row's picture is its first of
    `images` (the benchmark draws one at random), or its `image` when it has no `images`, as eval.py falls back."""
    folder = Path(folder)
    if split not in MLLMU_RATIOS:
        raise ObliviateError(f"unknown MLLMU-Bench split '{split}'. Valid: {', '.join(MLLMU_RATIOS)}")
    ratio = MLLMU_RATIOS[split]
    train_dir = mllmu_train_dir(folder, train_dir)
    data = MLLMUData([], [], {"forget": [], "test": [], "retain": [], "public": []})
    release_ids: dict[str, set[str]] = {"forget": set(), "retain": set()}
    retain_seen = 0
    for name, folder_name in (("forget", f"forget_{ratio}"), ("retain", f"retain_{100 - ratio}"),
                              ("public", "Retain_Set"), ("test", "Test_Set")):
        rows, _ = _parquet_rows(folder / folder_name)
        for path, n, row in rows:
            where = f"{path}: row {n}"
            subject = str(_need(row, "ID", where))
            if name == "test":
                if subject not in release_ids["forget"]:
                    continue
                if row.get("images") is not None:
                    if not len(row["images"]):
                        raise ObliviateError(f"{where}: 'images' is empty")
                    picture = row["images"][0]
                elif row.get("image") is not None:
                    picture = row["image"]
                else:
                    raise ObliviateError(f"{where}: no 'images' (nor 'image')")
            else:
                picture = _need(row, "image", where)
            image_id = f"{name}:{subject}"
            data.images[image_id] = _image_bytes(picture, where)
            if name in release_ids:
                release_ids[name].add(subject)
            if name == "forget":
                if train_dir is None:
                    data.forget += _unlearning_items(row, where, image_id)
            if name == "retain":
                if train_dir is None:
                    data.retain += _unlearning_items(row, where, image_id)
                retain_seen += 1
                if retain_people and retain_seen > retain_people:
                    continue
            data.eval_sets[name] += _profile_items(row, where, image_id)
    data.retain_people = {"scored": min(retain_seen, retain_people or retain_seen), "of": retain_seen}
    if train_dir is not None:
        _train_split(train_dir, ratio, release_ids, data)
    else:
        data.unlearning_data = (f"the release's question/answer, one per person ({len(data.forget)} forget pairs): "
                                "no baselines' training split (mllm.train_dir, or baseline_train_split/ in the "
                                "release folder)")
    if not data.forget:
        where = train_dir / f"forget_{ratio}" if train_dir else folder / f"forget_{ratio}"
        raise ObliviateError(f"{where}: no question-answer pairs to unlearn")
    return data


def mllmu_biographies(folder: str | Path, split: str = "forget10") -> dict[str, str]:
    """{forget person's ID: their profile's `biography`} of the release's forget folder (the rows that have one): the
    in-context attack's profile texts (`attacks/mllm/in_context.py`)."""
    if split not in MLLMU_RATIOS:
        raise ObliviateError(f"unknown MLLMU-Bench split '{split}'. Valid: {', '.join(MLLMU_RATIOS)}")
    rows, _ = _parquet_rows(Path(folder) / f"forget_{MLLMU_RATIOS[split]}")
    return {str(row["ID"]): row["biography"] for _, _, row in rows
            if row.get("ID") is not None and isinstance(row.get("biography"), str) and row["biography"].strip()}
