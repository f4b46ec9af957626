"""Per-item language-model metrics, and the single batched forward pass that feeds every likelihood metric.

Likelihood metrics (answer probability, truth ratio, normalised probability, exact memorization, extraction strength,
Min-K% and Min-K%++ of the answer tokens) are all read off ONE forward pass per chunk of items: each item contributes
its answer, its paraphrased answer (when it has one; otherwise the answer stands in, as TOFU does for world facts and
real authors, without being run twice) and its perturbed answers to one right-padded batch. `likelihood_metrics(...,
naive=True)` computes the same numbers with one pass per metric per item, for the benchmark and the equivalence test;
`count_forward_passes` counts calls of the model's top module.

Text metrics (ROUGE-L, exact answer) take strings; batched greedy generation lives in the adapter
(`causal_lm.generate`). Formulas: docs/metrics.md.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F

from obliviate.data import QAItem
from obliviate.models import sequences as seq

DEFAULT_MIN_K = 0.4  # MUSE PrivLeak uses Min-40%
SIGMA_FLOOR = 1e-6  # guards Min-K%++ against a one-hot next-token distribution (sigma = 0)


# ----------------------------------------------------------------------------------------------- forward-pass counting
@dataclass
class ForwardCounter:
    n: int = 0


@contextmanager
def count_forward_passes(model):
    """Count calls of `model` (a forward hook on the top module, so nested submodules do not count; every decoding
    step of `generate` counts as one call). A call of its decoder alone (a likelihood pass whose output head runs a
    slice at a time, `_pass_stats`) counts as one too."""
    counter = ForwardCounter()
    inside = [0]

    def enter(_module, _args):
        inside[0] += 1

    def hook(_module, _args, _output):
        inside[0] -= 1
        counter.n += 1

    def decoder_alone(_module, _args, _output):
        if not inside[0]:
            counter.n += 1

    handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(hook)]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if isinstance(decoder, torch.nn.Module) and decoder is not model:
        handles.append(decoder.register_forward_hook(decoder_alone))
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------- token statistics
@dataclass
class TokenStats:
    """Per-token quantities of one forward pass, aligned so position t scores target t (= input t+1).

    logprobs: log p(target_t) ([B, L], 0 where not scored); mask: scored positions; preds: teacher-forced argmax;
    targets: the true tokens; mu / sigma: mean and standard deviation of log p(z) under the model's own next-token
    distribution p(.) at each position (for Min-K%++), or None when not requested. answer_mask: the scored positions
    that hold the answer's own tokens, not the format's end-of-turn / EOS tokens (the memorisation metrics and Min-K%
    read these, as OpenUnlearning and the papers do); the mask itself (answer + end) serves the probabilities."""
    logprobs: torch.Tensor
    mask: torch.Tensor
    preds: torch.Tensor
    targets: torch.Tensor
    mu: torch.Tensor | None = None
    sigma: torch.Tensor | None = None
    answer_mask: torch.Tensor | None = None

    def row(self, i: int) -> "TokenStats":
        sl = slice(i, i + 1)

        def part(t):
            return None if t is None else t[sl]
        return TokenStats(self.logprobs[sl], self.mask[sl], self.preds[sl], self.targets[sl], part(self.mu),
                          part(self.sigma), part(self.answer_mask))

    @property
    def answer(self) -> torch.Tensor:
        return self.mask if self.answer_mask is None else self.answer_mask


SLICE_TOKENS = 256  # positions whose full-vocabulary float32 temporaries exist at once inside token_stats
MOMENT_TOKENS = 64  # positions whose float64 next-token distribution exists at once (the Min-K%++ moments)


def _moments(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu, sigma, log p(target)) per position of `logits` [..., V], in float64 (float32 on MPS, which has no
    float64) and in two passes, sigma = sqrt(E[(log p - mu)^2]): the one-pass sqrt(E[(log p)^2] - mu^2) cancels
    catastrophically when the distribution is near uniform (mu^2 ~ (log V)^2 >> sigma^2; 5e-4 relative error in
    float32 on a near-uniform model)."""
    wide = torch.float32 if logits.device.type == "mps" else torch.float64
    flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1)
    mu, sigma, lp = (torch.empty(flat.shape[0], dtype=wide, device=logits.device) for _ in range(3))
    for i in range(0, flat.shape[0], MOMENT_TOKENS):
        part = slice(i, i + MOMENT_TOKENS)
        logp = F.log_softmax(flat[part].to(wide), dim=-1)
        p = logp.exp()
        m = (p * logp).sum(-1)
        mu[part], lp[part] = m, logp.gather(-1, flat_targets[part]).squeeze(-1)
        sigma[part] = (p * (logp - m.unsqueeze(-1)).square()).sum(-1).sqrt()
        del logp, p
    return mu.view(targets.shape), sigma.view(targets.shape), lp.view(targets.shape)


