"""Unified Concept Editing (UCE): a closed-form edit of the cross-attention key and value projections.

Paper: Gandikota et al. 2024, "Unified Concept Editing in Diffusion Models", WACV, https://arxiv.org/abs/2308.14761
Reference code: rohitgandikota/unified-concept-editing, train-scripts/train_erase.py (`edit_model`).

Every cross-attention projection W (`attn2.to_k`, `attn2.to_v`: text states -> keys/values) is replaced by the
minimiser of  lam ||W* - W||^2 + erase_scale sum_e ||W* c_e - v*_e||^2 + preserve_scale sum_p ||W* c_p - W c_p||^2:

    W* = (lam W + erase_scale sum_e v*_e c_e^T + preserve_scale sum_p (W c_p) c_p^T)
         (lam I + erase_scale sum_e c_e c_e^T + preserve_scale sum_p c_p c_p^T)^-1,      v*_e = W c_guide(e)

c are per-token text-encoder states. As the reference code does, an erase text contributes the positions from its
last content token to the end of the padded sequence (the states that carry the whole prompt in a causal text
encoder), each aligned with the guide text's positions from the guide's own last content token (an empty guide starts
at its start token), truncated to the shorter. A preserved text contributes all its positions.

What is erased: the bare concept towards the anchor ("" when the task has none), as the reference code does by
default (`--add_prompts False`), plus every forget prompt towards itself with the concept replaced by the anchor
(`erase_forget_prompts`). What is kept: the empty prompt (the unconditional branch of guidance) and the task's
`preserve` concepts, optionally the retain prompts.

Since v*_e = W c_guide(e), the numerator is W (lam I + erase_scale sum_e g_e c_e^T + preserve_scale sum_p c_p c_p^T):
so W* = W M with one D x D matrix M shared by every edited projection, computed once in float64.

Defaults from the reference code: lam 0.5 (`lamb=0.5` in its `__main__`), erase_scale 1 (`--erase_scale`),
technique "replace" (v* = W c_guide), keys and values both edited (`with_to_k=True`), the empty prompt always among
the preserved texts (`retain_texts = [''] + preserve_concepts`), and preserve_scale None meaning
max(0.1, 1 / number of preserved texts) (the code's rule when `--preserve_scale` is not given).

SD3/FLUX (no cross-attention: docs/t2i_dit.md): as the UCE authors' FLUX port (trainscripts/uce_flux_edit.py in the
same repository), the edited maps are those whose input is the conditioning itself, `context_embedder` (reads the
token states: c is the text's last content T5 token's state) and `time_text_embed.text_embedder.linear_1` (reads the
pooled CLIP vector), each with its own M from the same closed form, one vector per text (the port's choice); v* =
W c_guide ("replace"). SD3 gets the same rule by analogy (no author release). Where obliviate differs from the port:
the erase pairs and preserved texts are this file's (the port preserves only the given concepts, with
preserve_scale 1; obliviate also keeps the empty prompt, with the preserve_scale rule above).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from obliviate.methods.common import check_number
from obliviate.methods.t2i.base import DiffusionMethod, EraseContext, is_cross_attention
from obliviate.models.dit import TEXT_INPUT_PROJECTIONS


def uce_matrix(erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor, lam: float, erase_scale: float,
               preserve_scale: float) -> torch.Tensor:
    """M (D x D, float64) such that W* = W M for any W: rows of `erase` are the c_e, the same rows of `guide` their
    c_guide(e), rows of `preserve` the c_p (each [N, D]; `preserve` may have no rows)."""
    C, G, P = (x.double().reshape(-1, x.shape[-1]) for x in (erase, guide, preserve))
    eye = torch.eye(C.shape[1], dtype=torch.float64, device=C.device)
    PtP = P.T @ P
    A = lam * eye + erase_scale * (G.T @ C) + preserve_scale * PtP  # the numerator is W A
    B = lam * eye + erase_scale * (C.T @ C) + preserve_scale * PtP  # symmetric positive definite (lam > 0)
    return torch.linalg.solve(B, A.T).T  # A B^-1 (B = B^T), without forming the inverse


@dataclass
class UCEConfig:
    lam: float = 0.5  # weight of staying close to the original W (`lamb` in the reference code)
    erase_scale: float = 1.0  # weight of the erase terms
    preserve_scale: float | None = None  # weight of the preserve terms; None: max(0.1, 1 / number of preserved texts)
    with_to_k: bool = True  # edit the key projections too (the values always)
    erase_forget_prompts: bool = True  # erase the task's forget prompts as well as the bare concept
    preserve_retain_prompts: bool = False  # also preserve the task's retain prompts (at most max_retain_prompts)
    max_retain_prompts: int = 64  # cap on the retain prompts preserved

    method = "UCE"  # the name config errors give (a class attribute, not a field: RECE's config extends this one)

    def __post_init__(self):
        m = self.method
        check_number(m, "lam", self.lam, positive=True)
        check_number(m, "erase_scale", self.erase_scale, min=0)
        if self.preserve_scale is not None:
            check_number(m, "preserve_scale", self.preserve_scale, min=0)
        check_number(m, "max_retain_prompts", self.max_retain_prompts, min=1)
        if int(self.max_retain_prompts) != self.max_retain_prompts:
            from obliviate.errors import ObliviateError
            raise ObliviateError(f"{m}: max_retain_prompts must be a whole number, got {self.max_retain_prompts!r}")
        for key in ("with_to_k", "erase_forget_prompts", "preserve_retain_prompts"):
            if not isinstance(getattr(self, key), bool):
                from obliviate.errors import ObliviateError
                raise ObliviateError(f"{m}: {key} must be true or false, got {getattr(self, key)!r}")


class UCE(DiffusionMethod):
    name = "UCE"
    Config = UCEConfig
    closed_form = True
    needs_images = False
    needs_frozen = False

    def trainable(self, name: str, param: torch.nn.Parameter) -> bool:
        if name.removesuffix(".weight") in TEXT_INPUT_PROJECTIONS:  # SD3/FLUX: the maps that read Cond itself
            return True
        if not is_cross_attention(name) or not name.endswith(".weight"):
            return False
        return ".to_v." in name or (self.config.with_to_k and ".to_k." in name)

    # ---- the texts and their token states -------------------------------------------------------------------------

    def erase_pairs(self, task) -> list[tuple[str, str]]:
        """(text to erase, its guide): the bare concept towards the anchor, and each forget prompt towards itself with
        the concept replaced by the anchor. Duplicates dropped, order kept."""
        pairs = [(task.concept, task.anchor)]
        if self.config.erase_forget_prompts:
            pairs += [(p, task.anchor_prompt(p)) for p in task.forget_prompts]
        return list(dict.fromkeys(pairs))

    def preserve_texts(self, task) -> list[str]:
        texts = [""] + [c for c in task.preserve if c != task.concept]
        if self.config.preserve_retain_prompts:
            texts += [r.text for r in task.retain_prompts[:int(self.config.max_retain_prompts)]]
        return list(dict.fromkeys(texts))

    def _states(self, ctx: EraseContext, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """Token states [N, L, D] in float64 and, per text, the index of its last content token (0, the start token,
        for an empty text)."""
        tok = ctx.pipe.tokenizer
        lengths = [len(tok(t, truncation=True, max_length=tok.model_max_length).input_ids) for t in texts]
        return ctx.encode(texts).states.double(), [max(n - 2, 0) for n in lengths]

    def edit_matrix(self, ctx: EraseContext) -> tuple[torch.Tensor, dict]:
        """M (D x D, float64) with W* = W M for every edited projection, and counts to log."""
        c = self.config
        task = ctx.task
        pairs = self.erase_pairs(task)
        olds, news = [o for o, _ in pairs], [n for _, n in pairs]
        old_states, old_last = self._states(ctx, olds)
        new_states, new_last = self._states(ctx, news)
        L, D = old_states.shape[1], old_states.shape[2]
        erase_c, guide_c = [], []
        for i in range(len(pairs)):
            n = L - max(old_last[i], new_last[i])  # positions both texts have from their last content token on
            erase_c.append(old_states[i, old_last[i]:old_last[i] + n])
            guide_c.append(new_states[i, new_last[i]:new_last[i] + n])
        C, G = torch.cat(erase_c), torch.cat(guide_c)  # [Ne, D] each, row e: c_e and c_guide(e)
        keep = self.preserve_texts(task)
        P = ctx.encode(keep).states.double().reshape(-1, D)  # [Np, D]: every position of every preserved text
        ps = c.preserve_scale if c.preserve_scale is not None else max(0.1, 1 / len(keep))
        M = uce_matrix(C, G, P, c.lam, c.erase_scale, ps)
        counts = {"erase_texts": len(pairs), "erase_vectors": len(C), "preserve_texts": len(keep),
                  "preserve_vectors": len(P), "preserve_scale": float(ps)}
        return M, counts

    def edited(self, unet, features: int) -> list[tuple[str, torch.nn.Parameter]]:
        """The projections the edit changes, every one checked to read `features` text features before any is
        changed."""
        from obliviate.errors import ObliviateError

        params = [(name, p) for name, p in unet.named_parameters() if self.trainable(name, p)]
        for name, p in params:
            if p.dim() != 2 or p.shape[1] != features:
                raise ObliviateError(f"{self.name}: {name} has shape {tuple(p.shape)}, but the text encoder's states "
                                     f"have {features} features (a denoiser that projects its text states first?)")
        if not params:
            raise ObliviateError(f"{self.name}: the UNet has no cross-attention (attn2) key/value projections to edit")
        return params

    # ---- SD3/FLUX: the maps whose input is the conditioning itself --------------------------------------------------
    def _input_vectors(self, ctx: EraseContext, texts: list[str]) -> dict[str, torch.Tensor]:
        """One float64 vector per text for each `Cond` field a text-input projection reads: `states` at the text's
        last content token (FLUX: the last T5 token before </s>, the reference's attention_mask.sum() - 2; an empty
        text: the last position, the reference's index -1), `pooled` the pooled text embedding."""
        cond = ctx.encode(texts)
        positions = ctx.pipe.backbone.content_positions(ctx.pipe, texts)
        last = torch.tensor([p[-1] if p else cond.states.shape[1] - 1 for p in positions])
        return {"states": cond.states[torch.arange(len(texts)), last.to(cond.device)].double(),
                "pooled": cond.pooled.double()}

    def input_edits(self, ctx: EraseContext, unet) -> tuple[list[tuple[str, torch.nn.Parameter, torch.Tensor,
                                                                          dict]], dict]:
        """SD3/FLUX (`backbone.text_input_projections`): per projection, (field, its weight, M with W* = W M, the
        vectors {"erase", "guide", "keep"} of its input), UCE's closed form on that projection's own input space;
        and counts to log. The erase pairs and preserved texts are UCE's, one vector per text."""
        c, task = self.config, ctx.task
        pairs, keep = self.erase_pairs(ctx.task), self.preserve_texts(task)
        n = len(pairs)
        vectors = self._input_vectors(ctx, [o for o, _ in pairs] + [g for _, g in pairs] + keep)
        ps = c.preserve_scale if c.preserve_scale is not None else max(0.1, 1 / len(keep))
        edits = []
        for _, module, field in ctx.pipe.backbone.text_input_projections(unet):
            V = vectors[field]
            parts = {"erase": V[:n], "guide": V[n:2 * n], "keep": V[2 * n:]}
            edits.append((field, module.weight, uce_matrix(parts["erase"], parts["guide"], parts["keep"], c.lam,
                                                           c.erase_scale, ps), parts))
        counts = {"erase_texts": n, "erase_vectors": n, "preserve_texts": len(keep), "preserve_vectors": len(keep),
                  "preserve_scale": float(ps)}
        return edits, counts

    @staticmethod
    def apply(params: list[tuple[str, torch.nn.Parameter]], M: torch.Tensor) -> dict:
        """W <- W M for every projection, in float64 and stored in the weight's dtype; the relative changes."""
        return UCE.apply_each([(p, M) for _, p in params])

    @staticmethod
    def apply_each(edits: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> dict:
        """W <- W M for each (weight, M), as `apply`."""
        rel = []
        for p, M in edits:
            W = p.detach().double()
            new = W @ M.to(W.device)
            rel.append(float((new - W).norm() / W.norm().clamp(min=1e-30)))
            p.data.copy_(new.to(p.dtype))
        return {"edited_matrices": len(rel), "mean_relative_change": sum(rel) / len(rel),
                "max_relative_change": max(rel)}

    def edit(self, ctx: EraseContext, unet) -> dict:
        if hasattr(ctx.pipe.backbone, "text_input_projections"):  # SD3/FLUX: no cross-attention (module docstring)
            edits, logs = self.input_edits(ctx, unet)
            return {**logs, **self.apply_each([(p, M) for _, p, M, _ in edits])}
        M, logs = self.edit_matrix(ctx)
        return {**logs, **self.apply(self.edited(unet, M.shape[0]), M)}
