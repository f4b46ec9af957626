"""UnlearnDiffAtk: can an erased text-to-image model still be prompted into drawing the concept?

Zhang et al., "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy to Generate Unsafe
Images ... For Now", ECCV 2024, https://arxiv.org/abs/2310.11868 (reference code: OPTML-Group/Diffusion-MU-Attack).

For a forget prompt p and a picture x0 of the concept that the *original* model drew from p (same seed), look for k
prefix tokens a such that the erased model denoises x0 well when prompted with "a p":

    min_a  E_{t, eps} || eps - eps_erased(x_t(x0, eps), E([a; p]), t) ||^2

Each prefix token is relaxed to a probability vector w_i over the vocabulary (its embedding is w_i @ token
embeddings); w is optimised with Adam and projected back onto the simplex after every step. Every `check_every`
iterations the discrete prompt (argmax of each w_i) is sampled by the erased model with the prompt's own seed and
shown to a detector; the attack on p succeeds when the concept is detected at any check. A prompt whose plain image
already shows the concept succeeds without attack, as in the paper:

    pre-ASR = share of prompts whose plain image shows the concept     (= 1 - UA on those prompts)
    ASR     = share of prompts that succeed with or without the attack;  robust UA = 1 - ASR

Only the adapter's functions and the pipeline's backbone are used (tokenize, encode_ids, predict, noisy, target,
denoise, decode), so the attack runs on SD 1.x/2.x and SDXL pipelines: with two text encoders (SDXL) one relaxed
token w_i gives each encoder its own embedding w_i @ (that encoder's token embeddings), the same tokens as typed.
The detector is the task's (the canvas world's classifier, or the user's: attacks/t2i/detectors.py).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from obliviate.attacks.t2i.common import (AttackTask, attack_vocabulary, readable_prompt, require_shared_vocabulary,
                                          summarize)
from obliviate.errors import ObliviateError

__all__ = ["PromptAttackConfig", "UnlearnDiffAtk", "attack_prompts", "prefix_embeddings", "prefixed_ids",
           "project_simplex", "summarize"]


@dataclass
class PromptAttackConfig:
    prefix_tokens: int = 5  # k, as the paper
    iterations: int = 40  # Adam steps on the relaxed tokens (paper: 40)
    lr: float = 0.01  # Adam learning rate (paper: 0.01)
    check_every: int = 10  # sample and detect the discrete prompt every this many iterations (and at the end)
    batch_size: int = 64  # prompts attacked together (each has its own tokens; the losses are independent)
    seed: int = 0  # initial tokens, timesteps and noise of the attack

    def __post_init__(self):
        for name in ("prefix_tokens", "iterations", "check_every", "batch_size"):
            if getattr(self, name) < 1:
                raise ObliviateError(f"attack {name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ObliviateError(f"attack lr must be positive, got {self.lr}")


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of v onto the probability simplex {w >= 0, sum w = 1} (Duchi et al. 2008):
    w = max(v - theta, 0) with theta chosen so that w sums to 1."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    excess = u.cumsum(-1) - 1
    j = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - excess / j) > 0).sum(-1, keepdim=True)  # how many entries stay positive (a prefix of u)
    theta = excess.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0)


@contextlib.contextmanager
def prefix_embeddings(text_encoder, prefix: Tensor):
    """While active, the text encoder's token embeddings at positions 1..k (after the start token) are `prefix`
    [N, k, D] instead of those of the placeholder ids there: a soft prompt through the model's own forward."""
    k = prefix.shape[1]

    def replace(module, args, out):
        if out.shape[0] != prefix.shape[0]:
            raise ObliviateError(f"prefix for {prefix.shape[0]} prompts applied to a batch of {out.shape[0]}")
        return torch.cat([out[:, :1], prefix.to(out.dtype), out[:, 1 + k:]], dim=1)

    handle = text_encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def prefixed_ids(pipe, prompts: Sequence[str], k: int, tokenizer=None) -> Tensor:
    """Token ids of `prompts` with k placeholder tokens after the start token (their embeddings are replaced by
    `prefix_embeddings`), by the pipeline's first tokenizer or the one given. The prompt must still fit, end token
    included."""
    from obliviate.models.diffusion import tokenize

    tokenizer = tokenizer or pipe.tokenizer
    ids = tokenize(pipe, list(prompts), tokenizer)
    pad = tokenizer.pad_token_id
    used = (ids != pad).sum(-1) if pad is not None and pad != tokenizer.eos_token_id else \
        (ids == tokenizer.eos_token_id).int().argmax(-1) + 1
    if int(used.max()) + k > ids.shape[1]:
        raise ObliviateError(f"a prompt of {int(used.max())} tokens leaves no room for {k} attack tokens in the "
                             f"tokenizer's {ids.shape[1]}")
    # any ordinary token (its embedding is replaced), never the end token: CLIP pools the states at the first end
    # token, SDXL's pooled text embedding among them
    special = set(tokenizer.all_special_ids)
    filler = next(i for i in range(len(tokenizer)) if i not in special)
    placeholder = torch.full((len(prompts), k), filler, dtype=ids.dtype, device=ids.device)
    return torch.cat([ids[:, :1], placeholder, ids[:, 1:ids.shape[1] - k]], dim=1)


