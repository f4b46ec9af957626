"""Receler's own pieces: the eraser after each cross-attention (identity at first, o + up(GELU(down(o))) after), the
concept mask and the concept-localised regularisation re-computed by hand, the adversarial states written into the
prompt, the inner attack bringing the concept back, and a run's erasers carried through load and export."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_task
from obliviate.config import TrainConfig
from obliviate.loops.t2i import erase
from obliviate.methods.t2i.receler import (Receler, attach_erasers, concept_mask, cross_attentions, erasers,
                                           erasers_off, insert_prompt, regularisation)
from obliviate.models.diffusion import encode_prompts, predict_noise

PROMPTS = ["a red star in striped style", "a red circle in solid style"]


def _predict(pipe, x):
    with torch.no_grad():
        return predict_noise(pipe.unet, x, 300, encode_prompts(pipe, PROMPTS))


def test_eraser_is_identity_at_first_then_its_formula(tiny_pipe):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = _predict(tiny_pipe, x)
    names = attach_erasers(tiny_pipe.unet, 4)
    assert names and len(erasers(tiny_pipe.unet)) == len(cross_attentions(tiny_pipe.unet)) == len(names)
    assert torch.equal(_predict(tiny_pipe, x), plain)  # `up` starts at zero
    torch.manual_seed(1)
    for e in erasers(tiny_pipe.unet):
        torch.nn.init.normal_(e.up.weight, std=0.5)
    assert not torch.allclose(_predict(tiny_pipe, x), plain, atol=1e-4)
    with erasers_off(tiny_pipe.unet):
        assert torch.equal(_predict(tiny_pipe, x), plain)
    # one cross-attention by hand: o + up(GELU(down(o)))
    _, attn = cross_attentions(tiny_pipe.unet)[0]
    hidden = torch.randn(2, 16, attn.to_q.in_features)
    context = torch.randn(2, 12, attn.to_k.in_features)
    with torch.no_grad():
        with erasers_off(tiny_pipe.unet):
            o = attn(hidden, encoder_hidden_states=context)
        e = attn.eraser
        by_hand = o + (torch.nn.functional.gelu(o @ e.down.weight.T + e.down.bias) @ e.up.weight.T + e.up.bias)
        assert torch.allclose(attn(hidden, encoder_hidden_states=context), by_hand, atol=1e-6)


def test_concept_mask_by_hand():
    """The concept tokens' maps at a quarter of the latent's side only (the reference's 16 x 16 of 64 x 64),
    averaged over heads, tokens and layers, min-max normalised, thresholded."""
    torch.manual_seed(0)
    B, heads, L = 2, 2, 6
    fine = torch.rand(B * heads, 64, L).softmax(-1)  # 8 x 8: not used
    coarse = [torch.rand(B * heads, 4, L).softmax(-1) for _ in range(2)]  # 2 x 2: a quarter of 8 x 8
    words = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    mask = concept_mask([fine, *coarse], words, (8, 8), 0.4)
    assert mask.shape == (B, 2, 2)
    for b in range(B):
        heat = torch.zeros(4)
        for maps in coarse:
            for h in range(heads):
                heat += maps[b * heads + h][:, words[b]].mean(-1) / (heads * len(coarse))
        norm = (heat - heat.min()) / (heat.max() - heat.min())
        assert mask[b].flatten().tolist() == (norm >= 0.4).float().tolist()


def test_regularisation_by_hand():
    torch.manual_seed(0)
    B, C = 2, 3
    outs = [torch.randn(B, 16, C), torch.randn(B, 4, C)]  # 4 x 4 and 2 x 2 grids of an 8 x 8 latent
    mask = torch.zeros(B, 2, 2)
    mask[0, 0, 0] = 1
    mask[1, 1, :] = 1
    expected = 0.0
    for out, side in zip(outs, (4, 2)):
        num, den = 0.0, 0.0
        for b in range(B):
            for y in range(side):
                for x in range(side):
                    off = 1 - float(mask[b, y * 2 // side, x * 2 // side])  # nearest resizing of the 2 x 2 mask
                    num += off * float((out[b, y * side + x] ** 2).mean())
                    den += off
        expected += num / den / len(outs)
    assert regularisation(outs, mask, (8, 8)).item() == pytest.approx(expected, rel=1e-6)


def test_adversarial_states_are_written_from_the_end_token():
    states = torch.zeros(2, 6, 3)
    adv = torch.ones(4, 3, requires_grad=True)
    out = insert_prompt(states, adv, [2, 4])
    assert out[0, 2:6].eq(1).all() and out[0, :2].eq(0).all()
    assert out[1, 4:].eq(1).all() and out[1, :4].eq(0).all()  # as many as fit
    out.sum().backward()
    assert adv.grad.tolist() == [[2.0] * 3, [2.0] * 3, [1.0] * 3, [1.0] * 3]


def test_inner_attack_brings_the_concept_back_and_the_erasers_train(tiny_pipe):
    method = Receler(Receler.Config(eraser_rank=8, adv_iters=3, adv_lr=0.05))
    result = erase(tiny_pipe, tiny_task("striped"), method, TrainConfig(max_steps=1, lr=1e-2, batch_size=2),
                   images_per_prompt=1, sample_steps=3, guidance=2.0)
    assert all(h["attack_mse"] < h["attack_mse_start"] for h in result.history)
    assert all(0 < h["mask_share"] < 1 for h in result.history)
    assert result.trainable_names and all(".attn2.eraser." in n for n in result.trainable_names)
    assert any(e.up.weight.abs().sum() > 0 for e in erasers(tiny_pipe.unet))  # trained and still attached


def test_bad_config_names_the_key():
    from obliviate.errors import ObliviateError

    for bad, key in (({"eraser_rank": 0}, "eraser_rank"), ({"adv_iters": -1}, "adv_iters"),
                     ({"mask_threshold": 2.0}, "mask_threshold"), ({"adv_lr": 0}, "adv_lr")):
        with pytest.raises(ObliviateError, match=key):
            Receler.Config(**bad)


@pytest.mark.slow
def test_a_run_loads_and_exports_with_its_erasers(tmp_path, tiny_pipeline_dir):
    """A Receler run's changed tensors are its erasers: the run loads with them on; the export is the unchanged base
    folder (diffusers loads the original) plus the erasers, which `load_erased` puts back."""
    import shutil

    from typer.testing import CliRunner

    from obliviate.cli import app
    from obliviate.methods.t2i.receler import ERASERS_FILE, load_erased
    from obliviate.models.diffusion import load_pipeline
    from obliviate.runners.t2i import load_run_pipeline
    from test_t2i_runs import _config

    base = tmp_path / "base"
    shutil.copytree(tiny_pipeline_dir, base)
    config = _config(tmp_path, base, "Receler")  # METHOD_ARGS: few adversarial passes, a small eraser
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "r1"
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    loaded = load_run_pipeline(run / "changed.safetensors", base)
    original = load_pipeline(base)
    assert erasers(loaded.unet) and not torch.allclose(_predict(loaded, x), _predict(original, x), atol=1e-5)
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(run), str(out)])
    assert result.exit_code == 0, result.output
    assert (out / ERASERS_FILE).is_file()
    assert torch.equal(_predict(load_pipeline(out), x), _predict(original, x))  # the folder alone: the original
    assert torch.allclose(_predict(load_erased(out), x), _predict(loaded, x), atol=1e-6)
    assert not math.isnan(float(_predict(loaded, x).sum()))
