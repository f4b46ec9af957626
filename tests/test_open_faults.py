"""Faults and bad input of issue 17 (section 5): each is one line naming the file or key, exit 2, nothing lost or
half-written, the base model untouched."""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import one_line_error, tiny_items
from obliviate.cli import app
from obliviate.errors import ObliviateError

runner = CliRunner()


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_qa(path: Path, items) -> str:
    path.write_text("".join(json.dumps({"question": i.question, "answer": i.answer}) + "\n" for i in items))
    return str(path)


def _user_config(tmp_path: Path, model: Path, **extra) -> Path:
    """A TOML run config on the user's own files (two forget items, the rest retained), a few steps, no evaluation."""
    items = tiny_items()
    keys = {"method": "GradDiff", "model": str(model), "forget_file": _write_qa(tmp_path / "forget.jsonl", items[:2]),
            "retain_file": _write_qa(tmp_path / "retain.jsonl", items[2:]), "output_dir": str(tmp_path / "runs"),
            "evaluate": False, **extra}
    lines = [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines) + "\n[train]\nmax_steps = 2\nbatch_size = 2\nlr = 1e-3\n")
    return path


# ---- a nearly full disk --------------------------------------------------------------------------------------------

def test_a_short_write_of_the_probe_is_a_full_disk(tmp_path, monkeypatch):
    import os

    from obliviate import runs

    real = os.write

    def short(fd, data):  # a nearly full disk: the kernel takes part of the write and reports no error
        return real(fd, data[:100]) if len(data) == 65536 else real(fd, data)

    monkeypatch.setattr(runs.os, "write", short)
    with pytest.raises(ObliviateError, match="cannot write to .*No space left on device"):
        with runs.claim_run_dir(tmp_path / "runs" / "x", log=None):
            pass
    assert not (tmp_path / "runs").exists()  # nothing made, nothing left


def test_a_full_disk_while_saving_the_tensors_is_one_line(tiny_lm_dir, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):  # what safetensors raises when the disk fills up under save_file
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    base = _digest(tiny_lm_dir)
    cfg = _user_config(tmp_path, tiny_lm_dir, name="full")
    one_line_error(runner.invoke(app, ["run", str(cfg), "--quiet"]), "cannot write to", "runs/full",
                   "No space left on device")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())  # nothing half-written
    assert _digest(tiny_lm_dir) == base


# ---- eval --out never overwrites an input --------------------------------------------------------------------------

def test_eval_out_never_overwrites_a_file_of_an_input_folder_even_forced(tiny_lm_dir, tmp_path):
    tofu = tmp_path / "TOFU"  # a complete release, so that the evaluation itself would succeed
    tofu.mkdir()
    items = tiny_items()
    for name, part in (("forget10", items[:2]), ("retain90", items[2:]), ("forget10_perturbed", items[:2]),
                       ("retain_perturbed", items[2:]), ("real_authors_perturbed", items[2:4]),
                       ("world_facts_perturbed", items[4:])):
        (tofu / f"{name}.json").write_text("".join(json.dumps({
            "question": i.question, "answer": i.answer, "paraphrased_answer": i.paraphrased_answer,
            "perturbed_answer": list(i.perturbed_answers)}) + "\n" for i in part))
    before = _digest(tofu)
    out = one_line_error(runner.invoke(app, ["eval", str(tiny_lm_dir), "--tofu-dir", str(tofu), "--out",
                                             str(tofu / "world_facts_perturbed.json"), "--force", "--quiet"]),
                         "--out", "world_facts_perturbed.json", "--tofu-dir")
    assert "input" in out
    assert _digest(tofu) == before


# ---- report on JSON of the wrong shape -----------------------------------------------------------------------------

def _run_folder(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "attacks").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"method": "NPO", "status": "completed", "forget_set": "forget10",
                                                  "forget_quality": 0.5, "model_utility": 0.4}))
    (run / "history.json").write_text(json.dumps([{"step": 1, "loss": 1.0}]))
    return run


ATTACK = {"attack": "probe", "family": "lm", "method": "NPO", "headline": "accuracy", "label": "probe",
          "models": {"NPO": {"accuracy": 0.1, "n": 2}, "original": {"accuracy": 0.9, "n": 2}},
          "per_item": {"NPO": [], "original": []}, "columns": ["accuracy"], "percent": ["accuracy"], "items": 2,
          "seconds": 1.0}


