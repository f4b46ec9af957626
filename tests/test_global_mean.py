"""Every method's loss is a mean over the optimiser step's global batch, however the batch is split: into uneven
shares (data parallel: 3 items as 2 + 1, or a share with no item) or into micro-batches (gradient accumulation).
Split into linked shares (what the loop does for the micro-batches of a step, and what `global_count` adds across
processes), the shares' losses and gradients sum to those of the whole batch; and accumulation 2 x batch 2 takes
the steps batch 4 takes."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_items, tiny_texts
from obliviate.config import LMTrainConfig
from obliviate.models import causal_lm as lm
from obliviate.models import sequences as seq
from obliviate.registry import MLLM_METHODS

# every loss-based language-model method, and the vision-language ones, which run on text batches too
# UOE needs an MoE model: test_lm_moe.py; the guards have no loss (test_lm_guards.py, test_mllm_guards.py)
METHODS = [n for n, e in MLLM_METHODS.items() if n not in ("Retrain", "UOE") and not e.guard]
IDK = "I don't know."


def _encode(tok, items, answer=None):
    return [lm.encode_item(tok, i, answer) for i in items]


def _batch(tok, forget, retain, companions):
    """A forget batch with its refusals (and companions) and a retain batch, as the loop collates them."""
    pad = tok.pad_token_id
    f = lm.collate(_encode(tok, forget), pad)
    f["idk"] = lm.collate(_encode(tok, forget, IDK), pad)
    f["companion"] = lm.collate(_encode(tok, companions), pad)
    return f, lm.collate(_encode(tok, retain), pad)


def _grads(term, params):
    if term is None:
        return None
    return [torch.zeros_like(p) if g is None else g
            for g, p in zip(torch.autograd.grad(term, params, allow_unused=True, retain_graph=True), params)]


@pytest.fixture(scope="module")
def models(tiny_lm_dir):
    model, tok = lm.load(tiny_lm_dir)
    reference = copy.deepcopy(model)
    with torch.no_grad():  # a reference apart from the model, so that every ratio and KL term moves
        g = torch.Generator().manual_seed(1)
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, reference, tok


def _method(name, model, reference, tok, folder):
    from obliviate.registry import lookup_method
    from test_methods import contract_args

    args = contract_args(name, folder)  # AltPO's alternate answers
    if name in ("RG", "RGD"):
        args = {"base": "NPO"}  # a sequence mean inside the restricted gradient
    method = lookup_method("mllm", name).load()
    method = method(method.Config(**args))
    method.setup(model, reference)
    if name == "RGD":  # a cap that keeps some sequences and drops others, so the kept count matters
        f, _ = _batch(tok, tiny_items()[:3], tiny_items()[3:], tiny_items()[3:6])
        with torch.no_grad():
            nll = seq.answer_nll(model, f).sort().values
        method.config.forget_loss_cap = float(nll[1] + nll[2]) / 2
    return method


@pytest.mark.parametrize("name", METHODS)
def test_a_loss_split_into_uneven_and_empty_shares_sums_to_the_whole_batch_loss(models, name, tmp_path):
    model, reference, tok = models
    method = _method(name, model, reference, tok, tmp_path)
    params = [p for p in model.parameters()]
    items = tiny_items()
    forget, retain = items[:3], items[3:] + tiny_texts()[:2]
    companions = items[3:6]
    whole_f, whole_r = _batch(tok, forget, retain, companions)
    # 3 forget items as 2 + 1 + 0, 5 retain items as 1 + 0 + 4: every uneven case, an empty share on each side
    cuts_f, cuts_r = [(0, 2), (2, 3), (3, 3)], [(0, 1), (1, 1), (1, 5)]
    shares = [_batch(tok, forget[a:b], retain[c:d], companions[a:b]) for (a, b), (c, d) in zip(cuts_f, cuts_r)]
    forgets, retains = [f for f, _ in shares], [r for _, r in shares]
    seq.link_micro_batches(forgets)
    seq.link_micro_batches(retains)
    forgets = [method.select_forget(model, f) for f in forgets]  # as the loop does: drop rows (RGD), then count
    seq.link_micro_batches(forgets)
    whole = method.losses(model, reference, whole_f, whole_r)
    parts = [method.losses(model, reference, f, r) for f, r in zip(forgets, retains)]
    assert not (whole.forget.detach() == 0).all() or name == "RMU", "a zero forget loss would prove nothing"
    torch.testing.assert_close(sum(p.forget for p in parts).detach(), whole.forget.detach(), rtol=1e-5, atol=1e-6)
    for key, value in whole.logs.items():  # the logs are shares of global means too
        assert sum(p.logs[key] for p in parts) == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for term in ("forget", "retain"):
        expected = _grads(getattr(whole, term), params)
        got = [_grads(getattr(p, term), params) for p in parts]
        if expected is None:
            assert all(g is None for g in got)
            continue
        assert any(float(g.abs().max()) > 0 for g in expected), f"{term}: no gradient to compare"
        for i, e in enumerate(expected):
            torch.testing.assert_close(sum(g[i] for g in got), e, rtol=1e-4, atol=1e-6)


def test_an_empty_share_is_one_row_that_counts_nothing(tiny_lm):
    model, tok = tiny_lm
    empty = lm.collate([], tok.pad_token_id)
    assert empty["input_ids"].shape == (1, 1) and float(seq.items(empty).sum()) == 0
    assert int(seq.scored_tokens(empty)) == 0 and "item_mask" not in lm.model_inputs(empty)
    loss = seq.mean_nll(model, empty)
    loss.backward()  # the padding row still reaches every parameter, so the process joins every collective
    assert float(loss) == 0 and all(p.grad is not None and float(p.grad.abs().max()) == 0
                                    for p in model.parameters())


def _unlearn(tiny_lm_dir, method, batch_size, accumulation, args=None):
    from obliviate import progress
    from obliviate.loops.lm import unlearn
    from obliviate.methods.common import make_method
    from obliviate.loops.step import changed_tensors

    progress.set_enabled(False)
    model, tok = lm.load(tiny_lm_dir)
    items = tiny_items()
    result = unlearn(model, tok, items[:4], items[4:] + tiny_texts()[:2], make_method("lm", method, args),
                     LMTrainConfig(max_steps=2, batch_size=batch_size, grad_accum_steps=accumulation, lr=1e-3,
                                 max_grad_norm=1.0))
    progress.set_enabled(True)
    return result.history, changed_tensors(result.model, result.trainable_names)


@pytest.mark.parametrize("method,args", [("GradDiff", None), ("NPO", None),
                                         ("RGD", {"diverse_retain_size": 4, "forget_loss_cap": 100.0}),
                                         ("RGD", {"diverse_retain_size": 4, "base": "NPO"})])
def test_accumulating_two_batches_of_two_takes_the_step_of_one_batch_of_four(tiny_lm_dir, method, args):
    one_history, one = _unlearn(tiny_lm_dir, method, 4, 1, args)
    two_history, two = _unlearn(tiny_lm_dir, method, 2, 2, args)
    assert len(one_history) == len(two_history) == 2
    for a, b in zip(one_history, two_history):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    assert one.keys() == two.keys() and one
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
    initial = dict(lm.load(tiny_lm_dir)[0].named_parameters())  # the steps moved the weights: no empty comparison
    assert any(not torch.allclose(one[k], initial[k].detach(), rtol=0, atol=1e-5) for k in one)


def test_the_steps_count_optimiser_steps_of_the_effective_batch(tiny_lm_dir):
    from obliviate import progress
    from obliviate.loops.lm import unlearn

    progress.set_enabled(False)
    model, tok = lm.load(tiny_lm_dir)
    items = tiny_items()
    # 4 forget items, 2 epochs, an effective batch of 2 x 2: 2 optimiser steps (not 4)
    result = unlearn(model, tok, items[:4], items[4:], "GradDiff",
                     LMTrainConfig(epochs=2, batch_size=2, grad_accum_steps=2, lr=1e-3))
    progress.set_enabled(True)
    assert [h["step"] for h in result.history] == [0, 1]


def test_grad_accum_steps_is_checked_and_refused_where_it_does_not_apply(tmp_path):
    from obliviate.config import build_config
    from obliviate.errors import ObliviateError

    with pytest.raises(ObliviateError, match="grad_accum_steps"):
        build_config({"method": "NPO", "train": {"grad_accum_steps": 0}})
    with pytest.raises(ObliviateError, match="train.grad_accum_steps is a language-model key; this is a "
                                             "text-to-image run"):
        build_config({"family": "t2i", "method": "ESD-x", "concept": "star", "train": {"grad_accum_steps": 2}})
