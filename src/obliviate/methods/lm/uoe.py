"""UOE: unlearning one expert of a mixture-of-experts model, a rule over any base method. The expert the forget
data's routing points to most is the only one the base method trains, together with the router of its layer, and an
anchor loss keeps that router sending the forget tokens to it, so that unlearning cannot "route around" the expert
and damage the others.

Paper: Zhuang, Zhang, Guo, Jia, Liu, Liu, Zhang 2025, "UOE: Unlearning One Expert Is Enough For Mixture-of-experts
LLMs" (arXiv 2411.18797v1; v2 and ACL 2025: "SEUF: Is Unlearning One Expert Enough for Mixture-of-Experts LLMs?"),
https://arxiv.org/abs/2411.18797 . Reference code: zhmzm/SEUF (LLaMA-Factory fork), read for the loss and the
defaults: src/llamafactory/train/ga_expert/trainer.py (the anchor), expert_setting/expert_setting.py (what is
trained), examples/*_WMDP/GA_1expert.yaml (the settings).

    affinity   s[l, e] = mean over the forget tokens t of  softmax(router_l(h_t))[e]      (the router's gating score)
    choice     l* = argmax_l max_e s[l, e] ,   e* = argmax_e s[l*, e]
    anchor     A = mean over the forget tokens t of  mean_e ( 1[e = e*] - softmax(router_l*(h_t))[e] )^2
    loss       L = L_base(forget, retain)  +  anchor_weight * A ;   trained: expert e* of layer l* and router l*

Defaults, from the reference code: anchor_weight 1.0 (`chosen_gating_loss`), base GradAscent (its GA_1expert
examples; the paper also pairs UOE with GradDiff, NPO and RMU: any base here), the anchor an MSE between the
one-hot of e* and the router's softmax over every expert on every token of the forget batch, the chosen layer's
router (`mlp.gate.weight`) trained with the expert. Its examples' learning rate is 2e-4, constant, 10 epochs.

Where obliviate differs, and why:
- the expert is chosen here from the forget data, by the affinity score above; the reference code takes it from a
  hand-written table (DeepSeek-V2-Lite: layer 16, expert 20; Qwen1.5-MoE: layer 4, expert 5), found offline by the
  paper's attribution. Only the paper's abstract and the code could be read here: the score follows the abstract
  ("expert attribution ... the most actively engaged expert") with the gating score the code's anchor uses (the
  router's softmax), and the layer rule is obliviate's: the block whose top expert draws the largest mean gating
  score (routing most concentrated on one expert). `layer` and `expert` fix either by hand (`layer` counts the
  sparse blocks from 0), as the reference's table does;
- the anchor's mean runs over the real tokens of the step's global forget batch (the reference packs sequences, so
  it has no padding to leave out), as every loss here is a mean over the step;
- the anchor is taken in the base's own forward pass of the forget batch (recognised by its input ids), as the
  reference's hook does; a base that never runs the forget batch with gradients gets one more forward pass for it;
- experts are fused tensors in transformers 5 ([num_experts, ...]): the expert is the slice [e*] of its layer's
  expert tensors, trained through the loop's gradient mask (`gradient_mask`: every other slice keeps its value
  exactly, weight decay included). A shared expert (Qwen2-MoE) is never trained, as in the reference.
The base's own parameter choice (RMU's layers) is replaced by the expert's; its setup, reference model, retain pool
and forget-row selection are kept. Refused in one line: a dense model, LoRA (the expert's tensors are trained
themselves, as in the reference's full fine-tuning).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from obliviate.errors import ObliviateError
from obliviate.methods.common import LossParts, check_number
from obliviate.methods.lm.base import RuleOverBase, resolve_base


@dataclass
class UOEConfig:
    base: str = "GradAscent"  # the language-model method whose loss trains the expert (reference: GA)
    base_args: dict = field(default_factory=dict)  # overrides of the base method's config
    anchor_weight: float = 1.0  # the router anchor loss's weight (reference: chosen_gating_loss = 1.0)
    layer: int | None = None  # which sparse block (0 = the first); None: the one with the highest affinity
    expert: int | None = None  # which expert of that layer; None: the one with the highest affinity
    attribution_batches: int | None = None  # forget batches the affinity averages over (None: all)

    def __post_init__(self):
        resolve_base("UOE", self.base)
        if not isinstance(self.base_args, dict):
            raise ObliviateError(f"UOE: base_args must be a table/dict, got {self.base_args!r}")
        check_number("UOE", "anchor_weight", self.anchor_weight, min=0)
        for key in ("layer", "expert", "attribution_batches"):
            value = getattr(self, key)
            low = 1 if key == "attribution_batches" else 0
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ObliviateError(f"UOE: {key} must be an integer >= {low} or null, got {value!r}")


def affinity_scores(probability_sums: torch.Tensor, tokens) -> torch.Tensor:
    """s[l, e]: each expert's router probability averaged over the forget tokens ([layers, experts])."""
    return probability_sums / max(float(tokens), 1.0)


def choose_expert(scores: torch.Tensor, layer: int | None = None, expert: int | None = None) -> tuple[int, int]:
    """(l*, e*): the layer whose top expert has the highest score (or `layer`), and its top expert (or `expert`).
    Ties go to the lowest index."""
    if layer is None:
        layer = int(scores.max(dim=1).values.argmax())
    if expert is None:
        expert = int(scores[layer].argmax())
    return layer, expert


