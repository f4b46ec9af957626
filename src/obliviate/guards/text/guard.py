"""GUARD, Generation-time Unlearning via Adaptive Restriction and Detection (Deng et al. 2025,
https://arxiv.org/abs/2505.13312; ICML 2025 MUGen workshop): a generation-time guard. No weight changes. The paper's
three steps, and what obliviate does for each:

1. *Detect* whether the prompt is about a forget target. The paper trains an MLP prompt classifier on embeddings of
   forget-target and other prompts. Stand-in here (no embedding model to download, and a classifier trained on the
   run's own questions would only learn their wording): a text is *flagged* for a forget subject once it names it,
   as a whole word followed by more text (`detect = "subjects"`, the items' `subject`: the profiles world's people,
   TOFU's authors); `detect = "always"` flags every text for every forget subject (the forget set has no subjects,
   or every prompt is to be guarded); the vision-language family adds `detect = "pictures"` (a text holding a
   picture's token is flagged for every forget subject: `guards/mllm/guard.py`).
2. *Extract the forbidden tokens*: the paper retrieves the forget answers of the detected target and keeps their key
   phrases. Here: the words of each forget answer of the subject that its question does not contain, the subject's
   own name words and a short list of function words left out (the fact: "Ada Lind was born in Lisbon." to
   "Where was Ada Lind born?" gives "Lisbon"); each word as the tokenizer writes it with and without a leading
   space is a forbidden token sequence.
3. *Restrict* generation: the paper penalises candidate tokens by hard token matching and by SBERT semantic matching
   inside a beam search. Here the hard token match, as a `transformers` `LogitsProcessor` (greedy or any decoding
   transformers runs): at a step whose text so far is flagged, a token is *forbidden* when it would start a
   forbidden sequence or continue one whose first tokens end the text so far. transformers' own
   `NoBadWordsLogitsProcessor` bans only the token that completes a sequence, which lets a word's first pieces out;
   this rule bans from the first piece. The semantic (SBERT) match is not done: it needs a sentence-embedding model
   this project cannot download (a paraphrased fact in other words is not caught; the paraphrase metrics show it).

Restriction, precisely: with logits z over the vocabulary and F the forbidden tokens at a position,
    z'_v = z_v                                   v not in F
    z'_v = logsumexp_{u not in F} z_u + log(floor)   v in F
so the restricted distribution gives each forbidden token probability floor / (1 + |F| floor) (floor 1e-10) and
renormalises the rest: generation never picks a forbidden token (the allowed ones hold ~all the mass), and a
likelihood of an answer that needs one stays finite (about log(1e-10) = -23 nats for each such token) instead of
-inf, so answer probability, truth ratio and the membership scores can still be computed and compared. Every scoring
pass gets the same rule at every position from the tokens before it (hooks on the module that reads the token ids,
a causal LM's decoder, and on the output head), so
a likelihood is the one of the distribution generation draws from; a text that never names a forget subject keeps
the model's logits bit for bit (its scores and answers are the unguarded model's exactly).

Reference code: none public at the time of writing (the paper's repository was not found); the rule follows the
paper's text. Weights: none change; the run records the settings and the forbidden words per subject (`material`)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import LogitsProcessor

from obliviate.errors import ObliviateError
from obliviate.guards.text import TextGuard

DETECT = ("subjects", "always")
WORD = re.compile(r"\w+")
# function words no answer's fact is carried by (a short list: a word left in only restricts more)
STOP_WORDS = frozenset("""a an the and or but of in on at to for from by with as is are was were be been being has
have had do does did it its this that these those he she they him her them his hers their theirs i you we me my our
your not no yes so than then there here who whom whose which what when where why how also very into about after
before over under up down out s""".split())
ALWAYS = "*"  # the material's key of the words forbidden everywhere (detect = "always")


@dataclass
class GUARDConfig:
    detect: str = "subjects"  # subjects (a text naming a forget subject) | always
    floor: float = 1e-10  # the probability a forbidden token keeps (finite likelihoods; never generated)
    min_word_length: int = 2  # shorter words are never forbidden
    detect_modes: ClassVar[tuple[str, ...]] = DETECT  # a family's subclass may add its own (not a setting)

    def __post_init__(self):
        if self.detect not in self.detect_modes:
            raise ValueError(f"detect must be one of {', '.join(self.detect_modes)}, got {self.detect!r}")
        if isinstance(self.floor, bool) or not isinstance(self.floor, (int, float)) or not 0 < self.floor < 1e-3:
            raise ValueError(f"floor must be a probability in (0, 0.001), got {self.floor!r}")
        if isinstance(self.min_word_length, bool) or not isinstance(self.min_word_length, int) \
                or self.min_word_length < 1:
            raise ValueError(f"min_word_length must be an integer >= 1, got {self.min_word_length!r}")


def key_words(question: str, answer: str, subject: str | None, min_length: int = 2) -> list[str]:
    """The words of `answer` that carry its fact: not in the question, not the subject's name, not function words."""
    asked = {w.lower() for w in WORD.findall(question + " " + (subject or ""))}
    out = []
    for word in WORD.findall(answer):
        low = word.lower()
        if len(word) >= min_length and low not in asked and low not in STOP_WORDS and word not in out:
            out.append(word)
    return out


