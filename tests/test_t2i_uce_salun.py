"""UCE (closed-form cross-attention edit), SalUn (saliency-masked random-label erasure) and the shared saliency mask:
the math on hand-made tensors, and each method through the real erase loop on the tiny pipeline."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_task
from obliviate.config import TrainConfig
from obliviate.errors import ObliviateError
from obliviate.methods.saliency import mask_fraction, saliency_mask

TRAIN = TrainConfig(max_steps=3, lr=1e-3, batch_size=4)


# ---- the saliency mask --------------------------------------------------------------------------------------------

def test_saliency_mask_keeps_exact_fraction_with_one_global_threshold():
    a = torch.tensor([10.0, -9.0, 8.0, 7.0])  # large gradients: all kept
    b = torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]])  # small ones: only the largest kept
    masks = saliency_mask([a, None, b], fraction=0.5)  # 10 entries -> exactly 5 kept
    assert masks[1] is None
    assert masks[0].shape == a.shape and masks[2].shape == b.shape
    assert masks[0].dtype == torch.float32 and set(torch.cat([masks[0], masks[2].flatten()]).tolist()) <= {0.0, 1.0}
    assert masks[0].tolist() == [1.0, 1.0, 1.0, 1.0]  # a per-tensor threshold would keep only 2 of these
    assert masks[2].tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]  # |-6| is the 5th largest overall
    assert mask_fraction(masks) == 0.5


def test_saliency_mask_ties_and_zeros():
    ties = saliency_mask([torch.ones(4), torch.ones(2)], fraction=0.5)  # 6 equal entries: exactly 3 kept, first first
    assert ties[0].tolist() == [1.0, 1.0, 1.0, 0.0] and ties[1].tolist() == [0.0, 0.0]
    zeros = saliency_mask([torch.tensor([0.0, 0.0, 0.0, 5.0])], fraction=0.75)  # a zero gradient is never salient
    assert zeros[0].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert saliency_mask([torch.zeros(3)], fraction=1.0)[0].tolist() == [0.0, 0.0, 0.0]
    assert saliency_mask([torch.tensor([2.0, -1.0])], fraction=1.0)[0].tolist() == [1.0, 1.0]
    half = saliency_mask([torch.tensor([1.0, 3.0], dtype=torch.float64)], fraction=0.5)[0]
    assert half.dtype == torch.float64 and half.tolist() == [0.0, 1.0]
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ObliviateError, match="fraction"):
            saliency_mask([torch.ones(2)], fraction=bad)
    with pytest.raises(ObliviateError, match="NaN"):
        saliency_mask([torch.tensor([1.0, float("nan")])])


# ---- UCE: the closed form on a hand-made Linear ------------------------------------------------------------------

def _hand_made(seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(8, 5, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(5, 8, generator=g))
    erase, guide, keep = (torch.randn(n, 8, generator=g, dtype=torch.float64) for n in (2, 2, 3))
    return lin.weight.detach().double(), erase, guide, keep


def test_uce_matrix_is_the_paper_formula():
    from obliviate.methods.t2i.uce import uce_matrix

    W, C, G, P = _hand_made()
    lam, es, ps = 0.5, 1.0, 0.3
    num = lam * W + es * sum(torch.outer(W @ g, c) for c, g in zip(C, G)) + ps * sum(torch.outer(W @ p, p) for p in P)
    den = lam * torch.eye(8, dtype=torch.float64) + es * sum(torch.outer(c, c) for c in C) \
        + ps * sum(torch.outer(p, p) for p in P)
    assert torch.allclose(W @ uce_matrix(C, G, P, lam, es, ps), num @ torch.linalg.inv(den), atol=1e-10)


def test_uce_preserves_kept_vectors_and_moves_erased_ones_to_the_guide():
    from obliviate.methods.t2i.uce import uce_matrix

    W, C, G, P = _hand_made()
    before = (W @ C.T - W @ G.T).norm(dim=0)  # distance of each erased output from its guide's output
    new = W @ uce_matrix(C, G, P, lam=0.5, erase_scale=1.0, preserve_scale=100.0)
    keep_err = ((new @ P.T - W @ P.T).norm(dim=0) / (W @ P.T).norm(dim=0)).max()
    assert keep_err < 0.02, keep_err
    assert ((new @ C.T - W @ G.T).norm(dim=0) < 0.8 * before).all()
    # erase and preserve weights large against lam: both constraints nearly met (8 dims hold 2 + 3 vectors)
    new = W @ uce_matrix(C, G, P, lam=0.5, erase_scale=10.0, preserve_scale=1000.0)
    keep_err = ((new @ P.T - W @ P.T).norm(dim=0) / (W @ P.T).norm(dim=0)).max()
    assert keep_err < 0.005, keep_err
    after = (new @ C.T - W @ G.T).norm(dim=0)
    assert (after < 0.2 * before).all(), (before, after)
    # without the preserve terms the kept vectors are not protected
    free = W @ uce_matrix(C, G, P[:0], lam=0.5, erase_scale=1.0, preserve_scale=0.0)
    assert ((free @ P.T - W @ P.T).norm(dim=0) / (W @ P.T).norm(dim=0)).max() > 5 * keep_err


def test_uce_huge_lambda_leaves_w_unchanged():
    from obliviate.methods.t2i.uce import uce_matrix

    W, C, G, P = _hand_made(1)
    assert torch.allclose(W @ uce_matrix(C, G, P, 1e12, 1.0, 1.0), W, atol=1e-9)
    assert not torch.allclose(W @ uce_matrix(C, G, P, 0.5, 1.0, 1.0), W, atol=1e-2)


def test_uce_texts_to_erase_and_preserve():
    from obliviate.methods.t2i.uce import UCE, UCEConfig

    task = tiny_task()
    pairs = UCE().erase_pairs(task)
    assert pairs[0] == ("striped", "solid")
    assert ("a red star in striped style", "a red star in solid style") in pairs and len(pairs) == 4
    assert UCE(UCEConfig(erase_forget_prompts=False)).erase_pairs(task) == [("striped", "solid")]
    task.anchor = ""
    assert ("a red star in striped style", "a red star in style") in UCE().erase_pairs(task)
    assert UCE().preserve_texts(task) == ["", "dotted", "solid"]
    more = UCE(UCEConfig(preserve_retain_prompts=True, max_retain_prompts=2)).preserve_texts(task)
    assert more == ["", "dotted", "solid"] + [r.text for r in task.retain_prompts[:2]]


# ---- through the erase loop ---------------------------------------------------------------------------------------

def _snapshot(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters()}


def test_uce_edits_only_cross_attention_keys_and_values(tiny_pipe):
    from obliviate.loops.t2i import erase
    from obliviate.methods.t2i.base import EraseContext
    from obliviate.methods.t2i.uce import UCE

    task = tiny_task()
    before = _snapshot(tiny_pipe.unet)
    result = erase(tiny_pipe, task, "UCE", TRAIN, images_per_prompt=1, sample_steps=3)
    after = dict(tiny_pipe.unet.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    allowed = {n for n in before if ".attn2.to_k.weight" in n or ".attn2.to_v.weight" in n}
    assert allowed and changed == allowed
    assert set(result.trainable_names) == allowed
    (logs,) = result.history
    assert logs["edited_matrices"] == len(allowed) and logs["erase_texts"] == 4 and logs["preserve_texts"] == 3
    assert math.isfinite(logs["mean_relative_change"]) and logs["mean_relative_change"] > 0

    # the edit did what it claims: the concept's last-token state now maps near the anchor's; the preserved texts (the
    # empty prompt, another style) barely move (about 5 % here; about 27 % with preserve_scale=0)
    ctx = EraseContext(tiny_pipe, None, task, torch.Generator().manual_seed(0))
    concept, anchor, empty, dotted = (ctx.encode([t]).states[0].double() for t in ("striped", "solid", "", "dotted"))
    _, (last_c, last_a) = UCE()._states(ctx, ["striped", "solid"])
    c, g = concept[last_c:last_c + 1], anchor[last_a:last_a + 1]
    for n in allowed:
        W, W_new = before[n].double(), after[n].detach().double()
        assert (c @ W_new.T - g @ W.T).norm() < 0.35 * (c @ W.T - g @ W.T).norm(), n
        for kept in (empty, dotted):
            assert (kept @ W_new.T - kept @ W.T).norm() < 0.12 * (kept @ W.T).norm(), n


@torch.no_grad()
def _pseudo_gap(pipe, task) -> float:
    """SalUn's forget objective on fixed noise: the mean distance, by the same UNet, between the forget prompts' noise
    prediction and the retain prompts' (the random labels)."""
    from obliviate.models.diffusion import add_noise, encode_prompts, initial_noise, predict_noise

    forget, retain = task.forget_prompts, [r.text for r in task.retain_prompts]
    n = len(forget)
    x0, eps = initial_noise(pipe, [100 + i for i in range(n)]), initial_noise(pipe, [200 + i for i in range(n)])
    x = add_noise(pipe, x0, eps, torch.full((n,), 500))
    pred = predict_noise(pipe.unet, x, 500, encode_prompts(pipe, forget))
    gaps = [float((pred - predict_noise(pipe.unet, x, 500, encode_prompts(pipe, retain[k:k + n]))).norm())
            for k in range(0, len(retain) - n + 1, n)]
    return sum(gaps) / len(gaps)


