"""SPM, the concept semi-permeable membrane: a one-dimensional (rank-1) adapter per erased concept.

Paper: Lyu et al. 2024, "One-dimensional Adapter to Rule Them All: Concepts, Diffusion Models and Erasing
Applications" (CVPR), https://arxiv.org/abs/2312.16145. Reference code read: github.com/Con6924/SPM
(src/models/spm.py, train_spm.py, src/configs/prompt.py, src/engine/sampling.py, infer_spm.py, configs/*/).

The adapter. Every Linear and Conv2d inside the UNet's `Transformer2DModel` blocks (proj_in, the self- and
cross-attention q/k/v/out projections, the feed-forward layers, proj_out) gets a rank-1 branch
W x + up(down(x)) * alpha / rank with rank 1 and alpha 1; `down` is Kaiming-uniform (a = sqrt 5) and `up` zero, so
the adapted UNet starts exactly as the original. Here the branch is peft's LoRA with r = 1, lora_alpha = 1 (the same
layers, the same initialisation: peft's default), injected into the UNet by `attach` and trained alone.

The loss, per step, for forget prompts c (the reference trains on the concept word itself; obliviate's forget
prompts contain it) and their anchor prompts a (`task.anchor_prompt`: the concept replaced by the anchor, so an empty
anchor on the bare concept word is the reference's "" exactly):

    x_t     = DDIM with guidance `start_guidance` from noise on c, by the adapted UNet, stopped at a random step
    L_erase = || eps_spm(x_t, c, t) - [eps_0(x_t, a, t) - g (eps_0(x_t, c, t) - eps_0(x_t, a, t))] ||^2
    L_la    = || eps_spm(x_t, z_k, t) - eps_0(x_t, z_k, t) ||^2      (latent anchoring)
    L       = L_erase + anchoring_weight * L_la

eps_0 is the same UNet with the adapter switched off (the reference's multiplier 0: no copy of the UNet is kept).
The latent anchors z_k are random text states: Gaussian directions of a concept prompt's state tensor, kept with
probability 1 - cos(direction, concept states), scaled to U(0.8, 1.2) times the concept states' norm
(src/engine/sampling.py), so the adapter leaves the rest of the text-state space where the original had it.

Reference defaults (configs/*/config.yaml, prompt.yaml): rank 1, alpha 1, 3000 iterations, lr 1e-4 (AdamW8bit,
cosine with 3 restarts, 500 warm-up steps), batch 1, 30 DDIM steps for x_t at guidance 3, g = 1, la_strength 1000,
4 anchors per step. Here the loop's `train` sets lr, steps and batch (set lr = 1e-4 for the paper's), and its
`t2i.sample_steps` the DDIM steps. With a batch of n prompts the `anchor_samples` anchors are drawn around the
batch's prompts in turn (the reference's batch is 1).

The run's changed tensors: the adapter merged into each target weight at scale 1 ("unet.<layer>.weight"), so
`obliviate export` writes an ordinary pipeline folder; that pipeline is SPM without facilitated transport (as the
reference's WebUI route, which its README says affects unrelated concepts more).

Facilitated transport (infer_spm.py): at generation each SPM is scaled per prompt by its transport rate

    gamma(p) = max( cos(E(p), E(c_e)),  |T(p) & T(c_e)| / |T(c_e)| )

E: the text encoder's per-token states, flattened; T: the prompt's token ids without special tokens; c_e the erased
concept. `SPMAdapter.from_run` recovers an adapter from a run (the rank-1 difference of its merged weights to the
base's, by SVD), `FacilitatedTransport` installs several on one pipeline, each with its own peft adapter and scale,
and `sample_with_transport` draws pictures with them. Differences from the reference: the reference multiplies both
factors of an SPM by gamma (its update by gamma^2) and, with several SPMs, sums their factors before the product
(mixing one SPM's down with another's up); here each SPM's update is scaled by gamma ** power (power 1 by default;
power 2 gives the reference's single-SPM scale) and the SPMs' updates add. The reference samples both passes of a
picture's classifier-free guidance with the same scale; so does this.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from obliviate.errors import ObliviateError
from obliviate.methods.common import check_number
from obliviate.methods.t2i.base import DiffusionMethod, EraseContext, LossParts
from obliviate.models.diffusion import encode_prompts, predict_noise, sample, tokenize

ADAPTER = "spm"  # the peft adapter name while training
BLOCKS = ("Transformer2DModel",)  # the reference's UNET_TARGET_REPLACE_MODULE_TRANSFORMER


@dataclass
class SPMConfig:
    erase_guidance: float = 1.0  # g: how far beyond the anchor prompt's noise the concept's is pushed
    anchoring_weight: float = 1000.0  # the reference's la_strength
    anchor_samples: int = 4  # random text states per step kept where the original puts them (0: no anchoring)
    start_guidance: float = 3.0  # classifier-free guidance of the partial sampling that makes x_t

    def __post_init__(self):
        check_number("SPM", "erase_guidance", self.erase_guidance, min=0)
        check_number("SPM", "anchoring_weight", self.anchoring_weight, min=0)
        check_number("SPM", "start_guidance", self.start_guidance, min=0)
        if isinstance(self.anchor_samples, bool) or not isinstance(self.anchor_samples, int) or self.anchor_samples < 0:
            raise ObliviateError(f"SPM: anchor_samples must be a whole number >= 0, got {self.anchor_samples!r}")


class FoldedAdapterMethod(DiffusionMethod):
    """A method that trains only a peft LoRA adapter named `adapter` on the modules `adapter_targets(unet)` names, and
    folds it into their weights after the last step (SPM, RealEra): the run's changed tensors are those weights."""
    adapter = ADAPTER

    def adapter_targets(self, unet) -> list[str]:
        raise NotImplementedError

    def adapter_rank(self) -> tuple[int, float]:
        """(rank, alpha) of the adapter."""
        return 1, 1.0

    def attach(self, unet) -> None:
        self.targets = self.adapter_targets(unet)
        rank, alpha = self.adapter_rank()
        add_adapter(unet, self.adapter, self.targets, rank=rank, alpha=alpha)

    def trainable(self, name: str, param) -> bool:
        return f".lora_A.{self.adapter}." in name or f".lora_B.{self.adapter}." in name

    def detach(self, unet) -> list[str]:
        merge_adapters(unet)
        return [f"{t}.weight" for t in self.targets]


