"""DoCo's own formulas: its concept-preserving gradient against the project's restricted gradient on hand-made
vectors, the discriminator's and the denoiser's losses and the discriminator's Adam step re-computed by hand on one
batch of the tiny SD pipeline, the warm-up, and the adversarial direction where a discriminator can learn."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from obliviate.config import TrainConfig
from obliviate.errors import ObliviateError
from obliviate.loops.t2i import erase
from obliviate.methods.common import make_method
from obliviate.methods.t2i.base import EraseContext
from obliviate.methods.t2i.doco import DISC_BETAS, PatchDiscriminator
from obliviate.models.diffusion import encode_prompts, predict_noise
from conftest import tiny_task


def _t(*rows):
    return [torch.tensor(r, dtype=torch.float64) for r in rows]


def _close(a: list, b: list):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-12), (x, y)


def test_concept_preserving_gradient_differs_from_the_restricted_gradient():
    """g_u = (1, 0) and g_p = (-1, 1) conflict (<g_u, g_p> = -1). DoCo removes g_u's component along g_p and keeps
    g_p out of the step: (0.5, 0.5). RG projects both (g_f' = (0.5, 0.5), g_r' = g_r + g_f = (0, 1)) and steps on
    their sum: (0.5, 1.5). With g_p added (preserve_weight 1) DoCo's step is (-0.5, 1.5): g_p is not projected, so
    the step goes against g_u, which RG's never does."""
    g_u, g_p = _t([1.0, 0.0]), _t([-1.0, 1.0])
    doco, _ = make_method("t2i", "DoCo").combine_gradients(g_u, g_p)
    rg, rg_logs = make_method("t2i", "RG", {"retain_weight": 1.0}).combine_gradients(g_u, g_p)
    doco_plus, _ = make_method("t2i", "DoCo", {"preserve_weight": 1.0}).combine_gradients(g_u, g_p)
    _close(doco, _t([0.5, 0.5]))
    _close(rg, _t([0.5, 1.5]))
    _close(doco_plus, _t([-0.5, 1.5]))
    assert float(doco[0] @ g_p[0]) == 0.0 and float(doco[0] @ g_u[0]) > 0  # orthogonal to g_p, still along g_u
    assert float(doco_plus[0] @ g_u[0]) < 0 <= float(rg[0] @ g_u[0])
    assert rg_logs["grad_conflict"] == 1.0
    half, _ = make_method("t2i", "DoCo", {"surgery_scale": 0.5}).combine_gradients(g_u, g_p)
    _close(half, _t([0.75, 0.25]))  # lambda 0.5: half the conflicting component goes
    off, _ = make_method("t2i", "DoCo", {"surgery": False, "preserve_weight": 0.1}).combine_gradients(g_u, g_p)
    _close(off, _t([0.9, 0.1]))  # no surgery: g_u + 0.1 g_p


def test_per_tensor_surgery_projects_where_the_whole_gradients_agree():
    """Two tensors: the first conflicts (<,> = -1), the second agrees (+6), so the whole vectors agree (+5). DoCo (per
    tensor, as its reference code) projects the first tensor; over the whole vector (per_tensor false) nothing is
    projected, and neither does RG's rule, which tests the whole vector."""
    g_u, g_p = _t([1.0, 0.0], [2.0]), _t([-1.0, 1.0], [3.0])
    per_tensor, logs = make_method("t2i", "DoCo").combine_gradients(g_u, g_p)
    whole, whole_logs = make_method("t2i", "DoCo", {"per_tensor": False}).combine_gradients(g_u, g_p)
    rg, rg_logs = make_method("t2i", "RG", {"retain_weight": 1.0}).combine_gradients(g_u, g_p)
    _close(per_tensor, _t([0.5, 0.5], [2.0]))
    _close(whole, g_u)
    _close(rg, _t([0.0, 1.0], [5.0]))  # g_f + g_r, nothing projected
    assert logs["grad_conflict"] == 0.5 and whole_logs["grad_conflict"] == 0.0 == rg_logs["grad_conflict"]
    assert logs["grad_cosine"] == pytest.approx(5 / math.sqrt(5 * 11))


def test_projection_agrees_with_the_reference_for_unit_gradients():
    """The reference (DoCo/gradient_clip.py, re-typed here) subtracts lambda cos(a, b) b/|b| from the unnormalised a:
    the same as the projection for a tensor whose unlearning gradient has norm 1, and not otherwise (obliviate
    removes the component itself)."""
    def reference(a, b, lam=1.0):
        b_hat, a_hat = b / (b.norm() + 1e-8), a / (a.norm() + 1e-8)
        dot = torch.dot(a_hat.flatten(), b_hat.flatten())
        return a - lam * dot * b_hat if dot < 0 else a

    gen = torch.Generator().manual_seed(0)
    b = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    a = []
    for bi in b:  # unit norm per tensor, each at cosine -0.6 with its b
        r = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        u = r - (r * bi).sum() / (bi * bi).sum() * bi
        a.append(-0.6 * bi / bi.norm() + 0.8 * u / u.norm())
    ours, logs = make_method("t2i", "DoCo").combine_gradients(a, b)
    assert logs["grad_conflict"] == 1.0
    for x, y in zip(ours, [reference(ai, bi) for ai, bi in zip(a, b)]):
        assert torch.allclose(x, y, atol=1e-7)
    big, _ = make_method("t2i", "DoCo").combine_gradients([3 * a[0]], [b[0]])
    assert abs(float(big[0].flatten() @ b[0].flatten())) < 1e-9  # ours: the conflict is gone whatever |a|
    assert float(reference(3 * a[0], b[0]).flatten() @ b[0].flatten()) < -1e-3  # the reference's: part of it stays


