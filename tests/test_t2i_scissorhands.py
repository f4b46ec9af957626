"""ScissorHands (methods/t2i/scissorhands.py): the SNIP connection sensitivity and its top-k share, the trimming of
exactly those entries on a tiny pipeline, and GEM's projection against the reference's quadratic programme."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import tiny_task
from obliviate.errors import ObliviateError
from obliviate.methods.common import make_method
from obliviate.methods.gradient_surgery import gem_project
from obliviate.methods.saliency import saliency_mask
from obliviate.methods.t2i.scissorhands import connection_sensitivity


def test_snip_ranks_by_gradient_times_weight_not_gradient():
    """s = |g * theta|, one ranking over every tensor: the largest gradient on a near-zero weight is not trimmed."""
    params = [torch.tensor([[1.0, -2.0, 0.5], [0.01, 3.0, 1.0]]), torch.tensor([4.0, -1.0])]
    grads = [torch.tensor([[0.5, 0.5, -4.0], [10.0, 0.0, 0.2]]), torch.tensor([0.1, -0.05])]
    s = connection_sensitivity(grads, params)
    assert torch.allclose(s[0], torch.tensor([[0.5, 1.0, 2.0], [0.1, 0.0, 0.2]]))
    assert torch.allclose(s[1], torch.tensor([0.4, 0.05]))
    mask = saliency_mask(s, 0.375)  # floor(0.375 * 8) = 3 entries: 2.0, 1.0, 0.5
    assert torch.equal(mask[0], torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(mask[1], torch.zeros(2))
    assert torch.equal(connection_sensitivity([None], [torch.ones(3)])[0], torch.zeros(3))  # no gradient: never


@pytest.mark.parametrize("scope", ["trained", "self_attention"])
def test_trimming_reinitialises_exactly_the_most_sensitive_entries(tiny_pipe, scope):
    """setup on the tiny pipeline: G re-computed by hand from the same draws (sum over the SNIP batches of |grad| of
    the forget denoising loss), the entries with the top trim_fraction of |G * theta| over every trained entry
    changed (those in self-attention only, for that scope), nothing else; the new values are a fresh layer's
    (Kaiming-uniform within 1/sqrt(fan_in), biases 0)."""
    from obliviate.loops.t2i import draw_latents
    from obliviate.methods.t2i.base import EraseContext, denoising_loss

    task = tiny_task("striped")
    unet = tiny_pipe.unet
    method = make_method("t2i", "ScissorHands", {"trim_fraction": 0.2, "snip_batches": 2, "snip_batch_size": 2,
                                                 "project": False, "trim_scope": scope})
    named = [(n, p) for n, p in unet.named_parameters() if method.trainable(n, p)]
    params = [p for _, p in named]
    gen = torch.Generator().manual_seed(3)
    ctx = EraseContext(tiny_pipe, None, task, gen, sample_steps=3, guidance=2.0)
    texts = task.forget_prompts
    forget = {"texts": texts, "context": ctx.encode(texts), "latents": draw_latents(ctx, texts, 0)}
    before = [p.detach().clone() for p in params]
    state = gen.get_state()
    for p in params:  # as the loop leaves them for setup
        p.requires_grad_(True)

    total = [torch.zeros_like(p) for p in params]  # by hand, from the same generator state
    for _ in range(2):
        idx = torch.randint(0, len(texts), (2,), generator=gen)
        batch = {"texts": [texts[i] for i in idx], "context": forget["context"][idx],
                 "latents": forget["latents"][idx]}
        for acc, g in zip(total, torch.autograd.grad(denoising_loss(unet, ctx, batch), params, allow_unused=True)):
            if g is not None:
                acc += g.abs()
    score = torch.cat([(g * p).abs().flatten() for g, p in zip(total, before)])
    k = int(0.2 * score.numel())
    expected = torch.zeros(score.numel(), dtype=torch.bool)
    expected[score.topk(k).indices] = True

    gen.set_state(state)
    try:
        method.setup(ctx, forget, params)
        start, kept = 0, 0
        for (name, p), b in zip(named, before):
            e = expected[start:start + b.numel()].view(b.shape)
            start += b.numel()
            if scope == "self_attention" and ".attn1." not in name:
                e = torch.zeros_like(e)
            kept += int(e.sum())
            c = p.detach() != b
            assert not (c & ~e).any(), name  # nothing outside the top-k moved
            fresh = p.detach()[e]
            if p.dim() >= 2:  # Kaiming-uniform, a = sqrt 5: within 1/sqrt(fan_in) (the old value again: probability 0)
                assert torch.equal(c, e), name
                assert bool((fresh.abs() <= 1 / math.sqrt(p[0].numel()) + 1e-6).all()), name
            else:  # a fresh bias is 0, a fresh normalisation scale 1 (unchanged where it already was)
                assert torch.equal(fresh, torch.full_like(fresh, 0.0 if name.endswith("bias") else 1.0)), name
        assert 0 < kept <= k and method.trim_logs["trimmed"] == pytest.approx(kept / score.numel())
        assert (kept == k) == (scope == "trained")
    finally:
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
                p.requires_grad_(False)


def _reference_gem(g: np.ndarray, memories: np.ndarray, margin: float = 0.5, eps: float = 1e-3) -> np.ndarray:
    """The reference's project2cone2 (GEM's dual with quadprog), re-typed with scipy: quadprog's solve_qp(P, q, G, h)
    minimises 1/2 v'Pv - q'v subject to G'v >= h, with P = M M' (symmetrised) + eps I, q = -M g, G = I, h = margin;
    the projected gradient is M'v + g."""
    from scipy.optimize import minimize

    P = memories @ memories.T
    P = 0.5 * (P + P.T) + np.eye(len(memories)) * eps
    q = -(memories @ g)
    res = minimize(lambda v: 0.5 * v @ P @ v - q @ v, np.full(len(memories), margin), jac=lambda v: P @ v - q,
                   bounds=[(margin, None)] * len(memories), method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12})
    return res.x @ memories + g


