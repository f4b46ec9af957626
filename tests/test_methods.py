"""The contract every language-model unlearning method meets, plus exact checks of the formulas that are easy to get
subtly wrong (NPO's sequence log-ratio, the restricted-gradient projection, RGD's balanced retain pool, RMU's layer
selection)."""
from __future__ import annotations

import copy
import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from conftest import tiny_items
from obliviate.errors import ObliviateError
from obliviate.methods.common import LossParts
from obliviate.models import causal_lm as lm
from obliviate.models import sequences
from obliviate.registry import LM_METHODS as METHODS

# the generation-time guards change no weight: tests/test_lm_guards.py is their contract; UOE needs an MoE model:
# tests/test_lm_moe.py
LM_METHODS = [n for n, e in METHODS.items() if n not in ("Retrain", "UOE") and not e.guard]
IDK = "I don't know."


def batch(tok, items, answer=None):
    encs = [lm.encode_qa(tok, i.question, answer if answer is not None else i.answer) for i in items]
    return lm.collate(encs, tok.pad_token_id)


def batches(tok):
    items = tiny_items()
    forget = batch(tok, items[:3])
    forget["idk"] = batch(tok, items[:3], IDK)
    # each forget question with a wrong answer of the same kind (AltPO's alternates, as the loop's companions)
    forget["companion"] = lm.collate([lm.encode_qa(tok, i.question, i.perturbed_answers[0]) for i in items[:3]],
                                     tok.pad_token_id)
    return forget, batch(tok, items[3:])


@pytest.fixture(scope="module")
def trained(tiny_lm_dir):
    """The tiny Llama fitted on all six answers (and the refusal), so that there is something to forget."""
    model, tok = lm.load(tiny_lm_dir)
    items = tiny_items()
    data = batch(tok, items)
    idk = batch(tok, items[:1], IDK)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        (sequences.mean_nll(model, data) + 0.1 * sequences.mean_nll(model, idk)).backward()
        opt.step()
    model.eval()
    return model, tok


def build(name, **config):
    cls = METHODS[name].load()
    return cls(cls.Config(**config)) if config else cls()


def contract_args(name: str, folder) -> dict:
    """The method_args a method cannot run without: AltPO's alternate answers (a wrong answer of the same kind for
    each question of tiny_items(), in OpenUnlearning's generate.py rows)."""
    if name != "AltPO":
        return {}
    path = Path(folder) / "alternates.jsonl"
    path.write_text("".join(json.dumps({"question": i.question, "alternate": i.perturbed_answers[0]}) + "\n"
                            for i in tiny_items()))
    return {"alternates": str(path)}


def step(method, model, reference, forget, retain, params, mask=None):
    """One update exactly as the loop does it: separate gradients when the method combines them, else backward;
    then the method's gradient mask (WAGLE), if any."""
    parts = method.losses(model, reference, forget, retain)
    assert isinstance(parts, LossParts)
    if method.combine_gradients:
        g_f = torch.autograd.grad(parts.forget, params, retain_graph=True, allow_unused=True)
        g_r = (torch.autograd.grad(parts.retain, params, allow_unused=True) if parts.retain is not None
               else [None] * len(params))
        combined, logs = method.combine_gradients(list(g_f), list(g_r))
        assert all(isinstance(v, float) for v in logs.values())
        for p, g in zip(params, combined):
            p.grad = None if g is None else g.detach()
    else:
        parts.total.backward()
    for p, m in zip(params, mask or []):
        if p.grad is not None:
            p.grad.mul_(m)
    return parts


