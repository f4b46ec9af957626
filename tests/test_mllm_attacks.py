"""Recovery attacks on vision-language runs (`obliviate attack`, attacks/mllm/, runners/mllm_attack.py): on a tiny
LLaVA saved with save_pretrained and MLLMU-Bench's files written in the published schema, a GradDiff run is attacked by
relearning (fine-tuned on some forget people with their pictures, the others scored with MLLMU-Bench's protocol) and
in-context recall (each forget person's profile before the question), on the unlearned, original and retrain model;
the user's folders stay untouched; bad input is one line; a guard run is attacked through its guard, with the
unguarded row beside it."""
from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from conftest import one_line_error
from obliviate.cli import app
from obliviate.errors import ObliviateError
from test_mllm_family import _profile, write_mllmu

runner = CliRunner()
# four forget people (relearning fine-tunes on two and scores the other two); the other sets as small as they go
FOUR_PEOPLE = {"forget_10": [_profile(i) for i in range(4)], "retain_90": [_profile(i) for i in range(4, 6)],
               "Retain_Set": [_profile(10)], "Test_Set": [_profile(0, test=True)]}
SMALL = ["steps=2", "lr=0.01", "batch_size=2"]


def _digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(tmp, model_dir, mllmu_dir, method, args=None, name="r", steps=2):
    from obliviate.config import build_config
    from obliviate.runners import run

    config = build_config({"family": "mllm", "method": method, "method_args": args or {}, "model": str(model_dir),
                           "mllmu_dir": str(mllmu_dir), "split": "forget10", "retrain_model": str(model_dir),
                           "mllm": {"train_parts": "all", "max_new_tokens": 4},
                           "eval": {"batch_size": 8, "retain_people": 1},
                           "train": {"max_steps": steps, "batch_size": 2, "lr": 1e-2},
                           "output_dir": str(tmp / "runs"), "name": name})
    return run(config, log=lambda *_: None)


@pytest.fixture(scope="module")
def mllmu_dir(tmp_path_factory):
    return write_mllmu(tmp_path_factory.mktemp("mllmu4"), FOUR_PEOPLE)


@pytest.fixture(scope="module")
def graddiff_run(llava_dir, mllmu_dir, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("mllm_attack_run"), llava_dir, mllmu_dir, "GradDiff")


@pytest.mark.slow  # a GradDiff run (the module's fixture, ~15 s) and relearning
def test_relearning_fine_tunes_on_some_forget_people_and_rescores_the_others(graddiff_run, llava_dir):
    run = graddiff_run
    base, folder = _digest(llava_dir), _digest(run)
    r = runner.invoke(app, ["attack", str(run), "--attack", "mllm_relearn", *SMALL, "--quiet"])
    assert r.exit_code == 0, r.output
    assert _digest(llava_dir) == base  # the user's model untouched
    assert all(_digest(run)[k] == v for k, v in folder.items() if k != "report.html")  # the run's files too
    result = json.loads((run / "attacks" / "mllm_relearn.json").read_text())
    assert result["family"] == "mllm" and result["method"] == "GradDiff" and result["seconds"] > 0
    assert list(result["models"]) == ["GradDiff", "original", "retrain"]
    assert result["config"]["steps"] == 2 and result["headline"] == "classification_image"
    for model, row in result["models"].items():
        for key in ("classification_image", "classification_image_before", "classification_text",
                    "truth_ratio", "truth_ratio_before", "forget_quality"):
            assert isinstance(row[key], float), (model, key, row[key])
        assert 0 <= row["classification_image"] <= 1 and row["n"] == len(result["per_item"][model])
        assert [p["step"] for p in result["curves"][model]] == [0, 1, 2]
    # fine-tuned on two forget people, scored on the other two: never the same person
    trained = set(result["fine_tuned_people"])
    measured = {r["subject"] for r in result["per_item"]["GradDiff"]}
    assert len(trained) == 2 and measured == {"0", "1", "2", "3"} - trained
    # step 0 is the unlearned model as the run scored it (its changed tensors applied, the run's prompt format)
    run_rows = {(r["subject"], r["question"], r["image"]): r
                for r in json.loads((run / "per_item.json").read_text())["forget"]}
    for row in result["per_item"]["GradDiff"]:
        scored = run_rows[(row["subject"], row["question"], row["image"])]
        assert row["classification_before"] == scored["classification"]
        if row["truth_ratio_before"] is not None:
            assert row["truth_ratio_before"] == pytest.approx(scored["truth_ratio"], rel=1e-4)
    # relearning moved the model: its forget scores after two steps are not those before
    graddiff = result["models"]["GradDiff"]
    assert graddiff["truth_ratio"] != pytest.approx(graddiff["truth_ratio_before"], rel=1e-3)
    # the original and the retrain folder are the same weights here: the same fine-tuning gives the same curve
    assert result["models"]["original"]["truth_ratio"] == pytest.approx(result["models"]["retrain"]["truth_ratio"])
    assert result["models"]["retrain"]["forget_quality"] == 1.0
    assert (run / "attacks" / "mllm_relearn.png").stat().st_size > 0
    assert "what the attacks recover" in (run / "report.html").read_text()
    assert f"wrote {run / 'attacks' / 'mllm_relearn'}.json" in r.output.replace("\n", "")


