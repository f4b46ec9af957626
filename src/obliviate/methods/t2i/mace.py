"""MACE, mass concept erasure: a closed-form refinement of the cross-attention keys and values, one LoRA per concept
trained to take the concept's tokens out of the cross-attention maps, and the LoRAs fused into one edit in closed form.

Paper: Lu, Wang, Li, Liu and Kong 2024, "MACE: Mass Concept Erasure in Diffusion Models", CVPR,
https://arxiv.org/abs/2403.06135. Reference code read: github.com/Shilin-LU/MACE (training.py, src/cfr_lora_training.py,
src/cfr_utils.py `find_matching_indices` `prepare_k_v` `closed_form_refinement` `AttnController`
`importance_sampling_fn`, src/dataset.py, src/mace_lora_atten_processor.py, src/fuse_lora_close_form.py, configs/).

The edited weights are the UNet's cross-attention key and value projections W (`attn2.to_k`, `attn2.to_v`), and only
those: the run's changed tensors are these weights, so `obliviate export` writes an ordinary pipeline folder.

1. Closed-form refinement (CFR). Each forget prompt (the reference's augmented prompts "a photo of {concept}", ...) is
   paired with its anchor prompt (the concept replaced by the task's anchor: the reference's mapping concept). The
   token positions the two texts share (the common prefix, the common suffix, then the padding, aligned as
   `find_matching_indices` and its extension to the full length do) are the co-existing words: in a causal text
   encoder they still carry the concept. Their states c_e are mapped onto the anchor prompt's states g_e at the
   matching positions:

       W* = argmin  lam ||W* - W||^2 + sum_e ||W* c_e - W g_e||^2 + preserve_scale sum_p ||W* c_p - W c_p||^2

   the same algebra as UCE's (W* = W M, `uce.uce_matrix` with erase_scale 1), only over other positions: UCE maps
   the prompt from its last content token on, MACE every position but the concept's own tokens.
2. One LoRA per concept (rank `rank`, on every `attn2.to_k` and `attn2.to_v`, A ~ N(0, 1/rank^2), B = 0: diffusers'
   LoRALinearLayer initialisation, peft's "gaussian"), trained alone on the refined model with the attention loss

       L = sum_l || A_l[:, region, concept positions] ||_F

   A_l: cross-attention layer l's attention probabilities (softmax(Q K^T / sqrt(d)) per head, as diffusers'
   `attn.get_attention_scores` computes them, recorded by an attention processor installed for the forward pass);
   concept positions: the concept's tokens in the prompt and, with `use_pooler`, every position holding the end
   token (CLIP's pooler token; SD 1.x's tokenizer also pads with it, so the padding too, as the reference);
   region: the pixels of the concept in the image (next paragraph). Latents: the original pipeline's pictures of the
   forget prompts, noised at timesteps drawn from the reference's importance distribution
   p(t) ~ sigmoid(0.05 (t - 200)) - sigmoid(0.05 (t - 400)) (`importance_sampling`), else uniformly. No denoising
   loss: the reference's default trains on this loss alone.
3. Fusion. With W0 the refined weights and W_i = W0 + (LoRA i) the weights of concept i's LoRA, every edited
   projection becomes

       W* = argmin  lam ||W* - W0||^2 + sum_i sum_{c in C_i} ||W* c - W_i c||^2 + preserve_scale sum_p ||W* c_p - W c_p||^2
          = (lam W0 + sum_i W_i C_i^T C_i + preserve_scale W P^T P) (lam I + sum_i C_i^T C_i + preserve_scale P^T P)^-1

   C_i: every position of concept i's forget prompts (`prepare_k_v(..., all_words=True, prepare_k_v_for_lora=True)`);
   W the original weights (the reference's preservation caches are computed on the original model). Several concepts:
   `also_erase` names further concepts erased in the same edit (their forget prompts are the task's with the concept
   word replaced, their pictures drawn by the original pipeline in `setup`); each has its own LoRA, trained on its own
   prompts in the same steps, and the fusion joins them.

The region, where obliviate differs from the paper. The paper segments the concept in each training picture with
Grounded-SAM (GroundingDINO + SAM weights, which obliviate cannot download or run on a built-in world, and which
know nothing of a world's made-up concepts). Here `mask = "attention"` takes the region from the model itself: the
refined model's cross-attention maps of the concept's own tokens (not the pooler or padding, which attend
everywhere) on the picture, noised once at t = 0.3 T (inside the importance window), averaged over heads and layers
at the latent's resolution, and thresholded at `mask_threshold` of its per-picture maximum. That is where the model
itself puts the concept, which is what the loss must empty, and it needs no second model. `mask = "none"` uses the
whole picture (the reference's route when no mask is given, which `AttnController` implements too).

Defaults (configs/object/*.yaml, the setting that needs no cached preservation statistics): lam 100 (`lamb`: the
object configs use 10 for bird, 100 for automobile, 1000 for ship), preserve_scale 0 (`train_preserve_scale`,
`fuse_preserve_scale`), rank 1, use_pooler true, importance sampling on, 50 steps per concept at lr 1e-5 (celebrity
and art configs: 1e-4), batch 1, AdamW (weight decay 1e-2), gradient clipping 1. The loop's `train` sets lr, steps
and batch; `default_steps` is the reference's 50.

Other differences from the reference, and why:
- Preserved texts: the reference adds cached statistics of COCO captions and of other concepts of the same domain
  (celebrity and art configs, with lam 0). obliviate preserves the task's `preserve` concepts and, with
  `preserve_retain_prompts`, the retain prompts (every position), scaled by `preserve_scale`; with lam 0 and
  nothing preserved the system is singular and the run is refused.
- Training the LoRAs: the reference trains them one after the other, 50 steps each; here every step trains each
  concept's LoRA on one batch of its own prompts (one UNet pass per concept), so each gets the run's steps. Each
  LoRA still sees only its concept and starts from the same refined weights, as in the reference.
- Batches larger than 1: the loss's norm runs over the batch's selected entries per layer (the reference's batch is
  1, for which this is its loss).
- Prompts: the reference's 30 augmentation templates become the task's forget prompts (which contain the concept).
- Everything closed-form in float64, applied once to each weight.

Refused on SD3/FLUX-shaped pipelines (`backbones`): the attention loss reads a UNet's cross-attention (attn2) maps over
the text tokens alone; joint attention mixes image and text tokens in one map.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from obliviate.errors import ObliviateError
from obliviate.methods.common import check_number
from obliviate.methods.t2i.attention_maps import concept_positions, every_map, recording
from obliviate.methods.t2i.base import DiffusionMethod, EraseContext, LossParts, is_cross_attention
from obliviate.methods.t2i.spm import _lora_layers, _unwrap
from obliviate.methods.t2i.uce import UCE, uce_matrix
from obliviate.models.diffusion import check_concept_known, denoise

ADAPTER = "mace"  # the peft adapter names: mace0 (the task's concept), mace1, ... (`also_erase`)
MASKS = ("attention", "none")
SINGULAR = ("MACE: the closed form is singular: set lam > 0 or preserve more texts (preserve_scale > 0 with the "
            "task's preserve concepts or preserve_retain_prompts)")


@dataclass
class MACEConfig:
    lam: float = 100.0  # weight of staying close to the current W in both closed forms (`lamb`)
    preserve_scale: float = 0.0  # weight of the preserved texts' keys/values (`train_/fuse_preserve_scale`)
    preserve_retain_prompts: bool = False  # also preserve the task's retain prompts (at most max_retain_prompts)
    max_retain_prompts: int = 64
    rank: int = 1  # each concept's LoRA rank
    use_pooler: bool = True  # the end token (and an end-token padding) among the positions the loss empties
    importance_sampling: bool = True  # timesteps from the reference's window around t = 200..400, else uniform
    mask: str = "attention"  # the region the loss empties: the concept's own attention, thresholded; or "none"
    mask_threshold: float = 0.5  # share of the per-picture maximum of that attention map
    also_erase: list[str] = field(default_factory=list)  # further concepts erased in the same edit

    def __post_init__(self):
        check_number("MACE", "lam", self.lam, min=0)
        check_number("MACE", "preserve_scale", self.preserve_scale, min=0)
        check_number("MACE", "mask_threshold", self.mask_threshold, min=0)
        if self.mask_threshold >= 1:
            raise ObliviateError(f"MACE: mask_threshold must be below 1, got {self.mask_threshold!r}")
        for key in ("rank", "max_retain_prompts"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ObliviateError(f"MACE: {key} must be a whole number >= 1, got {value!r}")
        for key in ("preserve_retain_prompts", "use_pooler", "importance_sampling"):
            if not isinstance(getattr(self, key), bool):
                raise ObliviateError(f"MACE: {key} must be true or false, got {getattr(self, key)!r}")
        if self.mask not in MASKS:
            raise ObliviateError(f"MACE: mask must be one of {', '.join(MASKS)}, got {self.mask!r}")
        if not isinstance(self.also_erase, list) or not all(isinstance(c, str) and c.strip() for c in self.also_erase):
            raise ObliviateError(f"MACE: also_erase must be a list of concepts, got {self.also_erase!r}")


# --- the pieces, each checked on its own in tests/test_t2i_mace.py ---------------------------------------------------

def matching_positions(old_ids: list[int], new_ids: list[int], length: int) -> tuple[list[int], list[int]]:
    """The positions of `old_ids` (a text with the concept, special tokens included) outside the span it does not
    share with `new_ids` (the anchor text), each with its partner in `new_ids`: the common prefix, the common suffix,
    then the padding up to `length`, both lists cut to the same size (the reference's `find_matching_indices` and the
    extension after it)."""
    start = 0
    while start < min(len(old_ids), len(new_ids)) and old_ids[start] == new_ids[start]:
        start += 1
    end_old, end_new = len(old_ids) - 1, len(new_ids) - 1
    while end_old >= start and end_new >= start and old_ids[end_old] == new_ids[end_new]:
        end_old, end_new = end_old - 1, end_new - 1
    old = list(range(start)) + list(range(end_old + 1, len(old_ids)))
    new = list(range(start)) + list(range(end_new + 1, len(new_ids)))
    n = len(old) + length - 1 - max(old[-1], new[-1])  # both texts' padding, up to the longer text's end
    old += list(range(old[-1] + 1, length))
    new += list(range(new[-1] + 1, length))
    return old[:n], new[:n]


def importance_weights(num_timesteps: int, temperature: float = 0.05) -> torch.Tensor:
    """The reference's timestep weights f(t) = sigmoid(T (t - 200)) - sigmoid(T (t - 400)), normalised."""
    t = torch.arange(num_timesteps, dtype=torch.float64)
    w = torch.sigmoid(temperature * (t - 200)) - torch.sigmoid(temperature * (t - 400))
    return w / w.sum()