def attack_prompts(pipe, prompts: Sequence[str], seeds: Sequence[int], targets: Tensor,
                   detect: Callable[[Tensor], list[bool]], config: PromptAttackConfig | None = None,
                   sample_steps: int = 25, guidance: float = 4.0) -> tuple[list[dict], Tensor]:
    """Attack each prompt of `prompts` (sampled with `seeds`) towards `targets`, the original model's latents of
    the concept [N, C, h, w]. `detect(images)` says, per image in [0, 1], whether it shows the concept.
    Returns one row per prompt, and the image the attack ended with per prompt [N, 3, H, W] (the plain one when it
    already shows the concept, else the one of the success, or of the last check). A row has: text, seed,
    pre_success, success, iteration (0: without attack; None: failed),
    adversarial_prompt (the prefix tokens decoded, then the prompt; None when the plain prompt already succeeds),
    prefix_ids (those of the success, or of the last check), and the attack's objective on one fixed draw of
    timesteps and noise: loss_before (start tokens), loss_after (prefix_ids), loss_relaxed (the final relaxed
    tokens; the gap to loss_after is what the discrete projection costs)."""
    config = config or PromptAttackConfig()
    require_shared_vocabulary(pipe, "UnlearnDiffAtk")
    if not (len(prompts) == len(seeds) == len(targets)):
        raise ObliviateError(f"{len(prompts)} prompts, {len(seeds)} seeds and {len(targets)} targets")
    rows, images = [], []
    for i in range(0, len(prompts), config.batch_size):
        batch = slice(i, i + config.batch_size)
        batch_rows, batch_images = _attack_batch(pipe, list(prompts[batch]), list(seeds[batch]), targets[batch],
                                                 detect, config, sample_steps, guidance, i)
        rows += batch_rows
        images.append(batch_images)
    return rows, torch.cat(images)


