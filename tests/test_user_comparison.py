"""A run on a user's own model is a comparison: the original model (the user's folder before unlearning) is scored
with the same protocol and prompt format, cached by the folder's content and the evaluation settings, and shown with
the retrain reference and the unlearned model in metrics.json, the terminal and the report. Forget quality from too few
forget items is flagged, in metrics.json, the terminal and the report."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import tiny_items


def _write_tofu(path, items):
    path.write_text("".join(json.dumps({"question": i.question, "answer": i.answer,
                                        "paraphrased_answer": i.paraphrased_answer,
                                        "perturbed_answer": list(i.perturbed_answers)}) + "\n" for i in items))
    return path


def _count_calls(monkeypatch, module, name: str) -> list:
    calls = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)
    return calls


def _cached(root) -> list:
    return sorted((root / "evaluations").glob("*/eval-*.json"))


def test_a_user_lm_run_scores_its_original_beside_the_unlearned_model_and_caches_it(tmp_path, monkeypatch, capsys,
                                                                                     chat_lm_dir, chat_retrain_dir):
    import obliviate.runners.lm as runner
    from obliviate.config import build_config
    from obliviate.runners import run

    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path / "cache"))
    evaluations = _count_calls(monkeypatch, runner, "evaluation_of")
    items = tiny_items()
    settings = {"method": "GradDiff", "model": str(chat_lm_dir), "output_dir": str(tmp_path / "runs"),
                "forget_file": str(_write_tofu(tmp_path / "forget.json", items[:2])),
                "retain_file": str(_write_tofu(tmp_path / "retain.json", items[2:])),
                "retrain_model": str(chat_retrain_dir),
                "train": {"lr": 1e-3, "max_steps": 6, "batch_size": 4}, "eval": {"batch_size": 8}}
    first = run(build_config({**settings, "name": "first"}), log=lambda *_: None)
    assert len(evaluations) == 3  # the retrain reference, the unlearned model, the original
    assert len(_cached(tmp_path / "cache")) == 1

    metrics = json.loads((first / "metrics.json").read_text())
    original, retrain = metrics["original"], metrics["retrain"]
    # the original is the user's model as it was: it answers the forget questions it was trained on
    assert original["forget_accuracy"] == 1.0 and retrain["forget_accuracy"] < 1.0
    assert original["utility_ratio"] == 1.0
    assert metrics["utility_ratio"] == pytest.approx(metrics["model_utility"] / original["model_utility"])
    assert retrain["utility_ratio"] == pytest.approx(retrain["model_utility"] / original["model_utility"])
    assert original["forget_quality"] is not None and retrain["forget_quality"] == 1.0
    page = (first / "report.html").read_text()
    assert all(f"<tr><td>{row}</td>" in page for row in ("original", "retrain", "GradDiff"))
    terminal = capsys.readouterr().out
    assert all(row in terminal for row in ("│ original", "│ retrain", "│ GradDiff"))

    # the second run on the same folder, with the same sets and settings, reads the original's evaluation
    second = run(build_config({**settings, "name": "second"}), log=lambda *_: None)
    assert len(evaluations) == 3 + 2  # the retrain reference and the unlearned model only
    assert json.loads((second / "metrics.json").read_text())["original"] == original


def test_a_user_lm_run_without_a_retrain_reference_still_has_the_original_row(tmp_path, monkeypatch, chat_lm_dir):
    from obliviate.bench.report import rewrite_report
    from obliviate.config import build_config
    from obliviate.runners import run

    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path / "cache"))
    items = tiny_items()
    out = run(build_config({
        "method": "NPO", "model": str(chat_lm_dir), "output_dir": str(tmp_path / "runs"), "name": "npo",
        "forget_file": str(_write_tofu(tmp_path / "forget.json", items[:1])),
        "retain_file": str(_write_tofu(tmp_path / "retain.json", items[1:])),
        "train": {"lr": 1e-3, "max_steps": 2, "batch_size": 4}, "eval": {"batch_size": 8}}), log=lambda *_: None)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "retrain" not in metrics and metrics["original"]["forget_accuracy"] == 1.0
    assert metrics["original"]["utility_ratio"] == 1.0 and "utility_ratio" in metrics
    (out / "report.html").unlink()
    rewrite_report(out)  # `obliviate report` draws the same rows from metrics.json
    page = (out / "report.html").read_text()
    assert "<tr><td>original</td>" in page and "<tr><td>NPO</td>" in page


def test_the_original_cache_is_keyed_by_the_folder_content_not_its_times(tmp_path, tiny_lm_dir):
    from obliviate.runs import base_record, evaluation_cache

    folder = tmp_path / "model"
    shutil.copytree(tiny_lm_dir, folder)
    settings = {"eval": {"batch_size": 8}}

    def key(settings=settings):
        return evaluation_cache("lm", base_record(folder), settings, str(tmp_path / "cache"))
    first = key()
    assert first.is_relative_to(tmp_path / "cache")
    for path in folder.iterdir():  # touched, copied back: the same content
        os.utime(path, (1, 1))
    assert key() == first
    assert key({"eval": {"batch_size": 4}}) != first
    config = folder / "generation_config.json"
    config.write_text(config.read_text().replace("}", ', "max_new_tokens": 7}', 1))
    changed_config = key()
    assert changed_config != first
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert key() not in (first, changed_config)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from vlm_models import tiny_llava

    from obliviate.worlds.portraits import portraits_data

    return tiny_llava(tmp_path_factory.mktemp("llava") / "model", portraits_data(10, 2, 2, seed=0))


@pytest.mark.slow  # 3.5-4.5 s: the default suite took 312 s, over its 5 minutes
def test_a_user_vision_language_run_scores_its_original_and_caches_it(tmp_path, monkeypatch, capsys, llava_dir):
    import obliviate.runners.mllm as runner
    from obliviate.config import build_config
    from obliviate.runners import run
    from test_mllm_family import write_mllmu

    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path / "cache"))
    evaluations = _count_calls(monkeypatch, runner, "evaluation_of")
    settings = {"family": "mllm", "method": "GradDiff", "model": str(llava_dir),
                "mllmu_dir": str(write_mllmu(tmp_path / "mllmu")), "retrain_model": str(llava_dir),
                "mllm": {"max_new_tokens": 4}, "train": {"max_steps": 1, "batch_size": 2, "lr": 1e-3},
                "output_dir": str(tmp_path / "runs")}
    first = run(build_config({**settings, "name": "first"}))
    assert len(evaluations) == 3 and len(_cached(tmp_path / "cache")) == 1
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["original"]["forget_classification_image"] is not None
    assert metrics["retrain"]["forget_quality"] == 1.0
    from obliviate.registry import undeclared  # every aggregate the evaluation writes has its declaration
    assert undeclared(metrics["retrain"], "mllm") == [] and undeclared(metrics["original"], "mllm") == []
    page = (first / "report.html").read_text()
    assert all(f"<tr><td>{row}</td>" in page for row in ("original", "retrain", "GradDiff"))
    terminal = capsys.readouterr().out
    header = next(line for line in terminal.splitlines() if "set, task" in line)  # MLLMU-Bench's table: models as
    assert header.split("┃")[2:5] == [f"{m:>12} " for m in ("original", "retrain", "GradDiff")]  # columns

    second = run(build_config({**settings, "name": "second"}))
    assert len(evaluations) == 3 + 2  # the original's evaluation read from the cache
    assert json.loads((second / "metrics.json").read_text())["original"] == metrics["original"]


def test_the_vision_language_table_shows_utility_relative_to_the_original():
    from obliviate.bench.scorecard import mllmu_rows

    rows = {"original": {"retain_classification_image": 0.8, "retain_classification_text": 0.5},
            "GradDiff": {"retain_classification_image": 0.6, "retain_classification_text": 0.5}}
    lines = dict(mllmu_rows(rows))
    assert lines["retain MC / original"] == ["1.00 / 1.00", "0.75 / 1.00"]
    assert "public MC / original" not in lines  # nothing to divide


# ---- forget quality from few items --------------------------------------------------------------------------------

def test_ks_cannot_reject_with_three_forget_items_and_the_documented_size_has_power():
    from scipy.stats import ks_2samp

    from obliviate.evals.tofu import MIN_FORGET_ITEMS, smallest_ks_pvalue

    # fully separated samples give the smallest p-value there is: 3 vs 3 never gets below 0.05
    assert smallest_ks_pvalue(3, 3) == pytest.approx(0.1)
    assert ks_2samp([0.0, 1, 2], [10.0, 11, 12]).pvalue == pytest.approx(0.1)
    assert smallest_ks_pvalue(4, 4) < 0.05 and smallest_ks_pvalue(3, 40) == pytest.approx(2 / 12341)
    # the documented size: power >= 0.8 against a one-standard-deviation shift at alpha 0.05 (n vs n) from 25 on,
    # not yet at 24 (docs/metrics.md, "Few forget items")
    rng = np.random.default_rng(0)

    def power(n, reps=2000):
        x, y = rng.normal(size=(reps, n)), rng.normal(1.0, size=(reps, n))
        try:
            pvalues = ks_2samp(x, y, axis=1, method="exact").pvalue
        except TypeError:  # scipy before 1.11 (the lowest pyproject declares) takes one pair at a time
            pvalues = np.array([ks_2samp(a, b, method="exact").pvalue for a, b in zip(x, y)])
        return float(np.mean(pvalues < 0.05))
    assert MIN_FORGET_ITEMS == 25
    assert power(24) < 0.8 <= power(25)


def test_few_forget_items_are_flagged_in_metrics_the_terminal_and_the_report(tmp_path, capsys):
    from obliviate.bench.report import page
    from obliviate.bench.scorecard import print_scorecard
    from obliviate.evals.evaluate import compare_to_retrain

    def result(ratios):
        return {"per_item": {"forget": [{"truth_ratio": r} for r in ratios]}, "aggregate": {},
                "config": {"forget_set_name": "forget"}}
    few = compare_to_retrain(result([0.1, 0.2, 0.3]), result([1.0, 1.1, 1.2]))["aggregate"]
    assert few["forget_quality"] == pytest.approx(0.1)  # fully apart, and still "passes" the 0.05 bar
    assert few["forget_quality_low_power"] is True and few["forget_quality_items"] == 3
    assert few["forget_quality_min_pvalue"] == pytest.approx(0.1)
    many = compare_to_retrain(result(np.linspace(0.1, 0.3, 30)), result(np.linspace(1, 2, 30)))["aggregate"]
    assert "forget_quality_low_power" not in many and many["forget_quality_items"] == 30

    print_scorecard({"GradDiff": few})
    terminal = capsys.readouterr().out
    assert "forget quality rests on 3 forget items" in terminal and "cannot go below p = 0.1" in terminal
    print_scorecard({"GradDiff": many})
    assert "forget quality rests on" not in capsys.readouterr().out
    html = page("run", {"GradDiff": few}, {}, [])
    assert "forget quality rests on 3 forget items" in html


def test_a_run_on_few_forget_items_records_and_shows_the_warning(tmp_path, monkeypatch, capsys, chat_lm_dir,
                                                                 chat_retrain_dir):
    from obliviate.config import build_config
    from obliviate.runners import run

    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path / "cache"))
    items = tiny_items()
    out = run(build_config({
        "method": "GradDiff", "model": str(chat_lm_dir), "output_dir": str(tmp_path / "runs"), "name": "few",
        "forget_file": str(_write_tofu(tmp_path / "forget.json", items[:3])),
        "retain_file": str(_write_tofu(tmp_path / "retain.json", items[3:])), "retrain_model": str(chat_retrain_dir),
        "train": {"lr": 1e-3, "max_steps": 1, "batch_size": 4}, "eval": {"batch_size": 8}}), log=lambda *_: None)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["forget_quality_low_power"] is True and metrics["forget_quality_items"] == 3
    assert "forget quality rests on 3 forget items" in capsys.readouterr().out
    assert "forget quality rests on 3 forget items" in (out / "report.html").read_text()