def restrict(logits: torch.Tensor, banned: torch.Tensor, floor: float) -> torch.Tensor:
    """`logits` ([..., V]) with the `banned` ones ([..., V] bool) set to logsumexp(allowed) + log(floor): the module
    docstring's rule. Rows with nothing banned come back unchanged (the same values)."""
    allowed = logits.masked_fill(banned, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.where(banned, allowed + math.log(floor), logits)


class Forbidden:
    """The forbidden token sequences of each subject, and the tokens a prefix may not be followed by."""

    def __init__(self, sequences: dict[str, list[list[int]]]):
        self.first: dict[str, set[int]] = {}
        self.after: dict[str, dict[tuple[int, ...], set[int]]] = {}
        self.longest = 1
        for subject, seqs in sequences.items():
            self.first[subject] = {s[0] for s in seqs if s}
            after: dict[tuple[int, ...], set[int]] = {}
            for s in seqs:
                for j in range(1, len(s)):
                    after.setdefault(tuple(s[:j]), set()).add(s[j])
                self.longest = max(self.longest, len(s))
            self.after[subject] = after

    def banned(self, subjects, prefix: list[int]) -> set[int]:
        """Tokens that would start a forbidden sequence of `subjects`, or continue one that `prefix` ends with."""
        out: set[int] = set()
        for subject in subjects:
            out |= self.first[subject]
            after = self.after[subject]
            for j in range(1, min(self.longest, len(prefix) + 1)):
                out |= after.get(tuple(prefix[-j:]), set())
        return out


class GUARD(TextGuard):
    name = "GUARD"
    Config = GUARDConfig
    paper = "Deng et al. 2025, GUARD: Generation-time LLM Unlearning via Adaptive Restriction and Detection, " \
            "https://arxiv.org/abs/2505.13312"

    def bind_items(self, forget: list, retain: list) -> GUARD:
        from obliviate.data import QAItem

        c = self.config
        questions = [i for i in forget if isinstance(i, QAItem)]
        if not questions:
            raise ObliviateError("GUARD needs forget questions (question-answer items): their answers give the "
                                 "forbidden words")
        if c.detect != "always" and not all(i.subject for i in questions):
            raise ObliviateError(f"GUARD detect = {c.detect!r} needs every forget item's subject (the person it is "
                                 "about: a `subject` field in the forget file); set method_args.detect = 'always' "
                                 "to guard every prompt")
        words: dict[str, list[str]] = {}
        for i in questions:
            key = ALWAYS if c.detect == "always" else i.subject
            found = words.setdefault(key, [])
            found += [w for w in key_words(i.question, i.answer, i.subject, c.min_word_length) if w not in found]
        self.material = {"words": words}
        return self

    def forbidden(self, tokenizer) -> Forbidden:
        sequences = {}
        for subject, words in self.require_material()["words"].items():
            seqs = []
            for w in words:
                for text in (" " + w, w):
                    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                    if ids and ids not in seqs:
                        seqs.append(ids)
            sequences[subject] = seqs
        return Forbidden(sequences)

    def named_in_text(self, subject: str) -> bool:
        """Whether a text can name `subject` (a family's subclass may say no: an id is no name)."""
        return True

    # ---- where the rule acts -------------------------------------------------------------------------------------
    def reader(self, model):
        """The module every scoring pass hands the token ids to: a causal LM's decoder (evaluation runs the decoder,
        then the head a slice at a time); None when the model has none."""
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        return decoder if isinstance(decoder, torch.nn.Module) else None

    def picture_token(self, model) -> int | None:
        """The token id that stands for a picture in the model's input (None: a model without pictures)."""
        return None

    def install(self, model, tokenizer) -> None:
        if getattr(model, "_obliviate_guard", None) is not None:
            raise ObliviateError("the model already runs through a guard: guards do not stack")
        rule = Restriction(self, tokenizer, self.picture_token(model))
        state = {"ids": None, "mask": None, "row": 0, "generating": False}
        reader = self.reader(model)
        head = model.get_output_embeddings()
        if reader is None or head is None:
            raise ObliviateError(f"GUARD needs a causal LM with a decoder and an output head; "
                                 f"{type(model).__name__} has none")

        def read_inputs(_module, args, kwargs):  # every pass starts at the reader: its token ids, from row 0
            if state["generating"]:
                return
            cache = kwargs.get("cache", kwargs.get("past_key_values"))  # its name in transformers 5, and before
            if cache is not None and getattr(cache, "get_seq_length", lambda: 0)() > 0:
                raise ObliviateError("GUARD scores whole sequences: decode through model.generate (its logits "
                                     "processor reads the text so far), not a forward call on a key-value cache")
            state["ids"] = kwargs.get("input_ids", args[0] if args else None)
            if state["ids"] is None:  # embeddings alone: no text to read, and no pass goes unguarded silently
                raise ObliviateError("GUARD reads the token ids of what it scores: call the model with input_ids")
            state["mask"] = kwargs.get("attention_mask")
            state["row"] = 0

        def restrict_rows(_module, _args, logits):  # the head's rows come in order: a whole batch, or slices
            if state["generating"] or state["ids"] is None:
                return None
            start = state["row"]
            state["row"] += logits.shape[0]
            ids = state["ids"][start:start + logits.shape[0]]
            mask = None if state["mask"] is None else state["mask"][start:start + logits.shape[0]]
            return rule.scored(ids, mask, logits)

        handles = [reader.register_forward_pre_hook(read_inputs, with_kwargs=True),
                   head.register_forward_hook(restrict_rows)]
        plain_generate = model.generate

        def generate(*args, **kwargs):
            from transformers import LogitsProcessorList

            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                raise ObliviateError("GUARD generates from token ids (input_ids): it reads the text so far")
            mask = kwargs.get("attention_mask")
            starts = [0] * ids.shape[0] if mask is None else (mask == 0).sum(-1).tolist()  # left padding
            processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
            processors.append(GuardLogitsProcessor(rule, starts))
            state["generating"] = True
            try:
                return plain_generate(*args, logits_processor=processors, **kwargs)
            finally:
                state["generating"] = False

        model.generate = generate
        model._obliviate_guard = (self, handles)

    def remove(self, model, tokenizer) -> None:
        installed = getattr(model, "_obliviate_guard", None)
        if installed is None:
            return
        for handle in installed[1]:
            handle.remove()
        del model.generate  # the class's own again
        model._obliviate_guard = None


class Restriction:
    """GUARD's rule for one tokenizer: which subjects a text names, and the restricted logits of a row."""

    def __init__(self, guard: GUARD, tokenizer, picture_token: int | None = None):
        self.tokenizer, self.floor = tokenizer, guard.config.floor
        self.forbidden = guard.forbidden(tokenizer)
        self.always = guard.config.detect == "always"
        # detect = "pictures": a text holding a picture's token is flagged for every forget subject
        self.picture = picture_token if guard.config.detect == "pictures" else None
        self.patterns = {} if self.always else {
            s: re.compile(r"(?<!\w)" + re.escape(s) + r"(?=\W)", re.IGNORECASE) for s in self.forbidden.first
            if guard.named_in_text(s)}

    def named(self, ids: list[int]) -> list[str]:
        """The subjects the text of `ids` is flagged for."""
        if self.always:
            return [ALWAYS]
        if self.picture is not None and self.picture in ids:
            return list(self.forbidden.first)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return [s for s, pattern in self.patterns.items() if pattern.search(text)]

    def flagged_from(self, ids: list[int]) -> dict[str, int]:
        """{subject: the first length n at which ids[:n] is flagged for it} (naming is kept once found: a prefix's
        text only grows, so a binary search finds the first n)."""
        out = {}
        for subject in self.named(ids):
            lo, hi = 1, len(ids)
            while lo < hi:
                mid = (lo + hi) // 2
                if subject in self.named(ids[:mid]):
                    hi = mid
                else:
                    lo = mid + 1
            out[subject] = lo
        return out

    def scored(self, ids: torch.Tensor, mask: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        """A scoring pass's logits ([B, K, V]: the last K of the T positions of `ids`, each predicting the next token
        from the tokens up to it) restricted on the flagged rows' positions; the others untouched."""
        out = None
        offset = ids.shape[1] - logits.shape[1]  # a head run on the last positions only (logits_to_keep)
        for b in range(ids.shape[0]):
            real = torch.arange(ids.shape[1], device=ids.device) if mask is None else mask[b].nonzero().flatten()
            if real.numel() == 0:
                continue
            first = int(real[0])
            row = ids[b, first:first + real.numel()].tolist()
            since = self.flagged_from(row)
            if not since:
                continue
            banned = torch.zeros(logits.shape[1:], dtype=torch.bool, device=logits.device)
            for t in range(max(min(since.values()) - 1, offset - first), len(row)):
                active = [s for s, n in since.items() if n <= t + 1]
                tokens = [v for v in self.forbidden.banned(active, row[:t + 1]) if v < logits.shape[-1]]
                banned[first + t - offset, tokens] = True
            if out is None:
                out = logits.clone()
            out[b] = restrict(logits[b], banned, self.floor)
        return logits if out is None else out

    def step(self, ids: list[int], scores: torch.Tensor) -> torch.Tensor | None:
        """One generation step's scores ([V]) for the text `ids`, restricted; None when the text is not flagged."""
        active = self.named(ids)
        if not active:
            return None
        banned = torch.zeros_like(scores, dtype=torch.bool)
        banned[[v for v in self.forbidden.banned(active, ids) if v < scores.shape[-1]]] = True
        return restrict(scores, banned, self.floor)


class GuardLogitsProcessor(LogitsProcessor):
    """GUARD's restriction in `model.generate`, each row read from its first real token (`starts`: its left
    padding); rows whose text is not flagged keep their scores."""

    def __init__(self, rule: Restriction, starts: list[int]):
        self.rule, self.starts = rule, starts

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores
        for b in range(input_ids.shape[0]):
            row = self.rule.step(input_ids[b, self.starts[b]:].tolist(), scores[b])
            if row is not None:
                if out is scores:
                    out = scores.clone()
                out[b] = row
        return out
