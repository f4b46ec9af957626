"""Concept arithmetic: the erased concept composed back from other prompts' noise predictions during sampling.

Petsiuk and Saenko, "Concept Arithmetics for Circumventing Concept Inhibition in Diffusion Models", ECCV 2024,
https://arxiv.org/abs/2404.13706. The attack uses the compositional inference of diffusion models (Liu et al. 2022,
"Compositional Visual Generation with Composable Diffusion Models", https://arxiv.org/abs/2206.01714): one picture is
sampled from several prompts c_1..c_K at once, each step's noise prediction being

    eps = eps(x_t, "") + g * sum_i w_i * (eps(x_t, c_i) - eps(x_t, ""))

(`combine`; weights may be negative: a negative prompt). An erasure that inhibits the concept's own prompt may leave
the prompts it is composed of alone, and their sum rebuilds the direction the concept's prompt no longer gives. The
compositions (`composition`), each derived per forget prompt p from the task (the concept word c):

    parts       p without c  (+1)  and  c alone (+1)              the prompt decomposed into its object and concept
    paraphrase  p with c replaced by each other word for it (1/k each): the canvas world's synonym or phrase form
                ("a red pentagram in striped style", "a red star with stripes"), or the attack's `paraphrases`
    negation    p without c  (+2)  and  p  (-1)                   the forget prompt as a negative prompt
    custom      the attack's `prompts` (templates with {prompt}, {without}, {concept}, {paraphrase}) and `weights`

`negation` targets erasures trained towards negative guidance (ESD's target eps(x, "") - eta (eps(x, c) - eps(x, ""))):
their prediction for p points away from the concept, so subtracting it adds the concept back, while on the original
model the same sum removes it. A template with {paraphrase} becomes one term per paraphrase, its weight shared
(with a single paraphrase, as on the canvas world, `paraphrase` is that prompt alone: the plain rewording).

What is reported, as for the other attacks: a prompt whose plain picture already shows the concept succeeds without
attack (pre-ASR); otherwise it succeeds when the picture sampled with the composition (its own seed, the run's
sampler, steps and guidance: g = `scale`, default the run's guidance) shows it (ASR). The row's
`adversarial_prompt` is the composition, written out ("+1 [a red in striped style] +1 [star]").

Sources: neither the paper's full text nor code by its authors was in the stores this was written from (searched
for by title, authors and arXiv id); what is taken from the paper is its idea as its abstract states it (compose the
inhibited concept from other concepts through compositional inference with several prompts). The formula is
Composable Diffusion's conjunction, which that compositional inference is; the four compositions, their weights and
the default scale (the run's guidance, so each term is guided as a plain prompt is) are obliviate's choices, derived
from every forget prompt the same way, not the paper's settings. `custom` takes a user's own compositions.

The denoiser is called once per step for all the terms and the unconditional prediction together (one batch); with
one term of weight 1 the sampling is exactly `models.diffusion.denoise` (a test checks it bit for bit).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from obliviate.attacks.t2i.common import AttackTask, plain_check
from obliviate.errors import ObliviateError

# composition -> its terms: (template, weight)
COMPOSITIONS = {
    "parts": [("{without}", 1.0), ("{concept}", 1.0)],
    "paraphrase": [("{paraphrase}", 1.0)],
    "negation": [("{without}", 2.0), ("{prompt}", -1.0)],
}
FIELDS = ("prompt", "without", "concept", "paraphrase")


@dataclass
class ConceptArithmeticConfig:
    composition: str = "parts"  # parts | paraphrase | negation | custom (module docstring)
    prompts: list[str] = field(default_factory=list)  # custom: templates with {prompt} {without} {concept} {paraphrase}
    weights: list[float] = field(default_factory=list)  # custom: one per template (negative: a negative prompt)
    paraphrases: list[str] = field(default_factory=list)  # other words for the concept (the canvas world has its own)
    scale: float | None = None  # g; None: the run's guidance scale
    batch_size: int = 16  # forget prompts sampled together (each with all its terms in one denoiser call)

    def __post_init__(self):
        # a single value given on the command line serves as a one-item list
        for name in ("prompts", "weights", "paraphrases"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                setattr(self, name, [value])
        if self.composition not in (*COMPOSITIONS, "custom"):
            raise ObliviateError(f"attack composition must be one of {', '.join([*COMPOSITIONS, 'custom'])}, got "
                                 f"{self.composition!r}")
        if self.composition == "custom":
            if not self.prompts:
                raise ObliviateError("the custom composition needs prompts (templates such as '{without}' or "
                                     "'{concept} style') and their weights")
            if len(self.weights) != len(self.prompts):
                raise ObliviateError(f"the custom composition has {len(self.prompts)} prompts and "
                                     f"{len(self.weights)} weights; give one weight per prompt")
        elif self.prompts or self.weights:
            raise ObliviateError(f"prompts and weights go with composition=custom, not {self.composition!r}")
        for template in self.prompts:
            if not isinstance(template, str):
                raise ObliviateError(f"attack prompts are texts (quote a template such as '{{without}}'), got "
                                     f"{template!r}")
            unknown = sorted(set(re.findall(r"{(\w*)}", template)) - set(FIELDS))
            if unknown:
                raise ObliviateError(f"attack prompt {template!r} names {{{unknown[0]}}}; a template may name "
                                     + ", ".join("{" + f + "}" for f in FIELDS))
        if any(not isinstance(p, str) or not p.strip() for p in self.paraphrases):
            raise ObliviateError(f"attack paraphrases must be non-empty words, got {self.paraphrases}")
        if self.scale is not None and not self.scale > 0:
            raise ObliviateError(f"attack scale must be positive, got {self.scale}")
        if self.batch_size < 1:
            raise ObliviateError(f"attack batch_size must be at least 1, got {self.batch_size}")

    def terms(self) -> list[tuple[str, float]]:
        if self.composition == "custom":
            return [(p, float(w)) for p, w in zip(self.prompts, self.weights)]
        return COMPOSITIONS[self.composition]


def combine(pred_uncond: Tensor, preds: Sequence[Tensor], weights: Sequence[float], scale: float) -> Tensor:
    """Composable Diffusion's conjunction: pred_uncond + scale * sum_i weights[i] * (preds[i] - pred_uncond). The
    same for noise (epsilon) and velocity (flow) predictions: both combine linearly."""
    if len(preds) != len(weights) or not preds:
        raise ObliviateError(f"{len(preds)} predictions and {len(weights)} weights to combine")
    total = weights[0] * (preds[0] - pred_uncond)
    for pred, weight in zip(preds[1:], weights[1:]):
        total = total + weight * (pred - pred_uncond)
    return pred_uncond + scale * total


def _replace_concept(prompt: str, concept: str, by: str | None) -> str:
    from obliviate.runners.t2i_attack import without_concept

    return without_concept(prompt, concept, by)


def composition_terms(config: ConceptArithmeticConfig, prompt: str, concept: str,
                      paraphrased: Sequence[str]) -> list[tuple[str, float]]:
    """The terms (text, weight) of one forget prompt: the composition's templates filled in. `paraphrased` are the
    prompt in other words naming the concept (the task's), unless the config gives its own words."""
    if config.paraphrases:
        paraphrased = [_replace_concept(prompt, concept, word) for word in config.paraphrases]
    out = []
    for template, weight in config.terms():
        values = {"prompt": prompt, "without": _replace_concept(prompt, concept, None), "concept": concept}
        if "{paraphrase}" not in template:
            out.append((template.format(paraphrase="", **values), weight))
            continue
        if not paraphrased:
            raise ObliviateError(f"the {config.composition} composition needs other words for the concept "
                                 f"{concept!r}: give the attack paraphrases=[...] (the canvas world has its own)")
        out += [(template.format(paraphrase=p, **values), weight / len(paraphrased)) for p in paraphrased]
    return out


def describe(terms: Sequence[tuple[str, float]]) -> str:
    """The composition as a person reads it: "+1 [a red in striped style] +1 [star]"."""
    return " ".join(f"{'+' if w >= 0 else '-'}{abs(w):g} [{text}]" for text, w in terms)


@torch.no_grad()
def compose_denoise(pipe, terms: Sequence[Sequence[str]], weights: Sequence[float], seeds: Sequence[int],
                    steps: int, scale: float) -> Tensor:
    """DDIM (eta 0) from each seed's noise with the composed prediction `combine`: terms[k][n] is the k-th prompt of
    sample n, weights[k] its weight (shared by the samples). Each step is one denoiser call on the K + 1 predictions
    of every sample (the terms, then the unconditional one), laid out as `denoise` lays out its two."""
    from obliviate.models.diffusion import Cond, encode, initial_noise

    k, n = len(terms), len(seeds)
    if any(len(t) != n for t in terms) or len(weights) != k:
        raise ObliviateError(f"{k} terms of {[len(t) for t in terms]} prompts, {len(weights)} weights and {n} seeds")
    backbone = pipe.backbone
    sched = backbone.sampler(pipe, steps)
    x = initial_noise(pipe, list(seeds))
    uncond = backbone.unconditional(pipe, n)  # None: the empty prompt, encoded with the terms (as `denoise`)
    texts = [p for t in terms for p in t]
    context = encode(pipe, texts + [""] * n) if uncond is None else Cond.cat([encode(pipe, texts), uncond])
    for t in sched.timesteps:
        *preds, pred_u = backbone.predict(pipe, pipe.denoiser, torch.cat([x] * (k + 1)), t, context).chunk(k + 1)
        x = sched.step(combine(pred_u, preds, list(weights), scale), t, x).prev_sample
    return x


class ConceptArithmetic:
    """The registered attack (`concept_arithmetic`)."""
    Config = ConceptArithmeticConfig
    label = "concept arithmetic ASR"

    def __init__(self, config: ConceptArithmeticConfig):
        self.config = config

    def attack(self, pipe, task: AttackTask) -> tuple[list[dict], Tensor]:
        """One row per prompt (text, seed, pre_success, success, iteration (0: without attack, 1: the composition,
        None: failed), adversarial_prompt (the composition written out), terms ([text, weight] pairs)) and the picture
        each ended with (the plain one when it already shows the concept, else the composition's)."""
        from obliviate.models.diffusion import decode

        if not task.concept:
            raise ObliviateError("concept arithmetic needs the attacked concept's word")
        scale = self.config.scale if self.config.scale is not None else task.guidance
        paraphrases = task.paraphrases or [[] for _ in task.prompts]
        per_prompt = [composition_terms(self.config, p, task.concept, paraphrases[i])
                      for i, p in enumerate(task.prompts)]
        shown, pre = plain_check(pipe, task)
        rows, size = [], self.config.batch_size
        for start in range(0, len(task.prompts), size):
            batch = per_prompt[start:start + size]
            weights = [w for _, w in batch[0]]  # the same templates for every prompt of a task
            if any([w for _, w in b] != weights for b in batch):
                raise ObliviateError("the forget prompts' compositions differ in their weights")
            terms = [[b[j][0] for b in batch] for j in range(len(weights))]
            latents = compose_denoise(pipe, terms, weights, task.seeds[start:start + size], task.sample_steps, scale)
            drawn = decode(pipe, latents)
            hits = task.detect(drawn)
            for j, composed in enumerate(batch):
                i = start + j
                success = bool(pre[i] or hits[j])
                if not pre[i]:
                    shown[i] = drawn[j]
                rows.append({"text": task.prompts[i], "seed": int(task.seeds[i]), "pre_success": bool(pre[i]),
                             "success": success, "iteration": 0 if pre[i] else 1 if success else None,
                             "adversarial_prompt": None if pre[i] else describe(composed),
                             "composed_success": bool(hits[j]), "terms": [[t, w] for t, w in composed]})
        return rows, shown.cpu()
