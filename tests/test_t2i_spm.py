"""SPM (methods/t2i/spm.py) on the tiny SD-shaped pipeline: the rank-1 adapter starts as the identity, training
erases towards the anchor target while latent anchoring holds random text states, the merged weights are the adapter,
facilitated transport's rate re-typed, two SPMs on one pipeline each scaled by its own rate, a full run and export,
and one-line errors."""
from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error, tiny_task
from obliviate.config import TrainConfig
from obliviate.errors import ObliviateError
from obliviate.loops.t2i import erase
from obliviate.methods.common import make_method
from obliviate.methods.t2i import spm as S
from obliviate.models.diffusion import add_noise, encode_prompts, initial_noise, predict_noise, tokenize

FAST = dict(images_per_prompt=1, sample_steps=3, guidance=2.0)


def _probe(pipe, n, seed=100):
    x0, eps = initial_noise(pipe, [seed + i for i in range(n)]), initial_noise(pipe, [seed + 50 + i for i in range(n)])
    return add_noise(pipe, x0, eps, torch.full((n,), 500))


@torch.no_grad()
def _eps(pipe, unet, context, x):
    return predict_noise(unet, x, 500, context)


def _transformer_layers(unet) -> set[str]:
    return {f"{n}.{c}" for n, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel"
            for c, cm in m.named_modules() if isinstance(cm, (torch.nn.Linear, torch.nn.Conv2d))}


def test_adapter_is_rank_one_on_the_transformer_layers_and_starts_as_the_identity(tiny_pipe):
    unet = tiny_pipe.unet
    names_before = [n for n, _ in unet.named_parameters()]
    x = _probe(tiny_pipe, 3)
    context = encode_prompts(tiny_pipe, tiny_task().forget_prompts)
    before = _eps(tiny_pipe, unet, context, x)
    expected = _transformer_layers(unet)
    method = make_method("t2i", "SPM")
    method.attach(unet)
    assert set(method.targets) == expected and len(expected) == 48  # the tiny UNet: 4 blocks x 12 layers
    trained = {n: p for n, p in unet.named_parameters() if method.trainable(n, p)}
    assert len(trained) == 2 * len(method.targets)
    for layer in method.targets:
        module = unet.get_submodule(layer)
        down, up = module.lora_A[S.ADAPTER].weight, module.lora_B[S.ADAPTER].weight
        assert down.shape[0] == 1 and up.shape[1] == 1  # one dimension
        assert down.abs().sum() > 0 and not up.any()  # Kaiming down, zero up
    assert torch.equal(_eps(tiny_pipe, unet, context, x), before)  # the identity before training
    assert method.detach(unet) == [f"{t}.weight" for t in method.targets]
    assert [n for n, _ in unet.named_parameters()] == names_before and not hasattr(unet, "peft_config")  # unwrapped


