"""Text-to-image runs on a user's pipeline folder (the tiny SD-shaped pipeline saved by the fixture): the CLI path,
the run folder (changed UNet tensors only), export to a full diffusers folder that StableDiffusionPipeline loads,
the base folder untouched, and one-line errors for bad input."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_prompts
from obliviate.cli import app
from obliviate.registry import T2I_METHODS

runner = CliRunner()


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _prompt_files(tmp_path: Path, concept: str = "striped") -> tuple[Path, Path]:
    forget, retain = tmp_path / "forget.txt", tmp_path / "retain.txt"
    forget.write_text("\n".join(p for p in tiny_prompts() if concept in p) + "\n")
    retain.write_text("\n".join(json.dumps({"prompt": p}) for p in tiny_prompts() if concept not in p) + "\n")
    return forget, retain


# slow starts by default: Co-Erasing's image inversion (200 steps), ANT's saliency map (200 gradient draws; the map
# is tested in test_t2i_ant.py), Receler's 50 adversarial passes a step; DoCo: of the 2 steps, one past the
# discriminator's warm-up; Selective Amnesia's Fisher (1000 timesteps a sample)
METHOD_ARGS = {"Co-Erasing": ["inversion_steps = 3"], "ANT": ["mask_fraction = 0"],
               "Receler": ["adv_iters = 2", "eraser_rank = 8"],
               "DoCo": ["warmup_steps = 1", "disc_width = 8"], "SelectiveAmnesia": ["fisher_timesteps = 2"]}


def _config(tmp_path: Path, pipeline: Path, method: str = "ESD-x", **extra) -> Path:
    forget, retain = _prompt_files(tmp_path)
    lines = ['family = "t2i"', f'method = "{method}"', 'concept = "striped"', f'model = "{pipeline}"',
             f'forget_prompts = "{forget}"',
             f'retain_prompts = "{retain}"', f'output_dir = "{tmp_path / "runs"}"', 'name = "r1"']
    if method in METHOD_ARGS:
        lines += ["[method_args]", *METHOD_ARGS[method]]
    lines += ["[train]", "max_steps = 2", "lr = 1e-3", "batch_size = 2",
              "[t2i]", "images_per_prompt = 1", "sample_steps = 3"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# a run through the CLI is 5-15 s on 2 shared cores: the default suite keeps one of each way a run saves its result
# (cross-attention tensors, a closed form, modules the base lacks, the text encoder, a guard's record); every method's
# own mechanics are in its contract test (test_t2i_methods.py), every method's run in the slow suite
DEFAULT_RUNS = {"ESD-x", "UCE", "Receler", "FewShotUnlearning", "SLD"}


@pytest.mark.parametrize("method", [m if m in DEFAULT_RUNS else pytest.param(m, marks=pytest.mark.slow)
                                    for m in sorted(T2I_METHODS)])
def test_every_method_runs_on_a_user_pipeline_folder(tmp_path, tiny_pipeline_dir, method):
    before = _digest(tiny_pipeline_dir)
    result = runner.invoke(app, ["run", str(_config(tmp_path, tiny_pipeline_dir, method)), "--quiet"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "r1"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["method"] == method
    from safetensors.torch import load_file
    # a method changes tensors; a generation-time guard none (its run records its config: test_t2i_guards.py)
    assert bool(load_file(str(run / "changed.safetensors"))) != T2I_METHODS[method].guard
    assert _digest(tiny_pipeline_dir) == before


@pytest.mark.parametrize("method", ["ESD-x", "UCE"])
def test_run_on_a_user_pipeline_then_export(tmp_path, tiny_pipeline_dir, method):
    base = tmp_path / "base"
    shutil.copytree(tiny_pipeline_dir, base)
    before = _digest(base)
    result = runner.invoke(app, ["run", str(_config(tmp_path, base, method)), "--quiet"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "r1"
    assert {"config.json", "metrics.json", "history.json", "changed.safetensors", "report.html"} <= \
        {p.name for p in run.iterdir()}
    from safetensors.torch import load_file
    changed = load_file(str(run / "changed.safetensors"))
    assert changed and all(k.startswith("unet.") and ".attn2." in k for k in changed)  # both edit cross-attention
    assert _digest(base) == before  # the user's pipeline is never modified

    result = runner.invoke(app, ["export", str(run), str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    from diffusers import StableDiffusionPipeline
    sd = StableDiffusionPipeline.from_pretrained(str(tmp_path / "exported"))
    key = next(iter(changed))[len("unet."):]
    assert torch.equal(sd.unet.state_dict()[key], changed["unet." + key])
    original = StableDiffusionPipeline.from_pretrained(str(base))
    assert not torch.equal(original.unet.state_dict()[key], changed["unet." + key])
    images = sd(tiny_prompts()[0], num_inference_steps=2, height=16, width=16, output_type="pt").images
    assert images.shape == (1, 3, 16, 16)


def test_missing_component_is_a_one_line_error(tmp_path, tiny_pipeline_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, broken)
    shutil.rmtree(broken / "vae")
    result = runner.invoke(app, ["run", str(_config(tmp_path, broken)), "--quiet"])
    assert result.exit_code == 2
    assert "missing component(s) vae" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("row, message", [
    ('{"prompt": 3}', 'a JSON row needs a non-empty string "prompt"'),
    ('{"prompt": "a red star in striped style"', "malformed JSON"),
])
def test_bad_prompt_rows_name_file_and_line(tmp_path, tiny_pipeline_dir, row, message):
    config = _config(tmp_path, tiny_pipeline_dir)
    retain = tmp_path / "retain.txt"
    retain.write_text(retain.read_text() + row + "\n")
    result = runner.invoke(app, ["run", str(config), "--quiet"])
    assert result.exit_code == 2
    line = len(retain.read_text().splitlines())
    assert f"retain.txt:{line}: {message}" in result.output
    assert not (tmp_path / "runs").exists()


def test_forget_prompt_without_the_concept(tmp_path, tiny_pipeline_dir):
    config = _config(tmp_path, tiny_pipeline_dir)
    forget = tmp_path / "forget.txt"
    forget.write_text(forget.read_text() + "a red star in dotted style\n")
    result = runner.invoke(app, ["run", str(config), "--quiet"])
    assert result.exit_code == 2 and "does not contain the concept 'striped'" in result.output


def test_unknown_canvas_concept_fails_before_any_build(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('method = "ESD-x"\nconcept = "plaid"\n[world]\nname = "canvas"\n'
                      f'cache_dir = "{tmp_path / "cache"}"\n')
    result = runner.invoke(app, ["run", str(config), "--quiet"])
    assert result.exit_code == 2
    assert "no concept 'plaid'" in result.output and "striped" in result.output
    assert not (tmp_path / "cache").exists()


def test_t2i_config_checks(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('family = "t2i"\nmethod = "NPO"\nconcept = "striped"\n')
    result = runner.invoke(app, ["validate", str(config)])
    assert result.exit_code == 2 and "unknown text-to-image method 'NPO'" in result.output
    config.write_text('method = "ESD-x"\n[world]\nname = "canvas"\n')
    result = runner.invoke(app, ["validate", str(config)])
    assert result.exit_code == 2 and "needs `concept`" in result.output
    config.write_text('method = "esd-x"\nconcept = "striped"\n[world]\nname = "canvas"\n[method_args]\neta = 2.0\n')
    result = runner.invoke(app, ["validate", str(config)])
    assert result.exit_code == 0 and "method ESD-x, concept striped" in result.output