@pytest.fixture
def doco_ctx(tiny_pipe):
    task = tiny_task("striped")
    ctx = EraseContext(tiny_pipe, copy.deepcopy(tiny_pipe.unet).requires_grad_(False), task,
                       torch.Generator().manual_seed(3), sample_steps=2, guidance=2.0)
    texts = task.forget_prompts
    return ctx, {"texts": texts, "context": ctx.encode(texts)}


def test_warmup_then_losses_and_discriminator_step_by_hand(doco_ctx):
    """On the tiny SD pipeline, with a warm-up of one step: the first call gives the denoiser no gradient (and a run
    that ended there is refused); the second first takes D's Adam step on L_D = BCE(D(x0_c), 1) + BCE(D(x0_a), 0) of
    the first call's (detached) predictions, then gives L_adv = BCE(D(x0_c), 0) and the anchor's denoising loss,
    each x0 by DDPM's formula: all re-computed here by hand."""
    ctx, forget = doco_ctx
    pipe, unet = ctx.pipe, ctx.pipe.unet
    method = make_method("t2i", "DoCo", {"warmup_steps": 1, "disc_width": 4, "disc_lr": 1e-3})
    params = [p.requires_grad_(True) for n, p in unet.named_parameters() if method.trainable(n, p)]
    method.setup(ctx, forget, params)
    assert forget["anchor_latents"].shape[0] == len(forget["texts"])
    draws, noisy = [], ctx.noisy
    ctx.noisy = lambda x0: draws.append(noisy(x0)) or draws[-1]
    anchor_states = encode_prompts(pipe, [ctx.task.anchor_prompt(t) for t in forget["texts"]])
    concept_states = encode_prompts(pipe, forget["texts"])

    @torch.no_grad()
    def x0s(x_t, t):  # the concept's (model being erased) and the anchor's (original) clean latents
        abar = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        return [(x_t - (1 - abar).sqrt() * predict_noise(u, x_t, t, c)) / abar.sqrt()
                for u, c in ((unet, concept_states), (ctx.frozen, anchor_states))]

    warm = method.losses(ctx, unet, forget, {})
    assert warm.logs["adversarial"] == 0.0 and warm.retain is None and "disc_loss" not in warm.logs
    assert all(g is None for g in torch.autograd.grad(warm.total, params, allow_unused=True))
    with pytest.raises(ObliviateError, match="not changed"):  # no step past the warm-up: the run changed nothing
        method.detach(unet)

    x0_c, x0_a = x0s(*draws[0][:2])
    d_before = copy.deepcopy(method.discriminator)
    loss_d = (torch.log1p(torch.exp(-d_before(x0_c))).mean()  # -log sigmoid(z): the concept labelled 1
              + torch.log1p(torch.exp(d_before(x0_a))).mean())  # -log(1 - sigmoid(z)): the anchor labelled 0
    grads = torch.autograd.grad(loss_d, list(d_before.parameters()))
    parts = method.losses(ctx, unet, forget, {})
    assert parts.logs["adversarial"] == 1.0
    assert parts.logs["disc_loss"] == pytest.approx(float(loss_d.detach()), rel=1e-5)
    lr, (b1, b2) = 1e-3, DISC_BETAS
    checked = 0
    for p_new, p_old, g in zip(method.discriminator.parameters(), d_before.parameters(), grads):
        m, v = (1 - b1) * g, (1 - b2) * g * g  # Adam's first step, bias-corrected
        expected = p_old - lr * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + 1e-8)
        # (a bias just before a BatchNorm has a gradient of rounding noise, ~1e-9, whose Adam step is noise too)
        sure = g.abs() > 1e-5
        assert torch.allclose(p_new[sure], expected[sure], atol=1e-7)
        assert ((p_new - p_old).abs() <= lr * 1.001).all()
        checked += int(sure.sum())
    assert checked > 0.8 * sum(p.numel() for p in d_before.parameters())

    (x_t, t, _), (xa_t, ta, eps_a) = draws[1:]
    x0_c, _ = x0s(x_t, t)
    with torch.no_grad():  # D after its step (checked above)
        adv = torch.log1p(torch.exp(method.discriminator(x0_c))).mean()  # -log(1 - sigmoid(z))
        preserve = ((predict_noise(unet, xa_t, ta, anchor_states) - eps_a) ** 2).mean()
    assert float(parts.forget.detach()) == pytest.approx(float(adv), rel=1e-5)
    assert float(parts.retain.detach()) == pytest.approx(float(preserve), rel=1e-5)
    grads_u = torch.autograd.grad(parts.forget, params, retain_graph=True, allow_unused=True)
    assert all(g is not None for g in grads_u) and parts.retain.requires_grad
    with torch.no_grad():  # a step changed the denoiser: the run is not refused
        params[0].sub_(1e-3 * grads_u[0])
    assert method.detach(unet) is None
    # a run of the loop whose steps are all warm-up is refused at its end, even though the loop's probe of the last
    # state calls the losses once more, past the warm-up
    with pytest.raises(ObliviateError, match="not changed"):
        erase(pipe, ctx.task, make_method("t2i", "DoCo", {"warmup_steps": 2, "disc_width": 4}),
              TrainConfig(max_steps=2, batch_size=2), images_per_prompt=1, sample_steps=2)


