"""TRCE: a closed-form edit of the cross-attention keys/values that maps the malicious prompts' [EoT] states to the
safe prompts' (textual semantic erasure), then contrastive fine-tuning of the early denoising steps (trajectory
steering).

Paper: Chen, Guo, Wang, Zhang, Nie and Liu 2025, "TRCE: Towards Reliable Malicious Concept Erasure in Text-to-Image
Diffusion Models", ICCV, https://arxiv.org/abs/2503.07389
Reference code read: ddgoodgood/TRCE (run_trce_stage1.py, run_trce_stage2.py, stage2_data_preparation.py,
src/cfr_utils.py `prepare_k_v` / `closed_form_refinement`, config/stage1/*.yaml, config/stage2/*.yaml); its prior
cache is MACE's (Shilin-LU/MACE src/cache_coco.py: sums over every COCO-2014 caption, all 77 positions).

Stage 1 (in `setup`, before the first step). For each forget prompt m and its safe prompt s (the concept replaced by
the task's anchor: the reference pairs each malicious template prompt with the same template on a safe concept),
rows of m's token states c are mapped to rows of s's token states g: [SoT] -> [SoT], m's first [EoT] -> s's first
[EoT], the last position -> the last position (standing for the padding [EoT]s, weighted by how many there are),
each of the concept's tokens -> s's last position. Every cross-attention key/value projection W (`attn2.to_k`,
`attn2.to_v`, through `backbone.text_projections`) becomes

    W* = argmin  mean_pairs sum_rows w_r ||W* c_r - W g_r||^2 + eta mean_p sum_pos ||W* p - W p||^2 + lam ||W* - W||^2
       = W (lam I + mean sum w g c^T + eta mean sum p p^T) (lam I + mean sum w c c^T + eta mean sum p p^T)^-1

(the paper's Eq.: W' = (sum W e^s e^mT + eta sum W e^k e^kT)(sum e^m e^mT + eta sum e^k e^kT)^-1), i.e. UCE's closed
form (`uce.uce_matrix`) on weighted rows: W* = W M, one D x D matrix for every projection. w_r = the row's weight
(`sot_weight`, `eot_weight`, `pad_weight` x the number of padding positions, `keyword_weight`); the defaults
(0, 1, 0, 0) are the reference's `token_weight_scale: [0,1,0,0]`: only the first [EoT] is remapped (the paper's
finding: [EoT] carries the prompt's whole meaning, and remapping it keeps the rest of the prompt's context). p are
the preserved texts' states at every position: the empty prompt, the task's `preserve` concepts and (by default) its
retain prompts, obliviate's stand-in for the reference's COCO prior.

Stage 2 (the loop's steps). The frozen original samples each forget prompt (DDIM at `trajectory_guidance`) from a
fresh seed and stops after k steps, k uniform in 1..K, K = int(early_fraction x steps) + 1 (capped at steps - 1): the
early, deterministic part of the trajectory that fixes what the picture shows. With the original's predictions e_m
(forget prompt), e_s (safe prompt), e_u (unconditional) at that x_t,

    f_safe = e_s + g (e_s - e_u),   f_unsafe = e_m + g (e_m - e_u)          (g = steer_guidance; the paper's beta = g + 1)
    L_erase = hinge(eps_theta(x_t, m)) [+ hinge(eps_theta(x_t, "")), averaged, with steer_unconditional]
    hinge(e) = max(0, scale (||e - f_safe||^2 - ||e - f_unsafe||^2 + margin))     (per picture, mean over latents)

and the unconditional predictions on the original's unconditional trajectories (stopped at a step uniform in
1..steps-1) are kept at the stage-1 model's:

    L = L_erase + reg_scale ||eps_theta(x_u, "") - eps_stage1(x_u, "")||^2

Only the self-attention (`attn1`) and the cross-attention queries (`attn2.to_q`) are trained (the paper: the
"visual" layers; the keys/values edited in stage 1 stay as stage 1 left them). The stage-1 model's predictions come
from the frozen original with its keys/values swapped for the edited ones for the call (no third UNet in memory).

Defaults from the reference (config/stage1/stage1_sexual_default.yaml, config/stage2/stage2_sexual_default.yaml):
token weights [0, 1, 0, 0]; steer_guidance 15, margin 0.01, scale 1 (`beta`), reg_scale 100 (`preserve_scale`),
reg_batch_size 4, early steps 0..25 of 50 (`max_early_timestep`), trajectories sampled at guidance 3
(stage2_data_preparation.py), 3 epochs over 20 concepts x 5 pictures = 300 steps at batch 1 (`default_steps`),
AdamW lr 1e-6, weight decay 0.01 (set `train.lr` / `train.weight_decay`: the loop owns the optimiser).

Where obliviate differs, and why:
- Preservation (`preserve_scale`, the paper's eta): the reference adds MACE's COCO cache (sums over ~617k captions at
  all positions) with weight preserve_scale^2 / 3e4 (it multiplies by `preserve_scale` twice, in run_trce_stage1.py
  and in `closed_form_refinement`): 0.01^2 x 616,767 / 3e4 = 0.0021 per caption's sum, against the erase terms'
  mean over pairs. obliviate has no COCO cache for an arbitrary pipeline: it preserves the empty prompt, the
  task's `preserve` concepts and retain prompts, as a mean over texts with eta = 0.002 (the same weight per text).
- `lam` (0.01): a ridge the paper does not have (the reference passes lamb=0). Its COCO prior spans every direction
  of the text states; a few dozen preserved texts do not, and without it the inverse is singular on directions no
  text reaches. It keeps W there and is negligible elsewhere (text states have squared norms of tens to hundreds).
- Token positions come from the tokenizer (the reference counts words: `len(sentence.split()) + 1` is the [EoT]
  only when each word is one token). Every token of a multi-token concept is a keyword row (the reference's weight
  loop stops at the fourth row, so it uses only the first); both only matter with `keyword_weight` > 0.
- Trajectories are sampled anew each step from fresh seeds (the reference caches 5 per concept and 2,000
  unconditional ones beforehand), one stop per batch, and x_t is predicted at its own timestep (the reference draws t
  in a window one DDIM step above the latent's). Its regulariser starts its sum at 0.01 (a constant, no gradient):
  left out.
- The erase term uses the task's forget prompts and their anchor prompts; the reference builds 20 synonyms x 15
  templates with an LLM. The concept's bare word is not erased on its own (the reference's prompts are all templates).
- SDXL runs as SD 1.x (its two CLIP encoders' states side by side; the rows are the first tokenizer's positions, which
  the second shares). The DiT shapes (SD3, FLUX) are refused (`backbones`): the reference is SD 1.4 only ("we will
  release the implementation of TRCE on newer model in the future", its README); FLUX's token states are T5's, with
  no [SoT]/[EoT] rows, and a joint-attention transformer has no attn1 / attn2.to_q split for stage 2. A port would
  edit `text_input_projections` (as docs/t2i_dit.md does for UCE) and train the image stream's attention: a choice
  the authors have not made.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from obliviate.errors import ObliviateError
from obliviate.methods.common import check_number
from obliviate.methods.t2i.base import DiffusionMethod, EraseContext, LossParts, is_cross_attention
from obliviate.methods.t2i.uce import UCE, uce_matrix
from obliviate.models.diffusion import Cond, denoise


@dataclass
class TRCEConfig:
    # stage 1: the closed-form edit
    sot_weight: float = 0.0  # weight of the [SoT] row (the reference's token_weight_scale[0])
    eot_weight: float = 1.0  # the first [EoT] row
    pad_weight: float = 0.0  # the last position, times the number of padding positions
    keyword_weight: float = 0.0  # each of the concept's tokens, mapped to the safe prompt's last position
    preserve_scale: float = 0.002  # eta: weight of the preserved texts (mean over texts of the sum over positions)
    lam: float = 0.01  # ridge towards the original W (obliviate's; the reference has none)
    preserve_retain_prompts: bool = True  # preserve the task's retain prompts too (at most max_retain_prompts)
    max_retain_prompts: int = 256
    # stage 2: trajectory steering
    steer_guidance: float = 15.0  # g in f = e_c + g (e_c - e_u) (the reference's `guidance`)
    margin: float = 0.01  # the hinge's margin
    scale: float = 1.0  # the hinge's scale (the reference's `beta`)
    steer_unconditional: bool = True  # the unconditional prediction on the forget trajectory is steered too
    reg_scale: float = 100.0  # weight of keeping the unconditional predictions (the reference's `preserve_scale`)
    reg_batch_size: int = 4  # unconditional trajectories per step
    early_fraction: float = 0.5  # forget trajectories stop within the first early_fraction of the sampling steps
    trajectory_guidance: float = 3.0  # guidance the original samples the forget trajectories with

    def __post_init__(self):
        for key in ("sot_weight", "eot_weight", "pad_weight", "keyword_weight", "preserve_scale", "steer_guidance",
                    "margin", "reg_scale", "trajectory_guidance"):
            check_number("TRCE", key, getattr(self, key), min=0)
        if self.sot_weight + self.eot_weight + self.pad_weight + self.keyword_weight <= 0:
            raise ObliviateError("TRCE: at least one of sot_weight, eot_weight, pad_weight, keyword_weight must be > 0")
        check_number("TRCE", "lam", self.lam, positive=True)
        check_number("TRCE", "scale", self.scale, positive=True)
        check_number("TRCE", "early_fraction", self.early_fraction, positive=True)
        if self.early_fraction > 1:
            raise ObliviateError(f"TRCE: early_fraction must be <= 1, got {self.early_fraction!r}")
        for key in ("max_retain_prompts", "reg_batch_size"):
            check_number("TRCE", key, getattr(self, key), min=1)
            if int(getattr(self, key)) != getattr(self, key):
                raise ObliviateError(f"TRCE: {key} must be a whole number, got {getattr(self, key)!r}")
        for key in ("preserve_retain_prompts", "steer_unconditional"):
            if not isinstance(getattr(self, key), bool):
                raise ObliviateError(f"TRCE: {key} must be true or false, got {getattr(self, key)!r}")


def hinge(pred: torch.Tensor, safe: torch.Tensor, unsafe: torch.Tensor, scale: float, margin: float) -> torch.Tensor:
    """Per picture: max(0, scale (||pred - safe||^2 - ||pred - unsafe||^2 + margin)), the squares as means."""
    near = F.mse_loss(pred.float(), safe.float(), reduction="none").flatten(1).mean(1)
    far = F.mse_loss(pred.float(), unsafe.float(), reduction="none").flatten(1).mean(1)
    return (scale * (near - far + margin)).clamp(min=0)


def last_early_step(steps: int, fraction: float) -> int:
    """K: forget trajectories stop after 1..K of the `steps` DDIM steps (the reference: 1..26 of 50 at 0.5)."""
    return max(1, min(steps - 1, int(fraction * steps) + 1))


class TRCE(DiffusionMethod):
    name = "TRCE"
    Config = TRCEConfig
    needs_frozen = True  # stage 2's targets: the original's predictions
    needs_images = False  # its x_t come from the original's own trajectories
    default_steps = 300
    backbones = ("sd", "sdxl")
    backbones_why = ("its stage 1 remaps a CLIP text encoder's [EoT] states in the UNet's cross-attention and its "
                     "stage 2 trains the UNet's attn1 and attn2 queries (the authors' code is SD 1.4's); a DiT has "
                     "neither")

    def __init__(self, config=None):
        super().__init__(config)
        self.edited: list[tuple[str, torch.nn.Parameter]] = []  # stage 1's projections (parameter name, weight)
        self.stage1_logs: dict = {}

    def trainable(self, name: str, param) -> bool:  # stage 2: the "visual" layers
        return ".attn1." in name or (is_cross_attention(name) and ".to_q." in name)

    # ---- stage 1 ----------------------------------------------------------------------------------------------------

    def pairs(self, task) -> list[tuple[str, str]]:
        """(malicious prompt, safe prompt): each forget prompt and itself with the concept replaced by the anchor."""
        return list(dict.fromkeys((p, task.anchor_prompt(p)) for p in task.forget_prompts))

    def preserve_texts(self, task) -> list[str]:
        texts = [""] + [c for c in task.preserve if c != task.concept]
        if self.config.preserve_retain_prompts:
            texts += [r.text for r in task.retain_prompts[:int(self.config.max_retain_prompts)]]
        return list(dict.fromkeys(texts))

    def rows(self, ctx: EraseContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The erase rows (c, g, w): malicious-prompt states [N, D], the safe-prompt states they map to [N, D] (both
        float64) and their weights [N], each pair's weights divided by the number of pairs (a mean over pairs)."""
        c = self.config
        task, tok = ctx.task, ctx.pipe.tokenizer
        pairs = self.pairs(task)
        olds, news = [o for o, _ in pairs], [n for _, n in pairs]
        old_states, new_states = ctx.encode(olds).states.double(), ctx.encode(news).states.double()
        L = old_states.shape[1]

        def ids(text):
            return tok(text, truncation=True, max_length=tok.model_max_length).input_ids

        keyword = tok(task.concept, add_special_tokens=False).input_ids
        C, G, W = [], [], []
        for i, (old, new) in enumerate(pairs):
            old_ids, new_ids = ids(old), ids(new)
            rows = [(0, 0, c.sot_weight), (len(old_ids) - 1, len(new_ids) - 1, c.eot_weight),
                    (L - 1, L - 1, c.pad_weight * (L - len(old_ids)))]
            if c.keyword_weight > 0:
                at = next((j for j in range(len(old_ids) - len(keyword) + 1)
                           if old_ids[j:j + len(keyword)] == keyword), None)
                if at is None:
                    raise ObliviateError(f"TRCE: the concept's tokens are not found in the tokens of forget prompt "
                                         f"{old!r} (keyword_weight needs them)")
                rows += [(at + j, L - 1, c.keyword_weight) for j in range(len(keyword))]
            for o, n, w in rows:
                if w > 0:
                    C.append(old_states[i, o])
                    G.append(new_states[i, n])
                    W.append(w / len(pairs))
        return torch.stack(C), torch.stack(G), torch.tensor(W, dtype=torch.float64, device=old_states.device)

    def edit_matrix(self, ctx: EraseContext) -> tuple[torch.Tensor, dict]:
        """M (D x D, float64) with W* = W M for every edited projection, and counts to log."""
        C, G, w = self.rows(ctx)
        keep = self.preserve_texts(ctx.task)
        P = ctx.encode(keep).states.double()
        P = P.reshape(-1, P.shape[-1]) / len(keep) ** 0.5  # a mean over texts of the sum over positions
        root = w.sqrt()[:, None]
        M = uce_matrix(C * root, G * root, P, self.config.lam, 1.0, self.config.preserve_scale)
        return M, {"erase_pairs": len(self.pairs(ctx.task)), "erase_rows": len(C), "preserve_texts": len(keep)}

    def setup(self, ctx: EraseContext, forget: dict, params: list) -> None:
        if ctx.sample_steps < 2:
            raise ObliviateError(f"TRCE: its trajectories need t2i.sample_steps >= 2, got {ctx.sample_steps}")
        unet = ctx.pipe.denoiser
        M, logs = self.edit_matrix(ctx)
        projections = ctx.pipe.backbone.text_projections(unet)
        self.edited = [(f"{n}.weight", m.weight) for n, m in projections]
        for name, p in self.edited:
            if p.dim() != 2 or p.shape[1] != M.shape[0]:
                raise ObliviateError(f"TRCE: {name} has shape {tuple(p.shape)}, but the text encoder's states have "
                                     f"{M.shape[0]} features")
        if not self.edited:
            raise ObliviateError("TRCE: the denoiser has no cross-attention key/value projections to edit")
        with torch.no_grad():
            self.stage1_logs = {**logs, **UCE.apply(self.edited, M)}

    def detach(self, unet) -> list[str]:
        """The run's changed tensors: stage 2's trained ones and stage 1's edited keys/values."""
        trained = [n for n, p in unet.named_parameters() if self.trainable(n, p)]
        return trained + [n for n, _ in self.edited if n not in trained]

    # ---- stage 2 ----------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def stage1(self, frozen):
        """The frozen original as the stage-1 model for the block: its keys/values swapped for the edited ones (the
        same storage, no copy; stage 2 does not train them)."""
        own = dict(frozen.named_parameters())
        saved = [(own[n], own[n].data) for n, _ in self.edited]
        try:
            for (target, _), (_, edited) in zip(saved, self.edited):
                target.data = edited.data
            yield frozen
        finally:
            for target, data in saved:
                target.data = data

    def trajectory(self, ctx: EraseContext, texts: list[str], last: int, guidance: float,
                   context: Cond | None = None):
        """The original's DDIM trajectory for each text from a fresh seed, stopped after k steps, k uniform in
        1..last; the stop then the seeds drawn from the loop's generator (as `partial_sample`). Returns (x_t, t, k)."""
        stop = int(torch.randint(1, last + 1, (1,), generator=ctx.generator))
        seeds = torch.randint(0, 2 ** 31 - 1, (len(texts),), generator=ctx.generator).tolist()
        x_t, t = denoise(ctx.pipe, texts, seeds, ctx.sample_steps, guidance, denoiser=ctx.frozen, stop_after=stop,
                         text_encoders=ctx.text_encoders, context=context)
        return x_t, t, stop

    def losses(self, ctx: EraseContext, unet, forget: dict, retain: dict) -> LossParts:
        c = self.config
        texts, cond = forget["texts"], forget["context"]
        n = len(texts)
        early = last_early_step(ctx.sample_steps, c.early_fraction)
        x_t, t, stop = self.trajectory(ctx, texts, early, c.trajectory_guidance)
        safe = ctx.encode([ctx.task.anchor_prompt(p) for p in texts])
        empty = ctx.unconditional(n)
        with torch.no_grad():  # the original's three predictions: one denoiser call
            e_m, e_s, e_u = ctx.predict(ctx.frozen, torch.cat([x_t] * 3), t, Cond.cat([cond, safe, empty])).chunk(3)
            f_safe = e_s + c.steer_guidance * (e_s - e_u)
            f_unsafe = e_m + c.steer_guidance * (e_m - e_u)
        if c.steer_unconditional:
            pred_m, pred_u = ctx.predict(unet, torch.cat([x_t, x_t]), t, Cond.cat([cond, empty])).chunk(2)
            erase = (hinge(pred_m, f_safe, f_unsafe, c.scale, c.margin).mean()
                     + hinge(pred_u, f_safe, f_unsafe, c.scale, c.margin).mean()) / 2
        else:
            erase = hinge(ctx.predict(unet, x_t, t, cond), f_safe, f_unsafe, c.scale, c.margin).mean()

        k = int(c.reg_batch_size)
        empty_k = ctx.unconditional(k)
        x_u, t_u, stop_u = self.trajectory(ctx, [""] * k, ctx.sample_steps - 1, 1.0, context=empty_k)
        with torch.no_grad(), self.stage1(ctx.frozen) as stage1:
            keep = ctx.predict(stage1, x_u, t_u, empty_k)
        reg = F.mse_loss(ctx.predict(unet, x_u, t_u, empty_k).float(), keep.float())
        logs, self.stage1_logs = {**self.stage1_logs}, {}  # stage 1's counts go with the first step's logs
        logs.update(erase=float(erase.detach()), reg=float(reg.detach()), steer_stop=stop, t=float(t),
                    reg_stop=stop_u, t_reg=float(t_u))
        return LossParts(forget=erase, retain=c.reg_scale * reg, logs=logs)
