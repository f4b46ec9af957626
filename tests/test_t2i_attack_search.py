"""P4D and Ring-A-Bell on the tiny SD-shaped pipeline: where P4D's learnable tokens go, that its straight-through
soft tokens are exactly the projected prompt in the forward pass, the success bookkeeping, that the optimisation
lowers its objective; Ring-A-Bell's concept vector, that its genetic search only improves, and that it searches once
for pipelines that share a text encoder."""
from __future__ import annotations

import pytest
import torch

from obliviate.attacks.t2i.common import AttackTask, framed_ids, prompt_tokens, soft_tokens, summarize
from obliviate.attacks.t2i.p4d import P4DK, P4DN, free_layout, inserted_layout
from obliviate.attacks.t2i.ring_a_bell import RingABell, concept_vector
from obliviate.errors import ObliviateError

from conftest import tiny_prompts


def _task(pipe, prompts, detect, **extra) -> AttackTask:
    from obliviate.models.diffusion import initial_noise

    return AttackTask(prompts, [0] * len(prompts), initial_noise(pipe, list(range(100, 100 + len(prompts)))), detect,
                      original=pipe, sample_steps=2, **extra)


def test_p4d_layouts():
    assert free_layout([7, 8, 9], 4) == ([0] * 4, [True] * 4)
    ids, learn = inserted_layout([1, 2, 3, 4, 5, 6], 3)  # the reference's len // k + 1 learnable tokens
    assert ids == [0, 1, 2, 3, 0, 4, 5, 6, 0] and learn == [True, False, False, False, True, False, False, False, True]
    ids, learn = inserted_layout([1, 2, 3, 4, 5], 3)
    assert ids == [0, 1, 2, 3, 0, 4, 5] and sum(learn) == 5 // 3 + 1


def test_projected_soft_tokens_are_the_discrete_prompt(tiny_pipe):
    prompts = tiny_prompts()[:2]
    tokens = prompt_tokens(tiny_pipe, prompts)
    ids = framed_ids(tiny_pipe, tokens, "test")
    assert torch.equal(ids, tiny_pipe.tokenizer(prompts, padding="max_length", max_length=12,
                                                return_tensors="pt").input_ids)
    table = tiny_pipe.text_encoder.get_input_embeddings().weight
    where = torch.zeros_like(ids, dtype=torch.bool)
    where[:, 2] = True
    other = ids.clone()
    other[:, 2] = torch.tensor([5, 6])
    with torch.no_grad():
        with soft_tokens(tiny_pipe.text_encoder, table[other], where):
            soft = tiny_pipe.text_encoder(ids)[0]
        assert torch.allclose(soft, tiny_pipe.text_encoder(other)[0], atol=1e-6)
    with pytest.raises(ObliviateError, match="needs 11 tokens; the tokenizer holds 10"):
        P4DN(P4DN.Config(tokens=11, iterations=1)).attack(tiny_pipe, _task(tiny_pipe, prompts, lambda x: [0] * len(x)))


def test_p4d_bookkeeping_and_objective(tiny_pipe):
    prompts = [p for p in tiny_prompts() if "striped" in p]
    calls = []

    def never(images):
        calls.append(len(images))
        return [False] * len(images)

    config = P4DK.Config(iterations=30, check_every=10, lr=0.1)
    rows, images = P4DK(config).attack(tiny_pipe, _task(tiny_pipe, prompts, never))
    assert calls == [3, 3, 3, 3] and images.shape == (3, 3, 16, 16)  # the plain pictures, then three checks
    assert not any(r["success"] or r["pre_success"] for r in rows) and all(r["iteration"] is None for r in rows)
    for r, tokens in zip(rows, prompt_tokens(tiny_pipe, prompts)):  # the prompt's tokens stay, in order
        assert [t for i, t in enumerate(r["token_ids"]) if i % 4] == tokens and len(r["token_ids"]) == 9
    assert sum(r["loss_after"] for r in rows) < sum(r["loss_before"] for r in rows)
    always, _ = P4DN(P4DN.Config(tokens=3, iterations=2, check_every=1)).attack(
        tiny_pipe, _task(tiny_pipe, prompts, lambda x: [True] * len(x)))
    assert summarize(always) == {"pre_asr": 1.0, "asr": 1.0, "ua_attacked": 0.0, "n_attacked": 3}
    assert all(r["adversarial_prompt"] is None and r["iteration"] == 0 for r in always)
    with pytest.raises(ObliviateError, match="needs the original pipeline"):
        P4DN(P4DN.Config()).attack(tiny_pipe, AttackTask(prompts, [0] * 3, torch.zeros(3, 4, 8, 8), never))


def test_p4d_options_are_checked():
    with pytest.raises(ObliviateError, match="every_k must be at least 1"):
        P4DK.Config(every_k=0)
    with pytest.raises(ObliviateError, match="weight_decay must be at least 0"):
        P4DN.Config(weight_decay=-1)


def test_ring_a_bell_vector_and_search(tiny_pipe, monkeypatch):
    prompts = [p for p in tiny_prompts() if "striped" in p]
    pairs = [(p, p.replace("striped", "dotted")) for p in prompts]
    from obliviate.models.diffusion import encode_prompts
    with torch.no_grad():
        expected = (encode_prompts(tiny_pipe, prompts) - encode_prompts(tiny_pipe, [b for _, b in pairs])).mean(0)
    assert torch.allclose(concept_vector(tiny_pipe, pairs), expected, atol=1e-6)
    assert concept_vector(tiny_pipe, [(p, p) for p in prompts]).abs().max() == 0
    # the better half is kept each generation: more generations never end farther from the target
    short = RingABell(RingABell.Config(tokens=4, population=8, generations=1)).search(tiny_pipe, prompts, pairs)
    long = RingABell(RingABell.Config(tokens=4, population=8, generations=15)).search(tiny_pipe, prompts, pairs)
    assert (long[1] <= short[1]).all() and (long[1] < short[1]).any()
    assert long[0].shape == (3, 12) and (long[0][:, 5] == tiny_pipe.tokenizer.eos_token_id).all()
    # one search serves every pipeline with the same text encoder (the erased model, the original, the reference)
    attack = RingABell(RingABell.Config(tokens=4, population=8, generations=3, distance="cosine"))
    searches = []
    search = attack.search
    monkeypatch.setattr(attack, "search", lambda *a: searches.append(1) or search(*a))
    task = _task(tiny_pipe, prompts, lambda x: [False] * len(x), concept_pairs=pairs)
    first, _ = attack.attack(tiny_pipe, task)
    again, _ = attack.attack(tiny_pipe, task)
    assert len(searches) == 1 and first == again and all(len(r["token_ids"]) == 4 for r in first)
    from obliviate.attacks.t2i.common import readable_prompt
    assert all(r["adversarial_prompt"] == readable_prompt(tiny_pipe.tokenizer, r["token_ids"]) for r in first)
    assert not any("\ufffd" in r["adversarial_prompt"] for r in first)
    with pytest.raises(ObliviateError, match="needs prompt pairs"):
        RingABell(RingABell.Config(tokens=4, population=4, generations=1)).attack(
            tiny_pipe, _task(tiny_pipe, prompts, lambda x: [False] * len(x)))
    with pytest.raises(ObliviateError, match="distance must be one of mse, cosine"):
        RingABell.Config(distance="l1")
