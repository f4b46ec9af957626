"""Language-model guards: ICU (`icu.py`) and GUARD (`guard.py`), the family-neutral text guards of `guards/text/`
for a causal LM and its tokenizer (where each acts: `guards/text/__init__.py`).

A guard's `bind_items(forget, retain)` takes what it needs from the run's forget (and retain) items, its `material`;
`describe()` records it beside the settings, so `load_guarded(folder)` rebuilds the guard without the run's files."""
from __future__ import annotations

from pathlib import Path

from obliviate.guards.text import TextGuard


class LMGuard(TextGuard):
    family = "lm"


def load_guarded(folder: str | Path, guard: LMGuard, device: str = "cpu", trust_remote_code: bool = False,
                 dtype: str = "float32"):
    """(model, tokenizer) of an exported language-model guard run with the guard installed: `models/causal_lm.load`
    (the folder's own chat template, if any, is the prompt format), then `guard.install`."""
    from obliviate.models import causal_lm as lm

    model, tokenizer = lm.load(folder, dtype, device, trust_remote_code)
    guard.install(model.eval(), tokenizer)
    return model, tokenizer
