"""Attacks on a run on the user's own pipeline, judged by the user's detector: a tiny CLIP folder (zero-shot) and a
tiny ViT classifier folder, built in code and saved with save_pretrained; the result has the erased model's and the
original's rows (no retrain reference), and a bad detector is one line."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error, tiny_prompts
from obliviate.attacks.t2i.detectors import NEUTRAL_PROMPTS, load_detector
from obliviate.cli import app

runner = CliRunner()
LABELS = ["striped", "dotted", "solid"]


@pytest.fixture(scope="module")
def detector_dirs(tmp_path_factory):
    """(a CLIP folder, a ViT image-classifier folder), each with its processor."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTForImageClassification,
                              ViTImageProcessor)

    from obliviate.worlds.tokenizer import train_clip_tokenizer

    root = tmp_path_factory.mktemp("detectors")
    torch.manual_seed(0)
    tokenizer = train_clip_tokenizer(tiny_prompts() * 3 + list(NEUTRAL_PROMPTS) * 3, max_length=12)
    ids = tokenizer.convert_tokens_to_ids
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=12, bos_token_id=ids("<|startoftext|>"),
                         eos_token_id=ids("<|endoftext|>"), pad_token_id=ids("<|endoftext|>"), **small),
        vision_config=dict(image_size=16, patch_size=8, **small), projection_dim=16))
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(root / "clip")
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, id2label=dict(enumerate(LABELS)),
                                              label2id={n: i for i, n in enumerate(LABELS)}, **small))
    vit.save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "vit")
    return root / "clip", root / "vit"


def test_detectors_judge_images(detector_dirs):
    clip_dir, vit_dir = detector_dirs
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    clip = load_detector(clip_dir, None, "striped")
    assert "'a picture of striped'" in clip.description and len(clip(images)) == 5
    vit = load_detector(vit_dir, "dotted", "striped")
    from transformers import AutoModelForImageClassification
    model = AutoModelForImageClassification.from_pretrained(vit_dir)
    with torch.no_grad():  # the processor's own normalisation: 0.5 mean and std for this ViT
        top = model(pixel_values=torch.nn.functional.interpolate(images, size=16) * 2 - 1).logits.argmax(-1)
    assert vit(images) == [LABELS[i] == "dotted" for i in top.tolist()]


def _user_run(tmp_path, pipeline_dir):
    from test_t2i_runs import _config

    result = runner.invoke(app, ["run", str(_config(tmp_path, pipeline_dir, "UCE")), "--quiet"])
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / "r1"


@pytest.mark.slow  # 3.5-4.5 s: the default suite took 312 s, over its 5 minutes
def test_attack_a_user_pipeline_run_with_a_user_detector(tmp_path, tiny_pipeline_dir, detector_dirs):
    clip_dir, vit_dir = detector_dirs
    run = _user_run(tmp_path, tiny_pipeline_dir)
    names = ["prompt_attack", "p4d_n", "ring_a_bell"]
    options = ["iterations=2", "check_every=1", "prefix_tokens=2", "p4d_n.tokens=4", "ring_a_bell.tokens=4",
               "population=4", "generations=2", "--quiet"]
    result = runner.invoke(app, ["attack", str(run), *options, "--detector", str(vit_dir), "--detector-label",
                                 "striped"] + [a for n in names for a in ("--attack", n)])
    assert result.exit_code == 0, result.output
    forget = [p for p in tiny_prompts() if "striped" in p]
    for name in names:
        saved = json.loads((run / "attacks" / f"{name}.json").read_text())
        assert list(saved["models"]) == ["UCE", "original"] and "no retrain row" in saved["caption"]
        assert [r["text"] for r in saved["per_item"]["UCE"]] == forget == [r["text"] for r in
                                                                            saved["per_item"]["original"]]
        assert saved["models"]["UCE"]["n_attacked"] == 3 and "image classifier" in saved["detector"]
        assert (run / "attacks" / f"{name}.png").is_file()
    assert "no retrain row" in result.output
    # CLIP zero-shot: the concept's prompt against neutral ones
    result = runner.invoke(app, ["attack", str(run), "--attack", "p4d_k", "iterations=1", "--detector",
                                 str(clip_dir), "--detector-label", "a red striped picture", "--quiet"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "attacks" / "p4d_k.json").read_text())
    assert "CLIP zero-shot" in saved["detector"] and "'a red striped picture'" in saved["detector"]
    bad = runner.invoke(app, ["attack", str(run), "--detector", str(vit_dir), "--detector-label", "zebra"])
    one_line_error(bad, "detector_label 'zebra' is not one of its labels: dotted, solid, striped", str(vit_dir))
    none = runner.invoke(app, ["attack", str(run)])
    one_line_error(none, "needs a detector for the concept")
