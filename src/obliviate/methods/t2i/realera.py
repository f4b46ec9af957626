"""RealEra: erase a concept and its semantic neighbourhood (neighbour-concept mining), with a LoRA on the text-reading
weights, while random text states beyond that neighbourhood keep the original's prediction (beyond-concept
regularisation).

Paper: Liu, An, Zhang, Li, Wu, Gu, Lin, Wang 2024, "RealEra: Semantic-level Concept Erasure via Neighbor-Concept
Mining", https://arxiv.org/abs/2410.09140 (project page realerasing.github.io/RealEra). Only the abstract and the
summary of its method were readable here (the constraints d(e, e + eta) <= D1 and cos(e, e + eta) in [S1, S2] on the
perturbed erasure embeddings, the beyond-concept regulariser, a closed-form cross-attention alignment and a LoRA
noise alignment); the authors' code was not found (no repository under their names or the project's). The sampling
and loss details below follow a third-party re-implementation found by code search (`execute_realera_sampling` /
`embedding_sampling`: 5 neighbours and 3 beyond-concept samples per step, radius U[0, 400] in CLIP-L state units,
neighbours at cosine in [0.5, 0.9] to the concept's states, beyond-concept samples below 0.5; ESD's negatively
guided target; 200 iterations at lr 2e-5), read for its choices, not copied.

Neighbour-concept mining. Around the text states e = E(c) [L, D] of each forget prompt c, random perturbations
eta = r u (u a uniform direction on the sphere, r ~ U[0, radius |e|]) are drawn and kept while

    cos(e, e + eta) in [similarity_low, similarity_high]      (the neighbourhood: associated concepts)

Beyond-concept samples are drawn the same way with r ~ U[0, beyond_radius |e|] and kept while cos(e, e + xi) <
similarity_low: states near the concept but outside its neighbourhood, which stand for the unrelated concepts. (On
SDXL the pooled embedding stays the prompt's: only the per-token states attention reads are perturbed.)

The loss, per step, with x_t the adapted model's own partial DDIM sample of c at guidance `start_guidance` stopped at
a random step (t the timestep reached), a the anchor prompt (`task.anchor_prompt`: the concept replaced by the
anchor, or left out when there is none), and eps_0 the UNet with the LoRA switched off (the original, no copy kept):

    target  = eps_0(x_t, a) - g (eps_0(x_t, c) - eps_0(x_t, ""))                        (ESD's target, anchored)
    L_erase = || eps(x_t, c) - target ||^2
    L_nbr   = mean_k || eps(x_t, e + eta_k) - target ||^2                 (the neighbours are erased along with c)
    L_beyond= mean_j || eps(x_t, e + xi_j) - eps_0(x_t, e + xi_j) ||^2    (beyond-concept regularisation)
    L       = L_erase + neighbour_weight L_nbr + beyond_weight L_beyond

The bounded update: a rank-`rank` LoRA (peft, alpha = rank: scale 1; Kaiming-uniform down, zero up, so training
starts from the original) on the cross-attention key and value projections, the only weights that read the text
states, so the change is a low-rank change of how text is read, confined by the two sample sets to the concept's
neighbourhood. `detach` folds the LoRA into those weights; the run's changed tensors are "<layer>.weight" of each
adapted projection, and `obliviate export` writes an ordinary pipeline folder.

Where obliviate differs, and why:
- The paper also aligns cross-attention in closed form (UCE-style, with the mined neighbours among the erased
  embeddings and the beyond-concept ones among the preserved); here a run is the LoRA noise alignment alone. For the
  two stages, erase with UCE, export, and run RealEra on that folder.
- Radii are in units of the concept states' norm |e| (the re-implementation's 400 is in SD 1.x CLIP-L units, where
  |e| is about 250): a user's encoder and the canvas world's tiny one have other scales. Directions are uniform on the
  sphere (the re-implementation normalises v - e with v Gaussian, which leans away from e and ties the sampling to
  the encoder's scale).
- The perturbed states are those of each forget prompt (the reference perturbs the bare concept word's states).
- The three terms are summed every step (the re-implementation alternates: odd steps L_erase, even steps the
  neighbour and beyond terms, summed over samples rather than averaged).
- The LoRA's rank and placement are not in what could be read of the paper: rank 4 on the key/value projections (the
  weights the paper's closed-form step edits) is obliviate's choice.
Defaults: 5 neighbours, 3 beyond-concept samples, cosine bounds [0.5, 0.9], radius 2 |e| (neighbours), 3 |e|
(beyond), g = 1, start guidance 3, rank 4; the loop's `train` sets lr and steps (the re-implementation: 2e-5, 200).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from obliviate.errors import ObliviateError
from obliviate.methods.common import check_number
from obliviate.methods.t2i.base import EraseContext, LossParts, is_text_key_value
from obliviate.methods.t2i.spm import FoldedAdapterMethod, adapter_off
from obliviate.models.diffusion import Cond

ADAPTER = "realera"
MAX_TRIES = 1_000  # draws per kept sample before the bounds are declared unreachable


def _whole(key: str, value, min_value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < min_value:
        raise ObliviateError(f"RealEra: {key} must be a whole number >= {min_value}, got {value!r}")


@dataclass
class RealEraConfig:
    neighbours: int = 5  # mined neighbour states per step, erased with the concept
    beyond: int = 3  # beyond-concept states per step, held where the original puts them (0: no regulariser)
    similarity_low: float = 0.5  # S1: the neighbourhood's lowest cosine to the concept's states
    similarity_high: float = 0.9  # S2: its highest (closer is the concept itself)
    radius: float = 2.0  # D1: the neighbours' largest perturbation, in units of the concept states' norm
    beyond_radius: float = 3.0  # the beyond-concept samples' largest perturbation, same units
    neighbour_weight: float = 1.0
    beyond_weight: float = 1.0
    erase_guidance: float = 1.0  # g: ESD's negative guidance
    start_guidance: float = 3.0  # classifier-free guidance of the partial sampling that makes x_t
    rank: int = 4  # the LoRA's rank

    def __post_init__(self):
        _whole("neighbours", self.neighbours, 0)
        _whole("beyond", self.beyond, 0)
        _whole("rank", self.rank, 1)
        check_number("RealEra", "similarity_low", self.similarity_low, min=-1)
        check_number("RealEra", "similarity_high", self.similarity_high, min=-1)
        if not self.similarity_low < self.similarity_high <= 1:
            raise ObliviateError(f"RealEra: similarity_low < similarity_high <= 1 is required, got "
                                 f"{self.similarity_low} and {self.similarity_high}")
        for key in ("radius", "beyond_radius"):
            check_number("RealEra", key, getattr(self, key), positive=True)
        for key in ("neighbour_weight", "beyond_weight", "erase_guidance", "start_guidance"):
            check_number("RealEra", key, getattr(self, key), min=0)


def perturb(states: torch.Tensor, k: int, radius: float, low: float, high: float,
            generator: torch.Generator) -> torch.Tensor:
    """k perturbed copies [k, L, D] of the prompts' `states` [n, L, D] (around each prompt in turn): e + r u with u
    uniform on the sphere and r ~ U[0, radius |e|], kept when low <= cos(e, e + r u) <= high."""
    out = []
    for i in range(k):
        e = states[i % len(states)].detach().flatten().float().cpu()
        for _ in range(MAX_TRIES):
            u = torch.randn(e.shape, generator=generator)
            r = float(torch.rand((), generator=generator)) * radius * e.norm()
            candidate = e + r * u / u.norm()
            if low <= float(F.cosine_similarity(e, candidate, dim=0)) <= high:
                break
        else:
            raise ObliviateError(f"RealEra: no perturbation within {radius} x the states' norm has a cosine in "
                                 f"[{low}, {high}] to the concept's states: raise the radius or widen the bounds")
        out.append(candidate)
    if not out:
        return states[:0]
    return torch.stack(out).view(k, *states.shape[1:]).to(states.device, states.dtype)


def mine(states: torch.Tensor, config: RealEraConfig, generator: torch.Generator):
    """(neighbours [k, L, D], beyond-concept samples [k', L, D]) around the prompts' states."""
    c = config
    near = perturb(states, c.neighbours, c.radius, c.similarity_low, c.similarity_high, generator)
    far = perturb(states, c.beyond, c.beyond_radius, -1.0, c.similarity_low - 1e-6, generator)
    return near, far


def lora_targets(unet) -> list[str]:
    """The cross-attention key and value projections: the weights that read the text states (a DiT's
    context-stream `add_k_proj`/`add_v_proj`, docs/t2i_dit.md)."""
    found = sorted(n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and is_text_key_value(n))
    if not found:
        raise ObliviateError(f"RealEra: the denoiser ({type(unet).__name__}) has no cross-attention key/value "
                             "projection to adapt")
    return found


class RealEra(FoldedAdapterMethod):
    name = "RealEra"
    Config = RealEraConfig
    needs_images = False  # x_t comes from the adapted model's own partial sampling

    adapter = ADAPTER

    def adapter_targets(self, unet) -> list[str]:
        return lora_targets(unet)

    def adapter_rank(self) -> tuple[int, float]:
        return self.config.rank, self.config.rank

    def losses(self, ctx: EraseContext, unet, forget: dict, retain: dict) -> LossParts:
        cfg = self.config
        texts, cond = forget["texts"], forget["context"]
        n = len(texts)
        x_t, t = ctx.partial_sample(texts, cfg.start_guidance, unet)
        near, far = mine(cond.states, cfg, ctx.generator)
        rows_near = torch.arange(len(near), device=x_t.device) % n
        rows_far = torch.arange(len(far), device=x_t.device) % n
        perturbed = Cond.cat([Cond(near, None if cond.pooled is None else cond.pooled[rows_near]),
                              Cond(far, None if cond.pooled is None else cond.pooled[rows_far])])
        x_p = torch.cat([x_t[rows_near], x_t[rows_far]])
        anchor = ctx.encode([ctx.task.anchor_prompt(p) for p in texts])
        with torch.no_grad(), adapter_off(unet):  # the original's predictions: one denoiser call
            eps_c, eps_a, eps_u, eps_far = ctx.predict(
                unet, torch.cat([x_t, x_t, x_t, x_t[rows_far]]), t,
                Cond.cat([cond, anchor, ctx.unconditional(n), perturbed[len(near):]])).split([n, n, n, len(far)])
            target = eps_a - cfg.erase_guidance * (eps_c - eps_u)
        pred, pred_near, pred_far = ctx.predict(unet, torch.cat([x_t, x_p]), t, Cond.cat([cond, perturbed])).split(
            [n, len(near), len(far)])
        erase = F.mse_loss(pred.float(), target.float())
        logs = {"erase_mse": float(erase.detach()), "t": float(t)}
        total = erase
        if len(near):
            nbr = F.mse_loss(pred_near.float(), target[rows_near].float())
            logs["neighbour_mse"] = float(nbr.detach())
            total = total + cfg.neighbour_weight * nbr
        beyond = None
        if len(far):
            held = F.mse_loss(pred_far.float(), eps_far.float())
            logs["beyond_mse"] = float(held.detach())
            beyond = cfg.beyond_weight * held
        return LossParts(forget=total, retain=beyond, logs=logs)