def test_gem_projection_agrees_with_the_reference_qp():
    rng = np.random.default_rng(0)
    memories = rng.normal(size=(3, 7))
    g = -memories.sum(0) + 0.1 * rng.normal(size=7)  # conflicts with every memory
    split = lambda v: [torch.tensor(v[:4]), None, torch.tensor(v[4:])]  # noqa: E731  (a parameter without a gradient)
    out, logs = gem_project(split(g), [split(m) for m in memories])
    assert out[1] is None and logs["gem_projected"] == 1.0
    np.testing.assert_allclose(torch.cat([out[0], out[2]]).numpy(), _reference_gem(g, memories), atol=1e-6)
    # GEM's ridge eps leaves <g~, m_j> >= -eps v_j (the reference's own tolerance), far from the conflict before
    assert logs["gem_dot"] < -1.0 and logs["gem_dot_after"] > -1e-2


def test_gem_projection_one_memory_closed_form_and_no_conflict():
    m = [torch.tensor([0.0, 2.0])]
    out, _ = gem_project([torch.tensor([1.0, -1.0])], [m])  # v = max(2 / (4 + eps), 0.5) = 0.5: the margin binds
    assert torch.allclose(out[0], torch.tensor([1.0, 0.0]))
    out, _ = gem_project([torch.tensor([1.0, -3.0])], [m])  # v = 6 / 4.001 > margin
    assert torch.allclose(out[0], torch.tensor([1.0, -3.0 + 2 * 6 / 4.001]))
    reference = _reference_gem(np.array([1.0, -3.0]), np.array([[0.0, 2.0]]))
    assert torch.allclose(out[0], torch.from_numpy(reference).float())
    same, logs = gem_project([torch.tensor([1.0, 1.0])], [m])  # no conflict: unchanged
    assert torch.equal(same[0], torch.tensor([1.0, 1.0])) and logs["gem_projected"] == 0.0


def test_repair_step_is_the_projected_difference():
    """combine_gradients: g = grad(L_r) + grad(-lam L_f), projected against the memory only when they conflict."""
    method = make_method("t2i", "ScissorHands")
    method.memories = [[torch.tensor([1.0, 0.0])]]
    out, logs = method.combine_gradients([torch.tensor([-2.0, 0.0])], [torch.tensor([1.0, 1.0])])
    # g = (-1, 1), <g, m> = -1: v = 1 / 1.001
    assert logs["gem_projected"] == 1.0 and torch.allclose(out[0], torch.tensor([-1.0 + 1 / 1.001, 1.0]), atol=1e-6)
    plain = make_method("t2i", "ScissorHands", {"project": False})
    out, logs = plain.combine_gradients([torch.tensor([-2.0, 0.0])], [torch.tensor([1.0, 1.0])])
    assert torch.equal(out[0], torch.tensor([-1.0, 1.0])) and logs == {}


def test_bad_config_names_the_key():
    for args, key in [({"trim_fraction": 0}, "trim_fraction"), ({"trim_fraction": 1.5}, "trim_fraction"),
                      ({"snip_batches": 0}, "snip_batches"), ({"lam": -1}, "lam"), ({"project": "yes"}, "project"),
                      ({"memory_batches": 1.5}, "memory_batches"), ({"trim_scope": "attn"}, "trim_scope")]:
        with pytest.raises(ObliviateError, match=key):
            make_method("t2i", "ScissorHands", args)
