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
from test_methods import IDK, batch, batches, build, contract_args


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
def test_altpo_equals_openunlearning(trained, reference, args, tmp_path):
    model, tok = trained
    forget, retain = batches(tok)  # forget["companion"]: the alternates, as the loop collates them
    method = build("AltPO", **contract_args("AltPO", tmp_path), **args)
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


def test_altpo_without_an_alternate_stops_in_one_line(tmp_path):
    """No alternates file: refused with the config (obliviate validate, the start of a run); a forget question the
    file has no alternate for: refused before the first step, naming it."""
    import random

    from obliviate.config import build_config
    from obliviate.runners.common import method_of

    for refuse in (lambda: build("AltPO"), lambda: method_of(build_config({"method": "AltPO"}))):
        with pytest.raises(ObliviateError, match=re.escape("AltPO needs alternate answers: set method_args."
                                                           "alternates to a JSON-lines file")) as e:
            refuse()
        assert "\n" not in str(e.value)
    rows = [{"question": "Where was Ada Lind born?", "alternate": "Far away."}]
    method = build("AltPO", alternates=_write_alternates(tmp_path / "alt.jsonl", rows))
    with pytest.raises(ObliviateError, match=re.escape(
            "has no alternate for 1 of the 2 forget items, e.g. 'Where was Bo Karsk born?'")) as e:
        method.companions(tiny_items()[:2], [], random.Random(0))
    assert "\n" not in str(e.value)


def test_generate_alternates_writes_the_file_altpo_reads(tmp_path, tiny_lm_dir, monkeypatch):
    """The model samples alternates in generate.py's rows; the same seed gives the same file, and AltPO pairs every
    forget item from it. A reply that is the true answer is dropped; an item left with none stops in one line and
    no file is written."""
    import random

    from obliviate.methods.lm.altpo import generate_alternates
    from obliviate.models import causal_lm

    model, tok = lm.load(tiny_lm_dir)
    items = tiny_items()[:2]
    path = tmp_path / "alt.jsonl"
    n = generate_alternates(model, tok, items, str(path), samples=2, max_new_tokens=6)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert n == len(rows) and 2 <= n <= 4 and {r["question"] for r in rows} == {i.question for i in items}
    assert all(r["alternate"] and r["alternate"] != r["answer"] for r in rows)
    generate_alternates(model, tok, items, str(tmp_path / "again.jsonl"), samples=2, max_new_tokens=6)
    assert (tmp_path / "again.jsonl").read_text() == path.read_text()
    pairs = build("AltPO", alternates=str(path)).companions(items, [], random.Random(0))
    assert all(p.answer in {r["alternate"] for r in rows if r["question"] == p.question} for p in pairs)

    answers = [i.answer for i in items]
    draws = iter([answers[:1], ["Elsewhere."], answers[:1],  # item 0 alone: one reply that is not the answer
                  answers, ["Elsewhere.", " "], answers])  # both: item 1 has only its answer and an empty reply
    monkeypatch.setattr(causal_lm, "generate", lambda *a, **k: next(draws))
    generate_alternates(model, tok, items[:1], str(tmp_path / "kept.jsonl"), samples=3)
    kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert [(r["question"], r["alternate"]) for r in kept] == [(items[0].question, "Elsewhere.")]
    with pytest.raises(ObliviateError, match=re.escape(f"no alternate other than the answer for "
                                                       f"{items[1].question!r} in 3 samples")):
        generate_alternates(model, tok, items, str(tmp_path / "none.jsonl"), samples=3)
    assert not (tmp_path / "none.jsonl").exists()


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


class RefPDU:
    """PDU.compute_loss and final_loss_value (src/trainer/unlearn/pdu.py), updating its dual variable as the
    reference does inside the loss, when primal_dual is on and the warm-up is over (can_update)."""

    def __init__(self, gamma, alpha, eps, step_size, primal_dual=True, can_update=True):
        self.preferences, self.eps, self.step_size = [gamma, alpha], eps, step_size
        self.primal_dual, self.can_update = primal_dual, can_update

    def compute_loss(self, model, forget_inputs, retain_inputs):
        logits = model(**forget_inputs).logits
        logits = logits.reshape(-1, logits.size(-1))
        forget_loss = (logits.max(dim=-1)[0] - logits.mean(dim=-1)) ** 2
        mask = (forget_inputs["labels"] != -100).reshape(-1)
        forget_loss = (forget_loss * mask).sum() / mask.sum()
        retain_loss = model(**retain_inputs).loss - self.eps
        loss = (torch.tensor(self.preferences) * torch.hstack([forget_loss, retain_loss])).sum()
        if self.primal_dual and self.can_update:
            self.preferences[1] = max(0, self.preferences[1] + self.step_size * retain_loss.item())
        return loss


