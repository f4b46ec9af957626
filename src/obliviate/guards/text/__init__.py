"""Guards of the models that answer in text (language models, `guards/lm/`; vision-language models, `guards/mllm/`):
how a guard takes part in asking a model (`install(model, tokenizer)`). Family-neutral: each family's guards are thin
subclasses that name the family, take the family's items and install on the family's model.

A text guard acts in one of two places, both reached by every metric, attack and caller that is handed the model and
its tokenizer, with no argument of its own:
  - the prompt: the tokenizer's prompt format (`models/prompt_format.py`, which every question goes through) gains
    earlier turns before each question (ICU's in-context examples). Likelihoods and generations then both read the
    question with them;
  - the next-token distribution: a rule that, from the tokens so far, sets some tokens' probability to a floor
    (GUARD's restriction). It runs as a `transformers` `LogitsProcessor` inside `model.generate`, and as hooks on the
    module that reads the token ids (a language model's decoder; a vision-language model itself) and on the output
    head for every scoring pass, so a likelihood is the one of the distribution generation samples from. Rows the
    rule leaves alone keep the model's own logits bit for bit.

A guard's `bind_items(forget, retain)` takes what it needs from the run's forget (and retain) question-answer items,
its `material`; `describe()` records it beside the settings, so `load_guarded(folder)` rebuilds the guard without
the run's files."""
from __future__ import annotations

from obliviate.errors import ObliviateError
from obliviate.guards import Guard


class TextGuard(Guard):
    def __init__(self, config=None):
        super().__init__(config)
        self.material: dict | None = None

    def bind_items(self, forget: list, retain: list) -> TextGuard:
        """Build the guard's material from the run's forget and retain items (one line when they cannot serve)."""
        raise NotImplementedError

    def restore(self, material: dict) -> TextGuard:
        """The material as `describe()` recorded it."""
        self.material = material
        return self

    def describe(self) -> dict:
        return {**super().describe(), "material": self.material}

    def require_material(self) -> dict:
        if self.material is None:
            raise ObliviateError(f"{self.name}: no forget items bound (bind_items, or a recorded material)")
        return self.material

    def install(self, model, tokenizer) -> None:
        """From now on the pair asks and scores through the guard."""
        raise NotImplementedError

    def remove(self, model, tokenizer) -> None:
        """Undo `install`."""
        raise NotImplementedError
