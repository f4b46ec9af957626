"""AltPO (alternate preference optimisation): DPO that prefers a plausible alternate answer (other facts, the same
kind of answer) to the true forget answer, relative to the frozen original model, plus a retain term.

Paper: Mekala et al. 2025, "Alternate Preference Optimization for Unlearning Factual Knowledge in Large Language
Models" (COLING 2025), https://arxiv.org/abs/2409.13474 (code: molereddy/Alternate-Preference-Optimization, its
`dpo` loss in dataloader.py)
Reference code read: OpenUnlearning (locuslab/open-unlearning) src/trainer/unlearn/dpo.py, `compute_dpo_loss` in
src/trainer/utils.py, configs/trainer/DPO.yaml, community/methods/AltPO (README.md, generate.py, run.sh: the DPO
trainer on `QAwithAlternateDataset`), `QAwithAlternateDataset` in src/data/qa.py.

    r(y) = log pi_theta(y|x) - log pi_ref(y|x)             (sums over the answer tokens)
    L_f = -(2 / beta) * mean_f[ log sigmoid( beta * ( r(y_alt) - r(y) ) ) ]
    L   = gamma * L_f + alpha * R,   R = NLL_r ("gd"), KL(p_ref || p_theta) on retain answers ("kl"), or none

Defaults (DPO.yaml, which the AltPO recipe runs): beta 0.1, alpha 1, gamma 1, retain NLL. The recipe searches beta in
{0.05, 0.1, 0.5}, alpha in {1, 2, 5} and trains 2 epochs.

Where the alternates come from. The paper and the reference generate them before unlearning, with the model itself:
generate.py asks it, for each forget question and answer, to write another answer that changes the facts (5 samples
at temperature 1, at most 200 new tokens) and writes JSON lines {"question", "answer", "alternate"}; the unlearning
run reads that file. obliviate reads the same file: `alternates` names it (JSON lines or one JSON list; the path is
taken from the working directory), and `generate_alternates` writes one with a language model in its own prompt
format (the same recipe; the instruction is worded for any instruct model rather than in Llama's tags). Each forget
item is matched by its question and answer when the file's rows give an answer (needed where one question is asked
of many people, as MLLMU-Bench's "What is this person's job?"), else by its question alone; every forget item must
have at least one alternate, and a config without `alternates` is refused at once (`obliviate validate`, the first
moment of a run) in one line. The alternate reaches the loss as the item's companion (`Method.companions`:
forget["companion"]), with everything else of the item kept (a vision-language item keeps its picture).
Two optional row keys go beyond generate.py's: "subject" (the item's person: matched first, for a question asked of
everyone, as "Where was this person born?" about a picture) and, in place of "question" and "answer", "text" (a
forget text, as a biography: its companion is the whole "alternate" text, scored as the text is).

The built-in worlds' alternates (`alternates = "world"`). generate.py needs a model that follows an instruction; the
profiles and portraits worlds' small models cannot, so there the world stands in for it: for each forget question,
its answer in the same template with other values of the same fact, drawn by the world's own generator (the value
pools the people were drawn from) with a seed of the world's and the person's, up to 5 per question (generate.py's
samples); a biography's alternates rewrite every fact; a portrait's "Who is this person?" gets names from the world's
name generator. They are DISJOINT from the perturbed answers (the wrong options) that the truth ratio and multiple
choice score: training towards them would move those metrics by teaching their own answer key, not by forgetting.
The file (`alternates-<sha256>.jsonl`) is written once into the world's folder (atomically; the world's cache key
is unchanged), and the run's metrics.json says where its alternates came from ("alternates": the source, the file
and its sha256, for a world's file also its rows; a user's file is recorded the same way). "world" is explicit: a world run without
`alternates` is refused like any other, and "world" on the user's own data is one line (`obliviate validate` too).
worlds/profiles.py and worlds/portraits.py (`alternate_rows`) say how each world draws them.

Differences from the reference: the reference trains on every (question, alternate) row as its own forget example
(5 rows per question in its recipe); obliviate pairs each forget item with one of its alternates, drawn with the
run's seed, so an epoch is one pass over the forget items. The alternate is scored with the format's end tokens and
the forget answer as `train.forget_tokens` says (IdkPO's convention), where the reference scores both alike. Means
are over the items of the optimiser step's global batch (`item_mean`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from obliviate.errors import ObliviateError
from obliviate.methods.lm.base import LossParts, Method, check_choice, check_number, item_mean, token_mean
from obliviate.methods.lm.idkpo import preference_margin
from obliviate.methods.lm.npo import RETAIN_CHOICES, retain_term


WORLD = "world"  # alternates = "world": the built-in world's (a user's file named so is "./world")


@dataclass
class AltPOConfig:
    # required: JSON lines {"question", "alternate"[, "answer", "subject"]} (generate.py's rows), or "world"
    alternates: str | None = None
    beta: float = 0.1
    alpha: float = 1.0  # weight of the retain term
    gamma: float = 1.0  # weight of the forget (preference) term
    retain: str = "gd"  # "gd" (retain NLL, the reference's), "kl" or "none"

    def __post_init__(self):
        if self.alternates is None:  # a config without them fails at once (obliviate validate, a run's start)
            raise ObliviateError("AltPO needs alternate answers: set method_args.alternates to a JSON-lines file of "
                                 "{\"question\", \"alternate\"} rows (OpenUnlearning's community/methods/AltPO/"
                                 "generate.py writes one), or to \"world\" on a built-in world")
        if not isinstance(self.alternates, str):
            raise ObliviateError(f"AltPO: alternates must be a file path, got {self.alternates!r}")
        check_number("AltPO", "beta", self.beta, positive=True)
        check_number("AltPO", "alpha", self.alpha, min=0)
        check_number("AltPO", "gamma", self.gamma, positive=True)
        check_choice("AltPO", "retain", self.retain, RETAIN_CHOICES)


TEXT = object()  # the key of a "text" row: (TEXT, text), (TEXT, subject, text); never equal to a question's


def load_alternates(path: str) -> dict:
    """{(question, answer): [alternates]} and {question: [alternates]} from a JSON-lines file (or one JSON list) of
    rows with "question" and "alternate" strings (and optionally "answer"; with "subject" also
    {(subject, question, answer): ...}), or "text" in place of "question" ({(TEXT, text)[, (TEXT, subject, text)]:
    ...}); a fault names the file and the row."""
    file = Path(path)
    if not file.is_file():
        raise ObliviateError(f"AltPO: alternates file not found: {path}")
    text = file.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else None
    except json.JSONDecodeError as e:
        raise ObliviateError(f"AltPO: {path}: not valid JSON: {e}") from None
    if rows is None:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ObliviateError(f"AltPO: {path}:{n}: not valid JSON: {e.msg}") from None
    table: dict = {}
    for n, row in enumerate(rows, 1):
        asked = "text" if isinstance(row, dict) and "text" in row and "question" not in row else "question"
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row.get(k).strip()
                                                for k in (asked, "alternate")):
            raise ObliviateError(f"AltPO: {path}: row {n}: needs non-empty \"question\" and \"alternate\" strings "
                                 "(or \"text\" in place of \"question\")")
        subject = row.get("subject") if isinstance(row.get("subject"), str) else None
        if asked == "text":
            keys = [(TEXT, row["text"])] + ([(TEXT, subject, row["text"])] if subject else [])
        else:
            answer = row.get("answer") if isinstance(row.get("answer"), str) else None
            keys = [row["question"]] + ([(row["question"], answer)] if answer is not None else []) + \
                ([(subject, row["question"], answer)] if answer is not None and subject else [])
        for key in keys:
            table.setdefault(key, []).append(row["alternate"].strip())
    if not table:
        raise ObliviateError(f"AltPO: {path}: no alternates in it")
    return table


class AltPO(Method):
    name = "AltPO"
    Config = AltPOConfig
    needs_reference = True

    def __init__(self, config=None):
        super().__init__(config)
        self.source: str | None = None  # the file the alternates were read from
        self.table: dict | None = None  # "world": read once the run's world is known (`from_world`)
        if self.config.alternates != WORLD:
            self.source = self.config.alternates
            self.table = load_alternates(self.source)

    @property
    def needs_world(self) -> bool:
        return self.config.alternates == WORLD

    def from_world(self, world) -> dict:
        """Called by the runner with the run's built-in world (None: the user's own data) before training: with
        "world", the world's alternates file (written once into its folder); either way what metrics.json keeps of
        where the alternates came from."""
        import hashlib

        if self.needs_world:
            if world is None:
                raise ObliviateError("AltPO: method_args.alternates = \"world\" takes a built-in world's alternates, "
                                     "and this run is on your own data: give a JSON-lines file of {\"question\", "
                                     "\"alternate\"} rows (generate_alternates or OpenUnlearning's generate.py "
                                     "writes one)")
            path, digest, rows = world.alternates_file()
            self.source, self.table = str(path), load_alternates(str(path))
            return {"alternates": {"source": "world", "world": world.kind, "file": str(path), "sha256": digest,
                                   "rows": rows}}
        path = Path(self.source)
        return {"alternates": {"source": "file", "file": str(path.absolute()),
                               "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}}

    def companions(self, forget: list, retain: list, rng) -> list:
        """Each forget item with one of its alternates as the answer (matched by subject, question and answer, else
        by question and answer, else by question; a text by subject and text, else by text), drawn with the run's
        seed."""
        if self.table is None:
            raise ObliviateError("AltPO: alternates = \"world\" are read from the run's world (`from_world`, which "
                                 "`obliviate run` and the bench call); calling the loop directly, call "
                                 "method.from_world(world) first or give a file")
        out, missing = [], []
        for item in forget:
            subject = getattr(item, "subject", None)
            if hasattr(item, "question"):
                asked = item.question
                choices = (subject and self.table.get((subject, asked, item.answer))) or \
                    self.table.get((asked, item.answer)) or self.table.get(asked)
                change = "answer"
            else:  # a forget text (a biography): its companion is a whole alternate text
                asked = item.text
                choices = (subject and self.table.get((TEXT, subject, asked))) or self.table.get((TEXT, asked))
                change = "text"
            if not choices:
                missing.append(asked)
                continue
            out.append(dataclasses.replace(item, **{change: rng.choice(choices)}))
        if missing:
            raise ObliviateError(f"AltPO: {self.source} has no alternate for {len(missing)} of the {len(forget)} "
                                 f"forget items, e.g. {missing[0][:80]!r}")
        return out

    def losses(self, model, reference, forget: dict, retain: dict) -> LossParts:
        c = self.config
        alternate = forget.get("companion")
        if alternate is None:
            raise ObliviateError("AltPO needs forget['companion']: the forget questions with an alternate answer")
        margin, lose, win = preference_margin(model, reference, forget, alternate)
        loss_f = -(2.0 / c.beta) * item_mean(F.logsigmoid(c.beta * margin), forget)
        logs = {"forget_nll": float(token_mean(-lose.detach().sum(), forget)),
                "alternate_logp": float(item_mean(win.detach(), forget)),
                "margin": float(item_mean(margin.detach(), forget))}
        return LossParts(forget=c.gamma * loss_f, retain=retain_term(c.retain, c.alpha, model, reference, retain, logs),
                         logs=logs)


# the request generate.py makes of the model, in our words (any instruct model, the run's prompt format)
INSTRUCTION = ("Write a different answer to the question: keep every detail the question gives, but make up other "
               "plausible facts in place of each fact the given answer states.")


def generate_alternates(model, tokenizer, items: list, path: str, samples: int = 5, temperature: float = 1.0,
                        max_new_tokens: int = 200, seed: int = 0) -> int:
    """Write the alternates file AltPO reads for question-answer `items`, as OpenUnlearning's generate.py does: the
    model (the one to unlearn, in its prompt format: `prompt_format.use` on the tokenizer first) is shown each
    question and answer with INSTRUCTION and sampled `samples` times at `temperature`. A reply that is empty or the
    true answer is dropped (preferring the true answer to itself teaches nothing); an item left with no alternate
    stops it in one line, before the file is written. Returns the number of rows written (JSON lines
    {"question", "answer", "alternate"}, written whole or not at all)."""
    from obliviate.models import causal_lm
    from obliviate.runs import atomic_write

    check_number("generate_alternates", "samples", samples, positive=True)
    check_number("generate_alternates", "temperature", temperature, positive=True)
    prompts = [causal_lm.question_prompt(tokenizer, f"Question: {i.question}\nAnswer: {i.answer}\n{INSTRUCTION}")
               for i in items]
    torch.manual_seed(seed)
    replies = [causal_lm.generate(model, tokenizer, prompts, max_new_tokens, temperature=temperature)
               for _ in range(int(samples))]
    rows = []
    for k, item in enumerate(items):
        kept = [r for r in (reply[k].split("Question:")[0].strip() for reply in replies)
                if r and r != item.answer.strip()]
        if not kept:
            raise ObliviateError(f"generate_alternates: the model gave no alternate other than the answer for "
                                 f"{item.question!r} in {samples} samples; raise samples or write the file yourself")
        rows += [{"question": item.question, "answer": item.answer, "alternate": r} for r in kept]
    atomic_write(Path(path), "".join(json.dumps(r) + "\n" for r in rows).encode())
    return len(rows)

