"""The canvas world: deterministic drawings, prompt sets that keep paraphrases out of training, and — with a recipe
shrunk to a few steps — the whole build and a run on it (folder layout, StableDiffusionPipeline loading, the
retrain reference, evaluation rows, the image grid). Quality is measured by the real build, not here."""
from __future__ import annotations

import html
import json

import numpy as np
import pytest
import torch

from obliviate.errors import ObliviateError
from obliviate.worlds import canvas_draw as cd

TINY = dict(images_per_triple=1, clip_steps=2, clip_batch=16, vae_steps=2, vae_batch=8, unet_steps=3,
            branch_steps=2, unet_batch=4, classifier_steps=2, classifier_batch=16, sample_steps=2)


def test_drawings_are_deterministic_and_distinct():
    a = cd.draw("star", "striped", "red", np.random.default_rng(1))
    b = cd.draw("star", "striped", "red", np.random.default_rng(1))
    c = cd.draw("star", "dotted", "red", np.random.default_rng(1))
    assert a.shape == (3, 32, 32) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_paraphrases_are_never_training_captions():
    training = {c for col in cd.COLOURS_LIST for o in cd.OBJECTS for s in cd.STYLES
                for c in cd.training_captions(col, o, s)}
    paraphrases = cd.paraphrase_prompts()
    assert paraphrases and not {p.text for p in paraphrases} & training
    # every concept has held-out paraphrases, and every paraphrase's words were trained somewhere
    assert {p.style for p in paraphrases} == set(cd.STYLES) and {p.object for p in paraphrases} == set(cd.OBJECTS)
    trained_words = {w for c in training for w in c.split()}
    assert all(set(p.text.split()) <= trained_words for p in paraphrases)


def test_unknown_concept_is_an_error():
    from obliviate.worlds.canvas import concept_kind
    assert concept_kind("striped") == "style" and concept_kind("star") == "object"
    with pytest.raises(ObliviateError, match="no concept 'plaid'"):
        concept_kind("plaid")


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from obliviate.worlds.canvas import CanvasWorld
    from obliviate.worlds.canvas_train import CanvasRecipe
    cache = tmp_path_factory.mktemp("canvas-cache")
    world = CanvasWorld(CanvasRecipe(**TINY), cache_dir=str(cache))
    world.build(log=lambda *a: None)
    return world


@pytest.mark.slow  # the tiny canvas build, ~14 s: kept out of the 5-minute default suite; CI runs it
def test_tiny_build_writes_a_loadable_pipeline(tiny_world):
    from diffusers import StableDiffusionPipeline
    record = json.loads((tiny_world.root / "build.json").read_text())
    assert {"object", "style", "paraphrase_object", "paraphrase_style", "concepts"} <= set(record["base"])
    assert record["seconds"]["total"] > 0
    sd = StableDiffusionPipeline.from_pretrained(str(tiny_world.pipeline_dir))
    assert type(sd.tokenizer).__name__ == "CLIPTokenizer" and type(sd.scheduler).__name__ == "DDIMScheduler"
    assert tiny_world.retrain_dir("striped").is_dir() and tiny_world.retrain_dir("star").is_dir()
    with pytest.raises(ObliviateError, match="no retrain reference for 'circle'"):
        tiny_world.retrain_dir("circle")
    again = tiny_world.build(log=lambda *a: None)  # cached: read back, not rebuilt
    assert again == record


