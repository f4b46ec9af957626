"""AdvUnlearn on the text encoder (the paper's preferred setting): only the text encoder's layers and final norm
change, the erasure moves the concept's noise towards ESD's target, the run saves "text_encoder." tensors, and
`export` writes a diffusers folder with them while the UNet and the base folder stay as they were. Runs saved
before (UNet tensors only) still load."""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_prompts, tiny_task
from obliviate.cli import app
from obliviate.config import TrainConfig
from obliviate.errors import ObliviateError
from obliviate.loops.t2i import changed_pipeline_tensors, erase
from obliviate.methods.common import make_method

FAST = dict(images_per_prompt=1, sample_steps=3, guidance=2.0)
TEXT = {"train": "text_encoder", "attack_steps": 3, "attack_lr": 1e-2, "warmup_steps": 1}
runner = CliRunner()


def _state(module) -> dict:
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


@torch.no_grad()
def _distance_to_esd_target(pipe, text_encoder, original_unet, original_text, texts) -> float:
    """|| eps(x, E(c)) - (2 eps_orig(x, "") - eps_orig(x, c)) || on fixed noise: ESD's target at eta 1."""
    from obliviate.models.diffusion import add_noise, encode_prompts, initial_noise, predict_noise

    x = add_noise(pipe, initial_noise(pipe, [100 + i for i in range(len(texts))]),
                  initial_noise(pipe, [200 + i for i in range(len(texts))]), torch.full((len(texts),), 500))
    eps_c = predict_noise(original_unet, x, 500, encode_prompts(pipe, texts, original_text))
    eps_u = predict_noise(original_unet, x, 500, encode_prompts(pipe, [""] * len(texts), original_text))
    pred = predict_noise(pipe.unet, x, 500, encode_prompts(pipe, texts, text_encoder))
    return float((pred - (2 * eps_u - eps_c)).norm())


def test_text_encoder_mode_trains_the_text_encoder_only(tiny_pipe):
    task = tiny_task("striped")
    unet_before, text_before = _state(tiny_pipe.unet), _state(tiny_pipe.text_encoder)
    original_text = copy.deepcopy(tiny_pipe.text_encoder)
    start = _distance_to_esd_target(tiny_pipe, original_text, tiny_pipe.unet, original_text, task.forget_prompts)
    result = erase(tiny_pipe, task, make_method("t2i", "AdvUnlearn", TEXT),
                   TrainConfig(max_steps=6, lr=5e-3, batch_size=3), **FAST)
    assert result.stopped is None and "attack_mse" in result.history[-1] and "retain_mse" in result.history[-1]
    assert result.trainable_names == [] and all(torch.equal(t, unet_before[n])
                                                for n, t in tiny_pipe.unet.state_dict().items())
    names = set(result.text_encoder_names)
    assert any("final_layer_norm" in n for n in names) and not any("embeddings" in n for n in names)
    changed = {n for n, t in tiny_pipe.text_encoder.state_dict().items() if not torch.equal(t, text_before[n])}
    assert changed and changed <= names
    tensors = changed_pipeline_tensors(result)
    assert set(tensors) == {f"text_encoder.{n}" for n in names}
    assert all(torch.equal(tensors[f"text_encoder.{n}"], tiny_pipe.text_encoder.state_dict()[n]) for n in names)
    # the erased text encoder moves the concept's noise towards ESD's target, read by the unchanged UNet
    end = _distance_to_esd_target(tiny_pipe, tiny_pipe.text_encoder, tiny_pipe.unet, original_text,
                                  task.forget_prompts)
    assert end < start


