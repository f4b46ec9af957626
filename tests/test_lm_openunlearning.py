"""OpenUnlearning's five language-model methods (WGA, SatImp, CE-U, AltPO, PDU) against OpenUnlearning's own loss.

Each test re-types the reference computation (locuslab/open-unlearning, src/trainer/unlearn/*.py and
src/trainer/utils.py) on the same batch and the same tiny model, and checks that obliviate's loss and its gradient
are the reference's. The methods' contract (they train, they forget, the global mean over split batches, the
vision-language family) is in tests/test_methods.py, tests/test_global_mean.py and tests/test_mllm_family.py, which
run over every registered method."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from obliviate.errors import ObliviateError
from conftest import tiny_items
from obliviate.models import causal_lm as lm
from obliviate.models import sequences
from test_methods import IDK, batch, batches, build


@pytest.fixture(scope="module")
def trained(tiny_lm_dir):
    """The tiny Llama fitted a little on the six answers, so that its token probabilities are far from uniform and
    the weights p^beta differ from token to token."""
    model, tok = lm.load(tiny_lm_dir)
    data, idk = batch(tok, tiny_items()), batch(tok, tiny_items()[:1], IDK)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        opt.zero_grad()
        (sequences.mean_nll(model, data) + 0.1 * sequences.mean_nll(model, idk)).backward()
        opt.step()
    return model.eval(), tok


def _inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def _agree(ours: torch.Tensor, reference: torch.Tensor, model) -> None:
    """The same loss (to ~1e-6) and the same gradient on every parameter."""
    assert abs(float(reference.detach())) > 1e-3, "a loss near 0 would prove nothing"
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-6, abs=1e-7)
    params = [p for p in model.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(ours, params, retain_graph=True, allow_unused=True)
    g_ref = torch.autograd.grad(reference, params, allow_unused=True)
    for a, b in zip(g_ours, g_ref):
        a = torch.zeros_like(params[0]) if a is None and b is None else a
        if b is None:
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---- OpenUnlearning's computations, re-typed (src/trainer/utils.py, src/trainer/unlearn/*.py) ----------------------
def ref_token_weighted(model, inputs, weight):
    """compute_wga_loss / compute_satimp_loss: the flattened per-token CE of the shifted logits, weighted by a
    function of exp(-CE) (detached), averaged over the tokens whose label is not -100."""
    outputs = model(**inputs)
    shift_logits = outputs.logits[..., :-1, :].contiguous()
    shift_labels = inputs["labels"][..., 1:].contiguous()
    lm_loss = nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(
        shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
    w = weight((-lm_loss).exp().detach())
    return -(w * lm_loss)[shift_labels.view(-1) != -100].mean()


def ref_retain_nll(model, inputs):
    """GradDiff.compute_retain_loss with retain_loss_type NLL: the model's own mean loss."""
    return model(**inputs).loss


@pytest.mark.parametrize("args", [{}, {"beta": 2.5, "gamma": 0.5, "alpha": 2.0}])
def test_wga_equals_openunlearning(trained, args):
    model, tok = trained
    forget, retain = batches(tok)
    method = build("WGA", **args)
    c = method.config
    ours = method.losses(model, None, forget, retain).total
    reference = (c.gamma * ref_token_weighted(model, _inputs(forget), lambda p: p ** c.beta)
                 + c.alpha * ref_retain_nll(model, _inputs(retain)))
    _agree(ours, reference, model)


@pytest.mark.parametrize("args", [{}, {"beta1": 1.0, "beta2": 3.0, "gamma": 2.0, "alpha": 0.5}])
def test_satimp_equals_openunlearning(trained, args):
    model, tok = trained
    forget, retain = batches(tok)
    method = build("SatImp", **args)
    c = method.config
    assert (build("SatImp").config.gamma, build("SatImp").config.alpha) == (1.0, 0.1)  # the README's 10:1
    ours = method.losses(model, None, forget, retain).total
    reference = (c.gamma * ref_token_weighted(model, _inputs(forget), lambda p: p ** c.beta1 * (1 - p) ** c.beta2)
                 + c.alpha * ref_retain_nll(model, _inputs(retain)))
    _agree(ours, reference, model)


def test_token_weights_stop_the_ascent_where_the_model_has_forgotten(trained):
    """WGA with beta 0 is gradient ascent; with beta > 0 a token the model gives p ~ 0 adds ~nothing (the point of
    the weighting), so its loss is smaller in size than plain ascent's."""
    model, tok = trained
    forget, retain = batches(tok)
    with torch.no_grad():
        plain = build("WGA", beta=0.0, retain="none").losses(model, None, forget, retain)
        weighted = build("WGA", retain="none").losses(model, None, forget, retain)
        assert float(plain.forget) == pytest.approx(-float(sequences.mean_nll(model, forget)), rel=1e-6)
        assert 0 < -float(weighted.forget) < -float(plain.forget)
        assert weighted.retain is None and plain.logs["forget_weight"] == pytest.approx(1.0)


