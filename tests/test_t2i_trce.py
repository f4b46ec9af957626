"""TRCE (methods/t2i/trce.py): stage 1's closed form against a direct least-squares solve and against a re-typing of
the reference's update (ddgoodgood/TRCE src/cfr_utils.py `prepare_k_v` + `closed_form_refinement`); stage 2's
contrastive loss re-computed by hand on one batch; stage 2 samples only the early steps of the forget trajectories,
trains only the visual layers and leaves stage 1's keys/values as stage 1 left them."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY_STYLES, tiny_task
from obliviate.config import TrainConfig
from obliviate.errors import ObliviateError
from obliviate.loops.t2i import erase
from obliviate.methods.common import make_method
from obliviate.methods.t2i import trce as trce_module
from obliviate.methods.t2i.base import EraseContext, EraseTask
from obliviate.models.diffusion import Cond, denoise

ALL_ROWS = {"sot_weight": 0.5, "eot_weight": 1.0, "pad_weight": 0.2, "keyword_weight": 0.7}


def _projections(pipe):
    return {f"{n}.weight": m.weight for n, m in pipe.backbone.text_projections(pipe.denoiser)}


def _word_positions(tok, text: str, concept: str) -> tuple[int, int]:
    """The reference's positions: the first [EoT] at len(words) + 1, the keyword at its word index + 1 (right when each
    word is one token, which the tiny tokenizer's prompts are: checked)."""
    words = text.split()
    assert len(tok(text).input_ids) == len(words) + 2
    return len(words) + 1, words.index(concept) + 1



def _run_stage1(pipe):
    """Stage 1 with every row kind on, on `pipe`: (task, method, ctx, the projections' weights before it)."""
    task = tiny_task("striped")
    method = make_method("t2i", "TRCE", ALL_ROWS)
    ctx = EraseContext(pipe, None, task, torch.Generator().manual_seed(0), sample_steps=3)
    before = {n: w.detach().double().clone() for n, w in _projections(pipe).items()}
    method.setup(ctx, {}, [])
    return task, method, ctx, before

