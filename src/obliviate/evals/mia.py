"""Membership-inference scores on free texts, and their AUC. Every score is oriented so that HIGHER means "more likely a
training member": NLL-style statistics are negated. One forward pass per chunk of texts feeds LOSS, ZLib, Min-K% and
Min-K%++; Reference adds one pass of the reference model; GradNorm needs one forward + backward per text (slow,
opt-in). A question-answer member is scored on its answer: LOSS, ZLib and Reference count the format's end tokens
too, as OpenUnlearning's attacks do; Min-K%, Min-K%++ and GradNorm read the answer's own tokens. Formulas:
docs/metrics.md."""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import torch

from obliviate.data import QAItem, TextItem
from obliviate.errors import ObliviateError
from obliviate.evals.metrics import (DEFAULT_MAX_LOGIT_TOKENS, DEFAULT_MIN_K, TokenStats, _pad_id, _stats, min_k,
                                     min_k_plus_plus, sequence_nll)
from obliviate.models import sequences as seq

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus", "reference", "gradnorm")
DEFAULT_ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")  # need no extra model and no backward pass


def _text(t) -> str:
    return t.answer if isinstance(t, QAItem) else t.text if isinstance(t, TextItem) else str(t)


def _encode(tokenizer, t, max_length: int):
    """A text (every token after the first scored), or a question-answer item in the run's prompt format with its
    answer and end tokens scored (as OpenUnlearning scores TOFU's forget and holdout sets)."""
    from obliviate.models import causal_lm as lm

    if isinstance(t, QAItem):
        return lm.encode_qa(tokenizer, t.question, t.answer, max_length)
    return lm.encode_text(tokenizer, _text(t), max_length)


def scored_text(tokenizer, t, max_length: int = 512) -> str:
    """The text ZLib compresses: the scored tokens decoded without special tokens (OpenUnlearning's
    `extract_target_texts_from_processed_data`): a text after its first token, an answer with its end text."""
    labels = _encode(tokenizer, t, max_length).labels[1:]
    return tokenizer.decode([x for x in labels if x != seq.IGNORE], skip_special_tokens=True)


def zlib_length(text: str) -> int:
    """Bytes of the zlib-compressed UTF-8 text (default compression level)."""
    return len(zlib.compress(text.encode("utf-8")))


# ------------------------------------------------------------------------------------ scores from token statistics
def loss_score(stats: TokenStats) -> torch.Tensor:
    """LOSS (Yeom et al.): -NLL, NLL the mean negative log-likelihood of the scored tokens (an answer's end tokens
    included)."""
    return -sequence_nll(stats.logprobs, stats.mask)


def zlib_score(stats: TokenStats, texts: Sequence[str]) -> torch.Tensor:
    """ZLib (Carlini et al. 2021): -NLL / len(zlib.compress(text bytes)), NLL as for LOSS, `texts` the scored
    tokens' text (`scored_text`)."""
    z = torch.tensor([zlib_length(t) for t in texts], dtype=torch.float64, device=stats.logprobs.device)
    return -sequence_nll(stats.logprobs, stats.mask) / z


def min_k_score(stats: TokenStats, k: float = DEFAULT_MIN_K) -> torch.Tensor:
    """Min-K% (Shi et al. 2023): mean of the lowest k% token log-probs (an answer's own tokens)."""
    return min_k(stats.logprobs, stats.answer, k)


def min_k_plus_plus_score(stats: TokenStats, k: float = DEFAULT_MIN_K) -> torch.Tensor:
    """Min-K%++ (Zhang et al. 2024): mean of the lowest k% of (log p(x_t) - mu_t) / sigma_t (an answer's own
    tokens)."""
    if stats.mu is None or stats.sigma is None:
        raise ValueError("Min-K%++ needs token statistics computed with moments=True")
    return min_k_plus_plus(stats.logprobs, stats.mu, stats.sigma, stats.answer, k)


def reference_score(stats: TokenStats, reference_stats: TokenStats) -> torch.Tensor:
    """Reference (Carlini et al. 2021): -(NLL_target - NLL_reference)."""
    return -(sequence_nll(stats.logprobs, stats.mask) - sequence_nll(reference_stats.logprobs, reference_stats.mask))


def gradnorm_score(model, tokenizer, texts: Sequence, max_length: int = 512) -> torch.Tensor:
    """GradNorm: -|| grad_theta NLL(text) ||_2, the global L2 norm over all trainable parameters (all parameters when
    none is trainable), one forward + backward per text. Members have small gradients, hence the sign."""
    params = [p for p in model.parameters() if p.requires_grad] or list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    pad = _pad_id(tokenizer)
    device = seq.model_device(model)
    out = []
    try:
        for t in texts:
            batch = seq.to_device(seq.collate([_encode(tokenizer, t, max_length).answer_only()], pad), device)
            with torch.enable_grad():
                loss = seq.mean_nll(model, batch)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            sq = sum(float(g.detach().float().square().sum()) for g in grads if g is not None)
            out.append(-(sq ** 0.5))
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return torch.tensor(out)