def test_first_k_layers_and_bad_settings(tiny_pipe):
    method = make_method("t2i", "AdvUnlearn", {"train": "text_encoder", "text_encoder_layers": 1})
    picked = [n for n, p in tiny_pipe.text_encoder.named_parameters() if method.text_encoder_trainable(n, p)]
    assert picked and all("encoder.layers.0." in n for n in picked)  # no final norm with the first k layers
    cross = make_method("t2i", "AdvUnlearn")
    assert not any(cross.text_encoder_trainable(n, p) for n, p in tiny_pipe.text_encoder.named_parameters())
    too_many = make_method("t2i", "AdvUnlearn", {"train": "text_encoder", "text_encoder_layers": 2})
    with pytest.raises(ObliviateError, match="text_encoder_layers = 2 but the text encoder has 1 layer"):
        erase(tiny_pipe, tiny_task("striped"), too_many, TrainConfig(max_steps=1, batch_size=3), **FAST)
    for args, message in [({"train": "vae"}, "train"), ({"text_encoder_layers": 1}, "applies to train"),
                          ({"train": "text_encoder", "text_encoder_layers": 1.5}, "whole number")]:
        with pytest.raises(ObliviateError, match=message):
            make_method("t2i", "AdvUnlearn", args)


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_config(tmp_path: Path, pipeline: Path) -> Path:
    forget, retain = tmp_path / "forget.txt", tmp_path / "retain.txt"
    forget.write_text("\n".join(p for p in tiny_prompts() if "striped" in p) + "\n")
    retain.write_text("\n".join(p for p in tiny_prompts() if "striped" not in p) + "\n")
    lines = ['family = "t2i"', 'method = "AdvUnlearn"', 'concept = "striped"', f'model = "{pipeline}"',
             f'forget_prompts = "{forget}"',
             f'retain_prompts = "{retain}"', f'output_dir = "{tmp_path / "runs"}"', 'name = "r1"',
             "[train]", "max_steps = 3", "lr = 5e-3", "batch_size = 2",
             "[t2i]", "images_per_prompt = 1", "sample_steps = 3",
             "[method_args]", 'train = "text_encoder"', "attack_steps = 2"]
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow  # 3.5-4.5 s: the default suite took 312 s, over its 5 minutes
def test_text_encoder_run_then_export(tmp_path, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from obliviate.runners.t2i import load_run_pipeline

    base = tmp_path / "base"
    shutil.copytree(tiny_pipeline_dir, base)
    before = _digest(base)
    result = runner.invoke(app, ["run", str(_run_config(tmp_path, base)), "--quiet"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "r1"
    assert json.loads((run / "metrics.json").read_text())["status"] == "completed"
    changed = load_file(str(run / "changed.safetensors"))
    assert changed and all(k.startswith("text_encoder.") and "embeddings" not in k for k in changed)

    result = runner.invoke(app, ["export", str(run), str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    exported = StableDiffusionPipeline.from_pretrained(str(tmp_path / "exported"))
    original = StableDiffusionPipeline.from_pretrained(str(base))
    text_state, original_text = exported.text_encoder.state_dict(), original.text_encoder.state_dict()
    assert all(torch.equal(text_state[k[len("text_encoder."):]], v) for k, v in changed.items())
    assert any(not torch.equal(original_text[k[len("text_encoder."):]], v) for k, v in changed.items())
    assert all(torch.equal(v, original_text[k]) for k, v in text_state.items() if f"text_encoder.{k}" not in changed)
    unet_state = original.unet.state_dict()
    assert all(torch.equal(v, unet_state[k]) for k, v in exported.unet.state_dict().items())
    assert _digest(base) == before  # the user's pipeline is never modified
    loaded = load_run_pipeline(run / "changed.safetensors", base)  # what `obliviate attack` evaluates
    assert all(torch.equal(loaded.text_encoder.state_dict()[k[len("text_encoder."):]], v) for k, v in changed.items())


def test_unet_only_changed_files_still_load(tmp_path, tiny_pipeline_dir):
    """A changed.safetensors as runs wrote it before ("unet." tensors only) loads as before; a tensor of a component
    that runs never change is a one-line error."""
    from safetensors.torch import save_file

    from obliviate.models.diffusion import load_pipeline
    from obliviate.runners.t2i import load_run_pipeline

    unet = load_pipeline(tiny_pipeline_dir).unet
    name = next(n for n in unet.state_dict() if ".attn2.to_k." in n)
    old = tmp_path / "old.safetensors"
    save_file({f"unet.{name}": torch.full_like(unet.state_dict()[name], 0.5)}, str(old))
    pipe = load_run_pipeline(old, tiny_pipeline_dir)
    assert torch.equal(pipe.unet.state_dict()[name], torch.full_like(unet.state_dict()[name], 0.5))
    bad = tmp_path / "bad.safetensors"
    save_file({"vae.decoder.conv_out.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(ObliviateError, match="tensors the base model lacks, e.g. vae.decoder.conv_out.weight"):
        load_run_pipeline(bad, tiny_pipeline_dir)