def test_salun_changes_only_salient_entries(tiny_pipe):
    from obliviate.loops.t2i import erase
    from obliviate.methods.t2i.salun import SalUn

    task = tiny_task()
    method = SalUn()
    before = _snapshot(tiny_pipe.unet)
    gap_before = _pseudo_gap(tiny_pipe, task)
    result = erase(tiny_pipe, task, method, TRAIN, images_per_prompt=1, sample_steps=3)
    assert _pseudo_gap(tiny_pipe, task) < 0.95 * gap_before  # its objective: forget prompts predict like retain ones
    assert result.stopped is None and len(result.history) == 3
    for logs in result.history:
        assert math.isfinite(logs["loss"]) and math.isfinite(logs["forget_mse"]) and math.isfinite(logs["retain_dm"])
        assert logs["mask_kept"] == pytest.approx(0.5, abs=1e-5)
    names = result.trainable_names
    assert len(names) == len(method.mask) == len(before)  # SalUn trains the whole UNet, under the mask
    after = dict(tiny_pipe.unet.named_parameters())
    total = sum(m.numel() for m in method.mask)
    assert sum(int(m.sum()) for m in method.mask) == total // 2  # exactly the top half
    moved, per_tensor = 0, []
    for n, m in zip(names, method.mask):
        assert m.shape == before[n].shape
        off = m == 0
        assert torch.equal(after[n].detach()[off], before[n][off]), n  # bitwise unchanged outside the mask
        moved += int((after[n].detach()[~off] != before[n][~off]).sum())
        per_tensor.append(float(m.mean()))
    assert moved > 0
    assert min(per_tensor) < 0.4 and max(per_tensor) > 0.6  # one global threshold, not 50 % of every tensor