@pytest.mark.parametrize("file, body, needles", [
    ("metrics.json", {"method": "NPO", "status": "completed", "forget_quality": "high"},
     ("metrics.json", "forget_quality", "number")),
    ("metrics.json", {"method": ["NPO"], "status": "completed"}, ("metrics.json", "method")),
    ("attacks/probe.json", {k: v for k, v in ATTACK.items() if k != "headline"}, ("probe.json", "headline")),
    ("attacks/probe.json", {**ATTACK, "models": {"NPO": {"accuracy": "0.1"}}}, ("probe.json", "models.NPO.accuracy")),
    ("attacks/probe.json", {**ATTACK, "curves": {"NPO": [{"step": "one", "recall": 0.1}]}},
     ("probe.json", "curves.NPO.0.step")),
    ("history.json", [{"step": 1, "loss": "low"}], ("history.json", "0.loss")),
])
def test_report_on_json_of_the_wrong_shape_names_the_file_and_key(tmp_path, file, body, needles):
    run = _run_folder(tmp_path)
    (run / "attacks" / "probe.json").write_text(json.dumps(ATTACK))
    assert runner.invoke(app, ["report", str(run)]).exit_code == 0  # the sound folder reports
    (run / file).write_text(json.dumps(body))
    page = (run / "report.html").read_bytes()
    one_line_error(runner.invoke(app, ["report", str(run)]), *needles)
    assert (run / "report.html").read_bytes() == page  # the good page stays


# ---- security: run names, remote code ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../x", "/tmp/elsewhere", "a/b", ".."])
def test_a_run_name_with_a_path_is_refused(tiny_lm_dir, tmp_path, name):
    cfg = _user_config(tmp_path, tiny_lm_dir)
    for command in ("validate", "run"):
        one_line_error(runner.invoke(app, [command, str(cfg), f"name={name}", *(["--quiet"] if command == "run"
                                                                               else [])]),
                       "name", "not a plain folder name")
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "x").exists()


def _remote_code_pipeline(tiny_pipeline_dir, tmp_path, tokenizer_class: str) -> tuple[Path, Path]:
    """The pipeline with a tokenizer whose tokenizer_config.json has an auto_map to code in the folder; that code
    writes a marker file when it runs."""
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline_dir, folder)
    marker = tmp_path / "remote-code-ran"
    tok = folder / "tokenizer"
    (tok / "evil_tokenizer.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import CLIPTokenizer\nclass EvilTokenizer(CLIPTokenizer):\n    pass\n")
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}, tokenizer_class=tokenizer_class)
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, marker


@pytest.mark.parametrize("tokenizer_class", ["EvilTokenizer", "CLIPTokenizer"])
def test_a_tokenizer_with_remote_code_never_asks_and_never_runs_it(tiny_pipeline_dir, tmp_path, monkeypatch,
                                                                   tokenizer_class):
    import builtins

    from obliviate.models.diffusion import load_pipeline

    folder, marker = _remote_code_pipeline(tiny_pipeline_dir, tmp_path, tokenizer_class)
    asked = []

    def answer_yes(prompt=""):  # a user who answers transformers' question with "y"
        asked.append(prompt)
        return "y"

    monkeypatch.setattr(builtins, "input", answer_yes)
    if tokenizer_class == "EvilTokenizer":  # only the remote class can load it: a clear error
        with pytest.raises(ObliviateError, match="tokenizer") as e:
            load_pipeline(folder)
        assert len(str(e.value).splitlines()) == 1
    else:  # a class transformers has: it loads, without the remote one
        pipe = load_pipeline(folder)
        assert type(pipe.tokenizer).__name__ != "EvilTokenizer"
    assert not asked and not marker.exists()


# ---- attack --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_run(tiny_lm_dir, tmp_path_factory):
    """GradDiff on the user's own files with questions and answers only: no paraphrases, subjects, biographies or
    wrong answers, so several attacks do not apply."""
    from obliviate.config import load_config
    from obliviate.runners import run

    tmp = tmp_path_factory.mktemp("plain_run")
    return run(load_config(_user_config(tmp, tiny_lm_dir, name="gd")), log=lambda *_: None)


