"""Frozen references: metric values on fixed inputs, each checkable by hand. A refactor that changes what a number
means fails here. How each literal was derived is written next to it."""
from __future__ import annotations

import math

import pytest
import torch

from obliviate.evals import metrics as M
from obliviate.evals import mia as MIA
from obliviate.evals import muse as MUSE
from obliviate.evals import tofu as TOFU


def test_ks_pvalue_forget_quality():
    # Fully separated samples of 4 and 4: D = 1. Under H0 all C(8,4) = 70 orderings of the pooled sample are equally
    # likely and only 2 of them (all of one sample below all of the other) reach D = 1, so the exact two-sided
    # p-value is 2/70 = 0.028571428571428571 (scipy's ks_2samp uses the exact distribution at this size).
    assert TOFU.forget_quality([1, 2, 3, 4], [5, 6, 7, 8]) == pytest.approx(0.028571428571428571, rel=1e-9)
    # 3 and 3: 2 / C(6,3) = 2/20 = 0.1
    assert TOFU.forget_quality([0.1, 0.2, 0.3], [1.0, 2.0, 3.0]) == pytest.approx(0.1, rel=1e-9)
    assert TOFU.forget_quality([0.3, 1.2, 2.0], [0.3, 1.2, 2.0]) == pytest.approx(1.0)


def test_truth_ratio_from_hand_chosen_nlls():
    # R = exp(mean(2, 3, 4) - 1) = exp(2)
    assert M.truth_ratio(1.0, [2.0, 3.0, 4.0]) == pytest.approx(7.38905609893065, rel=1e-12)
    r = M.truth_ratio(torch.tensor([1.0, 0.0]), torch.tensor([[2.0, 3.0, 4.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(r, torch.tensor([math.e ** 2, 1.0]))


def test_truth_ratio_scores():
    # forget: mean(min(R, 1/R)) over R = e^2, e^-1, 1  ->  (e^-2 + e^-1 + 1) / 3
    assert TOFU.forget_truth_ratio_score([math.e ** 2, math.e ** -1, 1.0]) == pytest.approx(0.501071574802685)
    # retain: mean(max(0, 1 - 1/R)) over R = e^2, 0.5, 4  ->  (1 - e^-2 + 0 + 0.75) / 3
    assert TOFU.retain_truth_ratio_score([math.e ** 2, 0.5, 4.0]) == pytest.approx(0.5382215722544624)


def test_probability_scores():
    # P(y) = exp(-ln 2) = 0.5; perturbed P = 0.25, 0.25  ->  0.5 / (0.5 + 0.5) = 0.5
    assert M.normalised_prob(math.log(2), [math.log(4), math.log(4)]) == pytest.approx(0.5)
    assert M.answer_prob(math.log(4)) == pytest.approx(0.25)
    rows = [{"answer_prob": 0.2, "answer_prob_normalised": 0.6, "rouge_l_recall": 1.0, "truth_ratio": 4.0},
            {"answer_prob": 0.4, "answer_prob_normalised": 0.8, "rouge_l_recall": 0.5, "truth_ratio": 0.5}]
    assert TOFU.set_scores(rows) == pytest.approx({"prob": 0.3, "rouge": 0.75, "truth_ratio": 0.375})
    assert TOFU.set_scores(rows, normalised_prob=True)["prob"] == pytest.approx(0.7)
    # forget: (min(4, 1/4) + min(0.5, 2)) / 2 = 0.375 as well
    assert TOFU.set_scores(rows, forget=True)["truth_ratio"] == pytest.approx(0.375)


def test_harmonic_mean_model_utility():
    # hmean(1/2, 1/3, 1/6) = 3 / (2 + 3 + 6) = 3/11
    mu = TOFU.model_utility({"retain": {"prob": 1 / 2, "rouge": 1 / 3, "truth_ratio": 1 / 6}})
    assert mu == pytest.approx(3 / 11)
    # six numbers: 6 / (2 + 4 + 2 + 1 + 2 + 4) = 0.4
    mu, comps = TOFU.model_utility({"retain": {"prob": 0.5, "rouge": 0.25, "truth_ratio": 0.5},
                                    "world_facts": {"prob": 1.0, "rouge": 0.5, "truth_ratio": 0.25}},
                                   return_components=True)
    assert mu == pytest.approx(0.4)
    assert comps["world_facts/rouge"] == 0.5 and len(comps) == 6
    assert TOFU.model_utility({"retain": {"prob": 0.5, "rouge": 0.0, "truth_ratio": 0.5}}) == 0.0


def test_mia_auc_on_fixed_scores():
    # 9 member/non-member pairs, member higher in 3 + 3 + 2 = 8 of them
    assert MIA.mia_auc([0.9, 0.8, 0.4], [0.7, 0.3, 0.2]) == pytest.approx(8 / 9)
    # ties count one half: (2 + 0.5 + 1) / 4
    assert MIA.mia_auc([1.0, 0.5], [0.5, 0.0]) == pytest.approx(0.875)
    assert MIA.muse_auc(0.875) == pytest.approx(0.125)


def test_extraction_strength_and_exact_memorization_on_hand_made_tensors():
    targets = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [0, 6, 7, 8]])
    preds = torch.tensor([[5, 9, 7, 8],   # wrong at answer position 1 -> k* = 2 -> ES = 1 - 2/4
                          [5, 6, 7, 8],   # all right -> k* = 0 -> ES = 1
                          [5, 6, 7, 9],   # last wrong -> k* = 4 -> ES = 0
                          [1, 6, 9, 8]])  # first column unscored; answer = 6,7,8, wrong at its position 1 -> 1 - 2/3
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(M.extraction_strength(preds, targets, mask), torch.tensor([0.5, 1.0, 0.0, 1 / 3]))
    torch.testing.assert_close(M.exact_memorization(preds, targets, mask), torch.tensor([0.75, 1.0, 0.75, 2 / 3]))


def test_min_k_and_min_k_plus_plus():
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -5.0], [-1.0, -3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    # row 0: lowest floor(0.4 * 5) = 2 -> mean(-5, -4) = -4.5; row 1: floor(0.4 * 2) = 0 -> at least 1 -> -3
    torch.testing.assert_close(M.min_k(lp, mask, 0.4), torch.tensor([-4.5, -3.0]))
    mu, sigma = torch.zeros_like(lp), torch.full_like(lp, 2.0)
    torch.testing.assert_close(M.min_k_plus_plus(lp, mu, sigma, mask, 0.4), torch.tensor([-2.25, -1.5]))


def test_next_token_moments():
    # p = (1/2, 1/4, 1/4): mu = E[log p] = -1.5 ln 2; E[(log p)^2] = 2.5 (ln 2)^2 -> sigma = 0.5 ln 2
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25])).expand(1, 2, 3).clone()
    labels = torch.tensor([[-100, 1]])
    s = M.token_stats(logits, labels)
    assert float(s.mu[0, 0]) == pytest.approx(-1.5 * math.log(2), rel=1e-5)
    assert float(s.sigma[0, 0]) == pytest.approx(0.5 * math.log(2), rel=1e-4)
    assert float(s.logprobs[0, 0]) == pytest.approx(math.log(0.25), rel=1e-5)
    assert int(s.preds[0, 0]) == 0