def attention_loss(maps: list[torch.Tensor], positions: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """sum over layers of the Frobenius norm of the attention probabilities [B * heads, HW, L] of the region's
    pixels (region [B, h, w] of 0/1 at the latent's resolution, resized to each layer's grid) to the marked token
    positions ([B, L] bool)."""
    total = 0.0
    for probs in maps:
        b = len(positions)
        grid = _grid(probs.shape[1], region.shape[-2:])
        inside = F.interpolate(region[:, None].float(), size=grid, mode="nearest").flatten(1) > 0.5  # [B, HW]
        probs = probs.view(b, -1, *probs.shape[1:])  # [B, heads, HW, L]
        keep = inside[:, None, :, None] & positions[:, None, None, :]
        total = total + probs.float().pow(2).masked_select(keep).sum().sqrt()
    return total


def fuse_weights(base: torch.Tensor, original: torch.Tensor, loras: list[tuple[torch.Tensor, torch.Tensor]],
                 preserve: torch.Tensor, lam: float, preserve_scale: float) -> torch.Tensor:
    """W* (float64) minimising lam ||W* - base||^2 + sum_i ||W* C_i^T - W_i C_i^T||^2
    + preserve_scale ||W* P^T - original P^T||^2; `loras` holds (W_i, C_i [N_i, D]), `preserve` is P [Np, D]."""
    eye = torch.eye(base.shape[1], dtype=torch.float64, device=base.device)
    P = preserve.double()
    num = lam * base.double() + preserve_scale * original.double() @ (P.T @ P)
    den = lam * eye + preserve_scale * (P.T @ P)
    for weight, C in loras:
        CtC = C.double().T @ C.double()
        num = num + weight.double() @ CtC
        den = den + CtC
    return _solve_right(num, den)


def _solve_right(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num den^-1 (den symmetric positive semi-definite), refused where den is singular (lam 0, too few texts)."""
    _check_invertible(den)
    return torch.linalg.solve(den, num.T).T


def _check_invertible(den: torch.Tensor) -> None:
    if not bool(torch.isfinite(den).all()) or float(torch.linalg.cond(den)) > 1e12:
        raise ObliviateError(SINGULAR)


def _grid(pixels: int, latent: tuple[int, int]) -> tuple[int, int]:
    """An attention layer's (h, w) from its pixel count and the latent's (h, w) (the UNet halves both at a level)."""
    h, w = latent
    while h * w > pixels:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != pixels:
        raise ObliviateError(f"MACE: an attention layer has {pixels} pixels, not a downsampling of {h}x{w}")
    return h, w


# --- the method ------------------------------------------------------------------------------------------------------

class MACE(DiffusionMethod):
    name = "MACE"
    Config = MACEConfig
    needs_images = True  # the concept's pictures, drawn by the original pipeline (the reference's generated data)
    default_steps = 50
    backbones = ("sd", "sdxl")
    backbones_why = ("its loss reads a UNet's cross-attention (attn2) maps over the text tokens; joint attention has "
                     "none")

    def concepts(self, task) -> list[str]:
        return [task.concept] + [c for c in dict.fromkeys(self.config.also_erase) if c != task.concept]

    def attach(self, unet) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        self.targets = sorted(n for n, m in unet.named_modules() if is_cross_attention(f"{n}.")
                              and n.endswith((".to_k", ".to_v")) and isinstance(m, torch.nn.Linear))
        if not self.targets:
            raise ObliviateError(f"MACE: the denoiser ({type(unet).__name__}) has no cross-attention (attn2) key/value "
                                 "projections")
        r = self.config.rank
        self.names = [f"{ADAPTER}{i}" for i in range(1 + len(self.config.also_erase))]
        for name in self.names:  # rank r, alpha r: LoRALinearLayer's scale 1
            with warnings.catch_warnings():  # one adapter per concept is meant: peft warns about a second one
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, init_lora_weights="gaussian",
                                                   target_modules=self.targets), unet, adapter_name=name)
        self._activate(unet, self.names[0])

    def trainable(self, name: str, param) -> bool:
        return f".lora_A.{ADAPTER}" in name or f".lora_B.{ADAPTER}" in name

    @staticmethod
    def _activate(unet, name: str | None) -> None:
        for _, module in _lora_layers(unet):
            if name is None:
                module.enable_adapters(False)
            else:
                module.enable_adapters(True)
                module.set_adapter(name)

    def _projections(self, unet) -> list[tuple[str, torch.nn.Parameter]]:
        return [(t, unet.get_submodule(t).get_base_layer().weight) for t in self.targets]

    # ---- setup: the concepts' prompts and pictures, the refinement, the regions --------------------------------------

    def setup(self, ctx: EraseContext, forget: dict, params: list) -> None:
        cfg, task, pipe = self.config, ctx.task, ctx.pipe
        unet = pipe.denoiser
        self._ctx = ctx
        concepts = self.concepts(task)
        self.sets = [forget]
        for concept in concepts[1:]:  # the task's prompts with the concept word swapped; the original draws them
            check_concept_known(pipe.tokenizer, concept)
            texts = [t.replace(task.concept, concept) for t in forget["texts"]]
            seeds = torch.randint(0, 2 ** 31 - 1, (len(texts),), generator=ctx.generator).tolist()
            self._activate(unet, None)
            latents = torch.cat([denoise(pipe, texts[i:i + 64], seeds[i:i + 64], ctx.sample_steps, ctx.guidance,
                                         text_encoders=ctx.text_encoders)[0] for i in range(0, len(texts), 64)])
            self.sets.append({"texts": texts, "context": ctx.encode(texts), "latents": latents})
        self.prompts = [list(dict.fromkeys(s["texts"])) for s in self.sets]  # each concept's distinct prompts
        self.anchors = [[" ".join(p.replace(c, task.anchor).split()) for p in ps]
                        for c, ps in zip(concepts, self.prompts)]

        projections = self._projections(unet)
        self.original = {n: p.detach().double().clone() for n, p in projections}
        keep = self.preserve_texts(task)
        self.preserve = (ctx.encode(keep).states.double().flatten(0, 1) if keep
                         else torch.zeros(0, self.original[self.targets[0]].shape[1], dtype=torch.float64))
        M, logs = self.refinement(ctx)
        self.logs = {**logs, **{f"cfr_{k}": v for k, v in UCE.apply(projections, M).items()}}

        self._activate(unet, None)  # the regions and positions, on the refined model
        for concept, batch in zip(concepts, self.sets):
            batch["mace_positions"] = self.positions(ctx, batch["texts"], concept, cfg.use_pooler)
            batch["mace_region"] = self.region(ctx, batch, concept)
        self._activate(unet, self.names[0])

    def preserve_texts(self, task) -> list[str]:
        texts = [c for c in task.preserve if c not in self.concepts(task)]
        if self.config.preserve_retain_prompts:
            texts += [r.text for r in task.retain_prompts[:self.config.max_retain_prompts]]
        return list(dict.fromkeys(texts))

    def refinement(self, ctx: EraseContext) -> tuple[torch.Tensor, dict]:
        """M (D x D, float64) with W* = W M: every forget prompt's co-existing words onto its anchor prompt's."""
        tok = ctx.pipe.tokenizer
        olds = [p for ps in self.prompts for p in ps]
        news = [a for anchors in self.anchors for a in anchors]
        old_states, new_states = ctx.encode(olds).states.double(), ctx.encode(news).states.double()
        length = old_states.shape[1]
        erase, guide = [], []
        for i, (old, new) in enumerate(zip(olds, news)):  # the texts' own tokens, special ones included, unpadded
            o, n = matching_positions(*(tok(x, truncation=True, max_length=length).input_ids for x in (old, new)),
                                      length)
            erase.append(old_states[i, o])
            guide.append(new_states[i, n])
        C, G = torch.cat(erase), torch.cat(guide)
        P, lam, ps = self.preserve.to(C.device), self.config.lam, self.config.preserve_scale
        _check_invertible(lam * torch.eye(C.shape[1], dtype=C.dtype, device=C.device) + C.T @ C + ps * P.T @ P)
        M = uce_matrix(C, G, P, lam, 1.0, ps)
        return M, {"cfr_prompts": len(olds), "cfr_vectors": len(C), "preserve_vectors": len(self.preserve)}

    @staticmethod
    def positions(ctx: EraseContext, texts: list[str], concept: str, use_pooler: bool) -> torch.Tensor:
        length = ctx.encode(texts[:1]).states.shape[1]
        return concept_positions(ctx.pipe.tokenizer, texts, concept, length,  # every end token, as the reference
                                 "all" if use_pooler else "none").to(ctx.pipe.device)

    @torch.no_grad()
    def region(self, ctx: EraseContext, batch: dict, concept: str) -> torch.Tensor:
        """[N, h, w] 0/1 at the latent's resolution: where the loss empties the attention (module docstring)."""
        latents = batch["latents"]
        if self.config.mask == "none":
            return torch.ones(len(latents), *latents.shape[-2:], device=latents.device)
        words = self.positions(ctx, batch["texts"], concept, use_pooler=False)
        steps = ctx.pipe.scheduler.config.num_train_timesteps
        t = torch.full((len(latents),), int(0.3 * steps), device=latents.device)
        eps = torch.randn(latents.shape, generator=ctx.generator).to(latents.device, latents.dtype)
        x_t = ctx.pipe.backbone.noisy(ctx.pipe, latents, eps, t)
        out = []
        for i in range(0, len(latents), 64):
            with recording(ctx.pipe.denoiser) as maps:
                ctx.predict(ctx.pipe.denoiser, x_t[i:i + 64], t[i:i + 64], batch["context"][i:i + 64])
            out.append(concept_heat(every_map(maps), words[i:i + 64], latents.shape[-2:]))
        heat = torch.cat(out)
        peak = heat.flatten(1).max(1).values.clamp(min=1e-30)[:, None, None]
        return (heat >= self.config.mask_threshold * peak).float()

    # ---- the steps ---------------------------------------------------------------------------------------------------

    def timesteps(self, ctx: EraseContext, n: int) -> torch.Tensor:
        pipe = ctx.pipe
        if not self.config.importance_sampling:
            return pipe.backbone.train_timesteps(pipe, n, ctx.generator)
        weights = importance_weights(pipe.scheduler.config.num_train_timesteps)
        return torch.multinomial(weights, n, replacement=True, generator=ctx.generator).to(pipe.device)

    def losses(self, ctx: EraseContext, unet, forget: dict, retain: dict) -> LossParts:
        total, logs = 0.0, dict(self.logs)
        self.logs = {}  # the refinement's figures go with the first step
        n = len(forget["texts"])
        for i, name in enumerate(self.names):
            batch = forget
            if i:  # a batch of the other concept's own prompts
                rows = torch.randint(0, len(self.sets[i]["texts"]), (n,), generator=ctx.generator)
                batch = {k: self.sets[i][k][rows.to(self.sets[i]["latents"].device)]
                         for k in ("context", "latents", "mace_positions", "mace_region")}
            self._activate(unet, name)
            t = self.timesteps(ctx, n)
            latents = batch["latents"]
            eps = torch.randn(latents.shape, generator=ctx.generator).to(latents.device, latents.dtype)
            x_t = ctx.pipe.backbone.noisy(ctx.pipe, latents, eps, t)
            with recording(unet) as maps:
                ctx.predict(unet, x_t, t, batch["context"])
            loss = attention_loss(every_map(maps), batch["mace_positions"], batch["mace_region"])
            logs[f"attention_{i}"] = float(loss.detach())
            total = total + loss
        return LossParts(forget=total, logs=logs)

    # ---- the fusion --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def detach(self, unet) -> list[str]:
        ctx, cfg = self._ctx, self.config
        contexts = [ctx.encode(ps).states.double().flatten(0, 1) for ps in self.prompts]  # every position
        fused = {}
        for name, weight in self._projections(unet):
            module = unet.get_submodule(name)
            base = weight.double()
            loras = [(base + module.get_delta_weight(a).double(), C.to(base.device))
                     for a, C in zip(self.names, contexts)]
            fused[name] = fuse_weights(base, self.original[name].to(base.device), loras,
                                       self.preserve.to(base.device), cfg.lam, cfg.preserve_scale)
        _unwrap(unet)
        for name, W in fused.items():
            weight = unet.get_submodule(name).weight
            weight.data.copy_(W.to(weight.dtype))
        return [f"{t}.weight" for t in self.targets]


def concept_heat(maps: list[torch.Tensor], words: torch.Tensor, latent: tuple[int, int]) -> torch.Tensor:
    """[B, h, w]: the attention of every pixel to the marked tokens, summed over them, averaged over heads and
    layers, each layer's map resized (bilinear) to the latent's resolution."""
    b = len(words)
    heat = 0.0
    for probs in maps:
        grid = _grid(probs.shape[1], tuple(latent))
        per = (probs.float().view(b, -1, *probs.shape[1:]) * words[:, None, None, :]).sum(-1).mean(1)  # [B, HW]
        heat = heat + F.interpolate(per.view(b, 1, *grid), size=tuple(latent), mode="bilinear",
                                    align_corners=False)[:, 0]
    return heat / max(len(maps), 1)