def test_adversarial_direction_where_the_discriminator_can_learn():
    """Concept domain = anchor domain + a stripe pattern. The discriminator's steps learn to tell them apart, and the
    denoiser's loss then pulls the concept's outputs towards the anchor's (labels swapped, it would push them away);
    no gradient of that loss reaches the discriminator."""
    method = make_method("t2i", "DoCo", {"disc_width": 8, "disc_lr": 1e-2})
    torch.manual_seed(0)
    method.discriminator = PatchDiscriminator(4, 8, PatchDiscriminator.blocks_for(8, 8))
    method.disc_opt = torch.optim.Adam(method.discriminator.parameters(), lr=1e-2, betas=DISC_BETAS)
    gen = torch.Generator().manual_seed(0)
    stripes = torch.zeros(1, 4, 8, 8)
    stripes[:, 0, ::2] = 1.0

    def batch():
        anchor = torch.randn(6, 4, 8, 8, generator=gen)
        return anchor + stripes, anchor
    losses = []
    for _ in range(20):
        method.pending = batch()
        losses.append(method.discriminator_step())
    assert sum(losses[-5:]) / 5 < 0.5 * 2 * math.log(2) < losses[0]  # well below chance (2 ln 2)
    concept, anchor = batch()
    concept.requires_grad_(True)
    method.disc_opt.zero_grad(set_to_none=True)
    adv = method.adversarial_loss(concept)
    (grad,) = torch.autograd.grad(adv, concept)
    assert all(p.grad is None or not p.grad.any() for p in method.discriminator.parameters())
    assert float((-grad * (anchor - concept.detach())).sum()) > 0  # descent moves the concept towards the anchor
    with torch.no_grad():
        assert float(method.adversarial_loss(concept - 0.5 * grad / grad.norm())) < float(adv)


def test_discriminator_depth_and_bad_configs():
    assert [PatchDiscriminator.blocks_for(s, s) for s in (4, 8, 16, 64, 128)] == [1, 2, 3, 4, 4]
    assert PatchDiscriminator(4, 8, 4)(torch.zeros(2, 4, 64, 64)).shape == (2, 1, 3, 3)  # the reference's on SD
    with pytest.raises(ObliviateError, match="4x4"):
        PatchDiscriminator.blocks_for(2, 8)
    for key, value in (("warmup_steps", -1), ("disc_width", 0), ("disc_lr", 0), ("discriminate", "eps"),
                       ("preserve_on", "all"), ("surgery", 1), ("surgery_scale", -1)):
        with pytest.raises(ObliviateError, match=key):
            make_method("t2i", "DoCo", {key: value})


def test_clean_latents_inverts_each_shapes_forward_process():
    """x0 from a prediction that is exactly the target: DDPM's x0 on the SD shape, x_t - sigma v under SD3's flow
    matching (the same solve, from each backbone's own forward process)."""
    from types import SimpleNamespace

    from obliviate.methods.t2i.doco import clean_latents
    from obliviate.models.diffusion import SDBackbone
    from obliviate.models.dit import SD3Backbone
    from obliviate.worlds.canvas_train import make_scheduler

    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    for backbone, scheduler, t in ((SDBackbone(), make_scheduler(), torch.tensor([10, 400, 900])),
                                   (SD3Backbone(), SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000)),
                                    torch.tensor([10.0, 400.0, 900.0]))):  # all its forward process reads
        ctx = SimpleNamespace(pipe=SimpleNamespace(backbone=backbone, scheduler=scheduler))
        x_t = backbone.noisy(ctx.pipe, x0, noise, t)
        pred = backbone.target(ctx.pipe, x0, noise, t)
        torch.testing.assert_close(clean_latents(ctx, x_t, t, pred), x0, atol=2e-5, rtol=1e-4)
        assert not torch.allclose(clean_latents(ctx, x_t, t, noise + 0.1), x0, atol=1e-2)