def anchor_loss(router_logits: torch.Tensor, expert: int, batch: dict) -> torch.Tensor:
    """mean over the real tokens of the step's global batch of mean_e (1[e = expert] - p_e)^2, p the router's
    softmax; `router_logits` are [B * T, E] in the batch's token order."""
    from obliviate.models.sequences import items, step_total

    def real(b):  # a token of an item, not padding (nor a dropped row)
        return (b["attention_mask"].float() * items(b)[:, None]).reshape(-1)

    probs = torch.softmax(router_logits.float(), dim=-1)
    target = torch.zeros_like(probs)
    target[:, expert] = 1.0
    per_token = ((target - probs) ** 2).mean(-1)
    return (per_token * real(batch)).sum() / step_total(batch, lambda b: real(b).sum())


class UOE(RuleOverBase):
    name = "UOE"
    Config = UOEConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.combine_gradients = self.base.combine_gradients
        self.layers = None  # the model's MoE layers (setup)
        self.choice: tuple[int, int] | None = None  # (layer, expert), taken in fit
        self.affinity: torch.Tensor | None = None  # [layers, experts], taken in fit
        self._names: dict[str, torch.Tensor | None] = {}  # trained name -> its gradient mask (None: all of it)
        self._order: list[str] = []  # the trained names in the model's parameter order (the loop's)

    def setup(self, model, reference) -> None:
        from obliviate.models.moe import require_moe

        if hasattr(model, "peft_config"):
            raise ObliviateError("UOE trains one expert's own tensors (as the reference's full fine-tuning does), "
                                 "not LoRA adapters: run UOE without [lora]")
        self.layers = require_moe(model, "UOE")
        c = self.config
        if c.layer is not None and c.layer >= len(self.layers):
            raise ObliviateError(f"UOE: layer={c.layer} is out of range: the model has {len(self.layers)} sparse "
                                 f"blocks (0 to {len(self.layers) - 1})")
        if c.expert is not None:
            counts = {layer.num_experts for layer in self.layers}
            if c.expert >= min(counts):
                raise ObliviateError(f"UOE: expert={c.expert} is out of range: the layers have {min(counts)} experts")
        self._candidates(None)
        self.choice = None
        self.base.setup(model, reference)

    def _candidates(self, choice: tuple[int, int] | None) -> None:
        """Before fit: every tensor the choice may fall on (the routers and expert tensors of the candidate layers);
        after: the chosen layer's router and its expert tensors, each masked to the chosen slice."""
        from obliviate.models.moe import expert_mask

        names: dict[str, torch.Tensor | None] = {}
        for layer in self.layers:
            if choice is not None and layer.index != choice[0]:
                continue
            if choice is None and self.config.layer is not None and layer.index != self.config.layer:
                continue
            names[layer.router_weight_name] = None
            for name, param in layer.expert_tensors():
                names[name] = expert_mask(param, choice[1]) if choice is not None else None
        self._names = names

    def trainable(self, name: str, param) -> bool:
        if self.layers is None:
            raise ObliviateError("UOE: setup(model, reference) picks the model's MoE layers before trainable")
        return name in self._names

    def fit(self, model, named: list, forget_batches, retain_batches) -> None:
        """The affinity of every expert on the forget set, and the expert unlearned (the loop then trains only it)."""
        import itertools

        from obliviate.models.moe import routing_counts

        limit = self.config.attribution_batches
        batches = itertools.islice(forget_batches, limit) if limit else forget_batches
        counts = routing_counts(model, batches, self.layers)
        if not counts["tokens"]:
            raise ObliviateError("UOE: the forget set has no token to take the routers' affinity from")
        self.affinity = affinity_scores(counts["probability"], counts["tokens"]).float()
        self.choice = choose_expert(self.affinity, self.config.layer, self.config.expert)
        self._candidates(self.choice)
        self._order = [n for n, _ in named if n in self._names]

    def chosen(self) -> dict | None:
        """The expert unlearned (`layer` counts the sparse blocks) and the affinity table it was chosen by."""
        if self.choice is None:
            return None
        return {"layer": self.choice[0], "expert": self.choice[1], "name": self.layers[self.choice[0]].name,
                "affinity": [[round(float(x), 6) for x in row] for row in self.affinity]}

    def gradient_mask(self) -> list | None:
        """Per parameter the loop trains after fit (the chosen router and expert tensors, in the model's order)."""
        if self.choice is None:
            raise ObliviateError("UOE: the expert is chosen before the first step (the loop's fit)")
        return [self._names[n] for n in self._order]

    def losses(self, model, reference, forget: dict, retain: dict) -> LossParts:
        from obliviate.models.moe import recorded_router_logits
        from obliviate.models.sequences import model_inputs

        if self.choice is None:
            raise ObliviateError("UOE: the expert is chosen before the first step (the loop's fit)")
        layer, expert = self.choice
        chosen = [self.layers[layer]]
        ids = forget["input_ids"]
        in_forget_pass = [False]

        def mark(_module, args, kwargs):  # the embedding of each forward pass sees that pass's input ids first
            in_forget_pass[0] = (args[0] if args else kwargs.get("input")) is ids
        handle = model.get_input_embeddings().register_forward_pre_hook(mark, with_kwargs=True)
        try:
            with recorded_router_logits(chosen, keep=lambda: in_forget_pass[0]) as record:
                parts = self.base.losses(model, reference, forget, retain)
        finally:
            handle.remove()
        logits = next((x for x in record[layer] if x.requires_grad), None)
        if logits is None:  # the base never ran the forget batch with gradients (or copied its ids): run it here
            with recorded_router_logits(chosen) as record:
                model(**model_inputs(forget))
            logits = record[layer][0]
        anchor = anchor_loss(logits, expert, forget)
        parts.logs["anchor_loss"] = float(anchor.detach())
        if self.config.anchor_weight:
            parts.forget = parts.forget + self.config.anchor_weight * anchor
        return parts