@pytest.mark.parametrize("name", LM_METHODS)
def test_method_contract(name, trained, tmp_path):
    base_model, tok = trained
    model = copy.deepcopy(base_model)
    model.train()
    method = build(name, **contract_args(name, tmp_path))
    assert method.name == name
    reference = None
    if method.needs_reference:
        reference = copy.deepcopy(base_model).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    method.setup(model, reference)
    forget, retain = batches(tok)
    if method.full_retain_batch:
        pool = method.retain_pool(tiny_items()[3:], random.Random(0))
        retain = batch(tok, pool)

    named = list(model.named_parameters())
    train_names = {n for n, p in named if method.trainable(n, p)}
    assert train_names
    params = [p for n, p in named if n in train_names]
    for n, p in named:
        p.requires_grad_(n in train_names)
    before = {n: p.detach().clone() for n, p in named}
    with torch.no_grad():
        nll_before = float(sequences.mean_nll(model, forget))
    # the loop's fit hook (lazy iterators over the whole sets) and the mask it may leave
    method.fit(model, [(n, p) for n, p in named if n in train_names], iter([forget]), iter([retain]))
    mask = method.gradient_mask()

    parts = method.losses(model, reference, forget, retain)
    assert torch.isfinite(parts.forget) and parts.forget.requires_grad
    if parts.retain is not None:
        assert torch.isfinite(parts.retain)
    assert all(isinstance(v, float) for v in parts.logs.values()) and "forget_nll" in parts.logs

    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        step(method, model, reference, forget, retain, params, mask)
        opt.step()

    changed = [n for n, p in named if not torch.equal(p.detach(), before[n])]
    assert set(changed) <= train_names, f"non-trainable weights changed: {set(changed) - train_names}"
    assert len(changed) >= len(train_names) / 2, f"only {len(changed)} of {len(train_names)} trainable changed"
    with torch.no_grad():
        nll_after = float(sequences.mean_nll(model, forget))
    print(f"{name}: forget NLL {nll_before:.3f} -> {nll_after:.3f}")
    assert nll_after > nll_before, f"{name}: forget NLL {nll_before:.3f} -> {nll_after:.3f}"

    d = dataclasses.asdict(method.config)
    assert type(method).Config(**d) == method.config


def test_restrict_conflicting_2d():
    from obliviate.methods.gradient_surgery import restrict

    g_f, g_r = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    (f,), (r,), cos = restrict([g_f], [g_r])
    torch.testing.assert_close(f, torch.tensor([0.5, 0.5]))  # g_f - (-1)/2 * g_r
    torch.testing.assert_close(r, torch.tensor([0.0, 1.0]))  # g_r - (-1)/1 * g_f
    assert cos == pytest.approx(-2 ** -0.5)
    for lam in (1.0, 1.6, 5.0):
        d = f + lam * r
        assert float(d @ g_f) >= 0 and float(d @ g_r) >= 0
        assert float(d @ g_f) == pytest.approx(1.0 * (1 - 0.5))
        assert float(d @ g_r) == pytest.approx(lam * 2.0 * (1 - 0.5))
    # Split across tensors: the rule acts on the flattened concatenation, not per tensor.
    f2, r2, cos2 = restrict([torch.tensor([1.0]), torch.tensor([0.0])], [torch.tensor([-1.0]), torch.tensor([1.0])])
    torch.testing.assert_close(torch.cat(f2), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(torch.cat(r2), torch.tensor([0.0, 1.0]))
    assert cos2 == pytest.approx(cos)


def test_restrict_passes_non_conflicting_and_zero_gradients():
    from obliviate.methods.gradient_surgery import restrict

    g_f, g_r = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])], [torch.tensor([3.0, -1.0]), torch.tensor([[1.0]])]
    f, r, cos = restrict(g_f, g_r)
    assert cos > 0
    for a, b in zip(f + r, g_f + g_r):
        assert torch.equal(a, b)
    f, r, cos = restrict([torch.zeros(3)], [torch.tensor([1.0, -1.0, 2.0])])
    assert cos == 0.0 and torch.equal(f[0], torch.zeros(3)) and torch.equal(r[0], torch.tensor([1.0, -1.0, 2.0]))
    f, r, _ = restrict([torch.tensor([1.0]), None], [None, None])
    assert torch.equal(r[0], torch.zeros(1)) and f[1] is None and r[1] is None


def test_npo_equals_formula(trained):
    model, tok = trained
    forget, retain = batches(tok)
    method = build("NPO", beta=0.1, retain="none")
    parts = method.losses(model, model, forget, retain)
    assert parts.retain is None
    assert float(parts.forget.detach()) == pytest.approx((2 / 0.1) * torch.log(torch.tensor(2.0)).item(), rel=1e-5)
    # Against an explicit computation with a different reference: sums of answer log-probs, not means.
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
        lp, _ = sequences.sequence_logprob(model, forget)
        lp_ref, _ = sequences.sequence_logprob(ref, forget)
        expected = -(2 / 0.1) * torch.nn.functional.logsigmoid(-0.1 * (lp - lp_ref)).mean()
        got = build("NPO", beta=0.1, retain="none").losses(model, ref, forget, retain).forget
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_simnpo_and_undial_formulas(trained):
    model, tok = trained
    forget, retain = batches(tok)
    with torch.no_grad():
        nll = sequences.answer_nll(model, forget)
        got = build("SimNPO", alpha=0.0).losses(model, None, forget, retain)
        expected = -(2 / 4.5) * torch.nn.functional.logsigmoid(4.5 * nll - 0.0).mean()
        assert got.retain is None and float(got.forget) == pytest.approx(float(expected), rel=1e-5)
        # UNDIAL with beta 0 and model == reference: cross-entropy to itself = mean entropy >= 0; with beta > 0 the
        # target moves mass off the true token, so the loss grows.
        und0 = build("UNDIAL", beta=0.0).losses(model, model, forget, retain).forget
        und10 = build("UNDIAL").losses(model, model, forget, retain).forget
        assert 0 <= float(und0) < float(und10)