def test_the_default_attacks_run_those_that_apply_and_name_the_skipped(plain_run):
    r = runner.invoke(app, ["attack", str(plain_run), "max_new_tokens=4", "relearn.steps=1", "--quiet"])
    assert r.exit_code == 0, r.output
    for name, reason in (("in_context", "biography"), ("paraphrase", "paraphrased questions"),
                         ("probe", "attributes"), ("multiple_choice", "perturbed answers")):
        line = next((line for line in r.output.splitlines() if line.startswith(f"skipped {name}:")), None)
        assert line is not None and reason in line, (name, r.output)
        assert not (plain_run / "attacks" / f"{name}.json").exists()
    for name in ("jailbreak", "step_by_step", "quantize_int8", "quantize_int4"):
        assert json.loads((plain_run / "attacks" / f"{name}.json").read_text())["attack"] == name
    # named, an attack that does not apply is still an error
    one_line_error(runner.invoke(app, ["attack", str(plain_run), "--attack", "in_context"]),
                   "in_context attack needs each forget subject's text")


@pytest.mark.parametrize("option, needles", [
    (["--attack", "relearn", "lr=abc"], ("relearn.lr", "must be a number", "'abc'")),
    (["max_new_tokens=ten"], ("max_new_tokens", "must be an integer", "'ten'")),
    (["--attack", "relearn", "steps=2.5"], ("relearn.steps", "must be an integer", "2.5")),
    (["--attack", "probe", "folds=true"], ("probe.folds", "must be an integer")),
])
def test_attack_option_types_are_checked_before_any_model_loads(plain_run, monkeypatch, option, needles):
    from obliviate.runners import lm_attack

    def no_loading(*args, **kwargs):
        raise AssertionError("the models were loaded before the options were checked")

    monkeypatch.setattr(lm_attack, "attack_target", no_loading)
    one_line_error(runner.invoke(app, ["attack", str(plain_run), *option]), *needles)


@pytest.mark.parametrize("attacked_before", [False, True])
def test_a_read_only_run_folder_is_one_line_before_any_model_loads(plain_run, monkeypatch, attacked_before):
    from obliviate import runs
    from obliviate.runners import lm_attack

    def read_only(folder):  # tests run as root, whom chmod does not stop: the file system refuses instead
        raise OSError(errno.EROFS, "Read-only file system")

    def no_loading(*args, **kwargs):
        raise AssertionError("the models were loaded before the run folder was found read-only")

    if attacked_before:
        (plain_run / "attacks").mkdir(exist_ok=True)
    else:
        shutil.rmtree(plain_run / "attacks", ignore_errors=True)
    monkeypatch.setattr(runs, "_probe_write", read_only)
    monkeypatch.setattr(lm_attack, "attack_target", no_loading)
    before = _digest(plain_run)
    one_line_error(runner.invoke(app, ["attack", str(plain_run), "--attack", "jailbreak", "max_new_tokens=4"]),
                   "cannot write to", "attacks", "Read-only file system")
    assert _digest(plain_run) == before