def ref_ceu(model, inputs, ignore_first_n_answer_tokens=1):
    """compute_batch_ceu and cross_entropy_unlearning_loss (src/trainer/unlearn/ceu.py)."""
    logits = model(**inputs).logits
    labels = inputs["labels"]
    valid_mask = labels != -100
    update_mask = (valid_mask.cumsum(dim=-1) <= ignore_first_n_answer_tokens) & valid_mask
    labels = labels.masked_fill(update_mask, -100)[..., 1:].contiguous()
    logits = logits[..., :-1, :].contiguous()
    valid = labels != -100
    valid_logits, valid_labels = logits[valid], labels[valid]
    target_logits = valid_logits.detach().clone()
    target_logits.scatter_(dim=-1, index=valid_labels.unsqueeze(-1), value=float("-inf"))
    return F.cross_entropy(input=valid_logits, target=F.softmax(target_logits, dim=-1))


@pytest.mark.parametrize("n", [1, 0, 3])
def test_ceu_equals_openunlearning(trained, n):
    model, tok = trained
    forget, retain = batches(tok)
    method = build("CEU", ignore_first_n_answer_tokens=n)
    parts = method.losses(model, None, forget, retain)
    assert parts.retain is None  # the reference's CEU has no retain term
    _agree(parts.total, ref_ceu(model, _inputs(forget), n), model)
    with_retain = build("CEU", alpha=0.5).losses(model, None, forget, retain)
    _agree(with_retain.total, ref_ceu(model, _inputs(forget)) + 0.5 * ref_retain_nll(model, _inputs(retain)), model)