@pytest.mark.slow  # the module's GradDiff run (~15 s)
def test_in_context_puts_each_forget_persons_profile_before_the_question(graddiff_run, monkeypatch):
    from obliviate.api import attack_run
    from obliviate.models.vlm import VisionLanguageAdapter

    asked, generate = [], VisionLanguageAdapter.generate

    def spy(self, model, tokenizer, items, questions=None, *args, **kwargs):
        asked.extend(zip(items, questions or [i.question for i in items]))
        return generate(self, model, tokenizer, items, questions, *args, **kwargs)

    monkeypatch.setattr(VisionLanguageAdapter, "generate", spy)
    lines = []
    results = attack_run(graddiff_run, "mllm_in_context", log=lines.append)
    result = results["mllm_in_context"]
    assert json.loads((graddiff_run / "attacks" / "mllm_in_context.json").read_text())["models"] == result["models"]
    assert list(result["models"]) == ["GradDiff", "original", "retrain"]
    for model, row in result["models"].items():
        for key in ("classification_image", "classification_image_plain", "classification_text",
                    "classification_image_other_profile", "cloze_image"):
            assert isinstance(row[key], float), (model, key)
    assert {r["subject"] for r in result["per_item"]["GradDiff"]} == {"0", "1", "2", "3"}  # every forget person
    # each question was asked plainly, after its own person's profile, and after another's (the control)
    jobs = ["poet", "nurse", "baker", "pilot"]
    for item, question in asked:
        own = f"Person {item.subject} is a {jobs[int(item.subject)]}.\n"
        other = f"Person {(int(item.subject) + 1) % 4} is a {jobs[(int(item.subject) + 1) % 4]}.\n"
        assert not question.startswith("Person") or question.startswith((own, other)), question
    for person in "0123":
        assert any(q.startswith(f"Person {person} is") and i.subject == person for i, q in asked)
        assert any(q.startswith(f"Person {person} is") and i.subject != person for i, q in asked)
    # the profile changed what the model answered (the original's answers; GradDiff at lr 1e-2 says one word)
    rows = result["per_item"]["original"]
    assert any(r["chosen"] != r["chosen_plain"] or r["generated"] != r["generated_plain"]
               or r["filled"] != r["filled_plain"] for r in rows)
    assert any("GradDiff: multiple choice with the picture" in line for line in lines)


@pytest.mark.slow  # both attacks again on three models: ~11 s on 2 shared cores
def test_the_default_set_runs_both_attacks(graddiff_run):
    r = runner.invoke(app, ["attack", str(graddiff_run), "steps=1", "lr=0.01", "batch_size=2", "--quiet"])
    assert r.exit_code == 0, r.output
    for name in ("mllm_relearn", "mllm_in_context"):
        assert f"wrote {graddiff_run / 'attacks' / name}.json" in r.output.replace("\n", "")


@pytest.mark.slow  # the module's GradDiff run (~15 s); the default suite is at its 5 minutes
@pytest.mark.parametrize("args, needles", [
    (["--attack", "relearn"], ("vision-language model run", "the relearn attack is for language model runs",
                               "mllm_relearn")),
    (["--attack", "prompt_attack"], ("the prompt_attack attack is for text-to-image runs", "mllm_in_context")),
    (["--attack", "mllm_relearnn"], ("unknown attack 'mllm_relearnn'", "Did you mean 'mllm_relearn'")),
    (["--attack", "mllm_relearn", "share=1.5"], ("mllm_relearn share must be between 0 and 1",)),
    (["--attack", "mllm_relearn", "data=forget_texts"], ("mllm_relearn data must be one of forget, retain",)),
    (["--attack", "mllm_in_context", "steps=2"], ("unknown attack option 'steps'",)),
])
def test_bad_attack_input_is_one_line_before_any_model_loads(graddiff_run, monkeypatch, args, needles):
    from obliviate.runners import mllm_attack

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(mllm_attack, "attack_target", no_loading)
    one_line_error(runner.invoke(app, ["attack", str(graddiff_run), *args]), *needles)


