"""ANT (Li et al. 2025, "Set You Straight"): its trajectory-aware loss against a re-typing of the reference update
(github.com/lileyang1210/ANT, Single/train-scripts/train_ant_single.py), the early/late split of the sampling steps,
and the augmentation-enhanced saliency map (per-tensor top share, intersected over augmentations)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_task
from obliviate.errors import ObliviateError
from obliviate.methods.common import make_method
from obliviate.methods.t2i.ant import intersect, tensorwise_mask
from obliviate.methods.t2i.base import EraseContext


def _context(pipe, steps=3):
    frozen = copy.deepcopy(pipe.unet).eval().requires_grad_(False)
    return EraseContext(pipe, frozen, tiny_task("striped"), torch.Generator().manual_seed(0), sample_steps=steps)


def _grads(loss, unet):
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for n, p in unet.named_parameters() if p.requires_grad], allow_unused=True)
    return {n: g for n, g in zip(names, grads) if g is not None}


def test_ant_loss_is_the_reference_update(tiny_pipe):
    """On one batch of trajectory points: the loss value is the reference's
    loss_3 + a2 loss_4 + a1 (loss_1 + a2 loss_2) (early target kept, late target reversed); its gradient with
    uncond_weight 0 is the reference's gradient exactly (the reference's unconditional terms come from a no-grad
    pass), and with uncond_weight > 0 the unconditional drift adds a gradient the reference does not have."""
    ctx = _context(tiny_pipe)
    unet = copy.deepcopy(tiny_pipe.unet).requires_grad_(True)
    with torch.no_grad():  # a model already moved from the original, so the unconditional drift is not zero
        gen = torch.Generator().manual_seed(1)
        for p in unet.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=gen))
    eta, a1, a2 = 0.7, 0.8, 0.3
    method = make_method("t2i", "ANT", {"eta": eta, "early_weight": a1, "uncond_weight": a2})
    texts = ["a red star in striped style", "a red circle in striped style"]
    cond = ctx.encode(texts)
    x_e, t_e, x_l, t_l = method.trajectory_points(ctx, texts)
    assert t_e > t_l
    ours, logs = method.trajectory_loss(ctx, unet, cond, x_e, t_e, x_l, t_l)

    # the reference's update, re-typed (its names): plus = early, minus = late; emb_p = emb_n = the concept
    empty = ctx.unconditional(len(texts))
    with torch.no_grad():
        e_0_plus = ctx.predict(ctx.frozen, x_e, t_e, empty)
        e_0_minus = ctx.predict(ctx.frozen, x_l, t_l, empty)
        e_n0_plus = ctx.predict(unet, x_e, t_e, empty)
        e_n0_minus = ctx.predict(unet, x_l, t_l, empty)
        e_p_plus = ctx.predict(ctx.frozen, x_e, t_e, cond)
        e_p_minus = ctx.predict(ctx.frozen, x_l, t_l, cond)
    e_n_plus = ctx.predict(unet, x_e, t_e, cond)
    e_n_minus = ctx.predict(unet, x_l, t_l, cond)
    loss_1 = F.mse_loss(e_n_plus, e_0_plus + eta * (e_p_plus - e_0_plus))
    loss_3 = F.mse_loss(e_n_minus, e_0_minus - eta * (e_p_minus - e_0_minus))
    loss_2 = F.mse_loss(e_0_plus, e_n0_plus)
    loss_4 = F.mse_loss(e_0_minus, e_n0_minus)
    reference = loss_3 + a2 * loss_4 + a1 * (loss_1 + a2 * loss_2)
    assert loss_2 > 0 and loss_4 > 0
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-7), (float(ours), float(reference))
    assert logs["ant_early"] == pytest.approx(float(loss_1.detach()), rel=1e-5)
    assert logs["ant_late"] == pytest.approx(float(loss_3.detach()), rel=1e-5)

    g_ref = _grads(reference, unet)
    no_uncond = make_method("t2i", "ANT", {"eta": eta, "early_weight": a1, "uncond_weight": 0.0})
    g_ours = _grads(no_uncond.trajectory_loss(ctx, unet, cond, x_e, t_e, x_l, t_l)[0], unet)
    assert g_ref.keys() == g_ours.keys()
    flat = lambda g: torch.cat([g[n].flatten() for n in sorted(g_ref)])  # noqa: E731
    # float precision: ours batches the passes into one denoiser call, the reference makes one call each
    assert (flat(g_ours) - flat(g_ref)).abs().max() <= 1e-4 * flat(g_ref).abs().max()
    g_paper = _grads(method.trajectory_loss(ctx, unet, cond, x_e, t_e, x_l, t_l)[0], unet)
    assert (flat(g_paper) - flat(g_ref)).norm() > 1e-2 * flat(g_ref).norm()


def test_early_and_late_steps(tiny_pipe):
    """The early stage is the reference's 7 of 50 steps (a share of the run's sampling steps, at least one step on
    each side); early points come from the first steps of the walk (high t), late ones from the rest."""
    method = make_method("t2i", "ANT")
    assert [method.boundary(s) for s in (50, 25, 3, 2)] == [7, 4, 1, 1]
    with pytest.raises(ObliviateError, match="at least 2 sampling steps"):
        method.boundary(1)
    ctx = _context(tiny_pipe, steps=25)
    stops = [method.draw_stops(ctx) for _ in range(400)]
    assert {e for e, _ in stops} == set(range(4)) and {late for _, late in stops} == set(range(4, 25))
    timesteps = tiny_pipe.backbone.sampler(tiny_pipe, 3).timesteps.tolist()
    ctx = _context(tiny_pipe, steps=3)
    for _ in range(3):
        _, t_e, _, t_l = method.trajectory_points(ctx, ["a red star in striped style"])
        assert t_e == timesteps[0] and t_l in timesteps[1:]


def test_saliency_map_is_per_tensor_and_intersected():
    """Each augmentation keeps the top share of every tensor on its own (a global ranking would keep none of the
    small-gradient tensor); the map keeps what every augmentation keeps."""
    small = torch.tensor([1e-6, 2e-6, 3e-6, 4e-6])
    large = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0, 6.0])
    a = tensorwise_mask([small, large], 0.5)
    assert a[0].tolist() == [0, 0, 1, 1] and a[1].tolist() == [1, 0, 0, 0, 1, 1]
    b = tensorwise_mask([small.flip(0), large], 0.5)
    both = intersect(intersect(None, a), b)
    assert both[0].sum() == 0 and both[1].tolist() == [1, 0, 0, 0, 1, 1]


def test_setup_builds_the_map_from_the_ant_gradient(tiny_pipe):
    """One augmentation: each trained tensor keeps exactly floor(share * n) entries (where it has that many non-zero
    gradients); more augmentations keep a subset of one's map."""
    task = tiny_task("striped")
    forget = {"texts": task.forget_prompts}
    forget["context"] = EraseContext(tiny_pipe, None, task, torch.Generator()).encode(forget["texts"])
    params = [p for p in tiny_pipe.unet.parameters()]

    def mask(args):
        method = make_method("t2i", "ANT", {"mask_iterations": 1, **args})
        ctx = _context(tiny_pipe)
        for p in params:
            p.requires_grad_(True)
        try:
            method.setup(ctx, forget, params)
        finally:
            for p in params:
                p.requires_grad_(False)
        return method

    one = mask({"mask_prompts": 1, "mask_seeds": 1, "mask_fraction": 0.3})
    checked = 0
    for p, m in zip(params, one.mask):
        if p.numel() >= 10 and m.sum() > 0:
            assert int(m.sum()) == int(0.3 * p.numel()), p.shape
            checked += 1
    assert checked > 10 and one.mask_logs["mask_augmentations"] == 1
    several = mask({"mask_prompts": 2, "mask_seeds": 2, "mask_fraction": 0.3})
    assert several.mask_logs["mask_augmentations"] == 4
    assert several.mask_logs["mask_kept"] < one.mask_logs["mask_kept"]
    # the same generator seed draws the first augmentation's points first: the intersection lies inside its map
    assert all(bool((s <= o).all()) for s, o in zip(several.mask, one.mask))


@pytest.mark.parametrize("args,key", [({"early_share": 1.0}, "early_share"), ({"mask_fraction": 1.5}, "mask_fraction"),
                                      ({"mask_seeds": 1.5}, "mask_seeds"), ({"eta": 0}, "eta")])
def test_bad_config_names_the_key(args, key):
    with pytest.raises(ObliviateError, match=key):
        make_method("t2i", "ANT", args)