def test_an_attack_refuses_a_run_whose_base_changed(tiny_lm_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from obliviate.config import load_config
    from obliviate.runners import run

    base = tmp_path / "model"
    shutil.copytree(tiny_lm_dir, base)
    folder = run(load_config(_user_config(tmp_path, base, name="gd")), log=lambda *_: None)
    weights = load_file(base / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + torch.ones_like(weights[name])
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    one_line_error(runner.invoke(app, ["attack", str(folder), "--attack", "jailbreak", "max_new_tokens=4"]),
                   "is not the run's base", "model.safetensors changed since the run")
    assert not (folder / "attacks" / "jailbreak.json").exists()


def test_a_run_made_with_relative_paths_is_attacked_from_another_folder(tiny_lm_dir, tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    shutil.copytree(tiny_lm_dir, work / "model")
    cfg = _user_config(work, work / "model", name="gd")
    monkeypatch.chdir(work)  # overrides typed in a shell are relative to the working directory
    r = runner.invoke(app, ["run", str(cfg), "--quiet", "model=model", "forget_file=forget.jsonl",
                            "retain_file=retain.jsonl", "output_dir=runs"])
    assert r.exit_code == 0, r.output
    recorded = json.loads((work / "runs" / "gd" / "config.json").read_text())
    assert all(Path(recorded[k]).is_absolute() for k in ("model", "forget_file", "retain_file", "output_dir"))
    monkeypatch.chdir(elsewhere)
    r = runner.invoke(app, ["attack", str(work / "runs" / "gd"), "--attack", "jailbreak", "max_new_tokens=4",
                            "--quiet"])
    assert r.exit_code == 0, r.output
    assert (work / "runs" / "gd" / "attacks" / "jailbreak.json").is_file()


# ---- config paths are relative to the config file ------------------------------------------------------------------

def test_relative_paths_in_a_config_file_are_relative_to_its_folder(tiny_lm_dir, tmp_path, monkeypatch):
    from obliviate.config import load_config

    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(tiny_lm_dir, project / "model")
    items = tiny_items()
    _write_qa(project / "forget.jsonl", items[:2])
    _write_qa(project / "retain.jsonl", items[2:])
    (project / "run.toml").write_text('method = "GradDiff"\nmodel = "model"\nforget_file = "forget.jsonl"\n'
                                      'retain_file = "retain.jsonl"\noutput_dir = "runs"\n'
                                      '[[eval_sets]]\nfile = "retain.jsonl"\nrole = "utility"\n')
    monkeypatch.chdir(tmp_path)  # not the config's folder
    r = runner.invoke(app, ["validate", "project/run.toml"])
    assert r.exit_code == 0 and r.output.startswith("ok:"), r.output
    config = load_config("project/run.toml", ["retain_file=project/retain.jsonl"])
    assert config.model == str(project / "model") and config.output_dir == str(project / "runs")
    assert config.eval_sets[0].file == str(project / "retain.jsonl")
    assert config.retain_file == "project/retain.jsonl"  # an override stays relative to the working directory


# ---- validate says what run would say ------------------------------------------------------------------------------

def test_validate_refuses_a_cuda_device_without_cuda(tiny_lm_dir, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _user_config(tmp_path, tiny_lm_dir)
    assert runner.invoke(app, ["validate", str(cfg)]).exit_code == 0
    for command in (["validate", str(cfg), "device=cuda"], ["run", str(cfg), "device=cuda", "--quiet"]):
        one_line_error(runner.invoke(app, command), "device 'cuda'", "CUDA is not available")
    assert not (tmp_path / "runs").exists()


def test_validate_refuses_a_concept_the_pipelines_tokenizer_does_not_know(tiny_pipeline_dir, tmp_path):
    from conftest import tiny_prompts

    # the tiny pipeline's byte-level tokenizer spells every word, so the concept it cannot spell is one that is
    # nothing but its special tokens (a tokenizer with a distinct <unk> also refuses unknown words)
    concept = "<|startoftext|>"
    forget, retain = tmp_path / "forget.txt", tmp_path / "retain.txt"
    forget.write_text("\n".join(p.replace("striped", concept) for p in tiny_prompts() if "striped" in p) + "\n")
    retain.write_text("\n".join(p for p in tiny_prompts() if "striped" not in p) + "\n")
    cfg = tmp_path / "erase.toml"
    cfg.write_text(f'family = "t2i"\nmethod = "ESD-x"\nconcept = "{concept}"\nmodel = "{tiny_pipeline_dir}"\n'
                   f'forget_prompts = "{forget}"\nretain_prompts = "{retain}"\noutput_dir = "{tmp_path / "runs"}"\n'
                   "evaluate = false\n[train]\nmax_steps = 1\n[t2i]\nimages_per_prompt = 1\nsample_steps = 2\n")
    for command in (["validate", str(cfg)], ["run", str(cfg), "--quiet"]):
        one_line_error(runner.invoke(app, command), f"the tokenizer does not know the concept '{concept}'")
    ok = cfg.read_text().replace(concept, "striped")
    forget.write_text("\n".join(p for p in tiny_prompts() if "striped" in p) + "\n")
    cfg.write_text(ok)
    assert runner.invoke(app, ["validate", str(cfg)]).exit_code == 0


def test_eval_of_a_run_folder_says_to_export_it_first(plain_run, tmp_path):
    forget = _write_qa(tmp_path / "forget.jsonl", tiny_items()[:2])
    retain = _write_qa(tmp_path / "retain.jsonl", tiny_items()[2:])
    one_line_error(runner.invoke(app, ["eval", str(plain_run), "--forget-file", forget, "--retain-file", retain,
                                       "--out", str(tmp_path / "eval.json"), "--quiet"]),
                   "is a run folder", f"obliviate export {plain_run} OUT")
    assert not (tmp_path / "eval.json").exists()