def test_merged_weights_equal_the_adapter_applied_outputs(tiny_pipe):
    unet = tiny_pipe.unet
    method = make_method("t2i", "SPM")
    method.attach(unet)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if method.trainable(name, p):
                p.normal_(0, 0.3)
    x = _probe(tiny_pipe, 3)
    context = encode_prompts(tiny_pipe, tiny_task().forget_prompts)
    adapted = _eps(tiny_pipe, unet, context, x)
    with S.adapter_off(unet):
        original = _eps(tiny_pipe, unet, context, x)
    deltas = {t: (unet.get_submodule(t).lora_B[S.ADAPTER].weight.flatten(1)
                  @ unet.get_submodule(t).lora_A[S.ADAPTER].weight.flatten(1)).clone() for t in method.targets}
    base = {f"{t}.weight": unet.get_submodule(t).get_base_layer().weight.detach().clone() for t in method.targets}
    names = method.detach(unet)
    merged = _eps(tiny_pipe, unet, context, x)
    assert (adapted - original).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    # an adapter recovered from the merged weights is the same rank-1 update
    state = unet.state_dict()
    recovered = S.SPMAdapter.from_weights("striped", {n: state[n] for n in names}, base)
    for t, (down, up) in recovered.factors.items():
        torch.testing.assert_close(up.flatten(1) @ down.flatten(1), deltas[t], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_training_erases_towards_the_anchor_and_latent_anchoring_holds(tiny_pipe):
    """The concept's prediction moves towards the erasure target eps_0(anchor) - (eps_0(c) - eps_0(anchor)); latent
    anchoring keeps random text states' predictions nearer the original's than training without it; and with
    facilitated transport the concept's prediction moves more than the unrelated prompts'. (The tiny random text
    encoder puts every prompt near one point, so without transport a rank-1 update moves them all alike, and the
    paper's anchoring weight of 1000 holds the concept too: the test trains at weight 10.)"""
    task = tiny_task("striped")
    original = copy.deepcopy(tiny_pipe.unet)
    forget = encode_prompts(tiny_pipe, task.forget_prompts)
    anchor = encode_prompts(tiny_pipe, [task.anchor_prompt(p) for p in task.forget_prompts])
    x = _probe(tiny_pipe, len(task.forget_prompts))
    eps_c = _eps(tiny_pipe, original, forget, x)
    target = 2 * _eps(tiny_pipe, original, anchor, x) - eps_c  # g = 1
    anchors = S.sample_anchors(forget, 16, torch.Generator().manual_seed(5))
    xa = _probe(tiny_pipe, 16, seed=500)
    eps_z = _eps(tiny_pipe, original, anchors, xa)
    anchors_moved, erased = {}, None
    for weight in (10.0, 0.0):
        pipe = copy.copy(tiny_pipe)
        pipe.unet = copy.deepcopy(original)
        result = erase(pipe, task, make_method("t2i", "SPM", {"anchoring_weight": weight}),
                       TrainConfig(max_steps=12, lr=1e-2, batch_size=3), **FAST)
        assert result.stopped is None and all("erase_mse" in h for h in result.history)
        changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, original.get_parameter(n))}
        assert changed and changed <= set(result.trainable_names)
        assert (_eps(pipe, pipe.unet, forget, x) - target).norm() < 0.8 * (eps_c - target).norm()
        anchors_moved[weight] = float((_eps(pipe, pipe.unet, anchors, xa) - eps_z).norm())
        erased = erased or (pipe.unet, result.trainable_names)
    assert anchors_moved[10.0] < 0.7 * anchors_moved[0.0], anchors_moved

    state = erased[0].state_dict()
    adapter = S.SPMAdapter.from_weights("striped", {n: state[n] for n in erased[1]}, original.state_dict())
    base = copy.copy(tiny_pipe)
    base.unet = copy.deepcopy(original)
    transport = S.FacilitatedTransport([adapter])
    prompts = task.forget_prompts + [p.text for p in task.retain_prompts]
    moved = []
    with transport.install(base):
        for i, prompt in enumerate(prompts):
            scale = transport.apply(base, prompt)[0]
            context, xi = encode_prompts(base, [prompt]), _probe(base, 1, seed=700 + i)
            change = _eps(base, base.unet, context, xi) - _eps(base, original, context, xi)
            moved.append((scale, float(change.norm())))
    concept, unrelated = moved[:len(task.forget_prompts)], moved[len(task.forget_prompts):]
    assert all(s == pytest.approx(1.0) for s, _ in concept) and all(s < 0.99 for s, _ in unrelated), moved
    mean = lambda rows: sum(m for _, m in rows) / len(rows)  # noqa: E731
    assert mean(concept) > mean(unrelated), moved


