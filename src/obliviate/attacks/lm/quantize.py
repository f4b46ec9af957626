"""Quantization (Zhang et al. 2024, "Catastrophic Failure of LLM Unlearning via Quantization",
https://arxiv.org/abs/2410.16454): unlearning with a small learning rate moves weights so little that rounding them
to a few bits can undo it; they report forgotten knowledge returning at 4 bits (much less at 8). The weights of every
linear layer are quantized with optimum-quanto (weight-only, per-channel int8, group-wise int4; the embedding and the
output head stay in full precision as in the paper's round-to-nearest setting), then the forget questions are asked.
The retrain model, quantized alike, shows what rounding alone recalls."""
from __future__ import annotations

from dataclasses import dataclass

from obliviate.attacks.lm.common import QuestionAttack, Target


@dataclass
class QuantizeConfig:  # the bit width is the attack's (quantize_int8, quantize_int4)
    max_new_tokens: int = 48


def quantized(model, bits: int):
    """`model` with its linear layers' weights quantized in place (optimum-quanto), the head left as it is, then each
    quantized layer turned back into a plain linear layer holding the dequantized weights: the same rounded values
    the quantized model computes with, at float speed (quanto's int4 matmul on CPU is a slow Python fallback)."""
    import torch
    from optimum.quanto import freeze, qint4, qint8, quantize
    from optimum.quanto.nn import QLinear

    head = model.get_output_embeddings()
    exclude = [n for n, m in model.named_modules() if m is head]
    quantize(model, weights=qint4 if bits == 4 else qint8, exclude=exclude)
    freeze(model)
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
    return model


class Quantize(QuestionAttack):
    Config = QuantizeConfig
    bits = 4

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
    bits = 8


class QuantizeInt4(Quantize):
    bits = 4