class SPM(FoldedAdapterMethod):
    name = "SPM"
    Config = SPMConfig
    needs_images = False  # data-free: x_t comes from the adapted model's own partial sampling
    backbones = ("sd",)
    backbones_why = ("latent anchoring draws random states of a single text encoder (no pooled embedding) and the "
                     "adapter sits on a UNet's transformer blocks")

    def adapter_targets(self, unet) -> list[str]:
        return adapter_targets(unet)

    def losses(self, ctx: EraseContext, unet, forget: dict, retain: dict) -> LossParts:
        cfg = self.config
        texts, cond = forget["texts"], forget["context"].states
        n = len(texts)
        x_t, t = ctx.partial_sample(texts, cfg.start_guidance, unet)
        anchor_prompts = ctx.encode([ctx.task.anchor_prompt(p) for p in texts]).states
        anchors = sample_anchors(cond, cfg.anchor_samples, ctx.generator)
        rows = torch.arange(len(anchors), device=x_t.device) % n
        with torch.no_grad(), adapter_off(unet):  # the original's three predictions: one UNet call
            eps_c, eps_a, eps_z = predict_noise(unet, torch.cat([x_t, x_t, x_t[rows]]), t,
                                                torch.cat([cond, anchor_prompts, anchors])).split([n, n, len(anchors)])
            target = eps_a - cfg.erase_guidance * (eps_c - eps_a)
        pred, pred_z = predict_noise(unet, torch.cat([x_t, x_t[rows]]), t, torch.cat([cond, anchors])).split(
            [n, len(anchors)])
        erase = F.mse_loss(pred.float(), target.float())
        logs = {"erase_mse": float(erase.detach()), "t": float(t)}
        anchoring = None
        if len(anchors):
            la = F.mse_loss(pred_z.float(), eps_z.float())
            logs["anchoring_mse"] = float(la.detach())
            anchoring = cfg.anchoring_weight * la
        return LossParts(forget=erase, retain=anchoring, logs=logs)


