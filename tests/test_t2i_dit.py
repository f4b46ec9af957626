"""SD3- and FLUX-shaped pipelines (models/dit.py): tiny pipelines built in code and saved with save_pretrained, as
diffusers' own tests build theirs; every number checked against the diffusers pipeline of the same folder."""
import json

import pytest
import torch

from conftest import tiny_prompts

from obliviate.guards.t2i import T2IGuard
from obliviate.models.diffusion import denoise, initial_noise, sample

PROMPT = ["a red star in striped style"]


def t5_tokenizer(texts: list[str]):
    """A T5 tokenizer without downloads: a Unigram vocabulary of the texts' words (and their letters, so unknown
    words still spell), <pad>=0, </s>=1, <unk>=2 as T5's."""
    from transformers import T5TokenizerFast

    words = sorted({w for t in texts for w in t.lower().split()})
    letters = sorted({c for w in words for c in w})
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [("▁" + w, -1.0) for w in words]
             + [(c, -5.0) for c in letters])
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_parts(texts):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, T5Config, T5EncoderModel

    from obliviate.worlds.tokenizer import train_clip_tokenizer

    clip_tok = train_clip_tokenizer(texts * 3, max_length=12)
    ids = clip_tok.convert_tokens_to_ids
    clip_config = CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=12, projection_dim=16,
                                 bos_token_id=ids("<|startoftext|>"), eos_token_id=ids("<|endoftext|>"),
                                 pad_token_id=ids("<|endoftext|>"))
    t5_tok = t5_tokenizer(texts)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=64, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    vae = AutoencoderKL(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    return clip_config, clip_tok, t5, t5_tok, vae


def build_sd3(folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from obliviate.models.dit import SD3Backbone, dit_pipeline, save_dit_pipeline

    torch.manual_seed(0)
    clip_config, clip_tok, t5, t5_tok, vae = tiny_parts(tiny_prompts())
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=64, pooled_projection_dim=32, out_channels=4,
                                        pos_embed_max_size=8)
    pipe = dit_pipeline(transformer, vae, (CLIPTextModelWithProjection(clip_config),
                                          CLIPTextModelWithProjection(clip_config), t5),
                        (clip_tok, clip_tok, t5_tok), FlowMatchEulerDiscreteScheduler(shift=3.0), SD3Backbone())
    save_dit_pipeline(pipe, folder)
    return folder


def build_flux(folder, guidance_embeds: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from obliviate.models.dit import FluxBackbone, dit_pipeline, save_dit_pipeline

    torch.manual_seed(0)
    clip_config, clip_tok, t5, t5_tok, vae = tiny_parts(tiny_prompts())
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                         pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
                                         guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = dit_pipeline(transformer, vae, (CLIPTextModel(clip_config), t5), (clip_tok, t5_tok), scheduler,
                       FluxBackbone())
    save_dit_pipeline(pipe, folder)
    return folder


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return build_sd3(tmp_path_factory.mktemp("tiny_sd3") / "pipeline")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return build_flux(tmp_path_factory.mktemp("tiny_flux") / "pipeline")


@pytest.fixture(scope="module", params=["sd3", "flux"])
def dit_pipe(request, sd3_dir, flux_dir):
    from obliviate.models.dit import load_dit_pipeline

    return load_dit_pipeline(sd3_dir if request.param == "sd3" else flux_dir)


def test_folders_load_as_their_shape(sd3_dir, flux_dir):
    from obliviate.models.dit import FluxBackbone, SD3Backbone, load_dit_pipeline

    from obliviate.models.diffusion import Pipeline, load_pipeline

    sd3, flux = load_dit_pipeline(sd3_dir), load_pipeline(flux_dir)  # runs load them as any pipeline folder
    assert isinstance(sd3, Pipeline) and list(sd3.components()) == ["transformer", "text_encoder", "text_encoder_2",
                                                                    "text_encoder_3"]
    assert isinstance(sd3.backbone, SD3Backbone) and (sd3.backbone.kind, sd3.backbone.prediction) == ("sd3", "flow")
    assert isinstance(flux.backbone, FluxBackbone) and flux.backbone.kind == "flux"
    assert len(sd3.text_encoders) == 3 and len(flux.text_encoders) == 2
    assert sd3.unet is sd3.denoiser and sd3.latent_shape == (4, 8, 8) and flux.latent_shape == (4, 8, 8)
    assert not any(p.requires_grad for p in sd3.denoiser.parameters())
    assert list((sd3_dir / "transformer").glob("*.safetensors")) and not list(sd3_dir.rglob("*.bin"))


def test_encode_is_the_pipelines_encode_prompt(dit_pipe):
    from obliviate.models.dit import diffusers_pipeline

    texts = ["a red star in striped style", "a blue circle"]
    cond = dit_pipe.backbone.encode(dit_pipe, texts)
    ref = diffusers_pipeline(dit_pipe).encode_prompt(texts, texts, **(
        {"prompt_3": texts, "do_classifier_free_guidance": False} if dit_pipe.backbone.kind == "sd3" else {}))
    torch.testing.assert_close(cond.states, ref[0], rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, ref[2] if dit_pipe.backbone.kind == "sd3" else ref[1], rtol=0, atol=0)
    L = 12 + 256 if dit_pipe.backbone.kind == "sd3" else 512
    assert cond.states.shape == (2, L, 64) and cond.pooled.shape == (2, 32)
    assert len(cond) == 2 and torch.equal(cond[1:].states, cond.states[1:])


def test_noise_target_and_sampler_agree(dit_pipe):
    """x_t at t=0 is x0 and at t=1000 the noise; a denoiser that predicts the exact target has zero loss and one
    scheduler step with it lands on the forward process at the next timestep."""
    b = dit_pipe.backbone
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    torch.testing.assert_close(b.noisy(dit_pipe, x0, noise, torch.zeros(3)), x0)
    torch.testing.assert_close(b.noisy(dit_pipe, x0, noise, torch.full((3,), 1000.0)), noise)
    sched = b.sampler(dit_pipe, 4)
    t, t_next = sched.timesteps[1], sched.timesteps[2]
    x_t = b.noisy(dit_pipe, x0, noise, t.expand(3))
    v = b.target(dit_pipe, x0, noise, t.expand(3))
    assert torch.nn.functional.mse_loss(v, noise - x0).item() == 0
    sched.step(v, sched.timesteps[0], x_t)  # the scheduler counts steps; move it to index 1
    x_next = sched.step(v, t, x_t, return_dict=False)[0]
    torch.testing.assert_close(x_next, b.noisy(dit_pipe, x0, noise, t_next.expand(3)), atol=1e-5, rtol=1e-5)


def test_train_timesteps_follow_the_examples(dit_pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    b = dit_pipe.backbone
    ts = b.train_timesteps(dit_pipe, 2000, torch.Generator().manual_seed(0))
    again = b.train_timesteps(dit_pipe, 2000, torch.Generator().manual_seed(0))
    assert torch.equal(ts, again) and ts.dtype == torch.float32 and ts.shape == (2000,)
    grid = FlowMatchEulerDiscreteScheduler.from_config(dit_pipe.scheduler.config).timesteps
    assert torch.isin(ts, grid).all() and (ts > 0).all() and (ts <= 1000).all()
    sigma = ts / 1000
    if b.kind == "sd3":  # logit-normal u, then the static shift 3: median sigma = 3*0.5 / (1 + 2*0.5) = 0.75
        assert abs(sigma.median().item() - 0.75) < 0.03
    else:  # uniform, unshifted (FLUX shifts at sampling only)
        assert abs(sigma.mean().item() - 0.5) < 0.03 and abs(sigma.median().item() - 0.5) < 0.04


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sampling_is_the_diffusers_pipeline(dit_pipe, guidance):
    """Our denoise (encode, predict, sampler, guidance) gives the diffusers pipeline's latents for the same
    starting noise, with and without classifier-free guidance (FLUX: true CFG, two passes)."""
    from obliviate.models.dit import FluxBackbone, diffusers_pipeline

    b = dit_pipe.backbone
    x_T = initial_noise(dit_pipe, [7])
    ours, at = denoise(dit_pipe, PROMPT, [7], steps=3, guidance=guidance, latents=x_T)
    assert at == 0.0 and ours.shape == x_T.shape
    ref_pipe = diffusers_pipeline(dit_pipe)
    if b.kind == "sd3":
        ref = ref_pipe(PROMPT, num_inference_steps=3, guidance_scale=guidance, latents=x_T, output_type="latent").images
    else:
        ref = ref_pipe(PROMPT, negative_prompt="", true_cfg_scale=guidance, num_inference_steps=3, height=16,
                       width=16, latents=FluxBackbone.pack(x_T), output_type="latent").images
        ref = FluxBackbone.unpack(ref, 8, 8)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    part, t_stop = denoise(dit_pipe, PROMPT, [7], steps=3, guidance=guidance, latents=x_T, stop_after=1)
    assert t_stop == float(b.sampler(dit_pipe, 3).timesteps[1]) and isinstance(t_stop, float)  # not rounded
    assert not torch.equal(part, ours)


def test_sample_images_with_and_without_guidance(dit_pipe):
    b = dit_pipe.backbone
    plain = sample(dit_pipe, PROMPT * 2, [0, 1], steps=2, guidance=1.0)
    guided = sample(dit_pipe, PROMPT * 2, [0, 1], steps=2, guidance=5.0)
    assert plain.shape == (2, 3, 16, 16) and torch.isfinite(guided).all()
    assert 0 <= plain.min() and plain.max() <= 1
    assert not torch.allclose(plain, guided) and not torch.allclose(plain[0], plain[1])


def test_guard_replaces_the_guidance_line(dit_pipe):
    b = dit_pipe.backbone
    seen = {}

    class Guard(T2IGuard):
        def extra_prompts(self):
            return ["dotted"]

        def combine(self, step, t, x, pred_uncond, pred_cond, extra):
            seen[step] = sorted(extra)
            return pred_uncond + 3.0 * (pred_cond - pred_uncond)

    x_T = initial_noise(dit_pipe, [3])
    guarded, _ = denoise(dit_pipe, PROMPT, [3], steps=2, guidance=1.0, latents=x_T, guard=Guard())
    plain, _ = denoise(dit_pipe, PROMPT, [3], steps=2, guidance=3.0, latents=x_T)
    torch.testing.assert_close(guarded, plain, atol=1e-5, rtol=1e-5)
    assert seen == {0: ["dotted"], 1: ["dotted"]}


def test_predict_gradients_reach_the_text_projections(dit_pipe):
    """A gradient method trains text_projections through predict/target: the loss reaches every listed layer."""
    b = dit_pipe.backbone
    denoiser = dit_pipe.denoiser
    layers = b.text_projections(denoiser)
    names = [n for n, _ in layers]
    if b.kind == "sd3":
        assert names == [f"transformer_blocks.{i}.attn.{p}" for i in (0, 1) for p in ("add_k_proj", "add_v_proj")]
    else:  # the single-stream blocks have no text-only projections
        assert names == ["transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_v_proj"]
    modules = dict(denoiser.named_modules())
    assert all(modules[n] is m for n, m in layers)
    for _, m in layers:
        m.weight.requires_grad_(True)
    try:
        g = torch.Generator().manual_seed(0)
        x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        t = b.train_timesteps(dit_pipe, 2, g)
        cond = b.encode(dit_pipe, PROMPT * 2)
        pred = b.predict(dit_pipe, denoiser, b.noisy(dit_pipe, x0, noise, t), t, cond)
        assert pred.shape == x0.shape
        torch.nn.functional.mse_loss(pred, b.target(dit_pipe, x0, noise, t)).backward()
        assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for _, m in layers)
    finally:
        for _, m in layers:
            m.weight.requires_grad_(False)
            m.weight.grad = None


def test_text_input_projections_read_cond(dit_pipe):
    """The closed-form targets read Cond directly: context_embedder the states, text_embedder the pooled vector."""
    b = dit_pipe.backbone
    cond = b.encode(dit_pipe, PROMPT)
    layers = {name: (m, field) for name, m, field in b.text_input_projections(dit_pipe.denoiser)}
    assert set(layers) == {"context_embedder", "time_text_embed.text_embedder.linear_1"}
    for m, field in layers.values():
        x = getattr(cond, field)
        assert m.in_features == x.shape[-1]
    # add_k_proj does not read the states: its input width is the transformer's, not the text encoder's
    assert all(m.in_features != cond.states.shape[-1] for _, m in b.text_projections(dit_pipe.denoiser))


def test_content_positions_point_at_the_words(dit_pipe):
    b = dit_pipe.backbone
    texts = ["a red star in striped style", "a star"]
    positions = b.content_positions(dit_pipe, texts)
    if b.kind == "flux":  # T5 only, no start token: words at 0..n-1; UCE-FLUX's last token = attention_mask.sum() - 2
        assert positions == [list(range(6)), [0, 1]]
        mask = dit_pipe.tokenizers[1](texts[0], padding="max_length", max_length=512).attention_mask
        assert positions[0][-1] == sum(mask) - 2
    else:  # CLIP's 12 positions (after its start token), then T5's
        assert positions == [list(range(1, 7)) + list(range(12, 18)), [1, 2, 12, 13]]


def test_embedded_guidance_flux_matches_its_pipeline(tmp_path):
    """A guidance-distilled FLUX: one conditional pass per step with g in the embedding, as FluxPipeline."""
    from obliviate.models.dit import FluxBackbone, diffusers_pipeline, load_dit_pipeline

    pipe = load_dit_pipeline(build_flux(tmp_path / "dev", guidance_embeds=True))
    b = pipe.backbone
    calls = []
    forward = pipe.denoiser.forward
    pipe.denoiser.forward = lambda *a, **k: calls.append(k["hidden_states"].shape[0]) or forward(*a, **k)
    x_T = initial_noise(pipe, [2])
    ours, _ = denoise(pipe, PROMPT, [2], steps=2, guidance=4.0, latents=x_T)
    assert calls == [1, 1]
    del pipe.denoiser.forward
    ref = diffusers_pipeline(pipe)(PROMPT, guidance_scale=4.0, num_inference_steps=2, height=16, width=16,
                                   latents=FluxBackbone.pack(x_T), output_type="latent").images
    torch.testing.assert_close(ours, FluxBackbone.unpack(ref, 8, 8), atol=1e-5, rtol=1e-5)
    other, _ = denoise(pipe, PROMPT, [2], steps=2, guidance=1.5, latents=x_T)
    assert not torch.allclose(ours, other)

    class Guard(T2IGuard):  # a guard still gets the unconditional and conditional predictions on a distilled model
        def combine(self, step, t, x, pred_uncond, pred_cond, extra):
            calls.append((pred_uncond.shape[0], pred_cond.shape[0]))
            return pred_cond

    calls.clear()
    denoise(pipe, PROMPT, [2], steps=2, guidance=4.0, latents=x_T, guard=Guard())
    assert calls == [(1, 1), (1, 1)]


def test_saved_folder_generates_with_diffusers(dit_pipe, tmp_path):
    """An edited pipeline saved by save_dit_pipeline is a folder diffusers' own class loads and samples from."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from obliviate.models.dit import load_dit_pipeline, save_dit_pipeline

    layer = dit_pipe.backbone.text_input_projections(dit_pipe.denoiser)[0][1]
    original = layer.weight.detach().clone()
    try:
        with torch.no_grad():
            layer.weight.mul_(0.5)
        save_dit_pipeline(dit_pipe, tmp_path / "export")
    finally:
        with torch.no_grad():
            layer.weight.copy_(original)
    assert not list((tmp_path / "export").rglob("*.bin"))
    cls = StableDiffusion3Pipeline if dit_pipe.backbone.kind == "sd3" else FluxPipeline
    loaded = cls.from_pretrained(tmp_path / "export")
    torch.testing.assert_close(loaded.transformer.context_embedder.weight, original * 0.5, rtol=0, atol=0)
    kwargs = {} if dit_pipe.backbone.kind == "sd3" else {"height": 16, "width": 16}
    image = loaded(PROMPT, num_inference_steps=2, output_type="np", **kwargs).images
    assert image.shape == (1, 16, 16, 3)
    again = load_dit_pipeline(tmp_path / "export")
    torch.testing.assert_close(again.denoiser.context_embedder.weight, original * 0.5, rtol=0, atol=0)


def test_bad_folders_are_one_line_errors(sd3_dir, tiny_pipeline_dir, tmp_path):
    import shutil

    from obliviate.errors import ObliviateError
    from obliviate.models.dit import load_dit_pipeline

    with pytest.raises(ObliviateError, match="'StableDiffusionPipeline' is not a DiT pipeline"):
        load_dit_pipeline(tiny_pipeline_dir)
    with pytest.raises(ObliviateError, match="no model_index.json"):
        load_dit_pipeline(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(sd3_dir, broken)
    shutil.rmtree(broken / "text_encoder_3")
    with pytest.raises(ObliviateError, match="missing component.*text_encoder_3") as e:
        load_dit_pipeline(broken)
    assert "\n" not in str(e.value)
    shutil.copytree(sd3_dir / "text_encoder_2", broken / "text_encoder_3")
    (weights,) = (broken / "transformer").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ObliviateError, match="transformer: cannot load") as e:
        load_dit_pipeline(broken)
    assert "\n" not in str(e.value)
    index = json.loads((broken / "model_index.json").read_text())
    index["_class_name"] = "PixArtSigmaPipeline"
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ObliviateError, match="'PixArtSigmaPipeline' is not a DiT pipeline"):
        load_dit_pipeline(broken)


# ---- runs: SD3 and FLUX folders through `obliviate run`, `export` and diffusers' from_pretrained -------------------
# refused on SD3/FLUX by design, with the words of their one-line refusal (their `backbones`/`backbones_why`)
REFUSED_DIT: dict[str, str] = {"SPM": "runs on sd pipelines", "Co-Erasing": "runs on sd pipelines",
                               "AdvUnlearn": "runs on sd, sdxl pipelines", "TRCE": "runs on sd, sdxl pipelines",
                               "MACE": "runs on sd, sdxl pipelines", "Receler": "runs on sd, sdxl pipelines",
                               "ForgetMeNot": "runs on sd, sdxl pipelines",
                               "ScissorHands": "runs on sd, sdxl pipelines",
                               "FewShotUnlearning": "training the text encoder is for pipelines with one text encoder"}
# the tensors each method changes on these shapes (docs/t2i_dit.md): the context-stream key/value maps for the
# cross-attention methods, the text-input projections for the closed forms
TEXT_KV = (".attn.add_k_proj.", ".attn.add_v_proj.")
CHANGES = {"ESD-x": TEXT_KV, "ConceptAblation": TEXT_KV, "RealEra": TEXT_KV, "DoCo": TEXT_KV,
           "UCE": ("transformer.context_embedder.weight", "transformer.time_text_embed.text_embedder.linear_1.weight"),
           "RECE": ("transformer.context_embedder.weight", "transformer.time_text_embed.text_embedder.linear_1.weight")}


def _dit_run(tmp_path, folder, method, evaluate: bool = True, args: dict | None = None):
    from typer.testing import CliRunner

    from obliviate.cli import app
    from test_t2i_backbones import _config

    config = _config(tmp_path, folder, method, args)
    if not evaluate:  # the samples beside the original's (evals/user_pipeline.py): seconds on a tiny FLUX
        config.write_text("evaluate = false\n" + config.read_text())
    return CliRunner().invoke(app, ["run", str(config), "--quiet"])


# each refusal once, on either shape (the rule is the shape's kind; the slow test below runs every pair)
@pytest.mark.parametrize("method,shape", [("AdvUnlearn", "flux"), ("Co-Erasing", "sd3"), ("SPM", "flux")])
def test_refused_methods_say_why_in_one_line(tmp_path, sd3_dir, flux_dir, shape, method):
    from conftest import one_line_error

    result = _dit_run(tmp_path, sd3_dir if shape == "sd3" else flux_dir, method, evaluate=False)
    one_line_error(result, method, REFUSED_DIT[method],
                   "StableDiffusion3Pipeline" if shape == "sd3" else "FluxPipeline")
    assert not (tmp_path / "runs" / "r1").exists()


def test_negtome_is_refused_on_dit_and_sld_and_gog_guard_it(sd3_dir):
    """NegToMe's processors are a UNet's: refused in one line; SLD and GoG work on the predictions of any shape."""
    from obliviate.errors import ObliviateError
    from obliviate.guards.t2i import attach
    from obliviate.guards.t2i.negtome import NegToMe
    from obliviate.guards.t2i.sld import SLD, SLDConfig
    from obliviate.models.dit import load_dit_pipeline

    pipe = load_dit_pipeline(sd3_dir)
    with pytest.raises(ObliviateError, match="NegToMe runs on sd, sdxl pipelines, not on this "
                                             "StableDiffusion3Pipeline: its processors") as e:
        attach(pipe, NegToMe().bind("striped"))
    assert "\n" not in str(e.value) and pipe.guard is None
    plain = sample(pipe, PROMPT, [0], steps=2)
    guarded = sample(pipe, PROMPT, [0], steps=2, guard=SLD(SLDConfig(warmup_steps=0)).bind("striped"))
    assert guarded.shape == plain.shape and not torch.equal(guarded, plain)
    from obliviate.methods.common import make_method
    gog = make_method("t2i", "GoG", {"detect": "words", "alpha": 0.0, "replacement": "dotted"}).bind("striped")
    rewritten = [p.replace("striped", "dotted") for p in PROMPT]
    assert rewritten != PROMPT  # the prompt names the concept: GoG samples its rewrite at alpha 0
    torch.testing.assert_close(sample(pipe, PROMPT, [0], steps=2, guard=gog), sample(pipe, rewritten, [0], steps=2),
                               atol=1e-5, rtol=0)


def _exported_loads_with_diffusers(tmp_path, base, run, changed):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from typer.testing import CliRunner

    from obliviate.cli import app

    result = CliRunner().invoke(app, ["export", str(run), str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    cls = StableDiffusion3Pipeline if "sd3" in str(base) else FluxPipeline
    exported = cls.from_pretrained(tmp_path / "exported")
    ours = exported.transformer.state_dict()
    (weights,) = (base / "transformer").glob("*.safetensors")
    theirs = load_file(str(weights))  # the base folder's own transformer, untouched
    for key, value in changed.items():
        assert torch.equal(ours[key.removeprefix("transformer.")], value), key
    # the run's tensors are all it may change (SalUn's mask, or SD3's last block, whose context stream nothing
    # reads, leave some as they were); some did change
    assert any(not torch.equal(theirs[k.removeprefix("transformer.")], v) for k, v in changed.items())
    assert all(torch.equal(v, theirs[k]) for k, v in ours.items() if f"transformer.{k}" not in changed)
    kwargs = {} if cls is StableDiffusion3Pipeline else {"height": 16, "width": 16}
    exported.set_progress_bar_config(disable=True)
    images = exported(PROMPT, num_inference_steps=2, output_type="pt", **kwargs).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.parametrize("shape", ["sd3", "flux"])
def test_run_export_and_from_pretrained(tmp_path, sd3_dir, flux_dir, shape):
    """`obliviate run` on a user's SD3/FLUX folder changes the tensors the method's DiT port names (and only the
    transformer's), `export` writes a folder diffusers' own class loads, with those tensors, and samples from it
    (UCE: the fastest run; every method runs in the slow test below)."""
    method = "UCE"
    import shutil

    from safetensors.torch import load_file

    base = tmp_path / shape
    shutil.copytree(sd3_dir if shape == "sd3" else flux_dir, base)
    result = _dit_run(tmp_path, base, method, evaluate=False)
    assert result.exit_code == 0, result.output
    from typer.testing import CliRunner

    from obliviate.cli import app
    (tmp_path / "run.toml").write_text((tmp_path / "run.toml").read_text().replace('name = "r1"', 'name = "r2"'))
    checked = CliRunner().invoke(app, ["validate", str(tmp_path / "run.toml")])  # the checks take the folder too
    assert checked.exit_code == 0 and checked.output.startswith("ok: "), checked.output
    run = tmp_path / "runs" / "r1"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["method"] == method
    changed = load_file(str(run / "changed.safetensors"))
    assert changed and all(k.startswith("transformer.") and any(p in k for p in CHANGES[method]) for k in changed)
    _exported_loads_with_diffusers(tmp_path, base, run, changed)


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["sd3", "flux"])
@pytest.mark.parametrize("method", [m for m, e in sorted(__import__("obliviate.registry").registry.T2I_METHODS.items())
                                    if not e.guard])
def test_every_method_runs_on_dit_or_is_refused(tmp_path, sd3_dir, flux_dir, shape, method):
    """Every registered (non-guard) method on SD3 and FLUX through the CLI: it runs, changes only transformer
    tensors (those its DiT port names, where CHANGES says), and its export loads in diffusers; or it is refused in
    one line (REFUSED_DIT)."""
    from safetensors.torch import load_file

    from conftest import one_line_error

    from test_t2i_backbones import SDXL_ARGS  # the same short settings as on SDXL

    base = sd3_dir if shape == "sd3" else flux_dir
    result = _dit_run(tmp_path, base, method, args=SDXL_ARGS.get(method))
    run = tmp_path / "runs" / "r1"
    if method in REFUSED_DIT:
        one_line_error(result, method, REFUSED_DIT[method])
        assert not run.exists()
        return
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["method"] == method
    changed = load_file(str(run / "changed.safetensors"))
    assert changed and all(k.startswith("transformer.") for k in changed)
    if method in CHANGES:
        assert all(any(p in k for p in CHANGES[method]) for k in changed), sorted(changed)
    _exported_loads_with_diffusers(tmp_path, base, run, changed)


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["sd3", "flux"])
def test_attacks_on_a_dit_run_through_the_cli(tmp_path, sd3_dir, flux_dir, shape):
    """`obliviate attack` on a UCE run on a user's SD3/FLUX folder, judged by a (tiny) image classifier: concept
    arithmetic (noise predictions composed through the backbone) attacks the erased and the base pipeline; the
    token-id attacks, whose ids must mean the same in every tokenizer (CLIP and T5 do not share a vocabulary), and
    P4D (one text encoder's embedding space) are refused in one line each."""
    from typer.testing import CliRunner

    from obliviate.cli import app
    from test_t2i_backbones import save_tiny_detector

    save_tiny_detector(tmp_path / "vit")
    result = _dit_run(tmp_path, sd3_dir if shape == "sd3" else flux_dir, "UCE", evaluate=False)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "r1"
    detector = ["--detector", str(tmp_path / "vit"), "--detector-label", "striped", "--quiet"]
    result = CliRunner().invoke(app, ["attack", str(run), "--attack", "concept_arithmetic", *detector])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "attacks" / "concept_arithmetic.json").read_text())
    assert list(saved["models"]) == ["UCE", "original"] and saved["models"]["UCE"]["n_attacked"] == 3
    for name, words in [("prompt_attack", "different vocabularies"), ("ring_a_bell", "different vocabularies"),
                        ("p4d_n", "text encoders")]:
        refused = CliRunner().invoke(app, ["attack", str(run), "--attack", name, *detector])
        assert refused.exit_code == 2 and "Traceback" not in refused.output, refused.output
        last = refused.output.strip().splitlines()[-1]
        assert last.startswith("error: ") and words in last, refused.output
        assert not (run / "attacks" / f"{name}.json").exists()


def test_text_reading_weights_on_every_shape(dit_pipe, tiny_pipe):
    """is_cross_attention / is_text_key_value pick a transformer's context-stream key/value maps (what
    text_projections lists) and, on an SD UNet, exactly the attn2 names they always picked."""
    from obliviate.methods.t2i.base import is_cross_attention, is_text_key_value

    listed = {n for n, _ in dit_pipe.backbone.text_projections(dit_pipe.denoiser)}
    names = [n for n, _ in dit_pipe.denoiser.named_parameters()]
    assert {n.rsplit(".", 1)[0] for n in names if is_cross_attention(n)} == listed
    assert [n for n in names if is_text_key_value(n)] == [n for n in names if is_cross_attention(n)]
    unet = [n for n, _ in tiny_pipe.denoiser.named_parameters()]
    assert [n for n in unet if is_cross_attention(n)] == [n for n in unet if ".attn2." in n]
    assert [n for n in unet if is_text_key_value(n)] == [n for n in unet if ".attn2.to_k." in n or ".attn2.to_v." in n]


@pytest.mark.parametrize("shape", ["flux", pytest.param("sd3", marks=pytest.mark.slow)])
def test_uce_on_dit_is_the_closed_form_of_its_flux_port(sd3_dir, flux_dir, shape):
    """UCE on SD3/FLUX edits context_embedder (c: the last content T5 token's state, as the authors' FLUX port:
    attention_mask.sum() - 2; the empty text: index -1) and the pooled text embedder (c: the pooled vector); each new W
    solves the normal equations W* (lam I + C^T C + ps P^T P) = W (lam I + G^T C + ps P^T P) with vectors picked here
    by hand, and moves the concept's output towards the anchor's."""
    from conftest import tiny_task
    from obliviate.loops.t2i import erase
    from obliviate.models.dit import load_dit_pipeline

    pipe = load_dit_pipeline(sd3_dir if shape == "sd3" else flux_dir)  # a fresh copy: the edit changes it
    task = tiny_task()
    method = __import__("obliviate.methods.common", fromlist=["make_method"]).make_method("t2i", "UCE")
    pairs, keep = method.erase_pairs(task), method.preserve_texts(task)
    olds, news = [o for o, _ in pairs], [n for _, n in pairs]
    before = {f: m.weight.detach().double().clone() for _, m, f in pipe.backbone.text_input_projections(pipe.denoiser)}
    t5 = pipe.tokenizers[-1]
    offset = pipe.tokenizer.model_max_length if pipe.backbone.kind == "sd3" else 0  # SD3: the CLIP states first

    def vectors(texts):
        with torch.no_grad():
            cond = pipe.backbone.encode(pipe, texts)
        last = [offset + sum(t5(t, padding="max_length", max_length=pipe.backbone.max_sequence_length)
                             .attention_mask) - 2 if t else -1 for t in texts]
        return {"states": torch.stack([cond.states[i, j] for i, j in enumerate(last)]).double(),
                "pooled": cond.pooled.double()}

    C, G, P = vectors(olds), vectors(news), vectors(keep)
    result = erase(pipe, task, method, images_per_prompt=1, sample_steps=2)
    assert sorted(result.trainable_names) == ["context_embedder.weight",
                                              "time_text_embed.text_embedder.linear_1.weight"]
    lam, ps = method.config.lam, max(0.1, 1 / len(keep))
    for _, module, field in pipe.backbone.text_input_projections(pipe.denoiser):
        W, new = before[field], module.weight.detach().double()
        c, g, p = C[field], G[field], P[field]
        eye = torch.eye(W.shape[1], dtype=torch.float64)
        lhs = new @ (lam * eye + c.T @ c + ps * p.T @ p)
        torch.testing.assert_close(lhs, W @ (lam * eye + g.T @ c + ps * p.T @ p), rtol=1e-4, atol=1e-4)
        assert (c @ new.T - g @ W.T).norm() < (c @ W.T - g @ W.T).norm(), field


@pytest.mark.slow
def test_sld_guard_run_exports_and_loads_guarded_on_flux(tmp_path, flux_dir):
    """A guard run on FLUX: no changed tensor, its export carries obliviate_guard.json, and load_guarded samples the
    exported folder through SLD (a different picture from the unguarded pipeline's)."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from obliviate.cli import app
    from obliviate.guards import load_guarded
    from obliviate.models.dit import load_dit_pipeline

    # SLD's medium preset waits 10 steps before guiding: from the first of the run's 3 here
    result = _dit_run(tmp_path, flux_dir, "SLD", evaluate=False, args={"warmup_steps": 0})
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "r1"
    assert load_file(str(run / "changed.safetensors")) == {}
    result = CliRunner().invoke(app, ["export", str(run), str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    guarded = load_guarded(tmp_path / "exported")
    images = guarded(PROMPT, [0])
    plain = sample(load_dit_pipeline(tmp_path / "exported"), PROMPT, [0], steps=3)
    assert images.shape == plain.shape == (1, 3, 16, 16) and not torch.equal(images, plain)