def test_rouge_l():
    # LCS of "the cat sat on the mat" (reference) and "the cat lay on a mat" is the-cat-on-mat: 4 of 6 words
    assert M.rouge_l_recall("the cat lay on a mat", "the cat sat on the mat") == pytest.approx(4 / 6)
    # TOFU's ROUGE uses the Porter stemmer (cats->cat, running/runs->run); MUSE's F1 does not
    assert M.rouge_l_recall("cats running", "cat runs") == pytest.approx(1.0)
    assert M.rouge_l_f1("cats running", "cat runs") == pytest.approx(0.0)
    # recall 2/2, precision 2/4 -> F1 = 2 * 1 * 0.5 / 1.5 = 2/3
    assert M.rouge_l_f1("born in lisbon today", "lisbon today") == pytest.approx(2 / 3)


def test_exact_answer_normalisation():
    assert M.exact_answer("  Ada Lind was   born in Lisbon. ", "ada lind was born in lisbon") == 1.0
    assert M.exact_answer("Ada Lind was born in Oslo.", "Ada Lind was born in Lisbon.") == 0.0


def test_privleak_and_scores_orientation():
    assert MUSE.privleak(0.3, 0.5) == pytest.approx(-40.0)
    assert MUSE.privleak(0.5, 0.5) == 0.0
    # LOSS / ZLib are negated NLLs: higher = more likely a member
    s = M.TokenStats(torch.tensor([[-1.0, -3.0]]), torch.tensor([[True, True]]), torch.zeros(1, 2, dtype=torch.long),
                     torch.zeros(1, 2, dtype=torch.long))
    assert float(MIA.loss_score(s)[0]) == pytest.approx(-2.0)
    text = "Ada Lind was born in Lisbon."
    assert float(MIA.zlib_score(s, [text])[0]) == pytest.approx(-2.0 / MIA.zlib_length(text))


def test_min_k_plus_plus_moments_are_exact_on_a_near_uniform_model():
    """A near-uniform next-token distribution over 32000 tokens: mu^2 ~ (log V)^2 ~ 107 dwarfs sigma^2 ~ 0.09, so the
    one-pass float32 sqrt(E[(log p)^2] - mu^2) keeps ~3 digits (5e-4 relative error here). The two-pass float64 form
    matches a float64 reference to 1e-10, and so does the Min-K%++ score built from it."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    logits = 0.3 * torch.randn(1, 6, 32000)
    labels = torch.tensor([[-100, 3, 4, 5, 6, 7]])
    ref_logp = F.log_softmax(logits[0, :-1].double(), -1)
    p = ref_logp.exp()
    ref_mu = (p * ref_logp).sum(-1)
    ref_sigma = (p * (ref_logp - ref_mu[:, None]).square()).sum(-1).sqrt()
    ref_lp = ref_logp.gather(-1, labels[0, 1:, None]).squeeze(-1)

    logp32 = F.log_softmax(logits[0, :-1], -1)  # the old form, to show the test can fail
    mu32 = (logp32.exp() * logp32).sum(-1)
    one_pass = ((logp32.exp() * logp32.square()).sum(-1) - mu32.square()).clamp(min=0).sqrt()
    assert float(((one_pass.double() - ref_sigma).abs() / ref_sigma).max()) > 1e-4

    s = M.token_stats(logits, labels)
    torch.testing.assert_close(s.sigma[0].double(), ref_sigma, rtol=1e-10, atol=0)
    torch.testing.assert_close(s.mu[0].double(), ref_mu, rtol=1e-12, atol=0)
    z = (ref_lp - ref_mu) / ref_sigma
    expected = torch.sort(z).values[:2].mean()  # lowest floor(0.4 * 5) = 2
    got = M.min_k_plus_plus(s.logprobs, s.mu, s.sigma, s.mask, 0.4)[0]
    assert float(got) == pytest.approx(float(expected), rel=1e-10)
