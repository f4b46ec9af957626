"""Question-answer items and texts, and loaders for the TOFU JSON-lines format (errors name the file and line)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from obliviate.errors import ObliviateError


@dataclass(frozen=True)
class QAItem:
    question: str
    answer: str
    # TOFU fields: the paraphrased answer, and wrong answers written in the same wording as the paraphrase.
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()
    paraphrased_question: str | None = None
    subject: str | None = None  # the person (or fact group) the item is about; splits are made by subject
    source: str = ""  # "profiles", "world_facts", "real_authors", "general_facts", or a file name

    def to_json(self) -> dict:
        d = asdict(self)
        d["perturbed_answers"] = list(self.perturbed_answers)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "QAItem":
        d = dict(d)
        d["perturbed_answers"] = tuple(d.get("perturbed_answers", ()))
        return cls(**d)


@dataclass(frozen=True)
class VQAItem:
    """A question about a person, asked with a picture (`image`: its id) or as text alone (None), with what each of
    MLLMU-Bench's tasks needs: `answer` (generation), `options` and `correct` (classification: 4 options in A-D
    order, the right letter), `cloze` and `cloze_answer` (a sentence with "__", the words that fill it). The
    portraits world fills every task; an MLLMU-Bench row's items fill one each (None: not asked)."""
    subject: str
    fact: str
    image: str | None
    question: str
    answer: str | None = None
    options: tuple[str, ...] | None = None
    correct: str | None = None
    cloze: str | None = None
    cloze_answer: str | None = None


@dataclass(frozen=True)
class TextItem:
    """A free text (a biography) for verbatim memorisation and membership inference."""
    text: str
    subject: str | None = None
    prefix_chars: int = 0  # where the prompt ends, for continuation (VerbMem)
    source: str = "text"
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def read_text_file(path: str | Path, what: str = "file") -> str:
    """A user's text file decoded as UTF-8 (a leading BOM dropped); a missing, unreadable or non-UTF-8 file is one
    ObliviateError naming the file (and for a bad byte, its line and byte offset)."""
    path = Path(path)
    if not path.is_file():
        raise ObliviateError(f"{what} not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ObliviateError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ObliviateError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                             "save the file as UTF-8") from None
    return text.removeprefix("\ufeff")  # editors on Windows may write a BOM; json and tomllib reject it


def read_json_file(path: str | Path, what: str = "JSON file"):
    """A user's JSON file (UTF-8); malformed JSON is one ObliviateError naming file:line."""
    try:
        return json.loads(read_text_file(path, what))
    except json.JSONDecodeError as e:
        raise ObliviateError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def _field(row: dict, names: tuple[str, ...]):
    for n in names:
        if n in row and row[n] is not None:
            return row[n]
    return None


def load_qa_jsonl(path: str | Path, source: str | None = None) -> list[QAItem]:
    """Read TOFU-style JSON lines: question, answer, optional paraphrased_answer / paraphrased_question,
    perturbed_answer (list). A JSON array file is accepted as well."""
    path = Path(path)
    text = read_text_file(path, "data file")
    rows: list[tuple[int, object]] = []
    if text.lstrip().startswith("["):
        try:
            rows = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise ObliviateError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    else:
        # split on "\n" only: str.splitlines also breaks at U+2028 and other separators JSON allows inside strings
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ObliviateError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
    items = []
    for lineno, row in rows:
        if not isinstance(row, dict):
            raise ObliviateError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        q, a = row.get("question"), row.get("answer")
        if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
            raise ObliviateError(f"{path}:{lineno}: needs non-empty string fields 'question' and 'answer'")
        perturbed = _field(row, ("perturbed_answer", "perturbed_answers")) or []
        if isinstance(perturbed, str):
            perturbed = [perturbed]
        if not isinstance(perturbed, list) or not all(isinstance(p, str) for p in perturbed):
            raise ObliviateError(f"{path}:{lineno}: 'perturbed_answer' must be a list of strings")
        items.append(QAItem(
            question=q, answer=a,
            paraphrased_answer=_field(row, ("paraphrased_answer",)),
            paraphrased_question=_field(row, ("paraphrased_question",)),
            perturbed_answers=tuple(perturbed),
            subject=row.get("subject") or row.get("author"),
            source=source or path.stem,
        ))
    if not items:
        raise ObliviateError(f"{path}: no question-answer rows")
    return items


def load_tofu_utility(tofu_dir: str | Path) -> dict[str, list[QAItem]]:
    """The real TOFU utility sets (world facts, real authors) from a user's folder."""
    tofu_dir = Path(tofu_dir)
    if not tofu_dir.is_dir():
        raise ObliviateError(f"TOFU folder not found: {tofu_dir}")
    return {
        "world_facts": load_qa_jsonl(tofu_dir / "world_facts_perturbed.json", "world_facts"),
        "real_authors": load_qa_jsonl(tofu_dir / "real_authors_perturbed.json", "real_authors"),
    }


def load_lines(path: str | Path) -> list[str]:
    path = Path(path)
    lines = [l.strip() for l in read_text_file(path).splitlines() if l.strip()]
    if not lines:
        raise ObliviateError(f"{path}: empty")
    return lines


def item_key(item: QAItem | TextItem) -> str:
    if isinstance(item, TextItem):
        return item.text
    if hasattr(item, "image"):  # a question about "this person" is a different item for every person and picture
        return f"{item.subject}\n{item.image}\n{item.question}\n{item.answer}"
    return f"{item.question}\n{item.answer}"


def check_disjoint(forget: list, retain: list) -> None:
    """Forget and retain (question-answer items and/or texts) must both be non-empty and share no item."""
    if not forget:
        raise ObliviateError("the forget set is empty")
    if not retain:
        raise ObliviateError("the retain set is empty")
    overlap = {item_key(i) for i in forget} & {item_key(i) for i in retain}
    if overlap:
        example = next(iter(overlap)).split("\n")[0][:80]
        raise ObliviateError(f"forget and retain sets overlap in {len(overlap)} item(s), e.g. {example!r}")


def load_prompts(path: str | Path, must_contain: str | None = None) -> list[str]:
    """Prompts for text-to-image runs: one per line, or JSON lines with a "prompt" key (blank lines skipped).
    A bad row (broken JSON, no "prompt", a forget prompt without the concept) is an error naming file:line."""
    path = Path(path)
    prompts = []
    for n, line in enumerate(read_text_file(path, "prompts file").split("\n"), 1):  # "\n" only, as for JSON lines
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ObliviateError(f"{path}:{n}: malformed JSON: {e.msg}") from None
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise ObliviateError(f"{path}:{n}: a JSON row needs a non-empty string \"prompt\"")
            line = prompt.strip()
        if must_contain is not None and must_contain not in line:
            raise ObliviateError(f"{path}:{n}: forget prompt {line!r} does not contain the concept '{must_contain}'")
        prompts.append(line)
    if not prompts:
        raise ObliviateError(f"{path}: no prompts")
    return prompts