@pytest.mark.parametrize("args", [{}, {"gamma": 2.0, "alpha": 50.0, "retain_loss_eps": 0.05, "primal_dual": False}])
def test_pdu_equals_openunlearning(trained, args):
    model, tok = trained
    forget, retain = batches(tok)
    method = build("PDU", **args)
    c = method.config
    ours = method.losses(model, None, forget, retain).total
    ref = RefPDU(c.gamma, c.alpha, c.retain_loss_eps, c.dual_step_size, c.primal_dual)
    _agree(ours, ref.compute_loss(model, _inputs(forget), _inputs(retain)), model)


def test_pdu_takes_the_references_primal_and_dual_steps(trained):
    """Three SGD steps with the dual variable moving: the same weights and the same lambda as the reference's loop
    (the reference updates lambda in the loss, obliviate after the step: the same sequence)."""
    import copy

    base, tok = trained
    forget, retain = batches(tok)
    args = {"alpha": 2.0, "retain_loss_eps": 0.0, "dual_step_size": 3.0, "dual_warmup_epochs": 0}
    ours, theirs = copy.deepcopy(base).train(), copy.deepcopy(base).train()
    method, ref = build("PDU", **args), RefPDU(1.0, 2.0, 0.0, 3.0)
    opt_ours, opt_ref = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (ours, theirs))
    lambdas = []
    for step in range(3):
        opt_ours.zero_grad()
        parts = method.losses(ours, None, forget, retain)
        parts.total.backward()
        opt_ours.step()
        logs = dict(parts.logs)
        method.after_step(logs, float(step))
        lambdas.append(logs["retain_preference"])
        opt_ref.zero_grad()
        ref.compute_loss(theirs, _inputs(forget), _inputs(retain)).backward()
        opt_ref.step()
        assert method.dual == pytest.approx(ref.preferences[1], rel=1e-6)
    assert lambdas[0] > 2.0 and lambdas[2] > lambdas[1] > lambdas[0]  # eps 0: the bound is broken, lambda rises
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _pdu_run(tiny_lm_dir, args, steps=4, checkpoints=None):
    from obliviate import progress
    from obliviate.config import LMTrainConfig
    from obliviate.loops.lm import unlearn
    from obliviate.methods.common import make_method

    model, tok = lm.load(tiny_lm_dir)
    items = tiny_items()
    progress.set_enabled(False)
    try:
        return unlearn(model, tok, items[:2], items[2:], make_method("lm", "PDU", args),
                       LMTrainConfig(max_steps=steps, batch_size=2, lr=1e-3), checkpoints=checkpoints)
    finally:
        progress.set_enabled(True)


def test_pdu_dual_steps_in_the_loop_follow_the_steps_retain_loss_after_the_warm_up(tiny_lm_dir):
    """Through the loop: lambda moves by eta (retain NLL - eps) after each step that begins at or after the warm-up
    (2 forget items, batch 2: one epoch per step, so steps 0 and 1 begin before epoch 2)."""
    history = _pdu_run(tiny_lm_dir, {"alpha": 1.0, "retain_loss_eps": 0.5, "dual_step_size": 0.5,
                                     "dual_warmup_epochs": 2}).history
    lam = 1.0
    for h in history:
        if h["step"] >= 2:
            lam = max(0.0, lam + 0.5 * (h["retain_nll"] - 0.5))
        assert h["retain_preference"] == pytest.approx(lam, rel=1e-12)
    assert history[-1]["retain_preference"] != 1.0  # the untrained model's retain NLL is far above 0.5