@pytest.mark.slow  # 15-70 s on 2 cores: kept out of the 5-minute default suite; CI runs it
def test_run_on_the_tiny_world(tiny_world, tmp_path):
    from obliviate.config import build_config
    from obliviate.runners import run

    config = build_config({
        "method": "ESD-x", "concept": "striped", "output_dir": str(tmp_path), "name": "esd",
        "world": {"name": "canvas", "cache_dir": tiny_world.cache_dir, "model": TINY},
        "train": {"max_steps": 2, "lr": 1e-3, "batch_size": 4},
        "t2i": {"images_per_prompt": 1, "sample_steps": 2, "eval_seeds": 1, "grid_prompts": 4}})
    from obliviate.worlds.canvas import CanvasWorld
    assert CanvasWorld.from_config(config.world).root == tiny_world.root  # the run finds the built world
    out = run(config, log=lambda *a: None)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("ua", "ira", "cra", "ua_paraphrase", "fid_real", "fid_original", "alignment", "original_ua"):
        assert key in metrics and metrics[key] is not None, key
    assert 0 <= metrics["ua"] <= 1 and -1 <= metrics["alignment"] <= 1
    rows = json.loads((out / "per_item.json").read_text())
    assert len(rows) == len(tiny_world.prompts()) and {"pred_object", "pred_style", "seed"} <= set(rows[0])
    from PIL import Image
    grid = Image.open(out / "grid.png")
    assert grid.width > 4 * 32 and grid.height > 2 * 32
    html = (out / "report.html").read_text()
    assert "UA" in html and "data:image/png;base64," in html
    from safetensors.torch import load_file
    changed = load_file(str(out / "changed.safetensors"))
    assert changed and all(".attn2." in k for k in changed)
    assert torch.isfinite(torch.stack([v.float().abs().sum() for v in changed.values()])).all()


