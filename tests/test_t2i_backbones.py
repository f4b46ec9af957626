"""The pipeline backbones (models/diffusion.py). SDXL-shaped pipelines (the tiny StableDiffusionXLPipeline folder of
conftest.py): the backbone's conditioning agrees with diffusers' own pipeline, every registered method runs on it
through the CLI (or is refused in one line), the run exports to a folder StableDiffusionXLPipeline loads, and the
attacks run or are refused in one line. SD 1.x: the backbone is the plain diffusers calls, bit for bit. Both: a
generation-time guard replaces the guidance line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error, tiny_prompts, tiny_task
from obliviate.cli import app
from obliviate.errors import ObliviateError
from obliviate.registry import T2I_METHODS

runner = CliRunner()

# refused on SDXL by design, with the words of their one-line refusal (none: AdvUnlearn's text-encoder mode is, below)
# methods written for SD 1.x/2.x conditioning only (their `backbones`), refused on SDXL in one line
REFUSED: dict[str, str] = {"SPM": "runs on sd pipelines", "Co-Erasing": "runs on sd pipelines",
                           # trains the text encoder: the loop refuses that on pipelines with several
                           "FewShotUnlearning": "training the text encoder is for pipelines with one text encoder"}


def _config(tmp_path: Path, pipeline: Path, method: str, method_args: dict | None = None) -> Path:
    forget, retain = tmp_path / "forget.txt", tmp_path / "retain.txt"
    forget.write_text("\n".join(p for p in tiny_prompts() if "striped" in p) + "\n")
    retain.write_text("\n".join(p for p in tiny_prompts() if "striped" not in p) + "\n")
    lines = ['family = "t2i"', f'method = "{method}"', 'concept = "striped"', f'model = "{pipeline}"',
             f'forget_prompts = "{forget}"', f'retain_prompts = "{retain}"', f'output_dir = "{tmp_path / "runs"}"',
             'name = "r1"', "[train]", "max_steps = 2", "lr = 1e-3", "batch_size = 2",
             "[t2i]", "images_per_prompt = 1", "sample_steps = 3"]
    if method_args:
        lines += ["[method_args]"] + [f"{k} = {json.dumps(v)}" for k, v in method_args.items()]
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tiny_sdxl(tiny_sdxl_pipeline_dir):
    from obliviate.models.diffusion import load_pipeline

    return load_pipeline(tiny_sdxl_pipeline_dir)


def test_sdxl_sampling_is_diffusers_own(tiny_sdxl, tiny_sdxl_pipeline_dir):
    """Two encoders' penultimate states concatenated, the pooled projection and the time ids in added_cond_kwargs,
    zeros as the unconditional branch: our DDIM sampler gives StableDiffusionXLPipeline's pictures."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from obliviate.models.diffusion import initial_noise, sample

    pipe = tiny_sdxl
    assert pipe.backbone.kind == "sdxl" and pipe.unet is pipe.denoiser and len(pipe.text_encoders) == 2
    prompts, seeds = tiny_prompts()[:2], [3, 4]
    ours = sample(pipe, prompts, seeds, steps=3, guidance=4.0)
    xl = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline_dir)
    xl.scheduler = DDIMScheduler.from_config(xl.scheduler.config)
    xl.set_progress_bar_config(disable=True)
    theirs = xl(prompts, latents=initial_noise(pipe, seeds), num_inference_steps=3, guidance_scale=4.0,
                height=16, width=16, output_type="pt").images
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    # the pooled embedding and the time ids matter: without them the UNet refuses, with others it draws otherwise
    cond = pipe.backbone.encode(pipe, prompts)
    assert cond.states.shape[-1] == 64 and cond.pooled.shape == (2, 16)
    x = initial_noise(pipe, seeds)
    base = pipe.backbone.predict(pipe, pipe.denoiser, x, 500, cond)
    other = type(cond)(cond.states, cond.pooled.flip(0))
    assert not torch.allclose(base, pipe.backbone.predict(pipe, pipe.denoiser, x, 500, other))
    with pytest.raises(ObliviateError, match="needs pooled text embeddings"):
        pipe.backbone.predict(pipe, pipe.denoiser, x, 500, type(cond)(cond.states))


def test_unknown_pipeline_class_is_refused_in_one_line(tmp_path, tiny_sdxl_pipeline_dir):
    from obliviate.models.diffusion import check_folder, load_pipeline

    folder = tmp_path / "kandinsky"
    shutil.copytree(tiny_sdxl_pipeline_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ObliviateError, match="pipeline class 'KandinskyV22Pipeline' is not supported"):
        load_pipeline(folder)
    shutil.rmtree(folder / "text_encoder_2")
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ObliviateError, match=r"missing component\(s\) text_encoder_2"):
        check_folder(folder)


