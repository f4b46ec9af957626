"""`obliviate validate` says everything `run` would reject before training (model folder, data and prompt files,
split, concept, an existing run folder) in one line naming it, without loading a model or building a world; and
`obliviate report` on a run folder with a corrupt JSON file is one line naming the file."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import one_line_error
from obliviate.cli import app

runner = CliRunner()




def write_qa(path, items) -> str:
    path.write_text("\n".join(json.dumps({"question": i.question, "answer": i.answer}) for i in items) + "\n")
    return str(path)


@pytest.fixture
def lm_files(tmp_path, tiny_lm_dir):
    from conftest import tiny_items
    items = tiny_items()
    return {"model": str(tiny_lm_dir), "forget_file": write_qa(tmp_path / "forget.jsonl", items[:2]),
            "retain_file": write_qa(tmp_path / "retain.jsonl", items[2:]), "output_dir": str(tmp_path / "runs")}


@pytest.fixture
def t2i_files(tmp_path, tiny_pipeline_dir):
    from conftest import tiny_prompts
    forget, retain = tmp_path / "forget.txt", tmp_path / "retain.txt"
    forget.write_text("\n".join(p for p in tiny_prompts() if "striped" in p) + "\n")
    retain.write_text("\n".join(p for p in tiny_prompts() if "striped" not in p) + "\n")
    return {"family": "t2i", "concept": "striped", "model": str(tiny_pipeline_dir), "forget_prompts": str(forget),
            "retain_prompts": str(retain), "output_dir": str(tmp_path / "runs")}


def config(tmp_path, method: str, keys: dict, world: dict | None = None):
    lines = [f'method = "{method}"'] + [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    if world:
        lines += ["[world]"] + [f"{k} = {json.dumps(v)}" for k, v in world.items()]
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def validate(path: str):
    return runner.invoke(app, ["validate", path])


# ---- language model ------------------------------------------------------------------------------------------------

def test_valid_configs_still_say_ok(tmp_path, lm_files, t2i_files):
    for keys, subject in ((lm_files, "forget file forget.jsonl)"), ({"split": "forget05"}, "split forget05"),
                          (t2i_files, "concept striped"), ({"concept": "star"}, "concept star")):
        r = validate(config(tmp_path, "GradDiff", keys, {"name": "canvas"} if keys.get("concept") == "star" else None))
        assert r.exit_code == 0 and r.output.startswith("ok: ") and subject in r.output, r.output
        # a run on the user's own files names them, not the built-in world's default split
        assert keys is not lm_files or "split" not in r.output, r.output
    assert not (tmp_path / "runs").exists()  # validate writes nothing


def test_missing_model_folder(tmp_path, lm_files):
    missing = tmp_path / "no-model"
    one_line_error(validate(config(tmp_path, "NPO", {**lm_files, "model": str(missing)})),
                   "model folder not found", str(missing))
    (tmp_path / "empty").mkdir()
    one_line_error(validate(config(tmp_path, "NPO", {**lm_files, "model": str(tmp_path / "empty")})),
                   "no config.json", str(tmp_path / "empty"))
    # a model folder for the world's data is checked as well
    one_line_error(validate(config(tmp_path, "NPO", {"model": str(missing)})), "model folder not found")


def test_missing_or_bad_forget_file(tmp_path, lm_files):
    missing = tmp_path / "nope.jsonl"
    one_line_error(validate(config(tmp_path, "GradDiff", {**lm_files, "forget_file": str(missing)})),
                   "data file not found", str(missing))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "answer": "A."}\n{"question": "Q2?"\n')
    one_line_error(validate(config(tmp_path, "GradDiff", {**lm_files, "forget_file": str(bad)})),
                   f"{bad}:2:", "malformed JSON")
    one_line_error(validate(config(tmp_path, "GradDiff", {**lm_files, "retain_file": lm_files["forget_file"]})),
                   "overlap")


def test_files_go_together_with_model(tmp_path, lm_files):
    keys = {k: v for k, v in lm_files.items() if k != "model"}
    one_line_error(validate(config(tmp_path, "GradDiff", keys)), "needs `model`")
    keys = {k: v for k, v in lm_files.items() if k != "retain_file"}
    one_line_error(validate(config(tmp_path, "GradDiff", keys)), "forget_file and retain_file go together")
    one_line_error(validate(config(tmp_path, "Retrain", lm_files)), "Retrain needs a built-in world")


def test_missing_idk_file(tmp_path, lm_files):
    one_line_error(validate(config(tmp_path, "IdkPO", {**lm_files, "idk_file": str(tmp_path / "idk.txt")})),
                   "not found", "idk.txt")


def test_unknown_split_names_the_valid_ones(tmp_path):
    one_line_error(validate(config(tmp_path, "GradDiff", {"split": "forget15"})),
                   "unknown split 'forget15'", "forget01", "forget05", "forget10", "forget20", "val10")


def test_missing_tofu_dir(tmp_path):
    one_line_error(validate(config(tmp_path, "GradDiff", {}, {"tofu_dir": str(tmp_path / "tofu")})),
                   "TOFU folder not found", str(tmp_path / "tofu"))


# ---- text-to-image ---------------------------------------------------------------------------------------------------

def test_unknown_concept_names_the_valid_ones(tmp_path):
    out = one_line_error(validate(config(tmp_path, "ESD-x", {"concept": "plaid"},
                                         {"name": "canvas", "cache_dir": str(tmp_path / "cache")})),
                         "no concept 'plaid'", "striped", "star")
    assert "styles:" in out and "objects:" in out
    assert not (tmp_path / "cache").exists()  # no world was built


def test_prompt_file_missing_or_without_the_concept(tmp_path, t2i_files):
    missing = tmp_path / "none.txt"
    one_line_error(validate(config(tmp_path, "ESD-x", {**t2i_files, "forget_prompts": str(missing)})),
                   "prompts file not found", str(missing))
    one_line_error(validate(config(tmp_path, "ESD-x", {**t2i_files, "retain_prompts": str(missing)})),
                   "prompts file not found", str(missing))
    one_line_error(validate(config(tmp_path, "ESD-x", {**t2i_files, "forget_prompts": t2i_files["retain_prompts"]})),
                   f"{t2i_files['retain_prompts']}:1:", "does not contain the concept 'striped'")
    keys = {k: v for k, v in t2i_files.items() if k != "retain_prompts"}
    one_line_error(validate(config(tmp_path, "ESD-x", keys)), "forget_prompts and retain_prompts go together")
    one_line_error(validate(config(tmp_path, "ESD-x", {**t2i_files, "retain_prompts": t2i_files["forget_prompts"]})),
                   "both forget and retain prompts")


def test_model_must_be_a_diffusers_folder(tmp_path, t2i_files, tiny_lm_dir):
    one_line_error(validate(config(tmp_path, "ESD-x", {**t2i_files, "model": str(tiny_lm_dir)})),
                   "not a diffusers pipeline folder", str(tiny_lm_dir))
    one_line_error(validate(config(tmp_path, "ESD-x", {**t2i_files, "model": str(tmp_path / "sd")})),
                   "pipeline folder not found", str(tmp_path / "sd"))


# ---- both ------------------------------------------------------------------------------------------------------------

def test_existing_run_folder(tmp_path, lm_files, t2i_files):
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    for keys in (lm_files, t2i_files):
        one_line_error(validate(config(tmp_path, "GradDiff", {**keys, "name": "mine"})),
                       "run folder already exists", str(tmp_path / "runs" / "mine"))
    (tmp_path / "file").write_text("")
    one_line_error(validate(config(tmp_path, "GradDiff", {**lm_files, "output_dir": str(tmp_path / "file")})),
                   "output_dir is not a folder", str(tmp_path / "file"))


# ---- obliviate report on a run folder with a corrupt file ------------------------------------------------------------

GOOD_METRICS = {"method": "X", "split": "forget10", "status": "completed"}


@pytest.mark.parametrize("name, body, needles", [
    ("metrics.json", '{"method": "X"', ("metrics.json:1:", "malformed JSON")),
    ("metrics.json", "[1, 2]", ("metrics.json", "must be a JSON object")),
    ("history.json", '[{"step": 0, "loss": 1.0}, {"step"', ("history.json:1:", "malformed JSON")),
    ("history.json", '[{"loss": 1.0}]', ("history.json", "row 1")),
    ("attacks/relearn.json", "not json", ("relearn.json:1:", "malformed JSON")),
    ("attacks/relearn.json", '{"models": {}}', ("relearn.json", "lacks the key(s) headline, method")),
    ("attacks/relearn.json", '{"models": [], "headline": "recall", "method": "X"}', ("relearn.json", "'models'")),
    ("summary.json", '{"scorecard": {', ("summary.json:1:", "malformed JSON")),
    ("summary.json", "{}", ("summary.json", "scorecard")),
])
def test_report_on_a_corrupt_run_folder_names_the_file(tmp_path, name, body, needles):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(GOOD_METRICS))
    (run / "history.json").write_text(json.dumps([{"step": 0, "loss": 1.0}]))
    (run / name).parent.mkdir(exist_ok=True)
    (run / name).write_bytes(body.encode())
    one_line_error(runner.invoke(app, ["report", str(run)]), str(run / name), *needles)
    assert not (run / "report.html").exists()


def test_report_on_a_sound_run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(GOOD_METRICS))
    (run / "history.json").write_text(json.dumps([{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}]))
    (run / "attacks").mkdir()
    (run / "attacks" / "jailbreak.json").write_text(json.dumps({
        "attack": "jailbreak", "method": "X", "headline": "recall", "label": "jailbreak",
        "models": {"X": {"recall": 0.25}, "original": {"recall": 1.0}, "retrain": {"recall": 0.0}}}))
    r = runner.invoke(app, ["report", str(run)])
    assert r.exit_code == 0, r.output
    page = (run / "report.html").read_text()
    assert "Robustness" in page and "<th>jailbreak</th>" in page and "<td>25.0%</td>" in page
