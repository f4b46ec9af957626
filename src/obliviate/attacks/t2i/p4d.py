"""P4D (Prompting4Debugging): find a prompt that makes the erased model predict the noise the original model predicts
for the concept prompt.

Chin et al., "Prompting4Debugging: Red-Teaming Text-to-Image Diffusion Models by Finding Problematic Prompts", ICML
2024, https://arxiv.org/abs/2309.06135 (reference code: joycenerd/P4D).

For a forget prompt P and the original model's picture of it (its latents x0), optimise soft token embeddings P*,
each step projected to the nearest vocabulary embedding (cosine, PEZ-style straight-through: the forward pass sees
the projected tokens, the gradient updates the soft ones), to minimise over random t and noise

    || eps_erased(x_t(x0, eps), E(P*), t) - eps_original(x_t, E(P), t) ||^2

P4D-N: P* is N free tokens (paper: 16). P4D-K: P* is P's own tokens with a learnable token before them and after
every k-th one (paper: k = 3), P's tokens held fixed. Optimiser AdamW (lr 0.1, weight decay 0.1), 3000 iterations,
a check every 50, as the paper's configs. Every `check_every` iterations (and at the end) the discrete prompt is
sampled by the erased model with P's seed and shown to the detector; the attack on P succeeds at the first check
that finds the concept. A prompt whose plain picture already shows the concept succeeds without attack (pre-ASR),
as for UnlearnDiffAtk (attacks/t2i/unlearn_diff_atk.py).

Differences from the reference code: prompts are attacked together in a batch (each its own tokens); success is the
detector's at a check, not the best CLIP similarity to the original's pictures over the run; the discrete prompt is
judged as token ids (not decoded and re-tokenized); the special tokens (start, end, padding) are left out of the
projection's vocabulary; x0 is the VAE posterior mean of the original's picture.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from obliviate.attacks.t2i.common import (AttackTask, attack_vocabulary, draw_ids, framed_ids, plain_check,
                                          prompt_tokens, readable_prompt, require_one_text_encoder, soft_tokens)
from obliviate.errors import ObliviateError


@dataclass
class P4DConfig:
    iterations: int = 3000  # AdamW steps on the soft tokens (paper's configs: 3000)
    lr: float = 0.1  # paper's configs
    weight_decay: float = 0.1  # paper's configs
    check_every: int = 50  # sample and detect the discrete prompt every this many iterations (and at the end)
    batch_size: int = 64  # prompts attacked together (each has its own tokens; the losses are independent)
    seed: int = 0  # initial tokens, timesteps and noise of the attack

    def __post_init__(self):
        for name in ("iterations", "check_every", "batch_size", *self._counts):
            if getattr(self, name) < 1:
                raise ObliviateError(f"attack {name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ObliviateError(f"attack lr must be positive, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ObliviateError(f"attack weight_decay must be at least 0, got {self.weight_decay}")

    _counts = ()  # the subclass's options that must be at least 1


@dataclass
class P4DNConfig(P4DConfig):
    tokens: int = 16  # N free tokens (paper: 16)

    _counts = ("tokens",)


@dataclass
class P4DKConfig(P4DConfig):
    every_k: int = 3  # a learnable token before the prompt's tokens and after every k-th (paper: 3)

    _counts = ("every_k",)


def free_layout(prompt: list[int], n: int) -> tuple[list[int], list[bool]]:
    """P4D-N: n learnable tokens, the prompt left out. (token ids, is-learnable) of what goes between start and end."""
    return [0] * n, [True] * n


def inserted_layout(prompt: list[int], k: int) -> tuple[list[int], list[bool]]:
    """P4D-K: a learnable token, then the prompt's tokens with a learnable one after every k-th (as the reference:
    len(prompt) // k + 1 learnable tokens)."""
    ids, learn = [0], [True]
    for j, token in enumerate(prompt, 1):
        ids.append(token)
        learn.append(False)
        if j % k == 0:
            ids.append(0)
            learn.append(True)
    return ids, learn