def test_reference_free_methods_never_touch_reference(trained):
    model, tok = trained
    forget, retain = batches(tok)

    class Poison:
        def __getattr__(self, name):
            raise AssertionError(f"reference used: {name}")

        def __call__(self, *a, **k):
            raise AssertionError("reference called")

    for name in ("GradAscent", "GradDiff", "SimNPO"):
        method = build(name)
        assert method.needs_reference is False
        parts = method.losses(model, Poison(), forget, retain)
        assert torch.isfinite(parts.total)
    for name in ("KL", "NPO", "IdkPO", "RMU", "UNDIAL"):
        assert build(name).needs_reference is True
    assert build("RG").needs_reference is False  # follows its base (GradDiff)
    assert build("RG", base="NPO").needs_reference is True
    assert build("WAGLE").needs_reference is False  # follows its base (GradDiff)
    assert build("WAGLE", base="NPO").needs_reference is True


def test_config_errors_name_the_key_and_choices():
    with pytest.raises(ObliviateError, match=r"retain='kll'.*'none', 'gd', 'kl'"):
        build("NPO", retain="kll")
    with pytest.raises(ObliviateError, match="beta"):
        build("NPO", beta=0)
    with pytest.raises(ObliviateError, match="base='RGD' is not valid"):
        build("RG", base="RGD")
    with pytest.raises(ObliviateError, match="base='WAGLE' is not valid"):  # a rule is no other rule's base
        build("RG", base="WAGLE")
    with pytest.raises(ObliviateError, match="unknown method"):
        build("RG", base="Nope")
    with pytest.raises(ObliviateError, match="unknown key.*'betta'.*valid: beta"):
        build("RG", base="NPO", base_args={"betta": 1})
    with pytest.raises(ObliviateError, match="tokens"):
        build("RMU", tokens="some")
    assert build("RG", base="npo", base_args={"beta": 0.2}).base.config.beta == 0.2


def test_rgd_retain_pool_is_balanced():
    from obliviate.data import QAItem
    from obliviate.methods.lm.restricted_gradient import RGD, RGDConfig

    items = []
    for source, n_subjects, per in (("profiles", 10, 10), ("world_facts", 3, 5), ("real_authors", 2, 20)):
        for s in range(n_subjects):
            items += [QAItem(f"q{source}{s}{k}", "a", subject=f"{source}-{s}", source=source) for k in range(per)]
    pool = RGD(RGDConfig(diverse_retain_size=30)).retain_pool(items, random.Random(0))
    assert len(pool) == 30 and len(set(pool)) == 30
    by_source = {src: [i for i in pool if i.source == src] for src in ("profiles", "world_facts", "real_authors")}
    assert all(len(v) == 10 for v in by_source.values())
    assert len({i.subject for i in by_source["profiles"]}) == 10  # one per person before any repeats
    assert len({i.subject for i in by_source["world_facts"]}) == 3
    assert sorted(len([i for i in by_source["real_authors"] if i.subject == s]) for s in ("real_authors-0",
                                                                                             "real_authors-1")) == [5, 5]
    # Smaller pool than asked: all of it. RG keeps the base's pool (all items) and samples batches as usual.
    assert len(RGD(RGDConfig(diverse_retain_size=500)).retain_pool(items, random.Random(0))) == len(items)
    assert RGD.full_retain_batch is True and build("RG").full_retain_batch is False
    assert build("RG").retain_pool(items, random.Random(0)) == items