def sample_anchors(states: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k random text states [k, L, D] around the prompts' `states` in turn (src/engine/sampling.py): a Gaussian
    direction, kept with probability 1 - cos(direction, states), scaled to U(0.8, 1.2) x the states' norm."""
    out = []
    for i in range(k):
        target = states[i % len(states)].detach().flatten().float().cpu()
        while True:
            direction = torch.randn(target.shape, generator=generator)
            direction = direction / direction.norm()
            if float(torch.rand((), generator=generator)) < 1 - float(target @ direction / target.norm()):
                break
        scale = float(torch.rand((), generator=generator)) * 0.4 + 0.8
        out.append(scale * target.norm() * direction)
    if not out:
        return states[:0]
    return torch.stack(out).view(k, *states.shape[1:]).to(states.device, states.dtype)


# --- the adapter (peft LoRA, r = 1) ----------------------------------------------------------------------------------

def adapter_targets(unet) -> list[str]:
    """The module names the reference adapts: every Linear and Conv2d inside a Transformer2DModel block."""
    found = []
    for name, module in unet.named_modules():
        if type(module).__name__ in BLOCKS:
            found += [f"{name}.{child}" for child, m in module.named_modules()
                      if child and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    if not found:
        raise ObliviateError(f"SPM: the denoiser ({type(unet).__name__}) has no {BLOCKS[0]} block, the layers the "
                             "reference adapts")
    return sorted(set(found))


def add_adapter(unet, name: str, targets: list[str], rank: int = 1, alpha: float = 1.0) -> None:
    """A peft LoRA adapter `name` of `rank` (SPM's: 1) on `targets` (Kaiming-uniform down, zero up: the identity at
    first), its update scaled by alpha / rank."""
    import warnings

    from peft import LoraConfig, inject_adapter_in_model

    with warnings.catch_warnings():  # several SPMs on one UNet are meant: peft warns about a second adapter
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets), unet,
                                adapter_name=name)


def _lora_layers(unet):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in unet.named_modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def adapter_off(unet):
    """The UNet as it was before any adapter (the reference's multiplier 0)."""
    layers = [m for _, m in _lora_layers(unet)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def _unwrap(unet) -> None:
    for name, module in _lora_layers(unet):
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent), child, module.get_base_layer())
    if "peft_config" in vars(unet):  # what inject_adapter_in_model records on the model
        del unet.peft_config


def merge_adapters(unet) -> None:
    """Fold the active adapters, at their current scales, into the wrapped weights and remove the wrappers."""
    with torch.no_grad():
        for _, module in _lora_layers(unet):
            module.merge()
    _unwrap(unet)


# --- facilitated transport -------------------------------------------------------------------------------------------

def transport_rate(prompt_states: torch.Tensor, prompt_ids: torch.Tensor, concept_states: torch.Tensor,
                   concept_ids: torch.Tensor, special_ids) -> torch.Tensor:
    """gamma per prompt [N]: the larger of the cosine between the prompt's and the concept's flattened text states
    and the share of the concept's tokens (special tokens left out) that the prompt contains (infer_spm.py,
    "clipcos_tokenuni")."""
    cos = F.cosine_similarity(prompt_states.flatten(1).float(), concept_states.flatten(1).float(), dim=-1).cpu()
    special = set(int(i) for i in special_ids)
    concept = set(concept_ids.flatten().tolist()) - special
    share = torch.tensor([len(set(ids.tolist()) & concept) / max(len(concept), 1) for ids in prompt_ids])
    return torch.maximum(cos, share)