class P4D:
    """The shared optimisation; P4DN and P4DK choose where the learnable tokens go."""
    Config = P4DConfig
    label = "P4D ASR"

    def __init__(self, config: P4DConfig):
        self.config = config

    def layout(self, prompt: list[int]) -> tuple[list[int], list[bool]]:
        raise NotImplementedError

    def attack(self, pipe, task: AttackTask) -> tuple[list[dict], Tensor]:
        """One row per prompt of the task, and the picture each ended with (the plain one when it already shows the
        concept, else the one of the success or of the last check). A row: text, seed, pre_success, success,
        iteration (0: without attack; None: failed), adversarial_prompt (the discrete prompt decoded; None when the
        plain prompt succeeds), token_ids, and the objective on one fixed draw of timesteps and noise for the start
        tokens (loss_before) and the final ones (loss_after)."""
        if task.original is None:
            raise ObliviateError("P4D needs the original pipeline: it matches the original's noise predictions")
        require_one_text_encoder(pipe, type(self).__name__, "it optimises soft tokens in one text encoder's "
                                 "embedding space, projected to that encoder's nearest tokens")
        rows, images = [], []
        for i in range(0, len(task.prompts), self.config.batch_size):
            batch_rows, batch_images = self._attack_batch(pipe, task.part(slice(i, i + self.config.batch_size)), i)
            rows += batch_rows
            images.append(batch_images)
        return rows, torch.cat(images)

    def _attack_batch(self, pipe, task: AttackTask, offset: int):
        from obliviate.models.diffusion import Cond, encode

        config, original, encoder = self.config, task.original, pipe.text_encoder
        n = len(task.prompts)
        layouts = [self.layout(p) for p in prompt_tokens(pipe, task.prompts)]
        ids = framed_ids(pipe, [ids for ids, _ in layouts], f"{type(self).__name__} (prompt and attack tokens)")
        learn = torch.zeros_like(ids, dtype=torch.bool)
        for j, (_, row) in enumerate(layouts):
            learn[j, 1:1 + len(row)] = torch.tensor(row)
        table = encoder.get_input_embeddings().weight.detach()
        vocab = attack_vocabulary(pipe.tokenizer).to(table.device)
        unit_table = torch.nn.functional.normalize(table[vocab].float(), dim=-1)
        gen = torch.Generator().manual_seed(config.seed + offset)
        backbone = pipe.backbone
        targets = task.targets.to(pipe.device, pipe.denoiser.dtype)
        with torch.no_grad():
            reference_context = encode(original, task.prompts)

        def nearest(soft: Tensor) -> Tensor:
            """The ids whose embeddings are nearest (cosine) each soft token; the prompt's own tokens elsewhere.
            Scored at the learnable positions only: SD's 49k-token vocabulary times every position would not fit."""
            chosen = ids.clone()
            scores = torch.nn.functional.normalize(soft[learn].float(), dim=-1) @ unit_table.T
            chosen[learn] = vocab[scores.argmax(-1)]
            return chosen

        def objective(context: Tensor, t: Tensor, noise: Tensor) -> Tensor:
            """Per prompt: the erased model's noise prediction under `context` against the original's under P."""
            noisy = backbone.noisy(pipe, targets, noise, t)
            with torch.no_grad():
                wanted = original.backbone.predict(original, original.denoiser, noisy.to(original.denoiser.dtype), t,
                                                   reference_context)
            pred = backbone.predict(pipe, pipe.denoiser, noisy, t, Cond(context))
            return ((pred.float() - wanted.float()) ** 2).flatten(1).mean(1)

        fixed_t = backbone.train_timesteps(pipe, n, gen)
        fixed_noise = torch.randn(targets.shape, generator=gen).to(targets)
        shown, pre = plain_check(pipe, task)
        success, found = list(pre), [0 if s else None for s in pre]
        start = torch.where(learn, vocab[torch.randint(0, len(vocab), ids.shape, generator=gen).to(vocab.device)],
                            ids)
        best = start.clone()
        soft = table[start].clone().float().requires_grad_(True)
        opt = torch.optim.AdamW([soft], lr=config.lr, weight_decay=config.weight_decay)
        with torch.no_grad():
            loss_before = objective(encoder(start)[0], fixed_t, fixed_noise)
        for it in range(1, config.iterations + 1):
            chosen = nearest(soft.detach())
            projected = soft + (table[chosen].float() - soft).detach()  # straight-through: forward sees the tokens
            with soft_tokens(encoder, projected, learn):
                context = encoder(ids)[0]
            t = backbone.train_timesteps(pipe, n, gen)
            noise = torch.randn(targets.shape, generator=gen).to(targets)
            loss = objective(context, t, noise).sum()  # each prompt its own tokens: independent gradients
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if it % config.check_every == 0 or it == config.iterations:
                todo = [j for j in range(n) if not success[j]]
                if not todo:
                    break
                chosen = nearest(soft.detach())
                drawn = draw_ids(pipe, task, chosen)
                hits = task.detect(drawn)
                for j in todo:
                    best[j], shown[j] = chosen[j], drawn[j]
                    if hits[j]:
                        success[j], found[j] = True, it
        with torch.no_grad():
            loss_after = objective(encoder(best)[0], fixed_t, fixed_noise)
        rows = []
        for j, (prompt, seed) in enumerate(zip(task.prompts, task.seeds)):
            tokens = best[j, 1:1 + len(layouts[j][0])].tolist()
            rows.append({"text": prompt, "seed": int(seed), "pre_success": bool(pre[j]), "success": bool(success[j]),
                         "iteration": found[j], "token_ids": tokens,
                         "adversarial_prompt": None if pre[j] else readable_prompt(pipe.tokenizer, tokens),
                         "loss_before": float(loss_before[j]), "loss_after": float(loss_after[j])})
        return rows, shown.cpu()


class P4DN(P4D):
    """P4D-N (`p4d_n`): N free tokens in place of the prompt."""
    Config = P4DNConfig
    label = "P4D-N ASR"

    def layout(self, prompt: list[int]) -> tuple[list[int], list[bool]]:
        return free_layout(prompt, self.config.tokens)


class P4DK(P4D):
    """P4D-K (`p4d_k`): a learnable token inserted after every k-th token of the prompt."""
    Config = P4DKConfig
    label = "P4D-K ASR"

    def layout(self, prompt: list[int]) -> tuple[list[int], list[bool]]:
        return inserted_layout(prompt, self.config.every_k)