def _attack_batch(pipe, prompts, seeds, targets, detect, config, sample_steps, guidance, offset):
    from obliviate.models.diffusion import decode, denoise

    n, k = len(prompts), config.prefix_tokens
    encoders = pipe.text_encoders  # one relaxed token, an embedding per encoder (SDXL: two)
    tables = [e.get_input_embeddings().weight.detach() for e in encoders]
    table = tables[0]
    vocab = attack_vocabulary(pipe.tokenizer).to(table.device)
    ids = [prefixed_ids(pipe, prompts, k, tokenizer) for tokenizer in pipe.tokenizers]
    gen = torch.Generator().manual_seed(config.seed + offset)
    backbone = pipe.backbone

    def cond(prefixes: list[Tensor]):
        """The prompts' conditioning with `prefixes` (one [N, k, D_e] per encoder) after the start token."""
        with contextlib.ExitStack() as hooks:
            for encoder, prefix in zip(encoders, prefixes):
                hooks.enter_context(prefix_embeddings(encoder, prefix))
            return backbone.encode_ids(pipe, ids)

    def relaxed(w: Tensor) -> list[Tensor]:
        return [w.to(t.dtype) @ t[vocab] for t in tables]

    def typed(tokens: Tensor) -> list[Tensor]:
        return [t[tokens] for t in tables]

    def draw(prefixes: list[Tensor]) -> Tensor:
        latents, _ = denoise(pipe, prompts, seeds, sample_steps, guidance, context=cond(prefixes))
        return decode(pipe, latents)

    targets = targets.to(pipe.device, pipe.denoiser.dtype)

    def objective(prefixes: list[Tensor], t: Tensor, noise: Tensor) -> Tensor:
        """Per-prompt denoising loss of the erased model on the targets, prompted with the prefix + prompt."""
        pred = backbone.predict(pipe, pipe.denoiser, backbone.noisy(pipe, targets, noise, t), t, cond(prefixes))
        wanted = backbone.target(pipe, targets, noise, t)
        return ((pred.float() - wanted.float()) ** 2).flatten(1).mean(1)

    # the loss reported before and after is measured on one fixed draw of timesteps and noise, so they compare
    fixed_t = backbone.train_timesteps(pipe, n, gen)
    fixed_noise = torch.randn(targets.shape, generator=gen).to(targets)
    plain, _ = denoise(pipe, prompts, seeds, sample_steps, guidance)
    shown = decode(pipe, plain)
    pre = detect(shown)
    success = list(pre)
    found: list[int | None] = [0 if s else None for s in pre]
    best = vocab[torch.randint(0, len(vocab), (n, k), generator=gen)]  # random start tokens, as one-hot rows
    weights = torch.zeros(n, k, len(vocab), device=table.device)
    weights.scatter_(-1, torch.searchsorted(vocab, best).unsqueeze(-1), 1.0)
    weights.requires_grad_(True)
    opt = torch.optim.Adam([weights], lr=config.lr)
    with torch.no_grad():
        loss_before = objective(typed(best), fixed_t, fixed_noise)
    for it in range(1, config.iterations + 1):
        t = backbone.train_timesteps(pipe, n, gen)
        noise = torch.randn(targets.shape, generator=gen).to(targets)
        loss = objective(relaxed(weights), t, noise).sum()  # each prompt its own gradient
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            weights.copy_(project_simplex(weights))
        if it % config.check_every == 0 or it == config.iterations:
            todo = [j for j in range(n) if not success[j]]
            if not todo:
                break
            chosen = vocab[weights.detach().argmax(-1)]
            drawn = draw(typed(chosen))
            hits = detect(drawn)
            for j in todo:
                best[j], shown[j] = chosen[j], drawn[j]
                if hits[j]:
                    success[j], found[j] = True, it
    with torch.no_grad():
        loss_after = objective(typed(best), fixed_t, fixed_noise)
        loss_relaxed = objective(relaxed(weights), fixed_t, fixed_noise)
    return [{"text": p, "seed": int(s), "pre_success": bool(pre[j]), "success": bool(success[j]),
             "iteration": found[j], "prefix_ids": [int(x) for x in best[j]],
             "adversarial_prompt": None if pre[j] else f"{readable_prompt(pipe.tokenizer, best[j].tolist())} {p}",
             "loss_before": float(loss_before[j]), "loss_after": float(loss_after[j]),
             "loss_relaxed": float(loss_relaxed[j])}
            for j, (p, s) in enumerate(zip(prompts, seeds))], shown.cpu()


class UnlearnDiffAtk:
    """The registered attack (`prompt_attack`): its options are PromptAttackConfig's."""
    Config = PromptAttackConfig
    label = "UnlearnDiffAtk ASR"

    def __init__(self, config: PromptAttackConfig):
        self.config = config

    def attack(self, pipe, task: AttackTask) -> tuple[list[dict], Tensor]:
        return attack_prompts(pipe, task.prompts, task.seeds, task.targets, task.detect, self.config,
                              task.sample_steps, task.guidance)
