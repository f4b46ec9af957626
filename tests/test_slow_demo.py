"""Slow: the real demo on the default worlds, as `make demo` runs it (the profiles, canvas and portraits parts in two
processes; no TOFU files, the worlds a fresh clone builds; trains the profiles world's two models, the canvas world's
pipeline with its retrain references and the portraits world's two LLaVAs). Run with `make test-slow` (CI does). It
checks what the README promises, not
a particular score."""
import html as html_lib
import json

import pytest


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, monkeypatch, users_cache):
    from obliviate.demo import run_demo

    # The worlds `make demo` builds and caches for its user (23 minutes cold on 2 cores, README): the test shares
    # that cache rather than the suite's private one, so a machine that has run the demo checks it in minutes.
    monkeypatch.setenv("OBLIVIATE_CACHE", users_cache)

    summary = run_demo(tmp_path / "demo", None, ["GradDiff", "NPO", "SimNPO", "RG", "RGD"], jobs=2)
    rows = summary["scorecard"]
    assert {"original", "retrain", "GradDiff", "NPO", "SimNPO", "RG", "RGD"} <= set(rows)
    assert rows["retrain"]["forget_quality"] == pytest.approx(1.0)
    # The original model must really know its facts, or the benchmark means nothing.
    assert rows["original"]["forget_accuracy"] >= 0.9 and rows["original"]["retain_accuracy"] >= 0.9
    assert rows["retrain"]["forget_accuracy"] < 0.2  # never saw those people
    for name in ("GradDiff", "NPO", "SimNPO", "RG", "RGD"):
        assert rows[name]["forget_accuracy"] < rows["original"]["forget_accuracy"]
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert saved["scorecard"].keys() == rows.keys()
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "forget quality" in html and "data:image/png;base64," in html

    # the recovery attacks: every method, and the original and the retrain model once, each attack's rows kept
    from obliviate.demo.lm import ATTACKS
    for name, results in saved["robustness"].items():
        assert set(results) == set(ATTACKS) and name in rows
        for attack, result in results.items():
            assert list(result["models"]) == [name, "original", "retrain"], attack
            assert (tmp_path / "demo" / name / "attacks" / f"{attack}.json").is_file()
        relearn = results["relearn"]["models"]
        # the ceiling and the floor: the original still knows the held-out facts, the retrain model never did
        assert relearn["original"]["recall_before"] >= 0.9 and relearn["retrain"]["recall_before"] <= 0.1
    assert set(saved["robustness"]) == {"GradDiff", "NPO", "SimNPO", "RG", "RGD"}
    assert "Robustness: what the attacks recover" in html and "relearning curves" in html

    # the canvas part: a style and an object erased by ESD-x, UCE and RGD, next to the original and the retrain
    sections = {s["concept"]: s for s in saved["t2i"]}
    assert set(sections) == {"striped", "star"}
    for concept, s in sections.items():
        card = s["scorecard"]
        assert {"original", "retrain", "ESD-x", "UCE", "RGD"} <= set(card)
        # the original draws the concept (its UA is low) and the retrain reference does not (its UA is high)
        assert card["original"]["ua"] < 0.5 < card["retrain"]["ua"], concept
        for name in ("ESD-x", "UCE", "RGD"):
            assert card[name]["ua"] > card["original"]["ua"], (concept, name)
            assert (tmp_path / "demo" / "t2i" / concept / name / "changed.safetensors").is_file()
            for attack_name in ("prompt_attack", "p4d_k"):  # every erasure attacked twice; the results kept
                attack = json.loads((tmp_path / "demo" / "t2i" / concept / name / "attacks" /
                                     f"{attack_name}.json").read_text())
                assert len(attack["per_item"][name]) == attack["models"][name]["n_attacked"] > 0
                assert list(attack["models"]) == [name, "original", "retrain"]
                assert "per_item" not in s["robustness"][name][attack_name]
        # the attack: an attacked prompt succeeds at least as often as the plain one, on every model
        for name, row in card.items():
            assert 0 <= row["pre_asr"] <= row["asr"] <= 1 and row["ua_attacked"] == pytest.approx(1 - row["asr"]), name
        # the original draws its concept under attack too; the retrain reference mostly does not
        assert card["original"]["ua_attacked"] < 0.5 < card["retrain"]["ua_attacked"], concept
        assert (tmp_path / "demo" / s["grid"]).is_file()
    # the page escapes quotes, as it must for a concept name written into HTML
    assert html_lib.escape("Erasing 'striped'") in html and html.count("class='grid'") >= 2

    # the vision-language part: MLLMU-Bench's table for the original, the retrain model and each method
    mllm = saved["mllm"]
    card = mllm["scorecard"]
    assert {"original", "retrain", "GradDiff", "NPO", "SimNPO", "RGD", "MMUnlearner", "PromptDecouple"} <= set(card)
    # the original knows its people, with the picture and as text; the retrain model never saw the forget people
    for form in ("image", "text"):
        assert card["original"][f"forget_classification_{form}"] >= 0.75
        assert card["retrain"][f"forget_classification_{form}"] <= 0.5
    assert card["retrain"]["forget_quality"] == pytest.approx(1.0)
    for name in ("GradDiff", "NPO", "SimNPO", "RGD", "MMUnlearner", "PromptDecouple"):
        assert card[name]["forget_classification_image"] <= card["original"]["forget_classification_image"], name
        assert (tmp_path / "demo" / "mllm" / name / "changed.safetensors").is_file()
    assert all((tmp_path / "demo" / e["picture"]).is_file() for e in mllm["examples"])
    assert "MLLMU-Bench" in html and "Before and after" in html

    # the page as a person sees it: every picture loads, nothing on the console, no number wraps; CI keeps the shot
    import os
    from pathlib import Path

    from browser import render
    shots = Path(os.environ.get("OBLIVIATE_SCREENSHOTS") or tmp_path)
    seen = render(tmp_path / "demo" / "report.html", screenshot=shots / "demo-report.png")
    assert seen["images"] > 8 and seen["broken"] == [] and seen["console"] == [] and seen["wrapped"] == [], seen

    # every method folder is a complete run folder: `obliviate report` and `obliviate export` take one of each part
    from typer.testing import CliRunner

    from obliviate.cli import app
    for part in ("NPO", "t2i/star/UCE", "mllm/GradDiff"):
        folder = tmp_path / "demo" / part
        r = CliRunner().invoke(app, ["report", str(folder)])
        assert r.exit_code == 0, (part, r.output)
        assert "None" not in (folder / "report.html").read_text().split("</h1>")[0], part
        r = CliRunner().invoke(app, ["export", str(folder), str(tmp_path / "exported" / part)])
        assert r.exit_code == 0, (part, r.output)