def test_what_an_attack_cannot_serve_is_one_line():
    from obliviate.attacks.mllm.common import Target
    from obliviate.attacks.mllm.in_context import InContext, InContextConfig
    from obliviate.attacks.mllm.relearn import Relearn, RelearnConfig
    from obliviate.data import VQAItem

    one = [VQAItem("Ada", "qa", "Ada#0", "What is this person's job?", answer="A poet.")]
    scored = [VQAItem("Ada", "classification", "Ada#0", "Job?", options=("poet", "nurse", "baker", "pilot"),
                      correct="A")]
    target = Target("GradDiff", {}, one, [], scored, pictures=None)
    with pytest.raises(ObliviateError, match="fine-tunes on some forget people and measures the others") as e:
        Relearn(RelearnConfig()).check(target)
    assert "\n" not in str(e.value)
    with pytest.raises(ObliviateError, match="data = 'retain': the run has no retain items"):
        Relearn(RelearnConfig(data="retain")).check(target)
    with pytest.raises(ObliviateError, match="needs each forget person's profile text .* none for Ada"):
        InContext(InContextConfig()).check(target)


@pytest.mark.slow  # an ICU run and two attacks on a tiny LLaVA: ~10 s on 2 shared cores
def test_a_guard_run_is_attacked_through_its_guard(llava_dir, mllmu_dir, tmp_path):
    from obliviate.api import attack_run

    run = _run(tmp_path, llava_dir, mllmu_dir, "ICU", {"correct_examples": 1}, name="icu")
    results = attack_run(run, ["mllm_relearn", "mllm_in_context"], {"steps": 1, "lr": 0.01, "batch_size": 2},
                         log=lambda *_: None)
    for name, result in results.items():
        assert list(result["models"]) == ["ICU", "original", "retrain", "ICU (unguarded)"], name
        assert result["models"]["ICU (unguarded)"] == result["models"]["original"]
        assert "the guard changes no weight" in result["caption"]
    assert "relearning fine-tunes the run's weights" in results["mllm_relearn"]["caption"]
    # through the guard: ICU's examples before every question moved the likelihoods the weights alone give
    relearn = results["mllm_relearn"]["models"]
    assert relearn["ICU"]["truth_ratio_before"] != pytest.approx(relearn["original"]["truth_ratio_before"])
    context = results["mllm_in_context"]["per_item"]
    assert any(g["chosen"] != o["chosen"] or g["generated"] != o["generated"] or g["filled"] != o["filled"]
               for g, o in zip(context["ICU"], context["original"]))


@pytest.mark.slow  # the tiny portraits world built (20 people), a run and both attacks: a minute or more on 2 cores
def test_a_portraits_world_run_is_attacked_from_the_cli(tmp_path):
    from test_mllm_family import TINY_WORLD

    model = "\n".join(f"{k} = {v}" for k, v in TINY_WORLD["model"].items())
    (tmp_path / "run.toml").write_text(
        f'method = "GradDiff"\nsplit = "forget10"\noutput_dir = "{tmp_path / "runs"}"\nname = "gd"\n'
        f'[world]\nname = "portraits"\nn_people = 20\nn_holdout = 2\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[world.model]\n{model}\n[train]\nmax_steps = 2\nbatch_size = 4\n[eval]\nretain_people = 2\n'
        '[mllm]\nmax_new_tokens = 4\n')
    r = runner.invoke(app, ["run", str(tmp_path / "run.toml"), "--quiet"])
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "gd"
    r = runner.invoke(app, ["attack", str(run), "steps=1", "lr=0.001", "batch_size=4", "--quiet"])
    assert r.exit_code == 0, r.output
    relearn = json.loads((run / "attacks" / "mllm_relearn.json").read_text())
    context = json.loads((run / "attacks" / "mllm_in_context.json").read_text())
    for result in (relearn, context):
        assert list(result["models"]) == ["GradDiff", "original", "retrain"]
        assert all(isinstance(row["classification_image"], float) for row in result["models"].values())
    # the world's two forget people: one fine-tuned on, the other measured (its picture and by-name items)
    assert len(relearn["fine_tuned_people"]) == 1
    measured = {r["subject"] for r in relearn["per_item"]["GradDiff"]}
    assert len(measured) == 1 and not measured & set(relearn["fine_tuned_people"])
    assert {r["image"] is None for r in relearn["per_item"]["GradDiff"]} == {True, False}
