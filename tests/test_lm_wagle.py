"""WAGLE (Jia et al., NeurIPS 2024): the attribution score against a by-hand computation, the mask's share, the loop
leaving every masked-out weight exactly as it was (AdamW's weight decay included), GradDiff and NPO as bases, and
bad settings in one line. The language-model contract runs in test_methods.py, the vision-language one in
test_mllm_family.py (every registered method)."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_items
from obliviate.config import TrainConfig
from obliviate.errors import ObliviateError
from obliviate.methods.common import make_method
from obliviate.models import causal_lm as lm
from obliviate.models import sequences


def batch(tok, items):
    return lm.collate([lm.encode_qa(tok, i.question, i.answer) for i in items], tok.pad_token_id)


def hf_gradients(model, batches):
    """The mean over the batches of the gradient of transformers' own loss (the reference's `outputs.loss`)."""
    named = list(model.named_parameters())
    total = [torch.zeros_like(p) for _, p in named]
    for b in batches:
        model.zero_grad()
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.backward()
        for t, (_, p) in zip(total, named):
            if p.grad is not None:
                t += p.grad
    model.zero_grad()
    return [t / len(batches) for t in total]


def test_score_and_mask_match_a_by_hand_computation(tiny_lm):
    """score = |(theta - g_r / mu) * g_f| from the reference's loss, averaged over two forget and two retain batches;
    the mask keeps exactly the top `fraction` of all entries with a non-zero score, ranked over every tensor."""
    model, tok = tiny_lm
    items = tiny_items()
    forget = [batch(tok, items[:2]), batch(tok, items[2:3])]
    retain = [batch(tok, items[3:5]), batch(tok, items[5:])]
    mu, fraction = 1e-3, 0.3  # a mu at which theta and g_r / mu are of one size, so both halves count
    g_f, g_r = hf_gradients(model, forget), hf_gradients(model, retain)
    by_hand = [((p.detach() - r / mu) * f).abs() for (_, p), f, r in zip(model.named_parameters(), g_f, g_r)]
    flat = torch.cat([s.flatten() for s in by_hand])
    theta_part = torch.cat([(p.detach() * f).abs().flatten() for (_, p), f in zip(model.named_parameters(), g_f)])
    assert float(theta_part.median()) > 1e-3 * float(flat.median())  # theta matters at this mu

    method = make_method("lm", "WAGLE", {"fraction": fraction, "mu": mu})
    named = list(model.named_parameters())
    method.fit(model, named, iter(forget), iter(retain))

    from obliviate.methods.lm.wagle import attribution_scores, mean_gradients
    params = [p for _, p in named]
    scores = attribution_scores(params, mean_gradients(model, params, iter(forget), None, "forget"),
                                mean_gradients(model, params, iter(retain), None, "retain"), mu)
    for s, h in zip(scores, by_hand):
        torch.testing.assert_close(s, h, rtol=1e-4, atol=1e-7)
    flat = torch.cat([s.flatten() for s in scores])  # ranked as computed (near-ties could swap by a rounding)

    mask = torch.cat([m.flatten() for m in method.gradient_mask()]).bool()
    nonzero = int((flat > 0).sum())
    k = min(int(fraction * flat.numel()), nonzero)
    assert int(mask.sum()) == k and method.kept == pytest.approx(k / flat.numel(), abs=1e-6)
    top = torch.topk(flat, k).indices
    assert bool(mask[top].all())  # the k largest by-hand scores, no other entry
    assert float(flat[mask].min()) >= float(flat[~mask].max())
    assert k == int(fraction * flat.numel())  # (tied embeddings: every entry gets a forget gradient here)


@pytest.mark.parametrize("base", ["GradDiff", "NPO"])
def test_a_run_changes_only_the_masked_weights(tiny_lm, base):
    """Through the loop, with AdamW's weight decay (which acts outside the gradient): every masked-out entry keeps
    its value bit for bit, the kept ones move, and the base's forgetting still happens (the forget NLL rises). The
    losses are the base's own."""
    from obliviate.loops.lm import unlearn

    model, tok = tiny_lm
    items = tiny_items()
    forget, retain = items[:2], items[2:]
    fb = batch(tok, forget)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        nll_before = float(sequences.mean_nll(model, fb))
    method = make_method("lm", "WAGLE", {"base": base, "fraction": 0.4})
    # the base's losses, unchanged by the wrapper
    fbatch, rbatch = batch(tok, forget), batch(tok, retain)
    fbatch["idk"] = fbatch
    ref = model if method.needs_reference else None
    assert float(method.losses(model, ref, fbatch, rbatch).total.detach()) == pytest.approx(
        float(make_method("lm", base).losses(model, ref, fbatch, rbatch).total.detach()))

    result = unlearn(model, tok, forget, retain, method,
                     TrainConfig(max_steps=4, batch_size=2, lr=2e-2, weight_decay=0.5))
    after = dict(result.model.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    masks = dict(zip(names, method.gradient_mask()))
    moved = kept = 0
    for n in names:
        out = ~masks[n].bool()
        assert torch.equal(after[n].detach()[out], before[n][out]), f"{n}: a masked-out entry changed"
        moved += int((after[n].detach() != before[n])[~out].sum())
        kept += int((~out).sum())
    assert moved > 0.9 * kept
    assert 0.3 < method.kept <= 0.4
    with torch.no_grad():
        assert float(sequences.mean_nll(result.model, fb)) > nll_before


@pytest.mark.parametrize("args, message", [
    ({"base": "RGD"}, "WAGLE: base='RGD' is not valid; choose one of GradAscent"),
    ({"base": "Nope"}, "unknown method 'Nope'"),
    ({"base_args": {"betta": 1}}, "WAGLE: base_args has unknown key(s) 'betta' for GradDiff"),
    ({"base_args": [1]}, "WAGLE: base_args must be a table/dict"),
    ({"fraction": 1.5}, "WAGLE: fraction must be in (0, 1]"),
    ({"fraction": 0}, "WAGLE: fraction must be > 0"),
    ({"mu": 0}, "WAGLE: mu must be > 0"),
    ({"mask_batches": 0}, "WAGLE: mask_batches must be a positive integer"),
    ({"mask_batches": 2.5}, "WAGLE: mask_batches must be a positive integer"),
])
def test_bad_settings_fail_in_one_line(args, message):
    with pytest.raises(ObliviateError) as e:
        make_method("lm", "WAGLE", args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_refused_where_no_attribution_can_be_taken(tiny_lm):
    model, tok = tiny_lm
    method = make_method("lm", "WAGLE")
    named = [(n.replace("q_proj.weight", "q_proj.lora_A.default.weight"), p) for n, p in model.named_parameters()]
    with pytest.raises(ObliviateError, match=r"without \[lora\]"):
        method.fit(model, named, iter([]), iter([]))
    with pytest.raises(ObliviateError, match="no forget batch"):
        method.fit(model, list(model.named_parameters()), iter([]), iter([]))
    with pytest.raises(ObliviateError, match="taken before the first step"):
        make_method("lm", "WAGLE").gradient_mask()