@pytest.mark.parametrize("folder", ["tiny_pipeline_dir", "tiny_sdxl_pipeline_dir"])
def test_stage1_is_the_least_squares_solution(folder, request):
    """Every edited W* minimises mean_pairs sum_rows w ||W* c - W g||^2 + eta mean_p sum ||W* p - W p||^2 +
    lam ||W* - W||^2, with the rows (SoT, first EoT, last position x padding count, keyword -> last position) found
    here from the words, solved directly by lstsq; on SD and on SDXL (its two encoders' states concatenated)."""
    from obliviate.models.diffusion import load_pipeline

    tiny_pipe = load_pipeline(request.getfixturevalue(folder))
    task, method, ctx, before = _run_stage1(tiny_pipe)
    tok, c = tiny_pipe.tokenizer, method.config
    pairs = [(p, " ".join(p.replace("striped", "solid").split())) for p in task.forget_prompts]
    enc = lambda texts: ctx.encode(texts).states.double()  # noqa: E731
    olds, news = enc([o for o, _ in pairs]), enc([n for _, n in pairs])
    L = olds.shape[1]
    A, B = [], []  # rows scaled by sqrt(weight): A x = B in the least-squares sense, x = W*^T
    for i, (old, new) in enumerate(pairs):
        eot_old, key = _word_positions(tok, old, "striped")
        eot_new, _ = _word_positions(tok, new, "solid")
        for o, n, w in [(0, 0, c.sot_weight), (eot_old, eot_new, c.eot_weight),
                        (L - 1, L - 1, c.pad_weight * (L - eot_old - 1)), (key, L - 1, c.keyword_weight)]:
            A.append((w / len(pairs)) ** 0.5 * olds[i, o])
            B.append((w / len(pairs)) ** 0.5 * news[i, n])
    keep = [""] + [s for s in TINY_STYLES if s != "striped"] + [r.text for r in task.retain_prompts]
    assert method.preserve_texts(task) == keep
    P = enc(keep).reshape(-1, olds.shape[-1])
    A = torch.cat([torch.stack(A), (c.preserve_scale / len(keep)) ** 0.5 * P,
                   c.lam ** 0.5 * torch.eye(P.shape[1], dtype=torch.float64)])
    G = torch.cat([torch.stack(B), (c.preserve_scale / len(keep)) ** 0.5 * P,
                   c.lam ** 0.5 * torch.eye(P.shape[1], dtype=torch.float64)])
    after = _projections(tiny_pipe)
    assert after and all(n.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")) for n in after)
    for name, W in before.items():
        want = torch.linalg.lstsq(A, G @ W.T).solution.T  # the targets are W g, W p, W e_j
        got = after[name].detach().double()
        assert not torch.allclose(got, W, atol=1e-3), name
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (name, (got - want).abs().max())


def _reference_update(W, contexts, valuess, weight_bases, weight_scale, cache1, cache2, lamb, preserve_scale):
    """ddgoodgood/TRCE src/cfr_utils.py `closed_form_refinement` for one projection, re-typed: the loop over the first
    len(weight_base) rows of each pair, the mean over pairs, the prior cache added with preserve_scale / 3e4."""
    mat1, mat2 = lamb * W, lamb * torch.eye(W.shape[1], dtype=W.dtype)
    total1, total2 = torch.zeros_like(W), torch.zeros_like(mat2)
    for context, values, base in zip(contexts, valuess, weight_bases):
        for i in range(len(base)):
            total1 += weight_scale[i] * base[i] * values[i][:, None] @ context[i][None, :]
            total2 += weight_scale[i] * base[i] * context[i][:, None] @ context[i][None, :]
    total1, total2 = total1 / len(contexts), total2 / len(contexts)
    total1 += preserve_scale * cache1 / 3e4
    total2 += preserve_scale * cache2 / 3e4
    return (total1 + mat1) @ torch.inverse(total2 + mat2)


def test_stage1_agrees_with_the_reference_update(tiny_pipe):
    """The reference's `prepare_k_v` (rows [SoT, first EoT, last, keyword], values W(new[[0, EoT, last, -1]]),
    weight_base [1, 1, 77 - words - 2, 1]) and `closed_form_refinement` (run_trce_stage1.py: the cache multiplied by
    preserve_scale before the call and again inside), the cache being the preserved texts' sums: the same weights to
    float precision when eta = preserve_scale^2 x (number of texts) / 3e4."""
    task, method, ctx, before = _run_stage1(tiny_pipe)
    tok, c = tiny_pipe.tokenizer, method.config
    keep = method.preserve_texts(task)
    ref_scale = (c.preserve_scale * 3e4 / len(keep)) ** 0.5
    P = ctx.encode(keep).states.double().reshape(-1, before[next(iter(before))].shape[1])
    for name, W in before.items():
        contexts, valuess, bases = [], [], []
        for old in task.forget_prompts:
            new = " ".join(old.replace("striped", "solid").split())
            emb_old, emb_new = ctx.encode([old, new]).states.double()
            L = emb_old.shape[0]
            (eot_old, key), (eot_new, _) = _word_positions(tok, old, "striped"), _word_positions(tok, new, "solid")
            contexts.append(emb_old[[0, eot_old, L - 1, key]])
            valuess.append(emb_new[[0, eot_new, L - 1, L - 1]] @ W.T)
            bases.append([1, 1, L - len(old.split()) - 2, 1])
        cache1 = ref_scale * (P @ W.T).T @ P  # run_trce_stage1.py: train_preserve_scale * prior
        cache2 = ref_scale * P.T @ P
        want = _reference_update(W, contexts, valuess, bases, [c.sot_weight, c.eot_weight, c.pad_weight,
                                 c.keyword_weight], cache1, cache2, c.lam, ref_scale)
        got = _projections(tiny_pipe)[name].detach().double()
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (name, (got - want).abs().max())


def test_stage2_loss_by_hand(tiny_pipe):
    """One batch, re-typed from the reference's run_trce_stage2.py: prefer = e_s + g (e_s - e_u), reject = e_m +
    g (e_m - e_u) by the original; clamp(mse(pred, prefer) - mse(pred, reject) + margin, 0) on the forget and the
    unconditional predictions, averaged; plus reg_scale x mse of the unconditional prediction on an unconditional
    trajectory against the stage-1 model's (here a copy of it, there `unet_reg`); the frozen original's
    keys/values are put back afterwards."""
    task = tiny_task("striped")
    method = make_method("t2i", "TRCE", {"margin": 0.5, "steer_guidance": 2.0, "reg_batch_size": 2})
    c = method.config
    unet = tiny_pipe.denoiser
    frozen = copy.deepcopy(unet).requires_grad_(False)
    ctx = EraseContext(tiny_pipe, frozen, task, torch.Generator().manual_seed(3), sample_steps=3)
    method.setup(ctx, {}, [])
    stage1 = copy.deepcopy(unet)
    for n, p in unet.named_parameters():  # as the loop does: the visual layers trainable
        p.requires_grad_(method.trainable(n, p))
    with torch.no_grad():  # as if stage 2 had trained a while: the visual layers moved
        for n, p in unet.named_parameters():
            if method.trainable(n, p):
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    texts = task.forget_prompts[:2]
    forget = {"texts": texts, "context": ctx.encode(texts)}
    frozen_kv = {n: p.detach().clone() for n, p in frozen.named_parameters() if n in dict(method.edited)}
    state = ctx.generator.get_state()
    parts = method.losses(ctx, unet, forget, {})
    ctx.generator.set_state(state)

    def predict(model, x, t, texts_or_cond):
        cond = texts_or_cond if isinstance(texts_or_cond, Cond) else ctx.encode(texts_or_cond)
        return tiny_pipe.backbone.predict(tiny_pipe, model, x, t, cond)

    K = 2  # int(0.5 x 3) + 1
    stop = int(torch.randint(1, K + 1, (1,), generator=ctx.generator))
    seeds = torch.randint(0, 2 ** 31 - 1, (2,), generator=ctx.generator).tolist()
    x, t = denoise(tiny_pipe, texts, seeds, 3, c.trajectory_guidance, denoiser=frozen, stop_after=stop)
    with torch.no_grad():
        e_m, e_u = predict(frozen, x, t, texts), predict(frozen, x, t, ["", ""])
        e_s = predict(frozen, x, t, [" ".join(p.replace("striped", "solid").split()) for p in texts])
        f_safe, f_bad = e_s + 2.0 * (e_s - e_u), e_m + 2.0 * (e_m - e_u)

        def h(pred):
            d = ((pred - f_safe) ** 2).mean(dim=(1, 2, 3)) - ((pred - f_bad) ** 2).mean(dim=(1, 2, 3)) + 0.5
            return torch.clamp(d, min=0).mean()
        erase_loss = (h(predict(unet, x, t, texts)) + h(predict(unet, x, t, ["", ""]))) / 2
        stop_u = int(torch.randint(1, 3, (1,), generator=ctx.generator))
        seeds = torch.randint(0, 2 ** 31 - 1, (2,), generator=ctx.generator).tolist()
        empty = ctx.unconditional(2)
        x_u, t_u = denoise(tiny_pipe, ["", ""], seeds, 3, 1.0, denoiser=frozen, stop_after=stop_u, context=empty)
        reg = ((predict(unet, x_u, t_u, empty) - predict(stage1, x_u, t_u, empty)) ** 2).mean()
    assert erase_loss > 0 and reg > 0
    assert parts.logs["steer_stop"] == stop and parts.logs["reg_stop"] == stop_u
    assert torch.allclose(parts.forget, erase_loss, rtol=1e-5, atol=1e-7), (parts.forget, erase_loss)
    assert torch.allclose(parts.retain, 100.0 * reg, rtol=1e-5, atol=1e-7), (parts.retain, reg)
    assert parts.forget.requires_grad and parts.retain.requires_grad
    assert len(frozen_kv) == 8 and all(torch.equal(p, frozen_kv[n]) for n, p in frozen.named_parameters()
                                       if n in frozen_kv)  # the stage-1 swap was put back

def test_stage2_steers_only_the_early_steps(tiny_pipe, monkeypatch):
    """The forget trajectories stop after 1..K = int(0.5 x 6) + 1 = 4 of 6 steps, sampled by the frozen original at
    the trajectory guidance, and are predicted at the timestep they stopped at; the unconditional ones stop anywhere in
    1..5, at guidance 1 under the unconditional conditioning. (The sampling itself is faked: only the draws count.)"""
    assert [trce_module.last_early_step(s, f) for s, f in [(50, 0.5), (6, 0.5), (3, 0.5), (2, 0.5), (10, 1.0)]] \
        == [26, 4, 2, 1, 9]
    timesteps = tiny_pipe.backbone.sampler(tiny_pipe, 6).timesteps.tolist()
    calls = []

    def fake_denoise(pipe, prompts, seeds, steps, guidance, **kw):
        calls.append((kw["stop_after"], guidance, kw["context"], kw["denoiser"], steps))
        return torch.randn(len(prompts), *pipe.latent_shape), timesteps[kw["stop_after"]]

    monkeypatch.setattr(trce_module, "denoise", fake_denoise)
    task = tiny_task("striped")
    method = make_method("t2i", "TRCE", {"reg_batch_size": 2})
    frozen = copy.deepcopy(tiny_pipe.denoiser)
    ctx = EraseContext(tiny_pipe, frozen, task, torch.Generator().manual_seed(0), sample_steps=6)
    method.setup(ctx, {}, [])
    texts = task.forget_prompts[:2]
    logs = [method.losses(ctx, tiny_pipe.denoiser, {"texts": texts, "context": ctx.encode(texts)}, {}).logs
            for _ in range(3)]
    steer, reg = calls[0::2], calls[1::2]
    assert all(c[1] == 3.0 and c[2] is None and c[3] is frozen and c[4] == 6 for c in steer)
    assert all(c[1] == 1.0 and c[2] is not None and len(c[2]) == 2 and c[3] is frozen for c in reg)
    assert [h["steer_stop"] for h in logs] == [c[0] for c in steer]
    assert all(h["t"] == timesteps[h["steer_stop"]] for h in logs)
    draws = [method.trajectory(ctx, texts, 4, 3.0)[2] for _ in range(100)]
    assert set(draws) == {1, 2, 3, 4}
    draws = [method.trajectory(ctx, [""], 5, 1.0)[2] for _ in range(100)]
    assert set(draws) == {1, 2, 3, 4, 5}


@pytest.mark.slow  # 4 s on 2 shared cores; the contract test runs TRCE by default (changed tensors <= the run's)
def test_stage2_trains_only_the_visual_layers(tiny_pipeline_dir):
    """A run changes attn1 and attn2.to_q (stage 2) and the keys/values, which are exactly stage 1's edit; the run's
    changed tensors are those."""
    from obliviate.models.diffusion import load_pipeline

    pipe, alone = load_pipeline(tiny_pipeline_dir), load_pipeline(tiny_pipeline_dir)
    before = {n: p.detach().clone() for n, p in pipe.denoiser.named_parameters()}
    task = tiny_task("striped")
    result = erase(pipe, task, make_method("t2i", "TRCE", {"reg_batch_size": 1}),
                   TrainConfig(max_steps=2, lr=1e-3, batch_size=2), images_per_prompt=1, sample_steps=3)
    make_method("t2i", "TRCE").setup(EraseContext(alone, None, task, torch.Generator(), sample_steps=3), {}, [])
    after, stage1 = dict(pipe.denoiser.named_parameters()), dict(alone.denoiser.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(p, before[n])}
    kv = {n for n in after if n.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))}
    assert set(result.trainable_names) >= changed and kv <= changed
    assert any(".attn1." in n for n in changed) and any(".attn2.to_q." in n for n in changed)
    assert all(".attn1." in n or ".attn2.to_q." in n for n in changed - kv)
    assert all(torch.equal(after[n], stage1[n]) for n in kv)