# --------------------------------------------------------------------------------------------------- drivers
@torch.no_grad()
def text_token_stats(model, tokenizer, texts: Sequence, batch_size: int = 32, max_length: int = 512,
                     moments: bool = True, max_logit_tokens: int = DEFAULT_MAX_LOGIT_TOKENS) -> list[TokenStats]:
    """Token statistics of texts (every token after the first scored) or question-answer items (answer and end
    tokens scored; `TokenStats.answer` marks the answer's own), per chunk of batch_size, each in forward passes of
    at most max_logit_tokens tokens."""
    pad = _pad_id(tokenizer)
    return [_stats(model, [_encode(tokenizer, t, max_length) for t in texts[start:start + batch_size]], pad,
                   moments=moments, max_tokens=max_logit_tokens) for start in range(0, len(texts), batch_size)]


def mia_scores(model, tokenizer, texts: Sequence, attacks: Sequence[str] = DEFAULT_ATTACKS, *, reference_model=None,
               reference_tokenizer=None, k: float = DEFAULT_MIN_K, batch_size: int = 32,
               max_length: int = 512, max_logit_tokens: int = DEFAULT_MAX_LOGIT_TOKENS) -> dict[str, list[float]]:
    """Per-text membership scores (higher = more likely member) for each requested attack."""
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ObliviateError(f"unknown MIA attack(s) {unknown}; valid: {', '.join(ATTACKS)}")
    if "reference" in attacks and reference_model is None:
        raise ObliviateError("the 'reference' MIA attack needs a reference_model")
    scores: dict[str, list[float]] = {a: [] for a in attacks}
    if not texts:
        return scores
    stats_list = text_token_stats(model, tokenizer, texts, batch_size, max_length,
                                  moments="min_k_plus_plus" in attacks, max_logit_tokens=max_logit_tokens)
    ref_list = None
    if "reference" in attacks:
        ref_list = text_token_stats(reference_model, reference_tokenizer or tokenizer, texts, batch_size, max_length,
                                    moments=False, max_logit_tokens=max_logit_tokens)
    for c, stats in enumerate(stats_list):
        chunk = texts[c * batch_size:(c + 1) * batch_size]
        for a in attacks:
            if a == "loss":
                v = loss_score(stats)
            elif a == "zlib":
                v = zlib_score(stats, [scored_text(tokenizer, t, max_length) for t in chunk])
            elif a == "min_k":
                v = min_k_score(stats, k)
            elif a == "min_k_plus_plus":
                v = min_k_plus_plus_score(stats, k)
            elif a == "reference":
                v = reference_score(stats, ref_list[c])
            else:
                continue
            scores[a] += [float(x) for x in v]
    if "gradnorm" in attacks:
        scores["gradnorm"] = [float(x) for x in gradnorm_score(model, tokenizer, texts, max_length)]
    return scores


def mia_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC (`sklearn.metrics.roc_auc_score`) of separating members (label 1) from non-members (label 0) by a
    higher-is-member score: 1 = members fully recognised, 0.5 = indistinguishable."""
    from sklearn.metrics import roc_auc_score

    if not len(member_scores) or not len(nonmember_scores):
        raise ValueError("mia_auc needs members and non-members")
    y = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    s = np.r_[np.asarray(member_scores, dtype=float), np.asarray(nonmember_scores, dtype=float)]
    return float(roc_auc_score(y, s))


def muse_auc(member_auc: float) -> float:
    """MUSE's AUC convention (NLL-like score, so a memorising model gets AUC near 0) from obliviate's: 1 - AUC."""
    return 1.0 - float(member_auc)


def mia_aucs(model, tokenizer, members: Sequence, nonmembers: Sequence, attacks: Sequence[str] = DEFAULT_ATTACKS,
             **kwargs) -> dict:
    """{"auc": {attack: AUC}, "members": scores, "nonmembers": scores} for forget (members) vs holdout texts; members
    and non-members share the forward passes."""
    both = mia_scores(model, tokenizer, list(members) + list(nonmembers), attacks, **kwargs)
    nm = len(members)
    m = {a: v[:nm] for a, v in both.items()}
    n = {a: v[nm:] for a, v in both.items()}
    return {"auc": {a: mia_auc(m[a], n[a]) for a in attacks}, "members": m, "nonmembers": n}
