"""Selective Amnesia (methods/t2i/selective_amnesia.py): the Fisher as the mean of squared per-sample gradients (on a
toy model, and on the tiny pipeline re-computed by hand from the same draws), the EWC term by hand, and the loss's
three terms re-computed on one batch."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_task
from obliviate.errors import ObliviateError
from obliviate.methods.common import make_method
from obliviate.methods.t2i.selective_amnesia import diagonal_fisher, ewc_penalty


def test_fisher_is_the_mean_of_squared_per_sample_gradients():
    w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    unused = torch.zeros(2, requires_grad=True)
    xs = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0], [3.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    ys = torch.tensor([1.0, 0.0, -2.0, 0.5])
    fisher = diagonal_fisher(lambda i: (w @ xs[i] - ys[i]) ** 2, 4, [w, unused])
    residual = (xs @ w - ys).detach()
    by_hand = ((2 * residual[:, None] * xs) ** 2).mean(0)  # not the square of the mean gradient
    assert torch.allclose(fisher[0], by_hand)
    assert not torch.allclose(fisher[0], (2 * residual[:, None] * xs).mean(0) ** 2)
    assert torch.equal(fisher[1], torch.zeros(2))


def test_ewc_penalty_by_hand():
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])]
    anchors = [torch.tensor([0.0, 2.5]), torch.tensor([[1.5]])]
    fisher = [torch.tensor([3.0, 4.0]), torch.tensor([[0.1]])]
    assert float(ewc_penalty(params, anchors, fisher)) == pytest.approx(3 * 1 + 4 * 0.25 + 0.1 * 1)


def _task():  # two retain prompts: the Fisher's samples (each a backward pass per timestep)
    task = tiny_task("striped")
    return dataclasses.replace(task, retain_prompts=task.retain_prompts[:2])


def _ctx(pipe, task, seed=5):
    from obliviate.methods.t2i.base import EraseContext
    return EraseContext(pipe, None, task, torch.Generator().manual_seed(seed), sample_steps=3, guidance=2.0)


def _xattn(unet):
    params = [p for n, p in unet.named_parameters() if ".attn2." in n]
    for p in params:
        p.requires_grad_(True)
    return params


def test_fisher_on_the_pipeline_is_the_elbo_sum_gradient_squared(tiny_pipe):
    """compute_fisher on the original model's samples of the retain prompts, re-computed by hand from the same draws:
    per sample, g = (T / K) sum over K fresh (t, eps) of grad ||eps - eps_theta(x_t, c, t)||^2; F = mean of g^2."""
    from obliviate.loops.t2i import draw_latents
    from obliviate.methods.t2i.base import denoising_loss

    task = _task()
    method = make_method("t2i", "SelectiveAmnesia", {"fisher_timesteps": 2, "fisher_batch_size": 1})
    unet = tiny_pipe.unet
    params = _xattn(unet)
    ctx = _ctx(tiny_pipe, task)
    state = ctx.generator.get_state()
    fisher = method.compute_fisher(ctx, params)

    ctx.generator.set_state(state)
    texts = [r.text for r in task.retain_prompts]
    latents, context = draw_latents(ctx, texts, seed=11), ctx.encode(texts)
    scale = tiny_pipe.scheduler.config.num_train_timesteps / 2
    by_hand = [torch.zeros_like(p) for p in params]
    for i in range(len(texts)):
        loss = sum(denoising_loss(unet, ctx, {"latents": latents[i:i + 1], "context": context[i:i + 1]})
                   for _ in range(2))
        for acc, g in zip(by_hand, torch.autograd.grad(scale * loss, params)):
            acc += g ** 2 / len(texts)
    for f, h in zip(fisher, by_hand):
        assert torch.allclose(f, h, rtol=1e-4, atol=1e-8 * float(h.abs().max()))
    assert sum(float(f.sum()) for f in fisher) > 0


def test_losses_are_surrogate_plus_replay_plus_ewc(tiny_pipe):
    """One batch: the surrogate term is the forget prompts' denoising loss on the anchor's pictures (drawn by the
    original), the retain term gamma * replay + lmbda * sum F (theta - theta*)^2, each re-computed by hand."""
    from obliviate.loops.t2i import draw_latents
    from obliviate.methods.t2i.base import denoising_loss

    task = _task()
    method = make_method("t2i", "SelectiveAmnesia", {"fisher_timesteps": 1, "lmbda": 3.0, "gamma": 0.5})
    unet = tiny_pipe.unet
    params = _xattn(unet)
    ctx = _ctx(tiny_pipe, task)
    texts = task.forget_prompts
    forget = {"texts": texts, "context": ctx.encode(texts)}
    retain_texts = [r.text for r in task.retain_prompts]
    retain = {"texts": retain_texts, "context": ctx.encode(retain_texts),
              "latents": draw_latents(ctx, retain_texts, seed=1)}
    method.setup(ctx, forget, params)
    anchors = draw_latents(ctx, [task.anchor_prompt(t) for t in texts], seed=7)
    assert torch.equal(method.surrogate_latents, anchors) and "striped" not in task.anchor_prompt(texts[0])
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
    state = ctx.generator.get_state()
    parts = method.losses(ctx, unet, forget, retain)

    ctx.generator.set_state(state)
    pick = [method.surrogate_rows[t][int(torch.randint(0, len(method.surrogate_rows[t]), (1,),
                                                        generator=ctx.generator))] for t in texts]
    surrogate = denoising_loss(unet, ctx, {"latents": anchors[torch.tensor(pick)], "context": forget["context"]})
    replay = denoising_loss(unet, ctx, retain)
    ewc = sum(float((f * 0.01 ** 2).sum()) for f in method.fisher)
    assert float(parts.forget.detach()) == pytest.approx(float(surrogate.detach()), rel=1e-6)
    assert parts.logs["ewc"] == pytest.approx(ewc, rel=1e-3) and ewc > 0
    assert float(parts.retain.detach()) == pytest.approx(0.5 * float(replay.detach()) + 3.0 * ewc, rel=1e-3)


def test_parameter_groups():
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", "time_embedding.linear_1.weight",
             "conv_out.weight", "down_blocks.0.resnets.0.conv1.weight"]
    picked = {g: [n for n in names if make_method("t2i", "SelectiveAmnesia", {"parameter_group": g}).trainable(n, None)]
              for g in ("full", "xattn", "noxattn")}
    assert picked["full"] == names and picked["xattn"] == names[:1]
    assert picked["noxattn"] == [names[1], names[4]]


def test_bad_config_names_the_key():
    for args, key in [({"lmbda": -1}, "lmbda"), ({"gamma": "a"}, "gamma"), ({"parameter_group": "all"},
                      "parameter_group"), ({"fisher_timesteps": 0}, "fisher_timesteps"),
                      ({"fisher_batch_size": 2.5}, "fisher_batch_size")]:
        with pytest.raises(ObliviateError, match=key):
            make_method("t2i", "SelectiveAmnesia", args)
