"""RealEra (methods/t2i/realera.py) on the tiny SD-shaped pipeline: mined neighbours and beyond-concept samples keep
to their bounds, the loss's three terms re-typed by hand on one batch, and a run folds a low-rank LoRA into the
cross-attention key/value weights only."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_task
from obliviate.config import TrainConfig
from obliviate.errors import ObliviateError
from obliviate.loops.t2i import erase
from obliviate.methods.common import make_method
from obliviate.methods.t2i import realera as R
from obliviate.methods.t2i.base import EraseContext
from obliviate.models.diffusion import initial_noise, predict_noise


def _cos(a, b):
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_neighbours_and_beyond_concept_samples_keep_to_their_bounds():
    states = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0)) * 3
    config = R.RealEraConfig(neighbours=6, beyond=4, similarity_low=0.5, similarity_high=0.8, radius=2.0,
                             beyond_radius=3.0)
    near, far = R.mine(states, config, torch.Generator().manual_seed(1))
    assert near.shape == (6, 5, 8) and far.shape == (4, 5, 8)
    for i, s in enumerate(near):
        e = states[i % 2]  # around each prompt in turn
        assert 0.5 <= _cos(e, s) <= 0.8
        assert (s - e).norm() <= 2.0 * e.norm() + 1e-5
    for i, s in enumerate(far):
        e = states[i % 2]
        assert _cos(e, s) < 0.5 and (s - e).norm() <= 3.0 * e.norm() + 1e-5
    # a neighbourhood out of reach (within 0.1 |e| every cosine is above 0.99) is a one-line error, not a hang
    with pytest.raises(ObliviateError, match="raise the radius"):
        R.perturb(states, 1, 0.1, 0.5, 0.9, torch.Generator().manual_seed(0))
    with pytest.raises(ObliviateError, match="similarity_low < similarity_high"):
        make_method("t2i", "RealEra", {"similarity_low": 0.9, "similarity_high": 0.5})


def test_loss_terms_retyped_on_one_batch(tiny_pipe):
    """erase: ||eps(c) - [eps_0(a) - g (eps_0(c) - eps_0(""))]||^2; neighbours: the same target from the perturbed
    states; beyond: the original's own prediction on the far samples. Weights and g differ so a swap shows."""
    pipe, task = tiny_pipe, tiny_task()
    config = R.RealEraConfig(neighbours=2, beyond=3, neighbour_weight=0.7, beyond_weight=2.5, erase_guidance=1.5,
                             rank=2)
    method = R.RealEra(config)
    unet = pipe.unet
    method.attach(unet)
    try:
        with torch.no_grad():  # a LoRA away from zero, so the adapted and original predictions differ
            g = torch.Generator().manual_seed(3)
            for n, p in unet.named_parameters():
                if method.trainable(n, p):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        gen = torch.Generator().manual_seed(5)
        ctx = EraseContext(pipe, None, task, gen)
        texts = task.forget_prompts[:2]
        x_t, t = initial_noise(pipe, [11, 12]), torch.tensor(400)
        ctx.partial_sample = lambda *a, **k: (x_t, t)
        forget = {"texts": texts, "context": ctx.encode(texts)}
        state = gen.get_state()
        parts = method.losses(ctx, unet, forget, {})

        gen.set_state(state)
        states = forget["context"].states
        near = R.perturb(states, 2, config.radius, 0.5, 0.9, gen)
        far = R.perturb(states, 3, config.beyond_radius, -1.0, 0.5 - 1e-6, gen)
        anchor = ctx.encode([task.anchor_prompt(p) for p in texts]).states
        empty = ctx.encode(["", ""]).states
        with torch.no_grad():
            with R.adapter_off(unet):
                eps_c = predict_noise(unet, x_t, t, states)
                eps_a = predict_noise(unet, x_t, t, anchor)
                eps_u = predict_noise(unet, x_t, t, empty)
                eps_far = predict_noise(unet, x_t[[0, 1, 0]], t, far)
            target = eps_a - 1.5 * (eps_c - eps_u)
            erase_mse = ((predict_noise(unet, x_t, t, states) - target) ** 2).mean()
            near_mse = ((predict_noise(unet, x_t, t, near) - target) ** 2).mean()
            far_mse = ((predict_noise(unet, x_t[[0, 1, 0]], t, far) - eps_far) ** 2).mean()
        assert far_mse > 0 and near_mse > 0
        assert torch.allclose(parts.forget.detach(), erase_mse + 0.7 * near_mse, rtol=1e-4)
        assert torch.allclose(parts.retain.detach(), 2.5 * far_mse, rtol=1e-4)
    finally:
        method.detach(unet)


def test_run_folds_a_low_rank_update_into_the_key_value_maps_only(tiny_pipe):
    unet = tiny_pipe.unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    method = make_method("t2i", "RealEra", {"rank": 2, "neighbours": 1, "beyond": 1})
    result = erase(tiny_pipe, tiny_task(), method, TrainConfig(max_steps=2, lr=1e-2, batch_size=2),
                   images_per_prompt=1, sample_steps=2)
    assert result.stopped is None and {"erase_mse", "neighbour_mse", "beyond_mse"} <= set(result.history[-1])
    names = set(result.trainable_names)
    assert names and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in names)
    assert [n for n, _ in unet.named_parameters()] == list(before) and not hasattr(unet, "peft_config")
    params = dict(unet.named_parameters())
    changed = {n for n in before if not torch.equal(params[n], before[n])}
    assert changed and changed <= names
    for n in changed:  # the folded LoRA: a change of rank <= 2
        assert torch.linalg.matrix_rank((params[n] - before[n]).double(), atol=1e-6) <= 2
