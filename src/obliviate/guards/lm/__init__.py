"""Language-model guards: how a guard takes part in asking a model (`install(model, tokenizer)`).

A language-model guard acts in one of two places, both reached by every metric, attack and caller that is handed
the (model, tokenizer) pair, with no argument of its own:
  - the prompt: the tokenizer's prompt format (`models/prompt_format.py`, which every question goes through) gains
    earlier turns before each question (ICU's in-context examples). Likelihoods and generations then both read the
    question with them;
  - the next-token distribution: a rule that, from the tokens so far, sets some tokens' probability to a floor
    (GUARD's restriction). It runs as a `transformers` `LogitsProcessor` inside `model.generate`, and as hooks on the
    model's decoder and output head for every scoring pass (a forward call, or the decoder then the head a slice at
    a time as `evals/metrics._pass_stats` runs it), so a likelihood is the one of the distribution generation samples
    from. Rows the rule leaves alone keep the model's own logits bit for bit.

A guard's `bind(forget, retain)` takes what it needs from the run's forget (and retain) items, its `material`;
`describe()` records it beside the settings, so `load_guarded(folder)` rebuilds the guard without the run's files."""
from __future__ import annotations

from pathlib import Path

from obliviate.errors import ObliviateError
from obliviate.guards import Guard


class LMGuard(Guard):
    family = "lm"

    def __init__(self, config=None):
        super().__init__(config)
        self.material: dict | None = None

    def bind_items(self, forget: list, retain: list) -> LMGuard:
        """Build the guard's material from the run's forget and retain items (one line when they cannot serve)."""
        raise NotImplementedError

    def restore(self, material: dict) -> LMGuard:
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


def load_guarded(folder: str | Path, guard: LMGuard, device: str = "cpu", trust_remote_code: bool = False,
                 dtype: str = "float32"):
    """(model, tokenizer) of an exported language-model guard run with the guard installed: `models/causal_lm.load`
    (the folder's own chat template, if any, is the prompt format), then `guard.install`."""
    from obliviate.models import causal_lm as lm

    model, tokenizer = lm.load(folder, dtype, device, trust_remote_code)
    guard.install(model.eval(), tokenizer)
    return model, tokenizer