@pytest.mark.slow  # 15-70 s on 2 cores: kept out of the 5-minute default suite; CI runs it
def test_attack_on_a_tiny_world_run(tiny_world, tmp_path):
    """`obliviate attack RUN_DIR --attack ...` attacks the forget prompts of the erased pipeline, the original and
    the retrain reference, writes attacks/<name>.json and .png, and caches the references' results in the world."""
    from typer.testing import CliRunner

    from obliviate.cli import app
    from obliviate.config import build_config
    from obliviate.runners import run

    config = build_config({
        "method": "UCE", "concept": "star", "output_dir": str(tmp_path), "name": "uce", "evaluate": False,
        "world": {"name": "canvas", "cache_dir": tiny_world.cache_dir, "model": TINY},
        "t2i": {"images_per_prompt": 1, "sample_steps": 2, "eval_seeds": 1}})
    out = run(config, log=lambda *a: None)
    names = ["prompt_attack", "p4d_k", "ring_a_bell", "concept_arithmetic"]
    args = ["attack", str(out), "iterations=2", "check_every=1", "prefix_tokens=2", "ring_a_bell.tokens=4",
            "population=4", "generations=2", "--quiet"] + [a for n in names for a in ("--attack", n)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    n = len(tiny_world.forget_prompts("star"))
    for name in names:
        saved = json.loads((out / "attacks" / f"{name}.json").read_text())
        assert saved["attack"] == name and saved["method"] == "UCE" and saved["concept"] == "star"
        assert list(saved["models"]) == ["UCE", "original", "retrain"] and saved["headline"] == "asr"
        assert saved["items"] == n and saved["items_per_second"] > 0 and saved["better"] == "lower"
        for model, a in saved["models"].items():
            assert a["n_attacked"] == n == len(saved["per_item"][model])
            assert 0 <= a["pre_asr"] <= a["asr"] <= 1 and a["ua_attacked"] == pytest.approx(1 - a["asr"])
            assert all(r["text"] in tiny_world.forget_prompts("star") for r in saved["per_item"][model])
        assert "classifier" in saved["detector"]
        from PIL import Image
        assert Image.open(out / "attacks" / f"{name}.png").width > 32
        assert f"{name} on UCE" in result.output
    assert json.loads((out / "attacks" / "p4d_k.json").read_text())["config"]["iterations"] == 2
    cached = sorted(p.name.split("-star-")[0] for p in (tiny_world.root / "attacks").glob("*.json"))
    assert cached == ["original"] * 4 + ["retrain"] * 4
    assert "retrain" in result.output and (out / "report.html").is_file() and not (out / "attack.json").exists()
    page = (out / "report.html").read_text()  # the page: the robustness table, the pictures, the adversarial prompts
    assert "Robustness" in page and "under the p4d_k attack" in page
    attacked = [r for r in json.loads((out / "attacks" / "prompt_attack.json").read_text())["per_item"]["UCE"]
                if r["adversarial_prompt"]]
    assert all(html.escape(r["adversarial_prompt"]) in page for r in attacked[:8] if r["success"]) and (
        not attacked or "adversarial prompts" in page)

    bad = CliRunner().invoke(app, ["attack", str(out), "iterations=0"])
    assert bad.exit_code == 2 and "iterations must be at least 1" in bad.output
    missing = CliRunner().invoke(app, ["attack", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not a run folder" in missing.output


@pytest.mark.slow  # 10-15 s on 2 cores: kept out of the 5-minute default suite; CI runs it
def test_the_build_is_deterministic(tiny_world, tmp_path):
    """Two builds of the same recipe give byte-identical models (every user gets the same world)."""
    import hashlib

    from obliviate.worlds.canvas import CanvasWorld
    from obliviate.worlds.canvas_train import CanvasRecipe
    again = CanvasWorld(CanvasRecipe(**TINY), cache_dir=str(tmp_path))
    again.build(log=lambda *a: None)

    def digests(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.suffix in (".safetensors", ".json")
                and not {"samples", "scores", "attacks"} & set(p.parts)  # caches of evaluations, not the world
                and p.name != "build.json"}
    first, second = digests(tiny_world.root), digests(again.root)
    assert any("tokenizer" in k for k in first) and any("unet" in k for k in first)
    assert first == second


@pytest.mark.slow  # two tiny denoiser trainings: 5-25 s on 2 shared cores
def test_a_validation_concepts_reference_never_sees_its_concept(tiny_world, tmp_path, monkeypatch):
    """The build's trunk saw the validation concepts' pictures: their references train a trunk of their own (without
    the retrain concepts and their concept) and a branch without their concept; built once, then reused."""
    import shutil

    from obliviate.models.diffusion import load_pipeline
    from obliviate.worlds import canvas_train as ct
    from obliviate.worlds.canvas import CanvasWorld
    from obliviate.worlds.canvas_train import CanvasRecipe

    shutil.copytree(tiny_world.root, tmp_path / tiny_world.root.name)  # the built world, in a cache of its own
    world = CanvasWorld(CanvasRecipe(**TINY), cache_dir=str(tmp_path))
    style = CanvasWorld.VALIDATION_CONCEPTS["style"]
    seen, real = [], ct.train_denoiser

    def recording(state, pipe, latents, captions, recipe, gen, start, steps, label):
        seen.append((label, start, steps, {c for cs in captions for c in cs}))
        return real(state, pipe, latents, captions, recipe, gen, start, steps, label)
    monkeypatch.setattr(ct, "train_denoiser", recording)
    folder = world.ensure_retrain(style, log=lambda *a: None)
    assert folder == world.root / f"retrain-{style}" and world.retrain_dir(style) == folder
    (trunk, t_start, t_steps, trunk_captions), (_, b_start, b_steps, branch_captions) = seen
    assert (t_start, t_steps, b_start, b_steps) == (0, TINY["unet_steps"] - TINY["branch_steps"],
                                                    TINY["unet_steps"] - TINY["branch_steps"], TINY["branch_steps"])
    phrase = cd.STYLE_PHRASES[style]
    assert not any(style in c or phrase in c for c in trunk_captions | branch_captions)
    assert not any("striped" in c or "star " in c for c in trunk_captions)  # the build's trunk left these out too
    assert any("striped" in c for c in branch_captions)  # the branch sees them, as the original's branch does
    load_pipeline(folder)
    assert world.ensure_retrain(style, log=lambda *a: None) == folder and len(seen) == 2  # built once
    world.ensure_retrain("striped", log=lambda *a: None)  # the build's own reference: nothing to train
    assert len(seen) == 2
    assert f"retrain-{style}" in json.loads((world.root / "build.json").read_text())