@dataclass
class SPMAdapter:
    """One trained SPM, unmerged: the concept it erases and, per adapted layer, its rank-1 factors in peft's shapes
    (down: lora_A's weight [1, in(, kh, kw)], up: lora_B's [out, 1(, 1, 1)])."""
    concept: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def from_weights(cls, concept: str, changed: dict[str, torch.Tensor], base_state: dict[str, torch.Tensor],
                     source: str = "the run") -> "SPMAdapter":
        """The adapter whose merge at scale 1 turned `base_state` into `changed` (UNet names "<layer>.weight"):
        each difference is rank 1, and its top singular pair gives the factors (up to float precision)."""
        factors = {}
        for key, weight in changed.items():
            if not key.endswith(".weight") or key not in base_state:
                raise ObliviateError(f"{source}: {key} is not an adapted UNet weight: not an SPM run?")
            delta = (weight.double() - base_state[key].to(weight.device).double()).flatten(1)
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            if s[0] == 0:
                continue  # a layer the training left unchanged
            if len(s) > 1 and s[1] > 1e-3 * s[0]:
                raise ObliviateError(f"{source}: the change to {key} has rank > 1: not an SPM run")
            root = s[0].sqrt()
            shape = weight.shape
            down = (vh[:1] * root).reshape(1, *shape[1:]).float()
            up = (u[:, :1] * root).reshape(shape[0], 1, *([1] * (len(shape) - 2))).float()
            factors[key.removesuffix(".weight")] = (down, up)
        return cls(concept, factors)

    @classmethod
    def from_run(cls, run_dir: str | Path, base_unet) -> "SPMAdapter":
        """The adapter of an SPM run folder, against the base pipeline's UNet the run started from."""
        from safetensors.torch import load_file

        from obliviate.runs import read_run_config

        config = read_run_config(Path(run_dir))
        if config.method != SPM.name:
            raise ObliviateError(f"{run_dir}: a {config.method} run, not an SPM one")
        changed = load_file(str(Path(run_dir) / "changed.safetensors"))
        unet = {k.removeprefix("unet."): v for k, v in changed.items() if k.startswith("unet.")}
        return cls.from_weights(config.concept, unet, base_unet.state_dict(), str(run_dir))


class FacilitatedTransport:
    """Several SPMs on one pipeline, each scaled per prompt by its own transport rate (gamma ** power). Use as
    `with FacilitatedTransport(adapters).install(pipe) as ft: ft.apply(pipe, prompt); ...sample...`; the pipeline's
    UNet is as before once the block ends. The generation-time guard's shape (T2I_CONTRACT section 3)."""

    def __init__(self, adapters: list[SPMAdapter], power: float = 1.0):
        if not adapters:
            raise ObliviateError("facilitated transport needs at least one SPM")
        check_number("FacilitatedTransport", "power", power, positive=True)
        self.adapters, self.power = adapters, power
        self.names = [f"{ADAPTER}{i}" for i in range(len(adapters))]

    @contextlib.contextmanager
    def install(self, pipe):
        unet = pipe.unet
        try:
            for name, adapter in zip(self.names, self.adapters):
                add_adapter(unet, name, sorted(adapter.factors))
                with torch.no_grad():
                    for layer, (down, up) in adapter.factors.items():
                        module = unet.get_submodule(layer)
                        module.lora_A[name].weight.copy_(down)
                        module.lora_B[name].weight.copy_(up)
            for _, module in _lora_layers(unet):
                module.set_adapter(self.names)
            unet.requires_grad_(False)
            yield self
        finally:
            _unwrap(unet)

    @torch.no_grad()
    def rates(self, pipe, prompts: list[str]) -> torch.Tensor:
        """gamma [N prompts, N adapters]."""
        concepts = [a.concept for a in self.adapters]
        states = encode_prompts(pipe, list(prompts) + concepts)
        ids = tokenize(pipe, list(prompts) + concepts)
        n = len(prompts)
        special = pipe.tokenizer.all_special_ids
        return torch.stack([transport_rate(states[:n], ids[:n], states[n + i:n + i + 1], ids[n + i], special)
                            for i in range(len(concepts))], dim=1)

    def apply(self, pipe, prompt: str) -> list[float]:
        """Set each SPM's scale for `prompt`; returns the scales."""
        scales = (self.rates(pipe, [prompt])[0] ** self.power).tolist()
        for _, module in _lora_layers(pipe.unet):
            for name, scale in zip(self.names, scales):
                module.set_scale(name, scale)
        return scales


def sample_with_transport(pipe, adapters: list[SPMAdapter], prompts: list[str], seeds: list[int], steps: int = 25,
                          guidance: float = 4.0, power: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pictures [N, 3, H, W] of the prompts with the unmerged SPMs, each scaled by its transport rate for that
    prompt, and those scales [N, len(adapters)]. One prompt at a time: the scale is the prompt's."""
    transport = FacilitatedTransport(adapters, power)
    images, scales = [], []
    with transport.install(pipe):
        for prompt, seed in zip(prompts, seeds):
            scales.append(transport.apply(pipe, prompt))
            images.append(sample(pipe, [prompt], [seed], steps, guidance))
    return torch.cat(images), torch.tensor(scales)
