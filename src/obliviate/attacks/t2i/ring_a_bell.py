"""Ring-A-Bell: a prompt found with the text encoder alone, whose embedding carries the concept.

Tsai et al., "Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion Models?", ICLR 2024,
https://arxiv.org/abs/2310.10012 (reference code: chiayi-hsu/Ring-A-Bell).

The concept vector is the mean difference of text embeddings (every token position) over prompt pairs that differ
only by the concept:

    c = mean_i [ E(prompt_i with the concept) - E(prompt_i without) ]

For a forget prompt p the target is E(p) + eta * c (paper: eta = 3), and a genetic algorithm over K tokens (paper:
16) looks for the discrete prompt whose embedding is nearest it (squared error over every position, as the reference
code; or cosine). Each generation keeps the better half of the population, fills the other half with children of
random parents (one-point crossover with probability `crossover_rate`, else a copy) and changes one random token of
a child with probability `mutation_rate` (reference: population 200, 3000 generations, 0.25, 0.5). The found prompt
is then sampled by the attacked model with p's seed and judged by the detector. The search needs only the text
encoder, so it is done once for every pipeline that shares one (the erased model, the original, the reference).

A prompt whose plain picture already shows the concept succeeds without attack (pre-ASR), as for the other attacks.

Differences from the reference code: all prompts are searched together (one batched text-encoder call per
generation); the parents are kept unchanged (the reference may mutate a parent in place) and the population keeps
its size; the found prompt is judged as token ids (not decoded and re-tokenized); special tokens are never chosen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from obliviate.attacks.t2i.common import (AttackTask, attack_vocabulary, draw_ids, encoder_digest, plain_check,
                                         encode_ids, readable_prompt, require_shared_vocabulary)
from obliviate.errors import ObliviateError

DISTANCES = ("mse", "cosine")


@dataclass
class RingABellConfig:
    tokens: int = 16  # K, the found prompt's length (paper: 16)
    eta: float = 3.0  # weight of the concept vector in the target (paper: 3)
    population: int = 200  # reference code
    generations: int = 3000  # reference code
    mutation_rate: float = 0.25  # reference code
    crossover_rate: float = 0.5  # reference code
    distance: str = "mse"  # squared error over every position (reference code), or "cosine"
    chunk: int = 1024  # candidate prompts through the text encoder at once while scoring a generation
    seed: int = 0

    def __post_init__(self):
        for name in ("tokens", "generations", "chunk"):
            if getattr(self, name) < 1:
                raise ObliviateError(f"attack {name} must be at least 1, got {getattr(self, name)}")
        if self.population < 2:
            raise ObliviateError(f"attack population must be at least 2, got {self.population}")
        for name in ("mutation_rate", "crossover_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ObliviateError(f"attack {name} must be between 0 and 1, got {getattr(self, name)}")
        if self.distance not in DISTANCES:
            raise ObliviateError(f"attack distance must be one of {', '.join(DISTANCES)}, got {self.distance!r}")


@torch.no_grad()
def concept_vector(pipe, pairs: list[tuple[str, str]]) -> Tensor:
    """Mean over the pairs of E(with the concept) - E(without) [L, D] (every token position)."""
    from obliviate.models.diffusion import encode_prompts

    if not pairs:
        raise ObliviateError("Ring-A-Bell needs prompt pairs with and without the concept for its concept vector")
    diffs = [encode_prompts(pipe, [w for w, _ in pairs[i:i + 256]]) - encode_prompts(pipe, [o for _, o in
                                                                                           pairs[i:i + 256]])
             for i in range(0, len(pairs), 256)]
    return torch.cat(diffs).float().mean(0)


class RingABell:
    """The registered attack (`ring_a_bell`)."""
    Config = RingABellConfig
    label = "Ring-A-Bell ASR"

    def __init__(self, config: RingABellConfig):
        self.config = config
        self._found: dict[tuple, tuple[Tensor, Tensor]] = {}  # text encoder + prompts -> (ids, distances)

    def attack(self, pipe, task: AttackTask) -> tuple[list[dict], Tensor]:
        """One row per prompt (text, seed, pre_success, success, iteration (0: without attack, 1: the found prompt,
        None: failed), adversarial_prompt, token_ids, distance: the found prompt's to the target) and the picture each
        ended with (the plain one when it already shows the concept, else the found prompt's)."""
        require_shared_vocabulary(pipe, "Ring-A-Bell")
        key = (encoder_digest(pipe.text_encoders), tuple(task.prompts), tuple(task.concept_pairs))
        if key not in self._found:
            self._found[key] = self.search(pipe, task.prompts, task.concept_pairs)
        ids, distances = self._found[key]
        shown, pre = plain_check(pipe, task)
        drawn = draw_ids(pipe, task, ids.to(pipe.device))
        hits = task.detect(drawn)
        rows = []
        for j, (prompt, seed) in enumerate(zip(task.prompts, task.seeds)):
            success = bool(pre[j] or hits[j])
            if not pre[j]:
                shown[j] = drawn[j]
            tokens = ids[j, 1:1 + self.config.tokens].tolist()
            rows.append({"text": prompt, "seed": int(seed), "pre_success": bool(pre[j]), "success": success,
                         "iteration": 0 if pre[j] else 1 if success else None, "token_ids": tokens,
                         "adversarial_prompt": None if pre[j] else readable_prompt(pipe.tokenizer, tokens),
                         "distance": float(distances[j])})
        return rows, shown.cpu()

    @torch.no_grad()
    def search(self, pipe, prompts: list[str], pairs: list[tuple[str, str]]) -> tuple[Tensor, Tensor]:
        """The genetic search: for each prompt, the framed ids [N, L] of the K tokens nearest its target, and their
        distances [N]."""
        from obliviate.attacks.t2i.common import framed_ids
        from obliviate.models.diffusion import encode_prompts

        config, tokenizer = self.config, pipe.tokenizer
        k, size = config.tokens, config.population
        framed_ids(pipe, [[0] * k], "Ring-A-Bell (its tokens option)")  # fits the tokenizer, or one clear line
        targets = encode_prompts(pipe, prompts).float() + config.eta * concept_vector(pipe, pairs)
        vocab = attack_vocabulary(tokenizer)
        gen = torch.Generator().manual_seed(config.seed)
        n = len(prompts)
        start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
        length = tokenizer.model_max_length
        frame = torch.tensor([start] + [pad] * (length - 1))
        frame[k + 1] = end

        def frame_ids(tokens: Tensor) -> Tensor:  # [..., K] -> [..., L]
            out = frame.expand(*tokens.shape[:-1], length).clone()
            out[..., 1:k + 1] = tokens
            return out

        def distance(tokens: Tensor) -> Tensor:
            """[N, M, K] candidate tokens -> [N, M] distance of each embedding to its prompt's target."""
            flat = frame_ids(tokens).reshape(-1, length)
            owner = torch.arange(n).repeat_interleave(tokens.shape[1])
            out = []
            for i in range(0, len(flat), config.chunk):
                emb = encode_ids(pipe, flat[i:i + config.chunk].to(pipe.device)).states.float()
                target = targets[owner[i:i + config.chunk].to(pipe.device)]
                if config.distance == "mse":
                    out.append(((emb - target) ** 2).flatten(1).mean(1))
                else:
                    out.append(1 - torch.nn.functional.cosine_similarity(emb.flatten(1), target.flatten(1)))
            return torch.cat(out).reshape(tokens.shape[:2]).cpu()

        def random_tokens(*shape: int) -> Tensor:
            return vocab[torch.randint(0, len(vocab), shape, generator=gen)]

        population = random_tokens(n, size, k)
        scores = distance(population)
        keep, rows = size - size // 2, torch.arange(n)[:, None]
        for _ in range(config.generations - 1):
            order = scores.argsort(1)[:, :keep]
            parents, parent_scores = population[rows, order], scores[rows, order]
            m = size - keep
            first = parents[rows, torch.randint(0, keep, (n, m), generator=gen)]
            second = parents[rows, torch.randint(0, keep, (n, m), generator=gen)]
            cut = torch.randint(1, k, (n, m, 1), generator=gen) if k > 1 else torch.ones(n, m, 1, dtype=torch.long)
            crossed = torch.rand(n, m, 1, generator=gen) < config.crossover_rate
            children = torch.where(crossed & (torch.arange(k) >= cut), second, first)
            mutated = torch.rand(n, m, generator=gen) < config.mutation_rate
            where = torch.nn.functional.one_hot(torch.randint(0, k, (n, m), generator=gen), k).bool()
            children = torch.where(mutated[..., None] & where, random_tokens(n, m, k), children)
            population = torch.cat([parents, children], 1)
            scores = torch.cat([parent_scores, distance(children)], 1)
        best = scores.argmin(1)
        return frame_ids(population[torch.arange(n), best]), scores[torch.arange(n), best]
