"""Quantization (Zhang et al. 2024, "Catastrophic Failure of LLM Unlearning via Quantization",
https://arxiv.org/abs/2410.16454): unlearning with a small learning rate moves weights so little that rounding them
to a few bits can undo it; they report forgotten knowledge returning at 4 bits (much less at 8). The weights of every
linear layer are quantized with optimum-quanto (weight-only, per-channel int8, group-wise int4; the embedding and the
output head stay in full precision as in the paper's round-to-nearest setting), then the forget questions are asked.
The retrain model, quantized alike, shows what rounding alone recalls."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import SimpleNamespace

from obliviate.attacks.lm.common import QuestionAttack, Target


@dataclass
class QuantizeConfig:  # the bit width is the attack's (quantize_int8, quantize_int4)
    max_new_tokens: int = 48


def quantized(model, bits: int):
    """`model` with its linear layers' weights quantized in place (optimum-quanto), the head left as it is, then each
    quantized layer turned back into a plain linear layer holding the dequantized weights: the same rounded values
    the quantized model computes with, at float speed (quanto's int4 matmul on CPU is a slow Python fallback)."""
    from optimum.quanto import freeze, qint4, qint8, quantize

    head = model.get_output_embeddings()
    exclude = [n for n, m in model.named_modules() if m is head]
    with pure_torch_unpack():
        quantize(model, weights=qint4 if bits == 4 else qint8, exclude=exclude)
        freeze(model)
        _to_plain_linear(model)
    return model


@contextlib.contextmanager
def pure_torch_unpack():
    """quanto unpacks int4 weights on CPU through a C++ extension that it compiles with ninja on first use in a
    process (about 25 s on an idle core, minutes on busy ones, and it recompiled in every process here). While
    active, `unpack_bits` serves instead: quanto's own pure-torch unpack (library/unpack.py, its kernel for other
    devices), which the decorator there does not hand back to import."""
    from optimum.quanto.library.extensions import get_extension

    extension = get_extension("quanto_cpp")
    loaded = extension._lib
    if loaded is None:
        extension._lib = SimpleNamespace(unpack=unpack_bits)
    try:
        yield
    finally:
        extension._lib = loaded


def unpack_bits(packed, bits: int):
    """uint8 values of `bits` bits each, packed along the first dimension as quanto packs them: the i-th group of
    rows holds each byte's i-th `bits`-bit field."""
    import torch

    fields = [(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(8 // bits)]
    return torch.cat(fields).to(torch.uint8)


def _to_plain_linear(model) -> None:
    import torch
    from optimum.quanto.nn import QLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, QLinear):
            plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                    device=module.weight.device, dtype=module.weight.dtype)
            with torch.no_grad():
                plain.weight.copy_(module.weight.dequantize())
                if module.bias is not None:
                    plain.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, plain)


class Quantize(QuestionAttack):
    Config = QuantizeConfig
    bits = 4

    def check(self, target: Target) -> None:
        from obliviate.families import require_extra
        require_extra("attacks", "optimum.quanto")

    def prompts(self, target: Target, model, tokenizer):
        return {f"int{self.bits}": ([i.question for i in target.forget], None)}

    def run(self, target: Target, log=print) -> dict:
        plain_models = target.models
        # the plain recall is of the unquantized model; the questions are then asked of the quantized one
        for name, load in plain_models.items():
            if name not in target._plain:
                target.plain_recall(name, *load())
        bits = self.bits
        quantized_target = Target(target.method, {n: (lambda load=load: _quantized_pair(load, bits))
                                                  for n, load in plain_models.items()},
                                  target.forget, target.retain, batch_size=target.batch_size, _plain=target._plain)
        return super().run(quantized_target, log)


def _quantized_pair(load, bits: int):
    model, tokenizer = load()
    return quantized(model.eval(), bits), tokenizer


class QuantizeInt8(Quantize):
    bits, label = 8, "int8 weights"


class QuantizeInt4(Quantize):
    bits, label = 4, "int4 weights"
