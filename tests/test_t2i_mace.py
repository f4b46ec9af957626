"""MACE's own pieces: the token alignment of the closed-form refinement (against a re-typing of the reference's
`find_matching_indices` and its extension), the refinement and the fusion against direct least-squares solves, the
attention loss and the regions re-computed by hand, the recorder against diffusers' own processor."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import tiny_task
from obliviate.errors import ObliviateError
from obliviate.methods.t2i.base import EraseContext
from obliviate.methods.t2i.attention_maps import concept_positions, every_map, recording
from obliviate.methods.t2i.mace import (MACE, attention_loss, concept_heat, fuse_weights, importance_weights,
                                        matching_positions)


def _reference_matching(old, new, length):
    """A re-typing of Shilin-LU/MACE src/cfr_utils.py `find_matching_indices` and the extension in `prepare_k_v`."""
    start_common = 0
    for i, j in zip(old, new):
        if i == j:
            start_common += 1
        else:
            break
    end_common_old, end_common_new = len(old) - 1, len(new) - 1
    while end_common_old >= start_common and end_common_new >= start_common:
        if old[end_common_old] == new[end_common_new]:
            end_common_old -= 1
            end_common_new -= 1
        else:
            break
    o = list(range(start_common)) + list(range(end_common_old + 1, len(old)))
    n = list(range(start_common)) + list(range(end_common_new + 1, len(new)))
    if o[-1] >= n[-1]:
        return o + list(range(o[-1] + 1, length)), n + list(range(n[-1] + 1, length - (o[-1] - n[-1])))
    return o + list(range(o[-1] + 1, length - (n[-1] - o[-1]))), n + list(range(n[-1] + 1, length))


@pytest.mark.parametrize("old,new", [
    ([0, 5, 6, 7, 9], [0, 5, 6, 8, 9]),  # one word replaced
    ([0, 5, 6, 7, 9], [0, 5, 6, 9]),  # the concept removed (empty anchor)
    ([0, 5, 7, 7, 6, 9], [0, 5, 8, 6, 9]),  # two tokens onto one
    ([0, 7, 5, 9], [0, 8, 8, 8, 5, 9]),  # one token onto three
])
def test_matching_positions_agree_with_the_reference(old, new):
    assert matching_positions(old, new, 12) == _reference_matching(old, new, 12)
    o, n = matching_positions(old, new, 12)
    assert len(o) == len(n)
    assert all(old[i] == new[j] for i, j in zip(o, n) if i < len(old) and j < len(new))  # shared words only


def test_refinement_is_the_least_squares_solution(tiny_pipe):
    """W M is the minimiser of lam ||W* - W||^2 + sum_e ||W* c_e - W g_e||^2 over the forget prompts' shared
    positions (solved here directly), and the concept's own tokens are not among the c_e."""
    task = tiny_task("striped")
    method = MACE(MACE.Config(lam=0.5))
    ctx = EraseContext(tiny_pipe, None, task, torch.Generator().manual_seed(0))
    method.prompts = [task.forget_prompts]
    method.anchors = [[task.anchor_prompt(p) for p in task.forget_prompts]]
    method.preserve = torch.zeros(0, 32, dtype=torch.float64)
    M, logs = method.refinement(ctx)
    tok, L = tiny_pipe.tokenizer, 12
    states = ctx.encode(task.forget_prompts).states.double()
    guides = ctx.encode(method.anchors[0]).states.double()
    rows_c, rows_g = [], []
    striped = tok("striped", add_special_tokens=False).input_ids
    for i, (p, a) in enumerate(zip(task.forget_prompts, method.anchors[0])):
        old, new = tok(p).input_ids, tok(a).input_ids
        o, n = _reference_matching(old, new, L)
        assert not set(o) & {old.index(striped[0])}  # the concept's token is left out
        rows_c.append(states[i, o])
        rows_g.append(guides[i, n])
    C, G = torch.cat(rows_c), torch.cat(rows_g)
    assert logs["cfr_vectors"] == len(C)
    W = torch.randn(16, 32, dtype=torch.float64)
    lam = 0.5
    A = torch.cat([math.sqrt(lam) * torch.eye(32, dtype=torch.float64), C])  # rows: the least-squares system
    B = torch.cat([math.sqrt(lam) * W.T, G @ W.T])
    direct = torch.linalg.lstsq(A, B).solution.T
    assert torch.allclose(W @ M, direct, atol=1e-8)
    # the reference's update re-typed (cfr_utils.py `prepare_k_v` + `closed_form_refinement`; in float64: the tiny
    # encoder's states make mat2 too ill-conditioned for float32's inverse to agree past 1e-3), on each of the UNet's
    # cross-attention key/value projections
    for name, p in tiny_pipe.unet.named_parameters():
        if ".attn2.to_k." not in name and ".attn2.to_v." not in name:
            continue
        layer = p.detach().double()
        mat1, mat2 = lam * layer, lam * torch.eye(layer.shape[1], dtype=torch.float64)
        for i, (prompt, anchor) in enumerate(zip(task.forget_prompts, method.anchors[0])):
            o, n = _reference_matching(tok(prompt).input_ids, tok(anchor).input_ids, L)
            context, values = states[i, o], guides[i, n] @ layer.T
            mat1 = mat1 + values.T @ context
            mat2 = mat2 + context.T @ context
        reference = mat1 @ torch.inverse(mat2)
        assert torch.allclose(layer @ M, reference, atol=1e-9), name
    # applied to the UNet's cross-attention keys/values, it brings the forget prompts' noise predictions towards
    # their anchor prompts'
    from obliviate.methods.t2i.uce import UCE
    from obliviate.models.diffusion import encode_prompts, predict_noise

    x = torch.randn(len(task.forget_prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def gap():
        with torch.no_grad():
            eps = predict_noise(tiny_pipe.unet, x, 300, encode_prompts(tiny_pipe, task.forget_prompts))
            return float((eps - anchor_eps).norm())
    with torch.no_grad():
        anchor_eps = predict_noise(tiny_pipe.unet, x, 300, encode_prompts(tiny_pipe, method.anchors[0]))
    start = gap()
    UCE.apply([(n, p) for n, p in tiny_pipe.unet.named_parameters() if UCE().trainable(n, p)], M)
    assert gap() < 0.5 * start


def test_fusion_is_the_least_squares_solution():
    torch.manual_seed(0)
    D, O = 6, 4
    base, original = torch.randn(O, D, dtype=torch.float64), torch.randn(O, D, dtype=torch.float64)
    loras = [(torch.randn(O, D, dtype=torch.float64), torch.randn(5, D, dtype=torch.float64)) for _ in range(2)]
    P = torch.randn(3, D, dtype=torch.float64)
    lam, ps = 0.7, 0.3
    fused = fuse_weights(base, original, loras, P, lam, ps)
    A = torch.cat([math.sqrt(lam) * torch.eye(D, dtype=torch.float64), *[C for _, C in loras], math.sqrt(ps) * P])
    B = torch.cat([math.sqrt(lam) * base.T, *[C @ W.T for W, C in loras], math.sqrt(ps) * P @ original.T])
    assert torch.allclose(fused, torch.linalg.lstsq(A, B).solution.T, atol=1e-10)
    # one LoRA whose prompts span every direction, nothing else: the fusion is that LoRA's weights
    W1, C1 = torch.randn(O, D, dtype=torch.float64), torch.randn(8, D, dtype=torch.float64)
    assert torch.allclose(fuse_weights(base, original, [(W1, C1)], P[:0], 0.0, 0.0), W1, atol=1e-10)
    with pytest.raises(ObliviateError, match="singular"):
        fuse_weights(base, original, [(W1, C1[:2])], P[:0], 0.0, 0.0)


def test_attention_loss_by_hand():
    torch.manual_seed(0)
    B, heads, h, w, L = 2, 3, 4, 4, 5
    probs = torch.rand(B * heads, h * w, L).softmax(-1)
    small = torch.rand(B * heads, 4, L).softmax(-1)  # a layer at half the resolution
    positions = torch.tensor([[0, 1, 0, 0, 1], [0, 0, 1, 1, 0]], dtype=torch.bool)
    region = torch.zeros(B, h, w)
    region[0, :2, :2] = 1
    region[1, 2:, :] = 1
    expected = 0.0
    for maps, (gh, gw) in ((probs, (4, 4)), (small, (2, 2))):
        total = 0.0
        for b in range(B):
            for head in range(heads):
                for y in range(gh):
                    for x in range(gw):
                        if region[b, y * (h // gh), x * (w // gw)] > 0:  # nearest resizing
                            for j in range(L):
                                if positions[b, j]:
                                    total += float(maps[b * heads + head, y * gw + x, j]) ** 2
        expected += math.sqrt(total)
    assert attention_loss([probs, small], positions, region).item() == pytest.approx(expected, rel=1e-6)


def test_importance_weights_are_the_reference_function():
    w = importance_weights(1000)
    f = [1 / (1 + math.exp(-0.05 * (t - 200))) - 1 / (1 + math.exp(-0.05 * (t - 400))) for t in range(1000)]
    assert torch.allclose(w, torch.tensor(f, dtype=torch.float64) / sum(f))
    assert float(w[150:451].sum()) > 0.98 and int(w.argmax()) == 300


def test_recorder_is_diffusers_attention_and_regions_follow_the_maps(tiny_pipe):
    """The recording processors give the UNet's own output, one map per cross-attention layer whose rows sum to 1,
    and the processors are put back after."""
    from obliviate.models.diffusion import encode_prompts, predict_noise

    unet = tiny_pipe.unet
    own = dict(unet.attn_processors)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    states = encode_prompts(tiny_pipe, ["a red star in striped style", "a red circle in solid style"])
    with torch.no_grad():
        plain = predict_noise(unet, x, 300, states)
        with recording(unet) as maps:
            recorded = predict_noise(unet, x, 300, states)
    maps = every_map(maps)
    assert torch.allclose(plain, recorded, atol=1e-6)
    assert len(maps) == sum(".attn2" in k for k in own) and all(m.shape[-1] == 12 for m in maps)
    assert all(torch.allclose(m.sum(-1), torch.ones(())) for m in maps)
    assert dict(unet.attn_processors) == own
    # a map where token 3 is attended only in the top-left quarter: the region is that quarter
    probs = torch.full((2, 64, 12), 1 / 12)
    probs[:, :, 3] = 0
    top_left = torch.zeros(8, 8, dtype=torch.bool)
    top_left[:4, :4] = True
    probs[:, top_left.flatten(), 3] = 0.9
    words = torch.zeros(1, 12, dtype=torch.bool)
    words[0, 3] = True
    heat = concept_heat([probs], words, (8, 8))[0]
    assert torch.equal(heat >= 0.5 * heat.max(), top_left)


def test_positions_mark_the_concept_and_the_end_token(tiny_pipe):
    tok = tiny_pipe.tokenizer
    pos = concept_positions(tok, ["a red star in striped style"], "striped", 12, "all")[0]
    ids = tok("a red star in striped style", padding="max_length", max_length=12).input_ids
    expected = [i == tok.convert_tokens_to_ids("striped</w>") or i == tok.eos_token_id for i in ids]
    assert pos.tolist() == expected and sum(expected) >= 2
    no_pool = concept_positions(tok, ["a red star in striped style"], "striped", 12)[0]
    assert no_pool.sum() == len(tok("striped", add_special_tokens=False).input_ids)


@pytest.mark.slow
def test_two_concepts_two_loras_one_fused_edit(tiny_pipe):
    """`also_erase`: one LoRA per concept, each trained on its own prompts (its attention loss falls), fused into the
    cross-attention key/value weights alone, with no adapter left on the UNet."""
    from obliviate.config import TrainConfig
    from obliviate.loops.t2i import erase

    task = tiny_task("striped")
    before = copy.deepcopy(tiny_pipe.unet.state_dict())
    original = copy.deepcopy(tiny_pipe.unet)
    method = MACE(MACE.Config(also_erase=["dotted"], lam=0.01, mask="none"))
    result = erase(tiny_pipe, task, method, TrainConfig(max_steps=8, lr=3e-2, batch_size=3), images_per_prompt=1,
                   sample_steps=3, guidance=2.0)
    assert {"attention_0", "attention_1"} <= set(result.history[0])
    for concept in ("striped", "dotted"):
        prompts = [p.replace("striped", concept) for p in task.forget_prompts]
        assert _attention(tiny_pipe, tiny_pipe.unet, prompts, concept) < _attention(tiny_pipe, original, prompts,
                                                                                    concept), concept
    changed = {k for k, v in tiny_pipe.unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed == set(result.trainable_names)
    assert all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)
    assert not any("lora" in k for k in tiny_pipe.unet.state_dict())


def test_bad_config_names_the_key():
    for bad, key in (({"mask": "gsam"}, "mask"), ({"lam": -1}, "lam"), ({"rank": 0}, "rank"),
                     ({"also_erase": "dotted"}, "also_erase"), ({"mask_threshold": 1.0}, "mask_threshold")):
        with pytest.raises(ObliviateError, match=key):
            MACE.Config(**bad)


def _attention(pipe, unet, prompts, concept) -> float:
    """MACE's loss on fixed noise over the whole picture: the prompts' attention to the concept and the end token."""
    from obliviate.models.diffusion import encode_prompts, predict_noise

    x = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(1))
    states = encode_prompts(pipe, prompts)
    with torch.no_grad(), recording(unet) as maps:
        predict_noise(unet, x, 300, states)
    positions = concept_positions(pipe.tokenizer, prompts, concept, states.shape[1], "all")
    return float(attention_loss(every_map(maps), positions, torch.ones(len(prompts), 8, 8)))
