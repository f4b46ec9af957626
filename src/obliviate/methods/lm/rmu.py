"""RMU (Representation Misdirection for Unlearning): steer one layer's activations on forget text towards a fixed
random direction, keep its activations on retain text equal to the original model's; only a few layers' MLP weights
train.

Paper: Li et al. 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning",
https://arxiv.org/abs/2403.03218

    u   = r / ||r||,  r ~ U[0, 1)^d  (fixed for the whole run; drawn in `setup` from `seed`)
    L_f = mean over forget tokens t of || h_theta^l(x_f)_t - c * u ||^2
    L_r = mean over retain tokens t of || h_theta^l(x_r)_t - h_ref^l(x_r)_t ||^2
    L   = L_f + alpha * L_r

h^l is the output of decoder layer l (`hidden_states[l + 1]` of a Hugging Face model called with
`output_hidden_states=True`; for the last layer HF applies the final norm there, so prefer a middle layer).

Choices and deviations, all documented here:
- Tokens: `tokens="answer"` (default) averages over answer tokens only (labels != -100, i.e. the positions of the
  answer tokens themselves), following obliviate's rule that losses count answer tokens; `tokens="all"` averages over
  every non-padding token of the sequences, as the WMDP code does with its plain-text corpora.
- Norm: the paper's formula uses the squared L2 norm per token (what we compute); the WMDP code uses
  `F.mse_loss`, i.e. additionally divides by the hidden size d. The ratio between L_f and L_r is the same, so only the
  effective learning rate differs.
- Layers: WMDP steers Zephyr-7B's layer 7 and trains the MLPs of layers 5-7 (c 6.5, alpha 1200). obliviate's worlds
  use small (4-layer) models, so the defaults are relative: `layer=-2` (4 layers -> layer 2) and `train_layers=None`,
  meaning [layer - 1, layer] (4 layers -> [1, 2]; a 2-layer model -> [0]). Negative indices count from the end.
  Coefficients follow the TOFU-scale setting: c 2, alpha 1.
- Trainable parameters: every parameter under `layers.{i}.mlp.` (Llama/Mistral/Qwen) or `h.{i}.mlp.` (GPT-2) of the
  trained layers; with a peft LoRA model the base weights are frozen, so only the LoRA tensors of those MLPs train.
  The WMDP code trains a single matrix per layer (`param_ids=[6]`); `param_filter="down_proj"` (a substring the
  parameter name must contain) mimics that.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from obliviate.errors import ObliviateError
from obliviate.methods.lm.base import LossParts, Method, check_choice, check_number, items, nll_from_logits, token_mean
from obliviate.models.sequences import model_inputs

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.mlp\.")


@dataclass
class RMUConfig:
    layer: int = -2  # decoder layer whose output is steered; negative counts from the end
    train_layers: list[int] | None = None  # layers whose MLP trains; None -> [layer - 1, layer] (clipped at 0)
    steering_coeff: float = 2.0  # c
    alpha: float = 1.0  # weight of the retain activation loss
    tokens: str = "answer"  # "answer" (answer tokens) or "all" (every non-padding token, as the WMDP code)
    param_filter: str = ""  # optional substring a trainable parameter name must contain (e.g. "down_proj")
    seed: int = 0  # seed of the random direction u

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ObliviateError(f"RMU: layer must be an integer, got {self.layer!r}")
        if self.train_layers is not None:
            if not isinstance(self.train_layers, (list, tuple)) or not self.train_layers or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in self.train_layers):
                raise ObliviateError(f"RMU: train_layers must be a non-empty list of integers or None, "
                                     f"got {self.train_layers!r}")
            self.train_layers = list(self.train_layers)
        check_number("RMU", "steering_coeff", self.steering_coeff, positive=True)
        check_number("RMU", "alpha", self.alpha, min=0)
        check_choice("RMU", "tokens", self.tokens, ("answer", "all"))


def _text_config(model):
    """The language model's config (a vision-language model nests it as text_config)."""
    return getattr(model.config, "text_config", None) or model.config