def test_uce_edits_sdxl_cross_attention_towards_the_anchor(tiny_sdxl):
    """The closed form on SDXL's concatenated states: the concept's last-token state maps near the anchor's."""
    from obliviate.loops.t2i import erase
    from obliviate.methods.t2i.base import EraseContext
    from obliviate.methods.t2i.uce import UCE

    pipe = tiny_sdxl
    projections = dict(pipe.backbone.text_projections(pipe.denoiser))
    before = {n: m.weight.detach().clone() for n, m in projections.items()}
    task = tiny_task()
    erase(pipe, task, "UCE", None, images_per_prompt=1, sample_steps=2)
    ctx = EraseContext(pipe, None, task, torch.Generator().manual_seed(0))
    states, (last_c, last_a) = UCE()._states(ctx, ["striped", "solid"])
    c, g = states[0, last_c:last_c + 1], states[1, last_a:last_a + 1]
    assert projections and all(n.endswith((".attn2.to_k", ".attn2.to_v")) for n in projections)
    for n, m in projections.items():
        W, W_new = before[n].double(), m.weight.detach().double()
        assert (c @ W_new.T - g @ W.T).norm() < 0.35 * (c @ W.T - g @ W.T).norm(), n


SDXL_ARGS = {"AdvUnlearn": {"attack_steps": 3},  # its inner attack: 30 steps by default
             "ANT": {"mask_seeds": 1, "mask_iterations": 2},  # its saliency map: 200 gradient draws by default
             "DoCo": {"warmup_steps": 1},  # of the run's 2 steps, one past the discriminator's warm-up (1000)
             "SelectiveAmnesia": {"fisher_timesteps": 4}}  # its Fisher: 1000 timesteps per sample by default


# a run is 5-10 s on 2 shared cores: the default suite keeps the refusals; ESD-x and UCE run in the export test below,
# AdvUnlearn's per-encoder attack in test_adv_unlearn_attacks_both_encoders
@pytest.mark.parametrize("method", [m if m in REFUSED else pytest.param(m, marks=pytest.mark.slow)
                                    for m in sorted(T2I_METHODS)])
def test_every_method_runs_on_sdxl_or_is_refused(tmp_path, tiny_sdxl_pipeline_dir, method):
    args = SDXL_ARGS.get(method)
    result = runner.invoke(app, ["run", str(_config(tmp_path, tiny_sdxl_pipeline_dir, method, args)), "--quiet"])
    run = tmp_path / "runs" / "r1"
    if method in REFUSED:
        one_line_error(result, method, REFUSED[method], "StableDiffusionXLPipeline")
        assert not run.exists()
        return
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["method"] == method
    from safetensors.torch import load_file
    changed = load_file(str(run / "changed.safetensors"))
    if T2I_METHODS[method].guard:  # a generation-time guard changes no weight: its run records its config
        assert changed == {} and metrics["guard"]["guard"] == method
        return
    assert changed and all(k.startswith("unet.") for k in changed)


def test_adv_unlearn_attacks_both_encoders(tiny_sdxl):
    """One soft prefix per text encoder, from the same tokens, optimised by the inner attack; only the UNet's
    cross-attention changes."""
    from obliviate.config import TrainConfig
    from obliviate.loops.t2i import erase
    from obliviate.methods.common import make_method

    pipe = tiny_sdxl
    text_before = [{k: v.clone() for k, v in e.state_dict().items()} for e in pipe.text_encoders]
    method = make_method("t2i", "AdvUnlearn", {"attack_steps": 3, "attack_lr": 0.01})
    result = erase(pipe, tiny_task(), method, TrainConfig(max_steps=2, lr=1e-3, batch_size=2), images_per_prompt=1,
                   sample_steps=2)
    assert [p.shape[-1] for p in method.prefix] == [32, 32] and len(method.prefix[0]) == 1
    assert all(h["attack_mse"] < h["attack_mse_start"] for h in result.history), result.history
    assert result.trainable_names and all(".attn2." in n for n in result.trainable_names)
    assert all(torch.equal(v, e.state_dict()[k]) for e, b in zip(pipe.text_encoders, text_before) for k, v in b.items())


def test_text_encoder_training_is_refused_on_two_encoders(tmp_path, tiny_sdxl_pipeline_dir):
    config = _config(tmp_path, tiny_sdxl_pipeline_dir, "AdvUnlearn", {"train": "text_encoder"})
    one_line_error(runner.invoke(app, ["run", str(config), "--quiet"]),
                   "training the text encoder is for pipelines with one text encoder", "has 2")