def test_stage2_trains_the_visual_layers_and_reports_the_edit(tiny_pipe):
    method = make_method("t2i", "TRCE")
    names = [n for n, p in tiny_pipe.denoiser.named_parameters() if method.trainable(n, p)]
    assert names and all(".attn1." in n or ".attn2.to_q." in n for n in names)
    assert any(".attn1.to_k." in n for n in names) and not any(".attn2.to_k." in n or ".attn2.to_v." in n for n in names)
    method.setup(EraseContext(tiny_pipe, None, tiny_task(), None, sample_steps=3), {}, [])
    kv = [n for n, _ in tiny_pipe.denoiser.named_parameters() if n.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))]
    assert method.detach(tiny_pipe.denoiser) == names + kv  # the run's changed tensors: both stages'


def test_bad_settings_are_one_line_errors(tiny_pipe):
    with pytest.raises(ObliviateError, match="sot_weight, eot_weight"):
        make_method("t2i", "TRCE", {"eot_weight": 0.0})
    with pytest.raises(ObliviateError, match="early_fraction"):
        make_method("t2i", "TRCE", {"early_fraction": 1.5})
    with pytest.raises(ObliviateError, match="reg_batch_size"):
        make_method("t2i", "TRCE", {"reg_batch_size": 0})
    with pytest.raises(ObliviateError, match="sample_steps >= 2"):
        make_method("t2i", "TRCE").setup(EraseContext(tiny_pipe, None, tiny_task(), None, sample_steps=1), {}, [])
    # a concept whose tokens are not the prompt's (a word that only starts with it): keyword rows cannot be found
    task = EraseTask("star", ["a red starry square in dotted style"], tiny_task().retain_prompts, anchor="square")
    ctx = EraseContext(tiny_pipe, None, task, torch.Generator().manual_seed(0))
    with pytest.raises(ObliviateError, match="not found in the tokens of forget prompt 'a red starry"):
        make_method("t2i", "TRCE", {"keyword_weight": 1.0}).rows(ctx)
    assert len(make_method("t2i", "TRCE").rows(ctx)[0]) == 1  # without keyword rows: the [EoT] alone