def token_stats(logits: torch.Tensor, labels: torch.Tensor, moments: bool | Sequence[int] = True) -> TokenStats:
    """Everything the likelihood metrics need, from the logits of one forward pass.

    moments: True for mu/sigma on every row, False for none, or a list of row indices (the other rows get zeros), so
    a big-vocabulary model does not materialise the full next-token distribution for rows that do not need it.
    The rows are reduced a slice at a time (about SLICE_TOKENS positions), so the float32 log-softmax and its
    products never exist for the whole batch: the peak is the logits themselves plus one slice. The rows with
    moments take their log-probs, mu and sigma from `_moments` (float64), so Min-K%++'s (log p - mu) / sigma does
    not lose its digits to cancellation either."""
    logits, targets, mask = seq.shifted(logits, labels)
    n, width = targets.shape
    wide = torch.float32 if logits.device.type == "mps" else torch.float64
    lp = torch.zeros((n, width), dtype=wide, device=logits.device)
    preds = torch.zeros((n, width), dtype=torch.long, device=logits.device)
    want = set(range(n)) if moments is True else set(moments or ())
    mu = sigma = None
    if moments is not False:
        mu, sigma = torch.zeros_like(lp), torch.zeros_like(lp)
    step = max(1, SLICE_TOKENS // max(1, width))
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        logp = F.log_softmax(logits[rows].float(), dim=-1)
        lp[rows] = (logp.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1) * mask[rows]).to(wide)
        preds[rows] = logp.argmax(-1)
        del logp
        keep = [r for r in range(rows.start, rows.stop) if r in want]
        if mu is not None and keep:
            mu[keep], sigma[keep], wide_lp = _moments(logits[keep], targets[keep])
            lp[keep] = wide_lp * mask[keep]
    return TokenStats(lp, mask, preds, targets, mu, sigma)