def test_salun_guided_mask_and_pseudo_prompts(tiny_pipe):
    from obliviate.loops.t2i import erase
    from obliviate.methods.t2i.base import EraseContext
    from obliviate.methods.t2i.salun import SalUn, SalUnConfig

    task = tiny_task()
    method = SalUn(SalUnConfig(mask_guidance=7.5, mask_fraction=0.1, alpha=0.0))
    result = erase(tiny_pipe, task, method, TrainConfig(max_steps=1, lr=1e-3, batch_size=2), images_per_prompt=1,
                   sample_steps=2)
    assert math.isfinite(result.history[0]["loss"]) and "retain_dm" not in result.history[0]
    assert result.history[0]["mask_kept"] == pytest.approx(0.1, abs=1e-5)

    ctx = EraseContext(None, None, task, torch.Generator().manual_seed(0))
    pseudo = SalUn().pseudo_texts(ctx, task.forget_prompts * 4)
    retain = {r.text for r in task.retain_prompts}
    assert set(pseudo) <= retain and len(set(pseudo)) > 1  # a random mismatched (retain) prompt per image
    assert SalUn(SalUnConfig(pseudo="anchor")).pseudo_texts(ctx, ["a red star in striped style"]) == \
        ["a red star in solid style"]
    task.anchor = ""
    with pytest.raises(ObliviateError, match="anchor"):
        SalUn(SalUnConfig(pseudo="anchor")).setup(ctx, {"texts": []}, [])


# ---- configs -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, args, key", [
    ("UCE", {"lam": 0}, "lam"), ("UCE", {"lam": -1.0}, "lam"), ("UCE", {"erase_scale": -1}, "erase_scale"),
    ("UCE", {"preserve_scale": float("nan")}, "preserve_scale"), ("UCE", {"with_to_k": "yes"}, "with_to_k"),
    ("UCE", {"max_retain_prompts": 0}, "max_retain_prompts"), ("UCE", {"max_retain_prompts": 2.5}, "max_retain_prompts"),
    ("SalUn", {"mask_fraction": 0}, "mask_fraction"), ("SalUn", {"mask_fraction": 1.5}, "mask_fraction"),
    ("SalUn", {"alpha": -0.1}, "alpha"), ("SalUn", {"pseudo": "noise"}, "pseudo"),
    ("SalUn", {"mask_batch_size": 0}, "mask_batch_size"), ("SalUn", {"mask_batch_size": 2.5}, "mask_batch_size"),
    ("SalUn", {"mask_guidance": -1}, "mask_guidance"), ("SalUn", {"nope": 1}, "nope"),
])
def test_bad_config_names_the_key(name, args, key):
    from obliviate.methods.common import make_method

    with pytest.raises(ObliviateError, match=key):
        make_method("t2i", name, args)


def test_defaults_and_registry():
    from obliviate.methods.common import make_method

    uce, salun = make_method("t2i", "UCE"), make_method("t2i", "SalUn")
    assert (uce.config.lam, uce.config.erase_scale, uce.config.preserve_scale) == (0.5, 1.0, None)
    assert uce.closed_form and not uce.needs_images and not uce.needs_frozen
    assert (salun.config.mask_fraction, salun.config.alpha) == (0.5, 0.5)
    assert salun.needs_images and not salun.needs_frozen and not salun.closed_form
    assert not uce.trainable("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight", None)
    assert not uce.trainable("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight", None)
    assert uce.trainable("mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight", None)
    assert not make_method("t2i", "UCE", {"with_to_k": False}).trainable(
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", None)