def test_one_step_loss_is_the_reference_loss_retyped(tiny_pipe):
    """train_spm.py + prompt.py's `_erase_with_la` + sampling.py, re-typed with separate UNet calls (the method
    batches them into two): the same generator draws give the same loss to float precision."""
    from obliviate.methods.t2i.base import EraseContext
    from obliviate.models.diffusion import denoise

    task = tiny_task("striped")
    unet = tiny_pipe.unet
    method = make_method("t2i", "SPM", {"erase_guidance": 1.5})
    method.attach(unet)
    with torch.no_grad():  # a trained-looking adapter, so eps_spm differs from eps_0
        for name, p in unet.named_parameters():
            if method.trainable(name, p):
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    texts = task.forget_prompts[:2]
    ctx = EraseContext(tiny_pipe, None, task, torch.Generator().manual_seed(3), sample_steps=4, guidance=2.0)
    forget = {"texts": texts, "context": ctx.encode(texts)}
    state = ctx.generator.get_state()
    parts = method.losses(ctx, unet, forget, {})

    gen = torch.Generator()
    gen.set_state(state)
    stop = int(torch.randint(1, 4, (1,), generator=gen))
    seeds = torch.randint(0, 2 ** 31 - 1, (2,), generator=gen).tolist()
    x_t, t = denoise(tiny_pipe, texts, seeds, 4, 3.0, unet=unet, stop_after=stop)  # "with network:" sampling
    target_emb = encode_prompts(tiny_pipe, texts)
    neutral_emb = encode_prompts(tiny_pipe, [task.anchor_prompt(p) for p in texts])
    anchors = []
    for k in range(4):  # sampling.sample: accept with probability 1 - sim, scale U(0.8, 1.2) x the target's norm
        target = target_emb[k % 2].flatten()
        while True:
            noise = torch.randn(target.shape, generator=gen)
            noise = noise / noise.norm()
            sim = torch.nn.functional.cosine_similarity(target, noise, dim=-1)
            if float(torch.rand((), generator=gen)) < 1 - float(sim):
                break
        anchors.append((float(torch.rand((), generator=gen)) * 0.4 + 0.8) * noise * target.norm())
    anchors = torch.stack(anchors).view(4, *target_emb.shape[1:])
    rows = torch.tensor([0, 1, 0, 1])
    mse = torch.nn.MSELoss()
    with torch.no_grad(), S.adapter_off(unet):  # the network's multiplier 0
        positive = predict_noise(unet, x_t, t, target_emb)
        neutral = predict_noise(unet, x_t, t, neutral_emb)
        anchor_ori = predict_noise(unet, x_t[rows], t, anchors)
    target_latents = predict_noise(unet, x_t, t, target_emb)
    anchor_latents = predict_noise(unet, x_t[rows], t, anchors)
    erase_loss = mse(target_latents, neutral - 1.5 * (positive - neutral))
    loss = erase_loss + 1000.0 * mse(anchor_latents, anchor_ori)
    assert float(erase_loss.detach()) > 0 and float(mse(anchor_latents, anchor_ori).detach()) > 0
    torch.testing.assert_close(parts.forget, erase_loss, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(parts.total, loss, rtol=1e-4, atol=1e-8)
    method.detach(unet)


def test_latent_anchoring_keeps_random_text_states_where_the_original_has_them(tiny_pipe):
    """Three steps with and without the anchoring term: with it, the predictions for fresh random text states (drawn
    as the training draws its anchors) stay nearer the original's (about half as far on this pipeline)."""
    task = tiny_task("striped")
    original = copy.deepcopy(tiny_pipe.unet)
    anchors = S.sample_anchors(encode_prompts(tiny_pipe, task.forget_prompts), 16, torch.Generator().manual_seed(5))
    xa = _probe(tiny_pipe, 16, seed=500)
    eps_z = _eps(tiny_pipe, original, anchors, xa)
    moved = {}
    for weight in (10.0, 0.0):
        pipe = copy.copy(tiny_pipe)
        pipe.unet = copy.deepcopy(original)
        result = erase(pipe, task, make_method("t2i", "SPM", {"anchoring_weight": weight}),
                       TrainConfig(max_steps=3, lr=1e-2, batch_size=3), **FAST)
        assert all(("anchoring_mse" in h) for h in result.history)
        moved[weight] = float((_eps(pipe, pipe.unet, anchors, xa) - eps_z).norm())
    assert moved[10.0] < 0.75 * moved[0.0], moved
    result = erase(tiny_pipe, task, make_method("t2i", "SPM", {"anchor_samples": 0}),
                   TrainConfig(max_steps=1, lr=1e-2, batch_size=3), **FAST)
    assert "anchoring_mse" not in result.history[0]  # no anchors, no term


def test_anchor_sampling_follows_the_reference():
    """Random text states at 0.8-1.2 x the concept states' norm, nearly orthogonal to them."""
    states = torch.randn(2, 12, 32)
    anchors = S.sample_anchors(states, 6, torch.Generator().manual_seed(0))
    assert anchors.shape == (6, 12, 32)
    for k, a in enumerate(anchors):
        ratio = float(a.norm() / states[k % 2].norm())
        assert 0.8 <= ratio <= 1.2
        assert abs(float(torch.nn.functional.cosine_similarity(a.flatten(), states[k % 2].flatten(), dim=0))) < 0.3
    assert len(S.sample_anchors(states, 0, torch.Generator())) == 0


def test_transport_rate_is_the_formula(tiny_pipe):
    """gamma = max(cos of the flattened text states, share of the concept's tokens in the prompt), re-typed."""
    prompts = ["a red circle in striped style", "a red circle in dotted style", "a red star in solid style"]
    concept = "striped"
    states, ids = encode_prompts(tiny_pipe, prompts + [concept]), tokenize(tiny_pipe, prompts + [concept])
    special = set(tiny_pipe.tokenizer.all_special_ids)
    gamma = S.transport_rate(states[:3], ids[:3], states[3:], ids[3], special)
    c = states[3].flatten()
    concept_tokens = set(ids[3].tolist()) - special
    for i in range(3):
        p = states[i].flatten()
        cos = float(p @ c / (p.norm() * c.norm()))
        share = len((set(ids[i].tolist()) - special) & concept_tokens) / len(concept_tokens)
        assert float(gamma[i]) == pytest.approx(max(cos, share), abs=1e-6)
    assert float(gamma[0]) == pytest.approx(1.0)  # the prompt names the concept
    assert float(gamma[1]) < 0.999 and float(gamma[2]) < 0.999  # unrelated prompts: smaller


def _random_adapter(unet, concept, seed) -> S.SPMAdapter:
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for t in S.adapter_targets(unet):
        w = unet.get_submodule(t).weight
        factors[t] = (torch.randn((1, *w.shape[1:]), generator=g) * 0.3,
                      torch.randn((w.shape[0], 1, *([1] * (w.dim() - 2))), generator=g) * 0.3)
    return S.SPMAdapter(concept, factors)


def _merged_unet(unet, adapters, scales):
    out = copy.deepcopy(unet)
    with torch.no_grad():
        for adapter, scale in zip(adapters, scales):
            for t, (down, up) in adapter.factors.items():
                w = out.get_submodule(t).weight
                w += scale * (up.flatten(1) @ down.flatten(1)).view_as(w)
    return out


def test_two_spms_on_one_pipeline_each_scaled_by_its_own_transport(tiny_pipe):
    unet = tiny_pipe.unet
    original = copy.deepcopy(unet)
    adapters = [_random_adapter(unet, "striped", 1), _random_adapter(unet, "star", 2)]
    prompts = ["a red star in striped style", "a red star in dotted style", "a red circle in dotted style"]
    x = _probe(tiny_pipe, 1)
    transport = S.FacilitatedTransport(adapters)
    with transport.install(tiny_pipe):
        rates = transport.rates(tiny_pipe, prompts)
        assert rates[0].tolist() == pytest.approx([1.0, 1.0])  # names both concepts
        assert rates[1, 1] == pytest.approx(1.0) and rates[1, 0] < 0.999  # the star only
        assert (rates[2] < 0.999).all()  # neither
        for i, prompt in enumerate(prompts):
            scales = transport.apply(tiny_pipe, prompt)
            assert scales == pytest.approx(rates[i].tolist())
            context = encode_prompts(tiny_pipe, [prompt])
            expected = _eps(tiny_pipe, _merged_unet(original, adapters, scales), context, x)
            torch.testing.assert_close(_eps(tiny_pipe, unet, context, x), expected, atol=1e-5, rtol=1e-5)
    # the pipeline's UNet is as before
    assert [n for n, _ in unet.named_parameters()] == [n for n, _ in original.named_parameters()]
    context = encode_prompts(tiny_pipe, prompts[:1])
    assert torch.equal(_eps(tiny_pipe, unet, context, x), _eps(tiny_pipe, original, context, x))

    # sampling: each picture is the merged pipeline's at that prompt's scales
    images, scales = S.sample_with_transport(tiny_pipe, adapters, prompts[1:], [7, 8], steps=3, guidance=2.0)
    assert images.shape[0] == 2 and scales.shape == (2, 2)
    from obliviate.models.diffusion import sample
    for k in range(2):
        expected = sample(tiny_pipe, [prompts[1 + k]], [7 + k], 3, 2.0,
                          unet=_merged_unet(original, adapters, scales[k].tolist()))
        torch.testing.assert_close(images[k:k + 1], expected, atol=1e-4, rtol=1e-4)


def test_bad_config_values_are_errors():
    for args, key in [({"anchor_samples": 1.5}, "anchor_samples"), ({"anchor_samples": -1}, "anchor_samples"),
                      ({"anchoring_weight": -1}, "anchoring_weight"), ({"erase_guidance": "x"}, "erase_guidance"),
                      ({"start_guidance": -0.5}, "start_guidance")]:
        with pytest.raises(ObliviateError, match=key):
            make_method("t2i", "SPM", args)
    with pytest.raises(ObliviateError, match="power"):
        S.FacilitatedTransport([S.SPMAdapter("striped")], power=0)


def test_a_denoiser_without_transformer_blocks_is_refused():
    with pytest.raises(ObliviateError, match="no Transformer2DModel block"):
        make_method("t2i", "SPM").attach(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_bad_method_args_in_a_run_config_are_one_line_errors(tmp_path):
    from obliviate.cli import app

    config = tmp_path / "c.toml"
    config.write_text('method = "SPM"\nconcept = "striped"\n[world]\nname = "canvas"\n[method_args]\n'
                      'anchor_samples = -2\n')
    one_line_error(CliRunner().invoke(app, ["validate", str(config)]), "anchor_samples")


@pytest.mark.slow
def test_spm_run_export_and_transport_from_the_run(tmp_path, tiny_pipeline_dir):
    """`obliviate run` with SPM on the user's pipeline folder, `obliviate export`, StableDiffusionPipeline loads it,
    and the adapter recovered from the run reproduces the run's weights."""
    import json

    from safetensors.torch import load_file

    from obliviate.cli import app
    from obliviate.models.diffusion import load_pipeline
    from test_t2i_runs import _config

    runner = CliRunner()
    result = runner.invoke(app, ["run", str(_config(tmp_path, tiny_pipeline_dir, "SPM")), "--quiet"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "r1"
    assert json.loads((run / "metrics.json").read_text())["status"] == "completed"
    changed = load_file(str(run / "changed.safetensors"))
    base = load_pipeline(tiny_pipeline_dir)
    assert {k.removeprefix("unet.") for k in changed} == {f"{t}.weight" for t in S.adapter_targets(base.unet)}
    result = runner.invoke(app, ["export", str(run), str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    from diffusers import StableDiffusionPipeline
    sd = StableDiffusionPipeline.from_pretrained(str(tmp_path / "exported"))
    for k, v in changed.items():
        assert torch.equal(sd.unet.state_dict()[k.removeprefix("unet.")], v)

    adapter = S.SPMAdapter.from_run(run, base.unet)
    assert adapter.concept == "striped" and adapter.factors
    merged = _merged_unet(base.unet, [adapter], [1.0]).state_dict()
    for k, v in changed.items():
        torch.testing.assert_close(merged[k.removeprefix("unet.")], v, atol=1e-6, rtol=1e-5)
    with pytest.raises(ObliviateError, match="not an SPM"):
        esd = tmp_path / "esd"
        esd.mkdir()
        result = runner.invoke(app, ["run", str(_config(esd, tiny_pipeline_dir, "ESD-x")), "--quiet"])
        assert result.exit_code == 0, result.output
        S.SPMAdapter.from_run(esd / "runs" / "r1", base.unet)