def _num_layers(model) -> int:
    n = getattr(_text_config(model), "num_hidden_layers", None)
    if n is None:
        raise ObliviateError("RMU: the model config has no num_hidden_layers")
    return int(n)


def _resolve(i: int, n: int, key: str) -> int:
    j = i + n if i < 0 else i
    if not 0 <= j < n:
        raise ObliviateError(f"RMU: {key} index {i} is out of range for a model with {n} layers")
    return j


class RMU(Method):
    name = "RMU"
    Config = RMUConfig
    needs_reference = True

    def __init__(self, config=None):
        super().__init__(config)
        self.u: torch.Tensor | None = None
        self.layer: int | None = None
        self.train_layers: set[int] = set()

    def setup(self, model, reference) -> None:
        c = self.config
        n = _num_layers(model)
        self.layer = _resolve(c.layer, n, "layer")
        layers = c.train_layers if c.train_layers is not None else [max(self.layer - 1, 0), self.layer]
        self.train_layers = {_resolve(i, n, "train_layers") for i in layers}
        if max(self.train_layers) > self.layer:
            raise ObliviateError(f"RMU: train_layers {sorted(self.train_layers)} include layers after the steered "
                                 f"layer {self.layer}; they get no gradient from the RMU loss")
        if not any(self.trainable(name, p) for name, p in model.named_parameters()):
            raise ObliviateError(f"RMU: no trainable MLP parameters found for layers {sorted(self.train_layers)} "
                                 f"(expected names containing 'layers.<i>.mlp.' or 'h.<i>.mlp.')")
        g = torch.Generator().manual_seed(int(c.seed))
        u = torch.rand(int(_text_config(model).hidden_size), generator=g)
        self.u = u / u.norm()

    def trainable(self, name: str, param: torch.nn.Parameter) -> bool:
        if self.layer is None:
            raise ObliviateError("RMU: call setup(model, reference) before asking which parameters train")
        m = _LAYER_RE.search(name)
        return (m is not None and int(m.group(1)) in self.train_layers and param.requires_grad
                and self.config.param_filter in name)

    def _hidden(self, model, batch: dict):
        out = model(**model_inputs(batch), output_hidden_states=True)
        return out.hidden_states[self.layer + 1], out.logits

    def _mask(self, batch: dict) -> torch.Tensor:
        """The averaged positions ([B, T] float), none on rows that are not items (`item_mask`)."""
        mask = batch["labels"] != -100 if self.config.tokens == "answer" else batch["attention_mask"].bool()
        return mask.float() * items(batch)[:, None]

    def _mean(self, per_token: torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean over the averaged positions of the step's global batch."""
        return token_mean((per_token * self._mask(batch)).sum(), batch, lambda b: self._mask(b).sum())

    def losses(self, model, reference, forget: dict, retain: dict) -> LossParts:
        if self.u is None:
            raise ObliviateError("RMU: call setup(model, reference) before computing losses")
        c = self.config
        h_f, logits_f = self._hidden(model, forget)
        target = c.steering_coeff * self.u.to(device=h_f.device, dtype=h_f.dtype)
        loss_f = self._mean(((h_f.float() - target.float()) ** 2).sum(-1), forget)
        logs = {"forget_nll": float(nll_from_logits(logits_f.detach(), forget)),
                "forget_act_dist": float(loss_f.detach())}
        retain_term = None
        if c.alpha > 0:
            h_r, logits_r = self._hidden(model, retain)
            with torch.no_grad():
                h_ref = reference(**model_inputs(retain),
                                  output_hidden_states=True).hidden_states[self.layer + 1]
            loss_r = self._mean(((h_r.float() - h_ref.float()) ** 2).sum(-1), retain)
            logs["retain_act_dist"] = float(loss_r.detach())
            logs["retain_nll"] = float(nll_from_logits(logits_r.detach(), retain))
            retain_term = c.alpha * loss_r
        return LossParts(forget=loss_f, retain=retain_term, logs=logs)
