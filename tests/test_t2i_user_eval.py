"""A text-to-image run on a user's own pipeline is scored (evals/user_pipeline.py): a before/after grid, the CLIP
alignment of forget and retain prompts, KID against the original's samples, and with a detector UA and the retain
agreement; a detector that does not find the concept in the original's own pictures is said in one line, for the run
and for an attack. Tiny pipeline, CLIP and ViT folders built in code (tests/conftest.py,
test_t2i_attack_detectors.py)."""
from __future__ import annotations

import html
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error, tiny_prompts
from obliviate.cli import app
from test_t2i_attack_detectors import LABELS, detector_dirs  # noqa: F401 (a fixture)
from test_t2i_runs import _config

runner = CliRunner()


@pytest.fixture(scope="module")
def dotted_detector(tmp_path_factory):
    """A ViT classifier whose top class is always "dotted" (zero weights, a large bias): a detector with a known
    verdict, so that the rates it gives are known."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path_factory.mktemp("dotted") / "vit"
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=1, num_attention_heads=2,
                                              id2label=dict(enumerate(LABELS)),
                                              label2id={n: i for i, n in enumerate(LABELS)}))
    with torch.no_grad():
        vit.classifier.weight.zero_()
        vit.classifier.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))  # LABELS.index("dotted") == 1
    vit.save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def _run(tmp_path, pipeline_dir, method="UCE", **t2i):
    result = runner.invoke(app, ["run", str(_config(tmp_path, pipeline_dir, method, **t2i)), "--quiet"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "r1"
    return run, json.loads((run / "metrics.json").read_text()), result.output


def test_user_pipeline_run_is_scored(tmp_path, tiny_pipeline_dir, detector_dirs):
    from PIL import Image

    from obliviate.attacks.t2i.detectors import load_detector
    from obliviate.evals.user_pipeline import UserClip
    from obliviate.models.diffusion import load_pipeline, sample
    from obliviate.runners.t2i import load_run_pipeline

    clip_dir, vit_dir = detector_dirs
    run, metrics, output = _run(tmp_path, tiny_pipeline_dir, clip_model=str(clip_dir), detector=str(vit_dir),
                                detector_label="striped", eval_prompts=2)
    forget = [p for p in tiny_prompts() if "striped" in p][:2]
    retain = [p for p in tiny_prompts() if "striped" not in p][:2]
    rows = json.loads((run / "per_item.json").read_text())
    # the first 2 prompts of each set, seeds 0 and 1 (t2i.eval_seeds), the same for both pipelines
    assert [(r["text"], r["seed"], r["set"]) for r in rows] == \
        [(p, s, n) for n, ps in (("forget", forget), ("retain", retain)) for p in ps for s in (0, 1)]
    assert metrics["n_images"] == 8 and metrics["eval_prompts_forget"] == 2
    from obliviate.registry import undeclared  # every number the run writes has its metric's declaration
    record = ("method", "concept", "status", "stopped", "notes")
    assert undeclared({k: v for k, v in metrics.items() if k not in record}, "t2i") == []

    # every number is the rows' and the rows are the pipelines': re-sampled here from the base folder and the run
    texts, seeds = [r["text"] for r in rows], [r["seed"] for r in rows]
    original = sample(load_pipeline(tiny_pipeline_dir), texts, seeds, 3, 4.0)
    erased = sample(load_run_pipeline(run / "changed.safetensors", tiny_pipeline_dir), texts, seeds, 3, 4.0)
    assert not torch.allclose(original, erased)
    clip = UserClip(clip_dir)
    assert [r["original_alignment"] for r in rows] == pytest.approx(clip.alignment(original, texts).tolist(), abs=1e-5)
    assert [r["erased_alignment"] for r in rows] == pytest.approx(clip.alignment(erased, texts).tolist(), abs=1e-5)
    detector = load_detector(vit_dir, "striped", "striped")
    assert [r["original_detected"] for r in rows] == detector(original)
    assert [r["erased_detected"] for r in rows] == detector(erased)

    def mean(key, subset, f=lambda v: v):
        values = [f(r[key]) for r in rows if r["set"] == subset]
        return sum(values) / len(values)

    assert metrics["alignment_forget"] == pytest.approx(mean("erased_alignment", "forget"))
    assert metrics["alignment_retain"] == pytest.approx(mean("erased_alignment", "retain"))
    assert metrics["original_alignment_forget"] == pytest.approx(mean("original_alignment", "forget"))
    assert metrics["original_alignment_retain"] == pytest.approx(mean("original_alignment", "retain"))
    assert metrics["ua"] == pytest.approx(mean("erased_detected", "forget", lambda v: not v))
    assert metrics["original_ua"] == pytest.approx(mean("original_detected", "forget", lambda v: not v))
    agree = [r["erased_detected"] == r["original_detected"] for r in rows if r["set"] == "retain"]
    assert metrics["retain_agreement"] == pytest.approx(sum(agree) / len(agree))
    assert "image classifier" in metrics["detector"]

    # KID of the erased samples against the original's in CLIP's embedding space; 8 images in 16 dimensions: no FID
    from obliviate.evals.canvas import fid_kid
    kid = fid_kid(clip.features(), erased, original, kid_subset_size=8)
    assert metrics["kid_original"] == pytest.approx(kid["kid_mean"], rel=1e-3, abs=1e-6)
    assert metrics["kid_subset_size"] == 8 and "fid_original" not in metrics
    assert any(n.startswith("FID left out: 8 images per pipeline") for n in metrics["notes"])
    assert not any("skipped" in n for n in metrics["notes"])

    # the grid: original above the erased pipeline, forget then retain prompts; on the report page
    grid = Image.open(run / "grid.png")
    assert grid.height > 2 * 16 * 6 and grid.width > 4 * 16 * 6  # 2 rows, 4 columns of 16-pixel pictures x 6
    report = (run / "report.html").read_text()
    assert "original and UCE, forget then retain prompts (seed 0)" in report and "data:image/png;base64" in report
    assert "CLIP forget" in report and "retain agreement" in report
    # the terminal: the original beside the erased pipeline
    assert "original" in output and "CLIP forget" in output and "KID original" in output


def test_skipped_scores_are_named(tmp_path, tiny_pipeline_dir):
    run, metrics, output = _run(tmp_path, tiny_pipeline_dir)
    assert (run / "grid.png").is_file() and len(json.loads((run / "per_item.json").read_text())) == 14
    skipped = ["no t2i.clip_model (a local CLIP folder): CLIP alignment and KID skipped",
               "no t2i.detector (a CLIP or image-classifier folder): UA and retain agreement skipped"]
    assert metrics["notes"] == skipped
    assert all(n in output for n in skipped)
    assert not {"alignment_forget", "kid_original", "ua", "retain_agreement"} & set(metrics)
    assert skipped[0] in (run / "report.html").read_text()


def test_a_detector_blind_to_the_concept_is_said_for_the_run_and_the_attack(tmp_path, tiny_pipeline_dir,
                                                                             dotted_detector):
    # "striped" is never the top class: the detector finds the concept in none of the original's pictures
    run, metrics, output = _run(tmp_path, tiny_pipeline_dir, detector=str(dotted_detector), detector_label="striped")
    line = ("the detector finds 'striped' in only 0% of the original pipeline's own forget-prompt samples (below "
            "t2i.detector_min_share = 50%): UA and retain agreement are meaningless")
    assert line in metrics["notes"] and line in output
    assert metrics["ua"] == metrics["original_ua"] == 1.0 and metrics["retain_agreement"] == 1.0
    assert html.escape(line) in (run / "report.html").read_text()
    # `obliviate report` rewrites the page with the line still on it
    assert runner.invoke(app, ["report", str(run)]).exit_code == 0
    assert html.escape(line) in (run / "report.html").read_text()

    # the attack takes the run's own detector (t2i.detector) and says the same of the attacked prompts' pictures
    attack = ["attack", str(run), "--attack", "prompt_attack", "iterations=1", "check_every=1", "prefix_tokens=2",
              "--quiet"]
    result = runner.invoke(app, attack)
    assert result.exit_code == 0, result.output
    said = ("the detector finds 'striped' in only 0% of the original pipeline's own pictures of the attacked prompts "
            "(below t2i.detector_min_share = 50%): the attack rates are meaningless")
    assert said in result.output
    saved = json.loads((run / "attacks" / "prompt_attack.json").read_text())
    assert said in saved["caption"] and "no retrain row" in saved["caption"]
    assert saved["detector_found_in_original"] == 0 and saved["models"]["original"]["pre_asr"] == 0

    # a detector that finds it ("dotted" is always the top class): no such line
    result = runner.invoke(app, attack + ["--detector", str(dotted_detector), "--detector-label", "dotted"])
    assert result.exit_code == 0, result.output
    assert "the detector finds" not in result.output
    saved = json.loads((run / "attacks" / "prompt_attack.json").read_text())
    assert "the detector finds" not in saved["caption"] and saved["detector_found_in_original"] == 1


def test_a_detector_that_finds_the_concept_gives_known_rates(tmp_path, tiny_pipeline_dir, dotted_detector):
    # "dotted" is always found, in the original's pictures and the erased one's: nothing erased, nothing changed
    run, metrics, output = _run(tmp_path, tiny_pipeline_dir, detector=str(dotted_detector), detector_label="dotted")
    assert metrics["ua"] == metrics["original_ua"] == 0.0 and metrics["retain_agreement"] == 1.0
    assert not any("the detector finds" in n for n in metrics["notes"]) and "the detector finds" not in output


@pytest.mark.parametrize("t2i, message", [
    ({"detector_label": "striped"}, "t2i.detector_label goes with t2i.detector"),
    ({"clip_model": "VIT"}, "t2i.clip_model: VIT is not a CLIP folder (config.json's model_type 'vit'"),
    ({"clip_model": "NOWHERE"}, "t2i.clip_model: NOWHERE has no config.json"),
    ({"clip_model": "BARE_CLIP"}, "t2i.clip_model: BARE_CLIP has no preprocessor_config.json"),
    ({"detector": "VIT", "detector_label": "zebra"}, "t2i.detector: detector folder VIT: detector_label 'zebra' is "
                                                     "not one of its labels: dotted, solid, striped"),
    ({"detector": "BARE_CLIP"}, "t2i.detector: detector folder BARE_CLIP: no preprocessor_config.json"),
    ({"kid_subset_size": 1}, "t2i.kid_subset_size: Input should be greater than or equal to 2"),
    ({"detector_min_share": 1.5}, "t2i.detector_min_share: Input should be less than or equal to 1"),
])
def test_evaluation_options_are_checked_before_any_work(tmp_path, tiny_pipeline_dir, detector_dirs, t2i, message):
    import shutil

    bare = tmp_path / "bare_clip"  # a CLIP folder without its image processor
    shutil.copytree(detector_dirs[0], bare)
    (bare / "preprocessor_config.json").unlink()
    places = {"VIT": str(detector_dirs[1]), "NOWHERE": str(tmp_path / "nowhere"), "BARE_CLIP": str(bare)}
    t2i = {k: places.get(v, v) for k, v in t2i.items()}
    for name, place in places.items():
        message = message.replace(name, place)
    config = _config(tmp_path, tiny_pipeline_dir, "UCE", **t2i)
    one_line_error(runner.invoke(app, ["validate", str(config)]), message)
    one_line_error(runner.invoke(app, ["run", str(config), "--quiet"]), message)
    assert not (tmp_path / "runs").exists()


def test_canvas_runs_refuse_the_user_pipeline_options(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'method = "UCE"\nconcept = "striped"\n[world]\nname = "canvas"\ncache_dir = "{tmp_path}"\n'
                      f'[t2i]\nclip_model = "{tmp_path}"\n')
    one_line_error(runner.invoke(app, ["validate", str(config)]), "t2i.clip_model is for runs on your own pipeline")
