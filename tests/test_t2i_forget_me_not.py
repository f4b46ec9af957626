"""Forget-Me-Not's own mechanics on the tiny SD pipeline: the recorded cross-attention maps and the loss agree with
softmax(Q K^T / sqrt(d)) re-computed by hand from each layer's inputs, per picture (two prompts whose concept stands
at different places), the concept's token positions, and the processors put back."""
from __future__ import annotations

import pytest
import torch

from obliviate.errors import ObliviateError
from obliviate.methods.t2i.attention_maps import concept_positions as positions_in, cross_attention_modules
from obliviate.methods.t2i.attention_maps import recording as recorded_cross_attention
from obliviate.methods.t2i.forget_me_not import attention_loss
from obliviate.models.diffusion import encode_prompts, initial_noise, predict_noise

TEXTS = ["a red star in striped style", "a striped star"]  # the concept at token 5, then at token 2


def concept_positions(pipe, texts, concept, use_pooler):
    """Forget-Me-Not's positions, as its loss asks for them."""
    return positions_in(pipe.tokenizer, texts, concept, pipe.tokenizer.model_max_length,
                        "first" if use_pooler else "none", required_by="ForgetMeNot")


def test_positions_are_the_concept_tokens_and_the_pooled_end_token(tiny_pipe):
    pos = concept_positions(tiny_pipe, TEXTS, "striped", use_pooler=False)
    ids = tiny_pipe.tokenizer(TEXTS, padding="max_length", max_length=tiny_pipe.tokenizer.model_max_length).input_ids
    word = tiny_pipe.tokenizer("striped", add_special_tokens=False).input_ids
    for row, seq in zip(pos, ids):
        assert [seq[i] for i in row.nonzero().flatten().tolist()] == word
    assert pos[0].nonzero().flatten().tolist() != pos[1].nonzero().flatten().tolist()
    pooled = concept_positions(tiny_pipe, TEXTS, "striped", use_pooler=True)
    eos = tiny_pipe.tokenizer.eos_token_id
    for row, seq in zip(pooled ^ pos, ids):  # one more position: the first end-of-text token, not the padding
        assert row.nonzero().flatten().tolist() == [seq.index(eos)]
    with pytest.raises(ObliviateError, match="not among the tokens"):
        concept_positions(tiny_pipe, ["a red star in dotted style"], "striped", use_pooler=True)


def test_loss_is_the_norm_of_softmax_qk_at_the_concept_tokens(tiny_pipe):
    unet = tiny_pipe.unet
    modules = cross_attention_modules(unet)
    assert modules and all(n.endswith("attn2") for n, _ in modules)
    inputs = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, kwargs, _n=n: inputs.__setitem__(_n, (args[0] if args else kwargs["hidden_states"],
                                                                 kwargs["encoder_hidden_states"])), with_kwargs=True)
             for n, m in modules]
    cond = encode_prompts(tiny_pipe, TEXTS)
    x = initial_noise(tiny_pipe, [1, 2])
    positions = concept_positions(tiny_pipe, TEXTS, "striped", use_pooler=True)
    try:
        with torch.no_grad(), recorded_cross_attention(unet) as maps:
            predict_noise(unet, x, 400, cond)
    finally:
        for h in hooks:
            h.remove()
    assert set(maps) == {n for n, _ in modules}
    squares = 0.0
    for name, module in modules:
        hidden, text = inputs[name]
        heads = module.heads
        b, n, _ = hidden.shape
        q = module.to_q(hidden).view(b, n, heads, -1).transpose(1, 2)  # [B, H, N, d]
        k = module.to_k(text).view(b, text.shape[1], heads, -1).transpose(1, 2)  # [B, H, L, d]
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # [B, H, N, L]
        by_hand = torch.cat([probs[i][..., positions[i]].flatten() for i in range(b)])
        recorded = attention_loss({name: maps[name]}, positions)
        assert torch.allclose(recorded, by_hand.norm(), rtol=1e-5), name
        squares += float((by_hand ** 2).sum())
        # the wrong layout (each picture's mask on the other's rows) gives another number: the test can tell
        assert not torch.isclose(recorded, attention_loss({name: maps[name]}, positions.flip(0)), rtol=1e-4)
    assert float(attention_loss(maps, positions)) == pytest.approx(squares ** 0.5, rel=1e-5)


def test_processors_come_back_and_predictions_are_unchanged(tiny_pipe):
    unet = tiny_pipe.unet
    before = {n: type(m.processor) for n, m in cross_attention_modules(unet)}
    cond = encode_prompts(tiny_pipe, TEXTS)
    x = initial_noise(tiny_pipe, [1, 2])
    with torch.no_grad():
        plain = predict_noise(unet, x, 400, cond)
        with recorded_cross_attention(unet):
            recorded = predict_noise(unet, x, 400, cond)
        with pytest.raises(RuntimeError), recorded_cross_attention(unet):
            raise RuntimeError("a failing step")
    assert torch.allclose(plain, recorded, atol=1e-5)  # the recording processor computes the same attention
    after = {n: type(m.processor) for n, m in cross_attention_modules(unet)}
    assert after == before and all("get_attention_scores" not in m.__dict__ for _, m in cross_attention_modules(unet))


def test_cross_attention_choice_trains_only_attn2(tiny_pipe):
    from obliviate.methods.common import make_method

    only = make_method("t2i", "ForgetMeNot", {"train": "cross_attention"})
    everything = make_method("t2i", "ForgetMeNot")
    names = [n for n, _ in tiny_pipe.unet.named_parameters()]
    assert {n for n in names if only.trainable(n, None)} == {n for n in names if ".attn2." in n}
    assert all(everything.trainable(n, None) for n in names)
    with pytest.raises(ObliviateError, match="train"):
        make_method("t2i", "ForgetMeNot", {"train": "attn"})


def test_agrees_with_the_reference_loss_on_its_batch_of_one(tiny_pipe):
    """The reference's AttnController, re-typed: per attn2 call, the probabilities at the positions mask repeated
    over the heads, reshaped to [-1, positions], all concatenated, then one norm (train_attn.py). Its batch is 1."""
    from obliviate.methods.common import make_method
    from obliviate.methods.t2i.base import EraseContext

    task = __import__("conftest").tiny_task()
    text = task.forget_prompts[:1]
    ctx = EraseContext(tiny_pipe, None, task, torch.Generator().manual_seed(0), sample_steps=2)
    batch = {"texts": text, "context": ctx.encode(text), "latents": initial_noise(tiny_pipe, [9])}
    state = ctx.generator.get_state()
    with torch.no_grad():
        ours = make_method("t2i", "ForgetMeNot").losses(ctx, tiny_pipe.unet, batch, {}).forget
        ctx.generator.set_state(state)
        x_t, t, _ = ctx.noisy(batch["latents"])
        positions = concept_positions(tiny_pipe, text, task.concept, use_pooler=True)
        with recorded_cross_attention(tiny_pipe.unet) as maps:
            ctx.predict(tiny_pipe.unet, x_t, t, batch["context"])
    kept = []
    for per_call in maps.values():
        for probs in per_call:
            heads = probs.shape[0] // positions.shape[0]
            mask = positions[:, None, :].repeat(heads, 1, 1)
            kept.append(probs.masked_select(mask).reshape(-1, int(positions[0].sum())))
    assert float(ours) == pytest.approx(float(torch.cat(kept).norm()), rel=1e-6)
