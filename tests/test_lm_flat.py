"""FLAT (Wang et al., ICLR 2025): the loss against the reference code's, re-typed (UCSC-REAL/FLAT, dataloader.py:
`ProbLossStable`, `get_contrastive_loss` with each reported divergence), on one batch; the direction of each term;
no retain data and no reference model; bad settings in one line. The language-model contract runs in
test_methods.py, the vision-language one in test_mllm_family.py (every registered method)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from conftest import tiny_items
from obliviate.errors import ObliviateError
from obliviate.methods.common import make_method
from obliviate.models import causal_lm as lm

IDK = ["I don't know.", "I have no idea."]


def batch(tok, items, answers=None):
    answers = answers or [i.answer for i in items]
    return lm.collate([lm.encode_qa(tok, i.question, a) for i, a in zip(items, answers)], tok.pad_token_id)


# ---- the reference, re-typed: dataloader.py of UCSC-REAL/FLAT ------------------------------------------------------
def reference_contrastive_loss(prob_sum_unlearn, prob_sum_good, div):
    if div == 'KL':
        def activation(x): return -torch.mean(x)
        def conjugate(x): return -torch.mean(torch.exp(x - 1.))
    elif div == 'Pearson':
        def activation(x): return -torch.mean(x)
        def conjugate(x): return -torch.mean(torch.mul(x, x) / 4. + x)
    elif div == 'Jenson-Shannon':
        def activation(x): return -torch.mean(- torch.log(1. + torch.exp(-x))) - torch.log(torch.tensor(2.))
        def conjugate(x): return -torch.mean(x + torch.log(1. + torch.exp(-x))) + torch.log(torch.tensor(2.))
    elif div == 'Total-Variation':
        def activation(x): return -torch.mean(torch.tanh(x) / 2.)
        def conjugate(x): return -torch.mean(torch.tanh(x) / 2.)
    prob_reg = -prob_sum_good
    loss_regular = activation(prob_reg)
    prob_peer = -prob_sum_unlearn
    loss_peer = conjugate(prob_peer)
    return loss_regular - loss_peer


def reference_prob_loss(logits, labels):
    """ProbLossStable: NLLLoss on the softmax itself, i.e. minus each token's probability (0 where ignored)."""
    return nn.NLLLoss(reduction='none', ignore_index=-100)(nn.Softmax(dim=-1)(logits), labels)
# ---------------------------------------------------------------------------------------------------------------------


def reference_flat(model, forget, idk, div):
    """The reference's "cl" loss with P taken per answer (each answer's mean over its own tokens: the reference's
    ProbLossStable values, averaged over the answer's positions only), one contrastive loss per item, averaged over
    the items: the paper's expectations (flat.py says why the reference's batch-wide mean over every position is not
    kept)."""
    def per_item(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = []
        for b in range(logits.shape[0]):
            labels = batch["labels"][b, 1:]
            losses = reference_prob_loss(logits[b, :-1, :], labels)
            out.append(losses.sum() / (labels != -100).sum())  # minus the answer's mean token probability
        return out

    unlearn, good = per_item(forget), per_item(idk)
    return torch.stack([reference_contrastive_loss(u, g, div) for u, g in zip(unlearn, good)]).mean()


@pytest.mark.parametrize("ours, theirs", [("KL", "KL"), ("JS", "Jenson-Shannon"), ("Pearson", "Pearson"),
                                          ("TV", "Total-Variation")])
def test_loss_equals_the_reference_on_one_batch(tiny_lm, ours, theirs):
    model, tok = tiny_lm
    items = tiny_items()[:3]
    forget = batch(tok, items)
    forget["idk"] = batch(tok, items, [IDK[0], IDK[1], IDK[0]])  # answers of different lengths: padding
    parts = make_method("lm", "FLAT", {"divergence": ours}).losses(model, None, forget, {})
    expected = reference_flat(model, forget, forget["idk"], theirs)
    torch.testing.assert_close(parts.forget, expected, rtol=1e-5, atol=1e-6)
    assert parts.retain is None  # no retain data
    # the gradients agree too (the loss is what the optimiser follows)
    params = list(model.parameters())
    ours_g = torch.autograd.grad(parts.forget, params, allow_unused=True)
    theirs_g = torch.autograd.grad(reference_flat(model, forget, forget["idk"], theirs), params, allow_unused=True)
    for a, b in zip(ours_g, theirs_g):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("divergence", ["KL", "JS", "Pearson", "TV"])
def test_the_template_is_learned_and_the_answer_forgotten(divergence):
    """d L / d P_template < 0 and d L / d P_forget > 0 for every divergence, over the whole range of a probability,
    and the closed forms match the formulas written in the method's docstring."""
    from obliviate.methods.lm.flat import DIVERGENCES

    g, f_star_g = DIVERGENCES[divergence]
    p = torch.linspace(0.0, 1.0, 11, requires_grad=True)
    (dg,) = torch.autograd.grad(g(p).sum(), p)
    (df,) = torch.autograd.grad(f_star_g(p).sum(), p)
    assert (dg > 0).all() and (df > 0).all()
    x = 0.3
    expected = {"KL": (x, math.exp(x - 1)), "Pearson": (x, x * x / 4 + x), "TV": (math.tanh(x) / 2,) * 2,
                "JS": (math.log(2) - math.log(1 + math.exp(-x)), -math.log(2 - 2 / (1 + math.exp(-x))))}[divergence]
    t = torch.tensor(x, dtype=torch.float64)
    assert float(g(t)) == pytest.approx(expected[0]) and float(f_star_g(t)) == pytest.approx(expected[1])


def test_needs_no_reference_no_retain_and_a_template(tiny_lm):
    model, tok = tiny_lm
    items = tiny_items()[:2]
    forget = batch(tok, items)
    method = make_method("lm", "FLAT")
    assert method.needs_reference is False and method.config.divergence == "TV"  # the reference code's default
    with pytest.raises(ObliviateError, match=r"FLAT needs forget\['idk'\]"):
        method.losses(model, None, forget, {})
    forget["idk"] = batch(tok, items, IDK)
    parts = method.losses(model, None, forget, None)  # the retain batch is never read
    assert torch.isfinite(parts.forget) and set(parts.logs) == {"forget_nll", "forget_prob", "template_prob"}


def test_bad_divergence_fails_in_one_line():
    with pytest.raises(ObliviateError) as e:
        make_method("lm", "FLAT", {"divergence": "Jenson-Shannon"})
    assert str(e.value) == "FLAT: divergence='Jenson-Shannon' is not valid; choose one of 'KL', 'JS', 'Pearson', 'TV'"
