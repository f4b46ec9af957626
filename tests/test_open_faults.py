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