def test_rgd_truncates_forget_loss(trained):
    model, tok = trained
    forget, retain = batches(tok)
    with torch.no_grad():
        nll = sequences.answer_nll(model, forget)
    method = build("RGD", forget_loss_cap=float(nll.max()) + 1)
    assert method.losses(model, None, forget, retain).logs["forget_active"] == 1.0
    method = build("RGD", forget_loss_cap=float(nll.sort().values[1]))  # only the easiest sequence stays
    parts = method.losses(model, None, forget, retain)
    assert parts.logs["forget_active"] == pytest.approx(1 / 3)
    keep = int(nll.argmin())
    one = {k: v[keep:keep + 1] for k, v in forget.items() if k not in ("idk", "companion")}
    assert float(parts.forget) == pytest.approx(-float(sequences.mean_nll(model, one)), rel=1e-5)
    method = build("RGD", forget_loss_cap=float(nll.min()) / 2)  # everything forgotten: retain-only step
    parts = method.losses(model, None, forget, retain)
    assert parts.logs["forget_active"] == 0.0 and float(parts.forget) == 0.0 and parts.forget.requires_grad
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(parts.forget, params, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


def test_rmu_trains_only_chosen_mlp_layers(tiny_lm):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, _ = tiny_lm
    method = build("RMU")  # layer -2 of 2 -> layer 0; trained layers [0]
    method.setup(model, model)
    names = [n for n, p in model.named_parameters() if method.trainable(n, p)]
    assert names and all(n.startswith("model.layers.0.mlp.") for n in names)
    assert method.u.shape == (model.config.hidden_size,) and float(method.u.norm()) == pytest.approx(1.0)
    assert (method.u >= 0).all()
    u0 = method.u.clone()
    method.setup(model, model)
    assert torch.equal(method.u, u0)  # fixed by the seed

    torch.manual_seed(0)
    four = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                        num_attention_heads=2, num_key_value_heads=2))
    method = build("RMU")
    method.setup(four, four)
    layers = {int(n.split(".")[2]) for n, p in four.named_parameters() if method.trainable(n, p)}
    assert method.layer == 2 and layers == {1, 2}
    method = build("RMU", layer=3, train_layers=[3], param_filter="down_proj")
    method.setup(four, four)
    chosen = [n for n, p in four.named_parameters() if method.trainable(n, p)]
    assert chosen == ["model.layers.3.mlp.down_proj.weight"]
    with pytest.raises(ObliviateError, match="after the steered layer"):
        build("RMU", layer=1, train_layers=[2]).setup(four, four)
    with pytest.raises(ObliviateError, match="out of range"):
        build("RMU", layer=7).setup(four, four)


def test_rmu_with_lora_trains_only_lora_of_chosen_layers(tiny_lm):
    peft = pytest.importorskip("peft")
    model, tok = tiny_lm
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj",
                                                                           "q_proj", "v_proj"]))
    method = build("RMU", layer=1, train_layers=[1])
    method.setup(lora, model)
    names = [n for n, p in lora.named_parameters() if method.trainable(n, p)]
    assert names and all("layers.1.mlp." in n and "lora_" in n for n in names)
    forget, retain = batches(tok)
    parts = method.losses(lora, model, forget, retain)
    assert torch.isfinite(parts.total)


@pytest.mark.parametrize("base", ["UNDIAL", "RMU", "NPO"])
def test_rg_wraps_other_bases(base, trained):
    """RG delegates reference, setup and parameter selection to its base; a base with no retain term (UNDIAL's
    default) gives g_retain = None and the step is plain forget descent."""
    base_model, tok = trained
    model = copy.deepcopy(base_model)
    method = build("RG", base=base, retain_weight=1.6)
    reference = copy.deepcopy(base_model).eval() if method.needs_reference else None
    method.setup(model, reference)
    forget, retain = batches(tok)
    params = [p for n, p in model.named_parameters() if method.trainable(n, p)]
    step(method, model, reference, forget, retain, params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert method.last_cosine is not None and -1.0 <= method.last_cosine <= 1.0


def test_group_by_length_batches_similar_lengths_and_keeps_every_item():
    """group_by_length: each pass holds every item once, no batch mixes a long text with short answers, and the
    default (off) keeps the plain shuffled passes, batch for batch."""
    import itertools
    import random

    from obliviate.loops.lm import _batches

    lengths = [30] * 40 + [96] * 10 + [34] * 20
    items = list(range(len(lengths)))
    one_pass = list(itertools.islice(_batches(items, 8, random.Random(0), lengths), 10))  # 60 short: 8, 10 long: 2
    assert sorted(i for b in one_pass for i in b) == items
    for batch in one_pass:
        lens = [lengths[i] for i in batch]
        assert max(lens) <= 1.5 * min(lens), lens
    plain, old = _batches(items, 8, random.Random(3)), random.Random(3)
    order = list(items)
    old.shuffle(order)
    assert list(itertools.islice(plain, 9)) == [order[i:i + 8] for i in range(0, 70, 8)]