def test_pdu_with_gradient_accumulation_takes_the_dual_steps_of_one_batch(tiny_lm_dir):
    """2 micro-batches of 2 take the dual steps of one batch of 4: lambda moves once per optimiser step on the
    step's retain loss (the reference moves it at every micro-batch, on that micro-batch's loss)."""
    from obliviate import progress
    from obliviate.config import LMTrainConfig
    from obliviate.loops.lm import unlearn
    from obliviate.methods.common import make_method

    def run(batch_size, accumulation):
        model, tok = lm.load(tiny_lm_dir)
        items = tiny_items()
        progress.set_enabled(False)
        try:
            return unlearn(model, tok, items[:4], items[4:], make_method("lm", "PDU", {"dual_warmup_epochs": 0}),
                           LMTrainConfig(max_steps=2, batch_size=batch_size, grad_accum_steps=accumulation,
                                         lr=1e-3)).history
        finally:
            progress.set_enabled(True)

    one, two = run(4, 1), run(2, 2)
    assert len({h["retain_preference"] for h in one}) == 2  # lambda moved at every step
    for a, b in zip(one, two):
        for key in ("retain_nll", "retain_preference", "logit_margin", "loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_a_resumed_pdu_run_replays_its_dual_steps(tiny_lm_dir, tmp_path):
    """Interrupted after 2 of 4 steps and resumed: the same lambdas and weights as the run taken in one go (the
    dual variable is rebuilt from the checkpoint's history, not restarted at alpha)."""
    from obliviate.loops.step import Checkpoints, changed_tensors

    class FirstHalf(Checkpoints):  # keeps only the checkpoint after step 2, as if the run were killed then
        def save(self, step, *a, **k):
            if step < 2:
                super().save(step, *a, **k)

    args = {"retain_loss_eps": 0.5, "dual_warmup_epochs": 0}
    whole = _pdu_run(tiny_lm_dir, args)
    _pdu_run(tiny_lm_dir, args, checkpoints=FirstHalf(str(tmp_path), 2, "k"))
    resumed = _pdu_run(tiny_lm_dir, args, checkpoints=Checkpoints(str(tmp_path), 2, "k"))
    assert [h["retain_preference"] for h in resumed.history] == [h["retain_preference"] for h in whole.history]
    a, b = changed_tensors(whole.model, whole.trainable_names), changed_tensors(resumed.model, resumed.trainable_names)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rg_passes_alternates_and_dual_steps_to_its_base(tmp_path):
    """RG over AltPO pairs the forget items with the base's alternates; RG over PDU moves the base's dual variable."""
    import random

    rg = build("RG", base="AltPO", base_args=contract_args("AltPO", tmp_path))
    pairs = rg.companions(tiny_items()[:2], [], random.Random(0))
    assert [p.answer for p in pairs] == [i.perturbed_answers[0] for i in tiny_items()[:2]]
    rg = build("RG", base="PDU", base_args={"retain_loss_eps": 0.5, "dual_warmup_epochs": 0})
    logs = {"retain_nll": 2.5}
    rg.after_step(logs, 0.0)
    assert rg.base.dual == logs["retain_preference"] == pytest.approx(1.0 + 2.0)


@pytest.mark.parametrize("name,args,message", [
    ("WGA", {"beta": -1}, "WGA: beta must be >= 0"),
    ("WGA", {"retain": "nll"}, "WGA: retain='nll' is not valid"),
    ("SatImp", {"beta1": "5"}, "SatImp: beta1 must be a number"),
    ("SatImp", {"gamma": 0}, "SatImp: gamma must be > 0"),
    ("CEU", {"ignore_first_n_answer_tokens": 1.5}, "CEU: ignore_first_n_answer_tokens must be a whole number"),
    ("CEU", {"ignore_first_n_answer_tokens": -1}, "CEU: ignore_first_n_answer_tokens must be >= 0"),
    ("AltPO", {"alternates": "alt.jsonl", "beta": 0}, "AltPO: beta must be > 0"),
    ("AltPO", {"alternates": 3}, "AltPO: alternates must be a file path"),
    ("PDU", {"dual_update_upon": "epoch"}, "PDU: dual_update_upon='epoch' is not valid; choose one of 'step'"),
    ("PDU", {"retain_loss_eps": -0.1}, "PDU: retain_loss_eps must be >= 0"),
    ("PDU", {"primal_dual": "yes"}, "PDU: primal_dual='yes' is not valid"),
])
def test_a_bad_config_value_is_one_clear_line(name, args, message):
    with pytest.raises(ObliviateError, match=message) as e:
        build(name, **args)
    assert "\n" not in str(e.value)


def test_kl_retain_needs_the_reference():
    assert build("WGA").needs_reference is False and build("WGA", retain="kl").needs_reference is True
    assert build("SatImp").needs_reference is False and build("SatImp", retain="kl").needs_reference is True
