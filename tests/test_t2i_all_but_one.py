"""All but One (Hong, Lee, Woo, AAAI 2024), as written from its abstract: the concept's guidance term
eps(x_t, c) - eps(x_t, "") is trained towards the original's guidance term of the alternative prompt, the
unconditional prediction is held. Its loss re-computed by hand on one batch, the alternative prompts, and what each
term's gradient reaches."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_task
from obliviate.errors import ObliviateError
from obliviate.methods.common import make_method
from obliviate.methods.t2i.base import EraseContext


def _setup(pipe):
    frozen = copy.deepcopy(pipe.unet).eval().requires_grad_(False)
    ctx = EraseContext(pipe, frozen, tiny_task("striped"), torch.Generator().manual_seed(0))
    unet = copy.deepcopy(pipe.unet)
    with torch.no_grad():  # a model already moved from the original, so every term is non-zero
        gen = torch.Generator().manual_seed(1)
        for p in unet.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=gen))
    texts = ["a red star in striped style", "a red circle in striped style"]
    x_t = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    return ctx, unet, texts, x_t, torch.tensor([700, 300])


def test_loss_is_the_guidance_term_formula(tiny_pipe):
    ctx, unet, texts, x_t, t = _setup(tiny_pipe)
    eta, lam = 0.6, 0.3
    method = make_method("t2i", "AllButOne", {"eta": eta, "uncond_weight": lam})
    cond = ctx.encode(texts)
    loss, logs = method.guidance_loss(ctx, unet, texts, cond, x_t, t)

    # by hand: the alternative is the prompt with the task's anchor ("solid") in place of the concept
    alt = ctx.encode(["a red star in solid style", "a red circle in solid style"])
    empty = ctx.unconditional(2)
    with torch.no_grad():
        g0_c = ctx.predict(ctx.frozen, x_t, t, cond) - ctx.predict(ctx.frozen, x_t, t, empty)
        g0_a = ctx.predict(ctx.frozen, x_t, t, alt) - ctx.predict(ctx.frozen, x_t, t, empty)
        e0_u = ctx.predict(ctx.frozen, x_t, t, empty)
        e_c, e_u = ctx.predict(unet, x_t, t, cond), ctx.predict(unet, x_t, t, empty)
    guidance = ((e_c - e_u - ((1 - eta) * g0_c + eta * g0_a)) ** 2).mean()
    drift = ((e_u - e0_u) ** 2).mean()
    assert drift > 0 and guidance > 0
    assert float(loss) == pytest.approx(float(guidance + lam * drift), rel=1e-5)
    assert logs["guidance_mse"] == pytest.approx(float(guidance), rel=1e-5)
    assert logs["uncond_drift"] == pytest.approx(float(drift), rel=1e-5)


def test_the_original_is_the_optimum_only_when_its_guidance_is_kept(tiny_pipe):
    """eta near 0 keeps the concept's own guidance term: the original model is already at the optimum (loss 0), while
    eta 1 asks it to move the concept's guidance to the alternative's."""
    ctx, _, texts, x_t, t = _setup(tiny_pipe)
    original = copy.deepcopy(ctx.frozen)
    keep = make_method("t2i", "AllButOne", {"eta": 1e-9})
    assert float(keep.guidance_loss(ctx, original, texts, ctx.encode(texts), x_t, t)[0]) < 1e-12
    move = make_method("t2i", "AllButOne")
    assert float(move.guidance_loss(ctx, original, texts, ctx.encode(texts), x_t, t)[0]) > 1e-8


def test_the_guidance_term_is_trained_through_both_predictions(tiny_pipe):
    """The update is on the guidance term eps(c) - eps(""): with lambda 0 its gradient is that of the difference
    (both passes carry it); the drift term adds the unconditional pass's own gradient."""
    ctx, unet, texts, x_t, t = _setup(tiny_pipe)
    cond = ctx.encode(texts)
    params = [p for n, p in unet.named_parameters() if ".attn2." in n]
    for p in unet.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    method = make_method("t2i", "AllButOne", {"uncond_weight": 0.0})
    g = torch.autograd.grad(method.guidance_loss(ctx, unet, texts, cond, x_t, t)[0], params)
    # the same objective with the unconditional pass detached differs: the guidance term is not the prediction
    empty = ctx.unconditional(2)
    alt = ctx.encode([ctx.task.anchor_prompt(p) for p in texts])
    with torch.no_grad():
        target = ctx.predict(ctx.frozen, x_t, t, alt) - ctx.predict(ctx.frozen, x_t, t, empty)
        e_u = ctx.predict(unet, x_t, t, empty)
    detached = ((ctx.predict(unet, x_t, t, cond) - e_u - target) ** 2).mean()
    g_detached = torch.autograd.grad(detached, params)
    flat = lambda gs: torch.cat([x.flatten() for x in gs])  # noqa: E731
    assert (flat(g) - flat(g_detached)).norm() > 1e-3 * flat(g).norm()


def test_parameter_groups_and_bad_config(tiny_pipe):
    xattn = make_method("t2i", "AllButOne")
    full = make_method("t2i", "AllButOne", {"parameter_group": "full"})
    names = [n for n, _ in tiny_pipe.unet.named_parameters()]
    assert {n for n in names if xattn.trainable(n, None)} == {n for n in names if ".attn2." in n}
    assert all(full.trainable(n, None) for n in names)
    for args, key in (({"eta": 1.5}, "eta"), ({"eta": 0}, "eta"), ({"uncond_weight": -1}, "uncond_weight"),
                      ({"parameter_group": "attn"}, "parameter_group")):
        with pytest.raises(ObliviateError, match=key):
            make_method("t2i", "AllButOne", args)
