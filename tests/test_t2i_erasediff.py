"""EraseDiff's own formulas on hand-made numbers and the tiny SD pipeline: the combined step g_r + lambda g_q (fixed
lambda, and the adaptive max(eta - cos, 0)), the forget objective towards uniform noise re-computed by hand, and the
inner estimate of min f: weights restored bit for bit, refreshed once per pass over the forget set."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_task
from obliviate.errors import ObliviateError
from obliviate.methods.common import make_method
from obliviate.methods.t2i.base import EraseContext
from obliviate.methods.t2i.erasediff import combined_step
from obliviate.models.diffusion import initial_noise


def test_fixed_lambda_adds_the_constraint_gradient():
    g_q = [torch.tensor([1.0, -2.0]), None, torch.tensor([0.5])]
    g_r = [torch.tensor([3.0, 1.0]), torch.tensor([4.0]), None]
    out, logs = make_method("t2i", "EraseDiff", {"lambda_weight": 0.25}).combine_gradients(g_q, g_r)
    assert torch.equal(out[0], torch.tensor([3.25, 0.5])) and torch.equal(out[1], torch.tensor([4.0]))
    assert torch.equal(out[2], torch.tensor([0.125])) and logs["lambda"] == 0.25
    assert combined_step([None], [None], 0.1, None)[0] == [None]


def test_adaptive_lambda_is_eta_minus_the_cosine_floored_at_zero():
    g_q = [torch.tensor([1.0, 0.0]), torch.tensor([0.0])]
    g_r = [torch.tensor([1.0, 1.0]), torch.tensor([0.0])]  # cos(g_r, g_q) = 1 / sqrt(2)
    out, logs = combined_step(g_q, g_r, 0.1, eta=1.0)
    lam = 1.0 - 1 / math.sqrt(2)
    assert logs["grad_cosine"] == pytest.approx(1 / math.sqrt(2)) and logs["lambda"] == pytest.approx(lam)
    assert torch.allclose(out[0], torch.tensor([1.0 + lam, 1.0]))
    out, logs = combined_step(g_q, g_r, 0.1, eta=0.5)  # eta below the cosine: the retain gradient alone
    assert logs["lambda"] == 0.0 and torch.equal(out[0], g_r[0])
    opposed = [torch.tensor([-1.0, -1.0]), torch.tensor([0.0])]  # cos = -1/sqrt(2): lambda = eta + 1/sqrt(2)
    assert combined_step(g_q, opposed, 0.1, eta=0.5)[1]["lambda"] == pytest.approx(0.5 + 1 / math.sqrt(2))
    with pytest.raises(ObliviateError, match="eta"):
        make_method("t2i", "EraseDiff", {"eta": -1.0})


def _ctx(pipe, seed=0):
    return EraseContext(pipe, None, tiny_task(), torch.Generator().manual_seed(seed), sample_steps=2)


def test_forget_objective_is_denoising_towards_uniform_noise(tiny_pipe):
    method = make_method("t2i", "EraseDiff")
    ctx = _ctx(tiny_pipe)
    texts = tiny_task().forget_prompts[:2]
    batch = {"texts": texts, "context": ctx.encode(texts), "latents": initial_noise(tiny_pipe, [5, 6])}
    state = ctx.generator.get_state()
    with torch.no_grad():
        ours = method.forget_loss(ctx, tiny_pipe.unet, batch)
        gen = torch.Generator().set_state(state)  # the same draws, by hand: t, then eps_f ~ U(0, 1)
        sched = tiny_pipe.scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (2,), generator=gen)
        eps_f = torch.rand(batch["latents"].shape, generator=gen)
        abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * batch["latents"] + (1 - abar).sqrt() * eps_f
        pred = tiny_pipe.unet(x_t, t, encoder_hidden_states=batch["context"].states).sample
    assert float(eps_f.min()) >= 0 and float(ours) == pytest.approx(float(F.mse_loss(pred, eps_f)), rel=1e-5)


def test_inner_passes_restore_the_weights_and_refresh_once_per_pass(tiny_pipe):
    method = make_method("t2i", "EraseDiff", {"inner_steps": 1, "inner_lr": 1e-2})
    ctx = _ctx(tiny_pipe)
    texts = tiny_task().forget_prompts
    forget = {"texts": texts, "context": ctx.encode(texts), "latents": initial_noise(tiny_pipe, range(len(texts)))}
    params = [p.requires_grad_(True) for p in tiny_pipe.unet.parameters()]  # as the loop leaves them
    before = [p.detach().clone() for p in params]
    method.setup(ctx, forget, params)
    f_min = method.estimate_forget_min(ctx, tiny_pipe.unet, batch_size=3)
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and all(p.grad is None for p in params)
    assert math.isfinite(f_min) and f_min > 0

    # 3 forget pictures, batches of 2: a pass over the forget set is 2 steps, min f re-estimated at steps 0 and 2
    retain_texts = [r.text for r in tiny_task().retain_prompts[:2]]
    retain = {"texts": retain_texts, "context": ctx.encode(retain_texts), "latents": initial_noise(tiny_pipe, [7, 8])}
    batch = {k: v[:2] for k, v in forget.items()}
    logs = [method.losses(ctx, tiny_pipe.unet, batch, retain).logs for _ in range(3)]
    mins = [h["forget_min"] for h in logs]
    assert len(texts) == 3 and mins[0] == mins[1] != mins[2]
    for h in logs:
        assert h["constraint"] == pytest.approx(h["forget_loss"] - h["forget_min"], abs=1e-6)


def test_pseudo_objective_is_another_prompts_detached_prediction(tiny_pipe):
    method = make_method("t2i", "EraseDiff", {"forget_target": "pseudo"})
    ctx = _ctx(tiny_pipe, seed=3)
    texts = tiny_task().forget_prompts[:2]
    batch = {"texts": texts, "context": ctx.encode(texts), "latents": initial_noise(tiny_pipe, [5, 6])}
    state = ctx.generator.get_state()
    ours = method.forget_loss(ctx, tiny_pipe.unet, batch)
    ctx.generator.set_state(state)  # by hand: a retain prompt per picture, then the ordinary noising
    pool = [r.text for r in tiny_task().retain_prompts]
    picks = torch.randint(0, len(pool), (2,), generator=ctx.generator).tolist()
    x_t, t, _ = ctx.noisy(batch["latents"])
    with torch.no_grad():
        pred = ctx.predict(tiny_pipe.unet, x_t, t, batch["context"])
        other = ctx.predict(tiny_pipe.unet, x_t, t, ctx.encode([pool[i] for i in picks]))
    assert float(ours) == pytest.approx(float(F.mse_loss(pred, other)), rel=1e-5)
