"""Mixture-of-experts language models: which layers route tokens to experts, what each router picks, and the slice of
the fused expert tensors that is one expert.

transformers 5 builds every sparse block it ships for Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE the same way: the
decoder layer's `mlp` has a `gate` (the router: a [num_experts, hidden] weight whose forward returns the router logits
first, then the top-k weights and indices) and `experts`, whose parameters are fused tensors with the expert on the
first axis (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]). A shared expert beside them (Qwen2-MoE) is not routed
and is no expert here. Any model built so is recognised wherever it sits, so a vision-language model whose language
model is one (LLaVA over Mixtral: `model.language_model.layers.N.mlp`) has the same sparse blocks; a dense model has
no such layer.

The router's load-balancing loss (`output_router_logits`, `router_aux_loss_coef`): obliviate's unlearning losses are
computed from the logits alone and never pass labels to the model, so transformers never adds it to an unlearning
objective, whatever the folder's config says (the built-in MoE world trains with it and saves its config without it:
worlds/train.py)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class MoELayer:
    index: int  # position among the model's MoE layers (0 = the first sparse block)
    name: str  # module path of the sparse block, e.g. "model.layers.3.mlp"
    router: torch.nn.Module
    experts: torch.nn.Module
    num_experts: int
    top_k: int

    @property
    def router_weight_name(self) -> str:
        return f"{self.name}.gate.weight"

    def expert_tensors(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(full name, parameter) of the fused expert tensors: one slice [e] per expert."""
        return [(f"{self.name}.experts.{n}", p) for n, p in self.experts.named_parameters()
                if p.dim() >= 1 and p.shape[0] == self.num_experts]


def moe_layers(model) -> list[MoELayer]:
    """The model's sparse blocks in order (none for a dense model); their names are those of
    `model.named_parameters()`."""
    layers = []
    for name, module in model.named_modules():
        router, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        count = getattr(experts, "num_experts", None)
        weight = getattr(router, "weight", None)
        if not (isinstance(router, torch.nn.Module) and isinstance(experts, torch.nn.Module) and isinstance(count, int)
                and isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == count):
            continue
        top_k = getattr(router, "top_k", None) or getattr(_text_config(model), "num_experts_per_tok", 1)
        layers.append(MoELayer(len(layers), name, router, experts, count, int(top_k)))
    return layers


def _text_config(model):
    """The language model's config: a vision-language model's `text_config` (LLaVA over Mixtral), else the model's."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def require_moe(model, who: str) -> list[MoELayer]:
    """The model's MoE layers, or one ObliviateError line saying it is dense."""
    layers = moe_layers(model)
    if not layers:
        from obliviate.errors import ObliviateError

        config, text = getattr(model, "config", None), _text_config(model)
        dense = type(model).__name__ + (f"'s language model ({text.model_type})" if text is not config else "")
        raise ObliviateError(f"{who} needs a mixture-of-experts model (a router and experts per layer: Mixtral, "
                             f"Qwen2-MoE, Qwen3-MoE, OLMoE); {dense} is dense")
    return layers


@contextlib.contextmanager
def recorded_router_logits(layers: list[MoELayer], keep=None):
    """Within it, every forward pass appends each router's logits ([tokens, num_experts], the graph kept) to
    `record[layer.index]`; `keep()` (optional) says whether the current pass is recorded."""
    record: dict[int, list[torch.Tensor]] = {layer.index: [] for layer in layers}

    def hook(index):
        def save(_module, _inputs, output):
            if keep is None or keep():
                record[index].append(output[0] if isinstance(output, tuple) else output)
        return save
    handles = [layer.router.register_forward_hook(hook(layer.index)) for layer in layers]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def routing_counts(model, batches, layers: list[MoELayer] | None = None) -> dict[str, torch.Tensor]:
    """Over the real tokens (attention_mask 1) of every batch: per layer and expert, how many tokens the router sent
    to the expert (its top-k choices) and the sum of the expert's router probability. Returns {"tokens": scalar,
    "selected": [L, E], "probability": [L, E]} (float64 sums, on the CPU)."""
    from obliviate.models.sequences import model_inputs

    layers = layers if layers is not None else moe_layers(model)
    n, e = len(layers), max(layer.num_experts for layer in layers)
    selected, probability = torch.zeros(n, e, dtype=torch.float64), torch.zeros(n, e, dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        with recorded_router_logits(layers) as record:
            model(**model_inputs(batch))
        real = batch["attention_mask"].reshape(-1).bool().cpu()
        tokens += real.sum()
        for layer in layers:
            logits = record[layer.index][0].float().cpu()[real]
            probs = torch.softmax(logits, dim=-1)
            chosen = probs.topk(layer.top_k, dim=-1).indices
            k = layer.num_experts
            selected[layer.index, :k] += torch.bincount(chosen.reshape(-1), minlength=k).double()
            probability[layer.index, :k] += probs.sum(0).double()
    return {"tokens": tokens, "selected": selected, "probability": probability}


def expert_mask(param: torch.Tensor, expert: int) -> torch.Tensor:
    """1 on the slice [expert] of a fused expert tensor, 0 elsewhere."""
    mask = torch.zeros_like(param)
    mask[expert] = 1
    return mask