@pytest.mark.parametrize("method", ["ESD-x", "UCE"])
def test_sdxl_run_exports_a_folder_diffusers_loads(tmp_path, tiny_sdxl_pipeline_dir, method):
    base = tmp_path / "base"
    shutil.copytree(tiny_sdxl_pipeline_dir, base)
    result = runner.invoke(app, ["run", str(_config(tmp_path, base, method)), "--quiet"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "r1"
    from safetensors.torch import load_file
    changed = load_file(str(run / "changed.safetensors"))
    assert changed and all(k.startswith("unet.") and ".attn2." in k for k in changed)
    result = runner.invoke(app, ["export", str(run), str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output

    from diffusers import StableDiffusionXLPipeline
    xl = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "exported"))
    original = StableDiffusionXLPipeline.from_pretrained(str(base))
    key = next(iter(changed))[len("unet."):]
    assert torch.equal(xl.unet.state_dict()[key], changed["unet." + key])
    assert not torch.equal(original.unet.state_dict()[key], changed["unet." + key])
    for name in ("text_encoder", "text_encoder_2"):  # the rest is the base's, unchanged
        ours, theirs = getattr(xl, name).state_dict(), getattr(original, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in ours.items())
    xl.set_progress_bar_config(disable=True)
    images = xl(tiny_prompts()[0], num_inference_steps=2, height=16, width=16, output_type="pt").images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_token_attacks_on_sdxl(tiny_sdxl):
    """UnlearnDiffAtk and Ring-A-Bell send the same token ids to both encoders, each framed by its own tokenizer; a
    soft prefix of real tokens equals typing them; the attack lowers its objective; P4D (one encoder's embedding
    space) is refused in one line."""
    from obliviate.attacks.t2i.common import AttackTask, encode_ids
    from obliviate.attacks.t2i.p4d import P4DN
    from obliviate.attacks.t2i.ring_a_bell import RingABell
    from obliviate.attacks.t2i.unlearn_diff_atk import (PromptAttackConfig, attack_prompts, prefix_embeddings,
                                                        prefixed_ids)
    from obliviate.models.diffusion import initial_noise

    pipe = tiny_sdxl
    prompts = [p for p in tiny_prompts() if "striped" in p]
    typed = [f"solid {p}" for p in prompts]
    ids = prefixed_ids(pipe, prompts, 1)
    ids[:, 1] = pipe.tokenizer.convert_tokens_to_ids("solid</w>")
    expected = pipe.backbone.encode(pipe, typed)
    with torch.no_grad():  # ids framed by the first tokenizer reach the second one as its own tokenization
        assert torch.allclose(encode_ids(pipe, ids).states, expected.states, atol=1e-6)
        # the soft prefix: each encoder's own embedding of the token, through its own forward
        placeholders = [prefixed_ids(pipe, prompts, 1, t) for t in pipe.tokenizers]
        with prefix_embeddings(pipe.text_encoder, pipe.text_encoder.get_input_embeddings().weight[ids[:, 1:2]]), \
                prefix_embeddings(pipe.text_encoder_2, pipe.text_encoder_2.get_input_embeddings().weight[ids[:, 1:2]]):
            soft = pipe.backbone.encode_ids(pipe, placeholders)
        assert torch.allclose(soft.states, expected.states, atol=1e-6)
        assert torch.allclose(soft.pooled, expected.pooled, atol=1e-6)
    targets = initial_noise(pipe, [100, 101, 102])
    config = PromptAttackConfig(prefix_tokens=3, iterations=30, check_every=30, lr=0.1)
    rows, images = attack_prompts(pipe, prompts, [0] * 3, targets, lambda x: [False] * len(x), config, sample_steps=2)
    assert images.shape == (3, 3, 16, 16) and all(r["adversarial_prompt"].endswith(r["text"]) for r in rows)
    assert sum(r["loss_relaxed"] for r in rows) < sum(r["loss_before"] for r in rows), rows
    task = AttackTask(prompts, [0] * 3, targets, lambda x: [False] * len(x), pipe,
                      [(p, p.replace("striped", "dotted")) for p in prompts], sample_steps=2)
    found, _ = RingABell(RingABell.Config(tokens=3, population=6, generations=3)).attack(pipe, task)
    assert all(len(r["token_ids"]) == 3 and r["distance"] > 0 for r in found)
    with pytest.raises(ObliviateError, match="P4DN: .* this StableDiffusionXLPipeline has 2 text encoders"):
        P4DN(P4DN.Config(tokens=4, iterations=1)).attack(pipe, task)


@pytest.mark.parametrize("shape", ["tiny_pipe", "tiny_sdxl"])
def test_guard_replaces_the_guidance_line(request, shape):
    """denoise(guard=...): a guard that returns plain CFG changes nothing; its extra prompts' predictions reach it,
    on every shape (the guard protocol of obliviate.guards.t2i)."""
    from obliviate.guards.t2i import T2IGuard
    from obliviate.models.diffusion import sample

    pipe = request.getfixturevalue(shape)
    prompts, seeds, other = tiny_prompts()[:2], [0, 1], "a red star in solid style"

    class Other(T2IGuard):
        def extra_prompts(self):
            return [other]

        def combine(self, i, t, x, u, c, extra):
            assert list(extra) == [other] and extra[other].shape == x.shape
            return extra[other]

    plain = sample(pipe, prompts, seeds, steps=3)
    assert torch.equal(sample(pipe, prompts, seeds, steps=3, guard=T2IGuard()), plain)
    steered = sample(pipe, prompts, seeds, steps=3, guard=Other())
    assert torch.allclose(steered, sample(pipe, [other] * 2, seeds, steps=3, guidance=1.0), atol=1e-5)


def test_sd_backbone_is_the_plain_diffusers_calls(tiny_pipe):
    """On SD 1.x the backbone adds nothing: its encoding, prediction, noising and sampling are the direct calls the
    code made before backbones, bit for bit (so no number of an SD 1.x run moves)."""
    from diffusers import DDIMScheduler

    from obliviate.methods.t2i.base import EraseContext
    from obliviate.models.diffusion import denoise, encode

    pipe = tiny_pipe
    assert pipe.backbone.kind == "sd" and pipe.unet is pipe.denoiser
    prompts, seeds = tiny_prompts()[:2], [5, 6]
    with torch.no_grad():
        ids = pipe.tokenizer(prompts + ["", ""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        states = pipe.text_encoder(ids)[0]
        cond = encode(pipe, prompts + ["", ""])
        assert cond.pooled is None and torch.equal(cond.states, states)
        sched = DDIMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(3)
        x = torch.stack([torch.randn(pipe.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        for t in sched.timesteps:
            t_batch = torch.full((4,), int(t), dtype=torch.long)
            c, u = pipe.unet(torch.cat([x, x]), t_batch, encoder_hidden_states=states).sample.chunk(2)
            x = sched.step(u + 4.0 * (c - u), t, x).prev_sample
        assert torch.equal(denoise(pipe, prompts, seeds, steps=3, guidance=4.0)[0], x)
    ctx = EraseContext(pipe, None, tiny_task(), torch.Generator().manual_seed(3))
    latents = torch.randn(2, *pipe.latent_shape, generator=torch.Generator().manual_seed(4))
    x_t, t, target = ctx.noisy(latents)
    gen = torch.Generator().manual_seed(3)
    t_direct = torch.randint(0, 1000, (2,), generator=gen)
    eps = torch.randn(latents.shape, generator=gen)
    abar = pipe.scheduler.alphas_cumprod[t_direct].view(-1, 1, 1, 1)
    assert torch.equal(t, t_direct) and torch.equal(target, eps)
    assert torch.equal(x_t, abar.sqrt() * latents + (1 - abar).sqrt() * eps)


def save_tiny_detector(folder) -> None:
    """A tiny random ViT image classifier over the canvas styles, saved as a user's detector folder (seeded)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    labels = ["striped", "dotted", "solid"]
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, id2label=dict(enumerate(labels)),
                                              label2id={n: i for i, n in enumerate(labels)}, hidden_size=16,
                                              intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    vit.save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)


def test_attack_an_sdxl_run_through_the_cli(tmp_path, tiny_sdxl_pipeline_dir):
    """`obliviate attack` on a run on a user's SDXL folder, judged by a (tiny) image classifier: the erased pipeline
    and the base one are attacked by UnlearnDiffAtk and Ring-A-Bell; P4D is refused in one line."""
    save_tiny_detector(tmp_path / "vit")
    result = runner.invoke(app, ["run", str(_config(tmp_path, tiny_sdxl_pipeline_dir, "UCE")), "--quiet"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "r1"
    detector = ["--detector", str(tmp_path / "vit"), "--detector-label", "striped", "--quiet"]
    result = runner.invoke(app, ["attack", str(run), "--attack", "prompt_attack", "--attack", "ring_a_bell",
                                 "iterations=2", "check_every=1", "prefix_tokens=2", "tokens=3", "population=4",
                                 "generations=2", *detector])
    assert result.exit_code == 0, result.output
    for name in ("prompt_attack", "ring_a_bell"):
        saved = json.loads((run / "attacks" / f"{name}.json").read_text())
        assert list(saved["models"]) == ["UCE", "original"] and saved["models"]["UCE"]["n_attacked"] == 3
    refused = runner.invoke(app, ["attack", str(run), "--attack", "p4d_n", "tokens=4", *detector])
    assert refused.exit_code == 2 and "Traceback" not in refused.output, refused.output
    assert refused.output.strip().splitlines()[-1].startswith("error: P4DN: ") and "2 text encoders" in refused.output
    assert not (run / "attacks" / "p4d_n.json").exists()
