"""Guardians of Generation (GoG; Roy, Mishra, Sen Sharma, Karande and Mandal, ICCV Workshops 2025, "Guardians of
Generation: Dynamic Inference-Time Copyright Shielding with Adaptive Guidance for AI Image Generation",
https://arxiv.org/abs/2503.16171): a generation-time guard in three parts.

  1. detection: a prompt is flagged when it names the protected concept (or one of its synonyms), or when its text
     embedding is close to the concept's (cosine >= threshold);
  2. rewriting: a flagged prompt gets a sanitised version c_safe (the concept's words replaced);
  3. adaptive guidance, for flagged prompts only (the paper's formal definition):

         eps = eps(x_t) + lambda (alpha eps(x_t, c_orig) + (1 - alpha) eps(x_t, c_safe) - eps(x_t))

     with lambda the sampling's guidance scale and alpha in [0, 1] the weight of the original prompt (alpha = 1:
     plain classifier-free guidance; 0: the rewritten prompt alone). Unflagged prompts sample exactly as CFG.

Reference code read: the project page (github.com/respailab/gog: the formula, alpha 0.7 on SD 2.1 and SDXL, 0.65
on FLUX, eta 3.0) and the authors' pipeline (github.com/sohambuilds/gogpipeline: detection/detection_manager.py,
Models/CFG.py, config.py). Its detection compares OpenAI `text-embedding-ada-002` embeddings of the prompt and of
each protected concept and synonym at cosine >= 0.8 (SIMILARITY_THRESHOLD), then asks gpt-4o-mini to confirm; its
rewriting asks the same model to sanitise the prompt. Its samplers blend the *text states* rather than the
predictions: states (1 - w) c_orig + w c_safe with w = 1 - alpha, the pooled embedding taken from c_safe, then plain
CFG (`blend = "embedding"` here); the paper writes the blend on the predictions (`blend = "prediction"`, the default).

Where obliviate differs, and why (nothing can be downloaded or called here):
  - the embedding detector uses the pipeline's own first CLIP text encoder (its pooled/projected text embedding), not
    ada-002, and there is no language-model confirmation: expect more false positives at the same threshold; the
    default `detect = "either"` flags a prompt that names the concept or is similar enough to it;
  - the rewrite replaces the concept's words (and synonyms) by `replacement` (default: nothing) instead of an LLM's
    rewrite; `rewrites` takes rewrites made beforehand (an LLM's, a person's), prompt by prompt, and wins where
    given. A prompt flagged by similarity alone (no word to replace, the paper's "indirect anchoring") and absent
    from `rewrites` gets `replacement` as its safe prompt (the empty prompt by default: its guidance is then scaled
    by alpha);
  - the paper also watches intermediate generation steps; obliviate's detection reads the prompt only;
  - a caller that hands the pipeline text conditioning instead of text (an attack's optimised tokens or embeddings)
    cannot be read: those rows are treated as flagged (the guard fails closed), their safe prompt the caller's text
    with the concept's words replaced.
Weights: none change; the run records this config."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from obliviate.guards.t2i import T2IGuard, join_rows

BLENDS = ("prediction", "embedding")
DETECTORS = ("words", "embedding", "either", "always")
SAFE = "<GoG rewritten prompt>"  # the key of the rewritten prompts' predictions among a step's extra predictions


@dataclass
class GuardiansConfig:
    alpha: float = 0.7  # weight of the original prompt (the project page's 0.7 on SD 2.1/SDXL; 0.65 on FLUX)
    blend: str = "prediction"  # prediction: the paper's equation | embedding: the reference code's text-state blend
    detect: str = "either"  # words | embedding | either | always (every prompt is guarded)
    similarity_threshold: float = 0.8  # cosine of the text embeddings (the reference's SIMILARITY_THRESHOLD)
    synonyms: list[str] = field(default_factory=list)  # other names of the concept (the reference's entries have them)
    replacement: str = ""  # what the concept's words become in the rewrite
    rewrites: dict[str, str] = field(default_factory=dict)  # prompt -> its rewrite, made beforehand
    concept: str = ""  # the protected concept; empty: the run's erased concept

    def __post_init__(self):
        value = self.alpha
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"alpha must be a number in [0, 1], got {value!r}")
        value = self.similarity_threshold
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1:
            raise ValueError(f"similarity_threshold must be a cosine similarity in [-1, 1], got {value!r}")
        if self.blend not in BLENDS:
            raise ValueError(f"blend must be one of {', '.join(BLENDS)}, got {self.blend!r}")
        if self.detect not in DETECTORS:
            raise ValueError(f"detect must be one of {', '.join(DETECTORS)}, got {self.detect!r}")
        if not isinstance(self.synonyms, list) or not all(isinstance(s, str) and s.strip() for s in self.synonyms):
            raise ValueError(f"synonyms must be a list of non-empty strings, got {self.synonyms!r}")
        if not isinstance(self.rewrites, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.rewrites.items()):
            raise ValueError(f"rewrites must be a table of prompt = rewritten prompt strings, got {self.rewrites!r}")
        for key in ("replacement", "concept"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"{key} must be a string, got {getattr(self, key)!r}")


class Guardians(T2IGuard):
    name = "GoG"
    Config = GuardiansConfig
    paper = ("Roy et al. 2025, Guardians of Generation: Dynamic Inference-Time Copyright Shielding with Adaptive "
             "Guidance for AI Image Generation, ICCV Workshops, https://arxiv.org/abs/2503.16171")

    def __init__(self, config=None):
        super().__init__(config)
        self.flagged: torch.Tensor | None = None  # per row of the current sampling call
        self.last_flags: list[bool] = []  # the last call's detection, for the caller to read

    def names(self) -> list[str]:
        return [self.target(), *self.config.synonyms]

    def _pattern(self) -> re.Pattern:
        words = sorted(self.names(), key=len, reverse=True)  # the longest name first ("van gogh" before "gogh")
        return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)", re.IGNORECASE)

    def names_concept(self, prompt: str) -> bool:
        return bool(self._pattern().search(prompt))

    def rewrite(self, prompt: str) -> str:
        """The prompt's sanitised version: its rewrite given in `rewrites`, else its concept words replaced, else (no
        word to replace) `replacement` alone."""
        if prompt in self.config.rewrites:
            return self.config.rewrites[prompt]
        if not self.names_concept(prompt):
            return self.config.replacement
        return " ".join(self._pattern().sub(self.config.replacement, prompt).split())

    @torch.no_grad()
    def similarity(self, pipe, prompts: list[str]) -> torch.Tensor:
        """Each prompt's largest cosine with the concept and its synonyms, by the pipeline's first (CLIP) text
        encoder's pooled embedding (its projection where the encoder has one)."""
        names = self.names()
        vectors = _text_embeddings(pipe, list(prompts) + names)
        ours, theirs = F.normalize(vectors[:len(prompts)], dim=-1), F.normalize(vectors[len(prompts):], dim=-1)
        return (ours @ theirs.T).max(dim=1).values

    def detect(self, pipe, prompts: list[str]) -> list[bool]:
        c = self.config
        if c.detect == "always":
            return [True] * len(prompts)
        words = [self.names_concept(p) for p in prompts]
        if c.detect == "words":
            return words
        close = (self.similarity(pipe, prompts) >= c.similarity_threshold).tolist()
        return close if c.detect == "embedding" else [a or b for a, b in zip(words, close)]

    def begin(self, pipe, unet, x, seeds, context, guidance, text_encoder=None, prompts=None):
        from obliviate.models.diffusion import encode

        self.guidance, self.rows, n = float(guidance), x.shape[0], x.shape[0]
        texts = [""] * n if prompts is None else list(prompts)
        flags = [True] * n if prompts is None else self.detect(pipe, texts)  # unreadable conditioning: fail closed
        self.last_flags = flags
        self.flagged = torch.tensor(flags, device=x.device).view(-1, *[1] * (x.dim() - 1))
        if not any(flags) or self.config.alpha == 1:
            self.flagged = None  # nothing to guard: CFG exactly
            return x, context
        safe = encode(pipe, [self.rewrite(t) if f else "" for t, f in zip(texts, flags)], text_encoder)
        if self.config.blend == "prediction":
            return x, join_rows([context, safe])
        cond, uncond = context[:n], context[n:]
        return x, join_rows([_blend_states(cond, safe, flags, self.config.alpha), uncond])

    def extra_prompts(self) -> list[str]:
        return [SAFE] if self.flagged is not None and self.config.blend == "prediction" else []

    def combine(self, step_index, t, x_t, pred_uncond, pred_cond, extra):
        if SAFE not in extra:
            return super().combine(step_index, t, x_t, pred_uncond, pred_cond, extra)
        a = self.config.alpha
        mixed = a * pred_cond + (1 - a) * extra[SAFE]
        guided = pred_uncond + self.guidance * (mixed - pred_uncond)
        return torch.where(self.flagged, guided, pred_uncond + self.guidance * (pred_cond - pred_uncond))


def _blend_states(cond, safe, flags: list[bool], alpha: float):
    """The reference code's blend: the flagged rows' text states alpha c + (1 - alpha) c_safe and their pooled
    embedding c_safe's; the other rows as they are."""
    from obliviate.models.diffusion import Cond

    rows = torch.tensor(flags, device=cond.states.device)
    states = torch.where(rows.view(-1, 1, 1), alpha * cond.states + (1 - alpha) * safe.states, cond.states)
    pooled = None if cond.pooled is None else torch.where(rows.view(-1, 1), safe.pooled, cond.pooled)
    return Cond(states, pooled)


def _text_embeddings(pipe, texts: list[str]) -> torch.Tensor:
    """[N, D] pooled embeddings of `texts` by the pipeline's first text encoder (CLIP in every supported shape)."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(encoder.device)
    out = encoder(ids)
    vectors = getattr(out, "text_embeds", None)
    return (vectors if vectors is not None else out.pooler_output).float()