# ---------------------------------------------------------------------------------- metrics on per-token tensors [B, L]
def sequence_nll(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over scored tokens, per row."""
    return -(logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def answer_prob(nll) -> torch.Tensor | float:
    """P(y|x) = exp(-NLL), NLL the mean answer-token negative log-likelihood."""
    if isinstance(nll, torch.Tensor):
        return torch.exp(-nll)
    return math.exp(-float(nll))


def truth_ratio(paraphrase_nll, perturbed_nlls) -> torch.Tensor | float:
    """R = exp(mean_j NLL(perturbed_j) - NLL(paraphrase)) = P(paraphrase) / P(perturbed), losses averaged first.

    Tensors: paraphrase_nll [B], perturbed_nlls [B, k]. Floats: a number and a sequence of numbers."""
    if isinstance(paraphrase_nll, torch.Tensor):
        return torch.exp(perturbed_nlls.mean(-1) - paraphrase_nll)
    perturbed = [float(x) for x in perturbed_nlls]
    if not perturbed:
        raise ValueError("truth ratio needs at least one perturbed answer")
    return math.exp(sum(perturbed) / len(perturbed) - float(paraphrase_nll))


def normalised_prob(answer_nll: float, perturbed_nlls: Sequence[float]) -> float:
    """P(y) / (P(y) + sum_j P(perturbed_j)), each P = exp(-mean NLL) (TOFU's probability on real authors/world facts)."""
    p = math.exp(-answer_nll)
    return p / (p + sum(math.exp(-x) for x in perturbed_nlls))


def exact_memorization(preds: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of scored tokens whose teacher-forced argmax equals the true token, per row."""
    mask = mask.bool()
    correct = (preds == targets) & mask
    return correct.sum(-1).float() / mask.sum(-1).clamp(min=1).float()


def extraction_strength(preds: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - k*/|y| per row, k* the shortest answer prefix from which greedy decoding reproduces the rest of the answer.

    Greedy decoding from the true prefix y[:k] reproduces y[k:] iff the teacher-forced argmax is right at every answer
    position j >= k (by induction: while every generated token is right, the decoder's context IS the true prefix, so
    its next token is the teacher-forced argmax; the first wrong argmax makes greedy output diverge). Hence
    k* = (index of the last wrong answer position) + 1, and 0 when every position is right. If the last token is wrong
    k* = |y| and the score is 0. Positions are counted over scored (answer) tokens only."""
    mask = mask.bool()
    wrong = mask & (preds != targets)
    position = torch.cumsum(mask.long(), dim=-1)  # 1-based index of each answer token within the answer
    k_star = (position * wrong.long()).max(dim=-1).values  # index after the last wrong position (0 if none)
    n = mask.sum(-1).clamp(min=1)
    return 1.0 - k_star.float() / n.float()


def lowest_k_mean(values: torch.Tensor, mask: torch.Tensor, k: float = DEFAULT_MIN_K) -> torch.Tensor:
    """Mean of the lowest max(1, floor(k * n)) scored values of each row (n = scored tokens in the row)."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    out = []
    for v, m in zip(values, mask.bool()):
        vals = v[m]
        if vals.numel() == 0:
            out.append(values.new_tensor(float("nan")))
            continue
        take = max(1, int(vals.numel() * k))
        out.append(torch.sort(vals).values[:take].mean())
    return torch.stack(out) if out else values.new_zeros(0)


def min_k(logprobs: torch.Tensor, mask: torch.Tensor, k: float = DEFAULT_MIN_K) -> torch.Tensor:
    """Min-K%: mean of the lowest k% token log-probs (higher = more likely a training member)."""
    return lowest_k_mean(logprobs, mask, k)


def min_k_plus_plus(logprobs: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor,
                    k: float = DEFAULT_MIN_K) -> torch.Tensor:
    """Min-K%++: mean of the lowest k% of (log p(x_t) - mu_t) / sigma_t (higher = more likely a member)."""
    z = (logprobs - mu) / sigma.clamp(min=SIGMA_FLOOR)
    return lowest_k_mean(z, mask, k)


# --------------------------------------------------------------------------------------------------- text metrics
@lru_cache(maxsize=4)
def _scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(generated: str, reference: str, use_stemmer: bool = True):
    """The `rouge_score` ROUGE-L Score (precision, recall, fmeasure) of `generated` against `reference`."""
    return _scorer(use_stemmer).score(reference, generated)["rougeL"]


def rouge_l_recall(generated: str, reference: str) -> float:
    """ROUGE-L recall of the generated answer against the reference (TOFU: rouge_score, use_stemmer=True)."""
    return float(rouge_l(generated, reference, use_stemmer=True).recall)


def rouge_l_f1(generated: str, reference: str, use_stemmer: bool = False) -> float:
    """ROUGE-L F-measure (MUSE VerbMem/KnowMem; MUSE's scorer uses use_stemmer=False)."""
    return float(rouge_l(generated, reference, use_stemmer=use_stemmer).fmeasure)


def normalise_answer(text: str) -> str:
    """Lowercase, strip, collapse whitespace, drop trailing periods."""
    text = re.sub(r"\s+", " ", text.lower().strip())
    return text.rstrip(".").strip()


def exact_answer(generated: str, reference: str) -> float:
    """1.0 when the normalised greedy answer equals the normalised true answer, else 0.0."""
    return float(normalise_answer(generated) == normalise_answer(reference))


# ------------------------------------------------------------------------------------------ the one-pass evaluation
def _roles(item: QAItem) -> list[tuple[str, str]]:
    """The sequences an item needs: answer, paraphrase (only if it has one), perturbed answers."""
    roles = [("answer", item.answer)]
    if item.paraphrased_answer:
        roles.append(("paraphrase", item.paraphrased_answer))
    roles += [("perturbed", p) for p in item.perturbed_answers]
    return roles


@dataclass
class ItemLikelihood:
    """One item's share of the likelihood pass, what every likelihood item metric reads (`evals/lm_metrics.py`): its
    answer row's token statistics (with the Min-K%++ moments), the answer's mean NLL, the paraphrase's (the answer's
    when the item has none, as TOFU does), the perturbed answers', and Min-K%'s k."""
    answer: TokenStats
    nll: float
    paraphrase_nll: float
    perturbed_nlls: list[float]
    k: float


def likelihood_item_metrics() -> list[tuple[str, object]]:
    """(name, function) of every declared item metric that reads the likelihood pass (`registry.METRICS`)."""
    from obliviate.registry import computed

    return [(m.name, m.load()) for m in computed("lm", "item", ("logprobs",))]


def _item_record(answer: TokenStats, paraphrase_nll: float | None, perturbed_nlls: list[float],
                 k: float, declared: list[tuple[str, object]] | None = None) -> dict:
    """All likelihood metrics of one item from the token statistics of its sequences (answer row carries moments):
    each declared item metric (`declared`: likelihood_item_metrics()) on the item's ItemLikelihood."""
    nll = float(sequence_nll(answer.logprobs, answer.mask)[0])
    item = ItemLikelihood(answer, nll, nll if paraphrase_nll is None else paraphrase_nll, perturbed_nlls, k)
    return {name: compute(item) for name, compute in (declared or likelihood_item_metrics())}


DEFAULT_MAX_LOGIT_TOKENS = 4096  # tokens of full-vocabulary logits one forward pass may hold (eval.max_logit_tokens)


def _groups(encoded: list[seq.Encoded], max_tokens: int) -> list[list[int]]:
    """Consecutive runs of sequences whose padded batch (sequences x longest) holds at most max_tokens tokens (a
    longer single sequence goes alone)."""
    groups: list[list[int]] = []
    width = 0
    for i, e in enumerate(encoded):
        w = max(width, len(e.input_ids))
        if groups and w * (len(groups[-1]) + 1) <= max_tokens:
            groups[-1].append(i)
            width = w
        else:
            groups.append([i])
            width = len(e.input_ids)
    return groups


def _pass_stats(model, batch: dict, moments: bool | Sequence[int]) -> TokenStats:
    """token_stats of one forward pass. With a plain linear head (`sequences.head_splits`) the decoder runs once and
    the head a few sequences (about SLICE_TOKENS positions) at a time, so the full-vocabulary logits of the whole pass
    never exist: the peak is one slice's logits and its temporaries (a 49k vocabulary: 4096 tokens of logits are
    0.8 GB, a 512-position slice 0.1 GB). Otherwise the model's own forward gives the pass's logits."""
    if not seq.head_splits(model, batch):
        return token_stats(seq.forward_logits(model, batch), batch["labels"], moments=moments)
    hidden = seq.decoder_hidden(model, batch)
    head, labels = model.get_output_embeddings(), batch["labels"]
    n, width = labels.shape
    step = max(1, SLICE_TOKENS // max(1, width))
    parts = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        rows = moments if isinstance(moments, bool) else [r - start for r in moments if start <= r < stop]
        parts.append(token_stats(head(hidden[start:stop]), labels[start:stop], moments=rows))
    if len(parts) == 1:
        return parts[0]
    return TokenStats(*(None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts])
                        for f in ("logprobs", "mask", "preds", "targets", "mu", "sigma")))


@torch.no_grad()
def _stats(model, encoded: list[seq.Encoded], pad_id: int, moments: bool | Sequence[int] = True,
           max_tokens: int = DEFAULT_MAX_LOGIT_TOKENS) -> TokenStats:
    """Token statistics of the encoded sequences, computed in forward passes of at most `max_tokens` tokens each:
    each pass's logits are reduced to per-token numbers (log-prob, argmax, moments) before the next pass, so the peak
    grows with max_tokens x vocabulary, not with sequences x vocabulary."""
    device = seq.model_device(model)
    width = max(len(e.input_ids) for e in encoded) - 1
    wanted = set(range(len(encoded))) if moments is True else set(moments or ())
    parts: list[TokenStats] = []
    for group in _groups(encoded, max_tokens):
        batch = seq.to_device(seq.collate([encoded[i] for i in group], pad_id), device)
        rows = [r for r, i in enumerate(group) if i in wanted] if moments is not False else False
        stats = _pass_stats(model, batch, rows)
        answer = seq.collate([encoded[i].answer_only() for i in group], pad_id)["labels"].to(stats.mask.device)
        stats.answer_mask = answer[:, 1:] != seq.IGNORE
        parts.append(stats)

    def joined(name: str):
        tensors = [getattr(p, name) for p in parts]
        if tensors[0] is None:
            return None
        return torch.cat([F.pad(t, (0, width - t.shape[1])) for t in tensors])
    return TokenStats(*(joined(n) for n in ("logprobs", "mask", "preds", "targets", "mu", "sigma", "answer_mask")))


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def likelihood_metrics(model, tokenizer, items: Sequence[QAItem], batch_size: int = 32, *, k: float = DEFAULT_MIN_K,
                       max_length: int = 512, naive: bool = False, progress=None,
                       max_logit_tokens: int = DEFAULT_MAX_LOGIT_TOKENS) -> list[dict]:
    """Per-item likelihood metrics. One forward pass per chunk of `batch_size` items (each item's 2 + |perturbed|
    sequences go in the same batch, so a pass holds up to batch_size * (2 + k) sequences), split further so that no
    pass holds more than `max_logit_tokens` tokens of logits.

    naive=True: one forward pass per metric per item, as a metric-per-loop evaluator would do (answer probability,
    exact memorization, extraction strength, Min-K%, Min-K%++: one pass each on the answer; truth ratio: one pass per
    paraphrase and perturbed answer; normalised probability: one pass per answer and perturbed answer). Same numbers."""
    from obliviate.models import causal_lm as lm

    if naive:
        return [_naive_item(model, tokenizer, it, k, max_length) for it in items]
    pad = _pad_id(tokenizer)
    declared = likelihood_item_metrics()
    out: list[dict] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        encoded, index = [], []
        for i, item in enumerate(chunk):
            for role, text in _roles(item):
                encoded.append(lm.encode_qa(tokenizer, item.question, text, max_length))
                index.append((i, role))
        stats = _stats(model, encoded, pad, moments=[r for r, (_, role) in enumerate(index) if role == "answer"],
                       max_tokens=max_logit_tokens)
        nlls = sequence_nll(stats.logprobs, stats.mask).tolist()
        per = [{"answer": None, "paraphrase": None, "perturbed": []} for _ in chunk]
        for row, (i, role) in enumerate(index):
            if role == "answer":
                per[i]["answer"] = stats.row(row)
            elif role == "paraphrase":
                per[i]["paraphrase"] = nlls[row]
            else:
                per[i]["perturbed"].append(nlls[row])
        out += [_item_record(p["answer"], p["paraphrase"], p["perturbed"], k, declared) for p in per]
        if progress is not None:
            progress(len(out), len(items))
    return out


def _naive_item(model, tokenizer, item: QAItem, k: float, max_length: int) -> dict:
    from obliviate.models import causal_lm as lm

    pad = _pad_id(tokenizer)

    def run(text: str) -> TokenStats:
        return _stats(model, [lm.encode_qa(tokenizer, item.question, text, max_length)], pad, moments=True)

    def nll_of(text: str) -> float:
        s = run(text)
        return float(sequence_nll(s.logprobs, s.mask)[0])

    s = run(item.answer)  # answer probability
    nll = float(sequence_nll(s.logprobs, s.mask)[0])
    s = run(item.answer)  # exact memorization
    em = float(exact_memorization(s.preds, s.targets, s.answer)[0])
    s = run(item.answer)  # extraction strength
    es = float(extraction_strength(s.preds, s.targets, s.answer)[0])
    s = run(item.answer)  # Min-K%
    mk = float(min_k(s.logprobs, s.answer, k)[0])
    s = run(item.answer)  # Min-K%++
    mkpp = float(min_k_plus_plus(s.logprobs, s.mu, s.sigma, s.answer, k)[0])
    perturbed = list(item.perturbed_answers)
    pert: list[float] = []
    tr = norm = None
    para = nll_of(item.paraphrased_answer or item.answer)  # truth ratio: its own passes (paraphrase, perturbed)
    if perturbed:
        pert = [nll_of(p) for p in perturbed]
        tr = truth_ratio(para, pert)
        norm = normalised_prob(nll_of(item.answer), [nll_of(p) for p in perturbed])  # normalised probability
    return {
        "answer_nll": nll, "answer_prob": answer_prob(nll), "paraphrase_nll": para, "perturbed_nlls": pert,
        "truth_ratio": tr, "answer_prob_normalised": norm, "exact_memorization": em, "extraction_strength": es,
        "min_k": mk, "min_k_plus_plus": mkpp, "n_answer_tokens": int(s.answer.sum()),
        "n_end_tokens": int(s.mask.sum() - s.answer.sum()),
    }


def greedy_answers(model, tokenizer, questions: Sequence[str], max_new_tokens: int = 48,
                   batch_size: int = 32, on_batch=None, at_limit: list | None = None) -> list[str]:
    """Batched greedy answers to questions asked in the tokenizer's prompt format (stopping where the model stops:
    `causal_lm.generate`); `at_limit` gets a flag per answer that ran to max_new_tokens."""
    from obliviate.models import causal_lm as lm

    prompts = [lm.question_prompt(tokenizer, q) for q in questions]
    if not prompts:
        return []
    return lm.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       on_batch=on_batch, at_limit=at_limit)