def test_ceu_leaves_out_the_first_answer_tokens(trained):
    """A sequence whose answer is no longer than the tokens left out adds nothing: the loss of a batch is then that
    of the other sequences alone."""
    model, tok = trained
    forget, retain = batches(tok)
    answer_tokens = (forget["labels"][:, 1:] != -100).sum(-1)
    n = int(answer_tokens.min())
    short = int(answer_tokens.argmin())
    others = [i for i in range(len(answer_tokens)) if i != short]
    rest = {k: forget[k][others] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        whole = build("CEU", ignore_first_n_answer_tokens=n).losses(model, None, forget, retain).forget
        alone = build("CEU", ignore_first_n_answer_tokens=n).losses(model, None, rest, retain).forget
    assert float(whole) == pytest.approx(float(alone), rel=1e-6)


def ref_batch_nll(model, inputs):
    """compute_batch_nll: the summed answer-token CE of each sequence."""
    logits = model(**inputs).logits[..., :-1, :].contiguous()
    labels = inputs["labels"][..., 1:].contiguous()
    return nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(logits.transpose(-1, -2), labels).sum(dim=-1)


def ref_dpo(model, ref_model, win_inputs, lose_inputs, beta):
    """compute_dpo_loss, as the DPO trainer (AltPO's recipe) calls it: the alternate wins, the forget answer loses."""
    win_loss = ref_batch_nll(model, win_inputs)
    lose_loss = ref_batch_nll(model, lose_inputs)
    with torch.no_grad():
        win_ref_loss, lose_ref_loss = ref_batch_nll(ref_model, win_inputs), ref_batch_nll(ref_model, lose_inputs)
    win_log_ratio, lose_log_ratio = -(win_loss - win_ref_loss), -(lose_loss - lose_ref_loss)
    return -2 / beta * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()


@pytest.fixture(scope="module")
def reference(trained):
    """A frozen original apart from the model, so that every log-ratio moves."""
    import copy

    ref = copy.deepcopy(trained[0])
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return ref.requires_grad_(False)


@pytest.mark.parametrize("args", [{}, {"beta": 0.5, "gamma": 2.0, "alpha": 5.0}])
def test_altpo_equals_openunlearning(trained, reference, args):
    model, tok = trained
    forget, retain = batches(tok)
    method = build("AltPO", **args)
    c = method.config
    assert method.needs_reference
    ours = method.losses(model, reference, forget, retain).total
    expected = (c.gamma * ref_dpo(model, reference, _inputs(forget["companion"]), _inputs(forget), c.beta)
                + c.alpha * ref_retain_nll(model, _inputs(retain)))
    _agree(ours, expected, model)


def _write_alternates(path, rows) -> str:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_altpo_pairs_each_forget_item_with_an_alternate_from_the_file(tmp_path):
    """OpenUnlearning's generate.py rows (question, answer, alternate; several per question): matched by question and
    answer where the file gives the answer, else by question; one alternate per item, drawn with the run's seed."""
    import random

    items = tiny_items()
    rows = [{"question": items[0].question, "answer": items[0].answer, "alternate": f"Alt {k}."} for k in range(3)]
    rows += [{"question": items[1].question, "alternate": "Other."}]
    method = build("AltPO", alternates=_write_alternates(tmp_path / "alt.jsonl", rows))
    pairs = method.companions(items[:2], items[2:], random.Random(0))
    assert [p.question for p in pairs] == [i.question for i in items[:2]]
    assert pairs[0].answer in {"Alt 0.", "Alt 1.", "Alt 2."} and pairs[1].answer == "Other."
    assert pairs[0].subject == items[0].subject  # everything but the answer is the item's
    drawn = {method.companions(items[:1], [], random.Random(seed))[0].answer for seed in range(20)}
    assert drawn == {"Alt 0.", "Alt 1.", "Alt 2."}
    # one question asked of two people: the answer tells them apart
    same = [dataclasses.replace(items[2], question="Who?"), dataclasses.replace(items[3], question="Who?")]
    rows = [{"question": "Who?", "answer": same[0].answer, "alternate": "A."},
            {"question": "Who?", "answer": same[1].answer, "alternate": "B."}]
    method = build("AltPO", alternates=_write_alternates(tmp_path / "who.jsonl", rows))
    assert [p.answer for p in method.companions(same, [], random.Random(0))] == ["A.", "B."]
    # a JSON list works too
    (tmp_path / "list.json").write_text(json.dumps(rows))
    assert build("AltPO", alternates=str(tmp_path / "list.json")).table["Who?"] == ["A.", "B."]


def test_altpo_runs_through_the_loop_with_the_alternates(tmp_path, tiny_lm_dir):
    """The loop hands the alternates to the loss as forget["companion"]: one step moves the weights and logs the
    alternates' log-likelihood."""
    from obliviate import progress
    from obliviate.config import LMTrainConfig
    from obliviate.loops.lm import unlearn
    from obliviate.methods.common import make_method

    items = tiny_items()
    path = _write_alternates(tmp_path / "alt.jsonl", [{"question": i.question, "alternate": i.perturbed_answers[0]}
                                                       for i in items[:2]])
    model, tok = lm.load(tiny_lm_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    progress.set_enabled(False)
    try:
        result = unlearn(model, tok, items[:2], items[2:], make_method("lm", "AltPO", {"alternates": path}),
                         LMTrainConfig(max_steps=1, batch_size=2, lr=1e-3))
    finally:
        progress.set_enabled(True)
    assert result.history and "alternate_logp" in result.history[0] and result.history[0]["alternate_logp"] < 0
    assert any(not torch.equal(p, before[n]) for n, p in result.model.named_parameters())


@pytest.mark.parametrize("rows,message", [
    (None, "AltPO needs alternate answers: set method_args.alternates"),
    ([{"question": "Where was Ada Lind born?", "alternate": "Far away."}],
     "has no alternate for 1 of the 2 forget questions, e.g. 'Where was Bo Karsk born?'"),
])
def test_altpo_without_an_alternate_stops_in_one_line(tmp_path, rows, message):
    import random

    args = {} if rows is None else {"alternates": _write_alternates(tmp_path / "alt.jsonl", rows)}
    with pytest.raises(ObliviateError, match=re.escape(message)) as e:
        build("AltPO", **args).companions(tiny_items()[:2], [], random.Random(0))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content,message", [
    (None, "AltPO: alternates file not found:"),
    ('{"question": "q", "alternate": "a"}\n{"question": "q", ', "alt.jsonl:2: not valid JSON"),
    ('{"question": "q"}\n', "alt.jsonl: row 1: needs non-empty \"question\" and \"alternate\" strings"),
    ("\n", "alt.jsonl: no alternates in it"),
])
def test_a_bad_alternates_file_is_named_in_one_line(tmp_path, content, message):
    path = tmp_path / "alt.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ObliviateError, match=re.escape(message)) as e:
        build("AltPO", alternates=str(path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,args,message", [
    ("WGA", {"beta": -1}, "WGA: beta must be >= 0"),
    ("WGA", {"retain": "nll"}, "WGA: retain='nll' is not valid"),
    ("SatImp", {"beta1": "5"}, "SatImp: beta1 must be a number"),
    ("SatImp", {"gamma": 0}, "SatImp: gamma must be > 0"),
    ("CEU", {"ignore_first_n_answer_tokens": 1.5}, "CEU: ignore_first_n_answer_tokens must be a whole number"),
    ("CEU", {"ignore_first_n_answer_tokens": -1}, "CEU: ignore_first_n_answer_tokens must be >= 0"),
    ("AltPO", {"beta": 0}, "AltPO: beta must be > 0"),
    ("AltPO", {"alternates": 3}, "AltPO: alternates must be a file path"),
])
def test_a_bad_config_value_is_one_clear_line(name, args, message):
    with pytest.raises(ObliviateError, match=message) as e:
        build(name, **args)
    assert "\n" not in str(e.value)


def test_kl_retain_needs_the_reference():
    assert build("WGA").needs_reference is False and build("WGA", retain="kl").needs_reference is True
    assert build("SatImp").needs_reference is False and build("SatImp", retain="kl").needs_reference is True
