"""The report a person reads: loaded in real headless Chromium (every picture loads, the console stays clean, no
number wraps), point labels that do not overlap, unlearning curves per world with the retain term, each family's
robustness caption, readable adversarial prompts; and the demo's method folders as complete run folders."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from browser import render


def _history(n: int, forget0: float, retain0: float) -> list[dict]:
    return [{"step": s, "loss": -forget0 - s, "forget_nll": forget0 + 0.5 * s, "retain_nll": retain0 + 0.01 * s}
            for s in range(n)]


def _demo_folder(tmp_path: Path) -> Path:
    """A demo folder with every part of the page (stand-in numbers, real plots and pictures)."""
    from PIL import Image

    from obliviate.bench.report import write_demo_report

    folder = tmp_path / "demo"
    (folder / "t2i" / "star").mkdir(parents=True)
    (folder / "mllm").mkdir()
    Image.new("RGB", (64, 32), (200, 40, 40)).save(folder / "t2i" / "star" / "grid.png")
    Image.new("RGB", (24, 24), (40, 40, 200)).save(folder / "mllm" / "face.png")
    # four models crowded together: their labels must still not overlap
    scorecard = {"original": {"forget_quality": 1.02e-13, "model_utility": 0.813, "forget_accuracy": 1.0},
                 "retrain": {"forget_quality": 1.0, "model_utility": 0.794, "forget_accuracy": 0.0},
                 "GradDiff": {"forget_quality": 0.111, "model_utility": 0.752, "forget_accuracy": 0.03},
                 "RG (over GradDiff)": {"forget_quality": 0.115, "model_utility": 0.753, "forget_accuracy": 0.03}}
    lm_attack = {"family": "lm", "method": "GradDiff", "headline": "recall", "models": {"GradDiff": {"recall": 0.18}}}
    t2i_attack = {"family": "t2i", "method": "ESD-x", "headline": "asr", "models": {"ESD-x": {"asr": 0.3}}}
    summary = {
        "scorecard": scorecard, "notes": ["a note"], "robustness": {"GradDiff": {"paraphrase": lm_attack}},
        "t2i": [{"concept": "star", "title": "Erasing 'star' from the canvas pipeline", "grid": "t2i/star/grid.png",
                 "scorecard": {"original": {"ua": 0.05}, "ESD-x": {"ua": 0.95}}, "notes": [],
                 "robustness": {"ESD-x": {"p4d_k": t2i_attack}}}],
        "mllm": {"split": "forget10", "scorecard": {"original": {}, "GradDiff": {}}, "notes": [],
                 "examples": [{"person": "Ada Lind", "role": "forget", "picture": "mllm/face.png",
                               "question": "Who is this?", "truth": "Ada Lind", "correct": "A",
                               "answers": {"original": {"generated": "This is Ada Lind, a poet from Lisbon who " * 4,
                                                        "chosen": "A"}}}]}}
    write_demo_report(folder, summary, {"GradDiff": _history(12, 1.0, 0.5), "RG": _history(12, 1.2, 0.6)},
                      {"GradDiff": _history(8, 2.0, 1.5)})
    return folder


@pytest.mark.slow  # 3.5-4.5 s: the default suite took 312 s, over its 5 minutes
def test_the_demo_page_loads_whole_in_chromium(tmp_path):
    folder = _demo_folder(tmp_path)
    shots = Path(os.environ.get("OBLIVIATE_SCREENSHOTS") or tmp_path)
    seen = render(folder / "report.html", screenshot=shots / "report-page.png")
    # trade-off plot, profiles curves, canvas grid, portraits picture, portraits curves
    assert seen["images"] == 5 and seen["broken"] == [], seen
    assert seen["console"] == []
    assert seen["wrapped"] == [], "numbers wrap onto a second line"
    assert (shots / "report-page.png").stat().st_size > 10_000


def test_chromium_sees_a_broken_picture_and_a_console_error(tmp_path):
    """The check above can fail: a page with a missing picture and a script error is caught."""
    page = tmp_path / "bad.html"
    page.write_text("<!doctype html><html><body><img alt='gone' src='missing.png'>"
                    "<script>console.error('boom')</script></body></html>")
    seen = render(page)
    assert seen["broken"] == ["gone"] and any("boom" in m for m in seen["console"])


def test_point_labels_do_not_overlap():
    from obliviate.bench.report import _matplotlib, place_labels

    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points = [(0.75, 0.11), (0.752, 0.112), (0.751, 0.109), (0.80, 1e-5), (0.753, 0.115)]
    for x, y in points:
        ax.scatter(x, y)
    ax.set_yscale("log")
    labels = place_labels(ax, points, ["GradDiff", "RG (over GradDiff)", "RGD (over GradDiff)", "SimNPO", "NPO"])
    renderer = fig.canvas.get_renderer()
    boxes = [a.get_window_extent(renderer) for a in labels]
    assert len(boxes) == len(points)
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (labels[i].get_text(), labels[j].get_text())
    plt.close(fig)


def test_unlearning_curves_show_the_retain_term_in_distinct_colours():
    from obliviate.bench.report import _matplotlib, curves_figure

    fig = curves_figure({"GradDiff": _history(5, 1.0, 0.5), "NPO": _history(5, 1.1, 0.4),
                         "RGD": _history(5, 0.9, 0.45)}, "Unlearning curves: the profiles world")
    forget, retain = fig.axes
    assert "forget" in forget.get_ylabel() and "retain" in retain.get_ylabel()
    assert len({tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
                for line in forget.lines}) == 3
    assert [line.get_label() for line in retain.lines] == ["GradDiff", "NPO", "RGD"]
    assert retain.lines[0].get_ydata()[0] == pytest.approx(0.5)
    _matplotlib().close(fig)


def test_each_family_world_gets_its_own_curves_and_captions(tmp_path):
    html = (_demo_folder(tmp_path) / "report.html").read_text()
    assert html.count("alt='unlearning curves'") == 2  # profiles and portraits apart
    assert "share of forget facts in the answers" in html  # the language-model robustness caption
    assert "share whose picture shows the erased concept" in html  # the canvas section's own
    assert html.count("share of forget facts in the answers") == 1


def test_adversarial_prompts_read_without_replacement_characters():
    from obliviate.attacks.t2i.common import readable_prompt
    from obliviate.worlds.tokenizer import train_clip_tokenizer

    tok = train_clip_tokenizer(["a red star in striped style"])
    star = tok("★ star", add_special_tokens=False)["input_ids"]
    assert len(star) > 2  # the symbol is three byte tokens
    assert readable_prompt(tok, star) == tok.decode(star).strip() == "★ star"
    lone = [star[0]] + tok("red star", add_special_tokens=False)["input_ids"]  # half a character, as attacks pick
    assert "\ufffd" in tok.decode(lone)
    text = readable_prompt(tok, lone)
    assert "\ufffd" not in text and text == f"<|{star[0]}|> red star"


def test_demo_method_folders_are_run_folders(tiny_lm_dir, tmp_path):
    """`obliviate report` and `obliviate export` take a demo method's folder as they take a run's."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from obliviate.cli import app
    from obliviate.config import RunConfig, TrainConfig
    from obliviate.demo import write_method_folder

    before = {p.name: p.read_bytes() for p in tiny_lm_dir.iterdir() if p.is_file()}
    base = load_file(str(tiny_lm_dir / "model.safetensors"))
    name = next(k for k in base if k.endswith("norm.weight"))
    config = RunConfig(method="NPO", split="forget10", train=TrainConfig(lr=6e-4, epochs=10))
    folder = tmp_path / "demo" / "NPO"
    write_method_folder(folder, config, str(tiny_lm_dir), {"forget_quality": 0.05, "model_utility": 0.7},
                        _history(3, 1.0, 0.5), {"forget": []}, {name: base[name] * 2},
                        attacks={"paraphrase": {"family": "lm", "method": "NPO", "headline": "recall",
                                                "models": {"NPO": {"recall": 0.1}}}})
    assert json.loads((folder / "config.json").read_text())["train"]["lr"] == 6e-4
    runner = CliRunner()
    r = runner.invoke(app, ["report", str(folder)])
    assert r.exit_code == 0, r.output
    page = (folder / "report.html").read_text()
    assert "obliviate run: NPO on forget10" in page and "None" not in page.split("</h1>")[0]
    assert "Robustness: what the attacks recover" in page
    r = runner.invoke(app, ["export", str(folder), str(tmp_path / "exported")])
    assert r.exit_code == 0, r.output
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    torch.testing.assert_close(exported[name], base[name] * 2)
    assert {p.name: p.read_bytes() for p in tiny_lm_dir.iterdir() if p.is_file()} == before
