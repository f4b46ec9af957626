"""Cross-attention maps of a UNet-shaped denoiser (SD, SDXL), for the methods whose losses or masks read them
(Forget-Me-Not, MACE, Receler): which modules attend to the text, their attention probabilities during a forward
pass, and where a concept's tokens stand in a prompt."""
from __future__ import annotations

import contextlib

import torch

from obliviate.errors import ObliviateError
from obliviate.methods.t2i.base import is_cross_attention


def cross_attention_modules(denoiser) -> list[tuple[str, torch.nn.Module]]:
    """The denoiser's cross-attention modules (diffusers `Attention` named like `...attn2`), by name."""
    from diffusers.models.attention_processor import Attention

    return [(n, m) for n, m in denoiser.named_modules() if isinstance(m, Attention) and is_cross_attention(n + ".")]


@contextlib.contextmanager
def recording(denoiser):
    """Within the block every cross-attention module computes attention with diffusers' `AttnProcessor` and appends
    its probabilities [batch * heads, pixels, tokens] (`attn.get_attention_scores`, with their gradient) to the
    yielded dict under the module's name; the modules' own processors are restored after, also on an error."""
    from diffusers.models.attention_processor import AttnProcessor

    maps: dict[str, list[torch.Tensor]] = {}
    modules = cross_attention_modules(denoiser)
    saved = [(m, m.processor) for _, m in modules]
    try:
        for name, module in modules:
            module.set_processor(AttnProcessor())
            scores = module.get_attention_scores  # the class's method, bound to this module

            def record(query, key, attention_mask=None, _scores=scores, _name=name):
                probs = _scores(query, key, attention_mask)
                maps.setdefault(_name, []).append(probs)
                return probs
            module.get_attention_scores = record  # an instance attribute shadowing the method until restored
        yield maps
    finally:
        for module, processor in saved:
            module.__dict__.pop("get_attention_scores", None)
            module.set_processor(processor)


def every_map(maps: dict[str, list[torch.Tensor]]) -> list[torch.Tensor]:
    """All the recorded maps, layer after layer."""
    return [probs for per_layer in maps.values() for probs in per_layer]


def concept_positions(tokenizer, texts: list[str], concept: str, length: int, end_tokens: str = "none",
                      required_by: str | None = None) -> torch.Tensor:
    """[N, L] bool: the concept's tokens in each text (tokenised in context, padded to `length`) and, with
    `end_tokens`, the first end-of-text token ("first") or every one, padding included on SD 1.x ("all").
    `required_by` (a method's name): a text without the concept's tokens is an error naming it."""
    word = tokenizer(concept, add_special_tokens=False).input_ids
    out = torch.zeros(len(texts), length, dtype=torch.bool)
    for row, text in enumerate(texts):
        ids = tokenizer(text, padding="max_length", max_length=length, truncation=True).input_ids
        for i in range(len(ids) - len(word) + 1):
            if ids[i:i + len(word)] == word:
                out[row, i:i + len(word)] = True
        if required_by and not out[row].any():
            raise ObliviateError(f"{required_by}: the concept '{concept}' is not among the tokens of the forget "
                                 f"prompt {text!r} (tokenised in context, or cut at {length})")
        if end_tokens == "first" and tokenizer.eos_token_id in ids:
            out[row, ids.index(tokenizer.eos_token_id)] = True
        elif end_tokens == "all":
            out[row] |= torch.tensor([i == tokenizer.eos_token_id for i in ids])
    return out
