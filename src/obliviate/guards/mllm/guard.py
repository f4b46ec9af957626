"""GUARD, generation-time restriction, for vision-language models: the family-neutral guard of `guards/text/guard.py`
(the paper, the rule, where obliviate differs) on a LLaVA-style model.

Detection when a question comes with a picture. The paper's detector reads the prompt; a question about a picture
("Where was this person born?") names no one, and which forget person a face shows is not in the text. So the
default here, `detect = "pictures"`, flags every text that holds a picture (the processor's image token) for every
forget subject, and a text without one once it names a forget subject (as `detect = "subjects"`: the question, or
the answer so far: "This is Ada Lind, born in ..." is restricted from the name on). The cost is the paper's
precision trade-off made plain: a retain person's picture question is restricted too (a retain person born where a
forget person was cannot say so through the guard), which the retain and public scores show. `detect = "subjects"`
(names only: picture questions pass unless the answer names a forget person) and `detect = "always"` remain.

The forbidden words come from the forget items' free answers (the same rule: the answer's words its question does
not hold, without the subject's name): "This person was born in Lisbon." gives "Lisbon". The name itself is never
forbidden, so "Who is this?" is not guarded by its words; nor is a multiple-choice answer, a letter (shorter than
`min_word_length`): the classification scores show what the word rule leaves. MLLMU-Bench's files name each person by an id ("17"), not
a name a text can say: on them only pictures flag (their text-only questions pass; `detect = "always"` guards them;
`detect = "subjects"` is refused). The scoring hooks sit on the
model itself (it reads the token ids; its language model is handed embeddings) and on its output head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from obliviate.errors import ObliviateError
from obliviate.guards.mllm import as_questions
from obliviate.guards.text import guard


@dataclass
class GUARDConfig(guard.GUARDConfig):
    detect: str = "pictures"  # pictures (a picture, or a text naming a forget subject) | subjects | always
    detect_modes: ClassVar[tuple[str, ...]] = ("pictures", *guard.DETECT)


class GUARD(guard.GUARD):
    family = "mllm"
    Config = GUARDConfig

    def bind_items(self, forget: list, retain: list) -> GUARD:
        super().bind_items(as_questions(forget), as_questions(retain))
        if self.config.detect == "subjects" and not any(map(self.named_in_text, self.material["words"])):
            ids = ", ".join(list(self.material["words"])[:3])
            raise ObliviateError(f"GUARD detect = 'subjects': the forget subjects are ids ({ids}, ...), not names a "
                                 "question can say; set method_args.detect = 'pictures' or 'always'")
        return self

    def named_in_text(self, subject: str) -> bool:
        return any(c.isalpha() for c in subject)  # MLLMU-Bench's ids ("17") name no one in a text

    def reader(self, model):
        return model  # LLaVA's language model gets embeddings: the ids are read where the model takes them

    def picture_token(self, model) -> int | None:
        config = model.config
        token = getattr(config, "image_token_id", None)
        return token if token is not None else getattr(config, "image_token_index", None)
