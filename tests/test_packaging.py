"""Packaging and conventions: --version, -h and shell completion; `ls attacks` with each attack's options; a
family's missing extra is one line naming it; an export carries a model card and can be pushed to the Hub (no
network: huggingface_hub's calls are replaced); training curves go to TensorBoard or wandb when asked."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import one_line_error, tiny_items
from obliviate.cli import app

runner = CliRunner()
SRC = str(Path(__file__).resolve().parents[1] / "src")


# ---- the command line ----------------------------------------------------------------------------------------------

def test_version_and_short_help():
    from obliviate import __version__

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"obliviate {__version__}", r.output
    for args in (["-h"], ["ls", "-h"], ["world", "-h"], ["export", "-h"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0 and "Usage:" in r.output, (args, r.output)
    assert "--push-to-hub" in runner.invoke(app, ["export", "-h"]).output


def test_help_and_version_stay_instant():
    code = ("import sys; from typer.testing import CliRunner; from obliviate.cli import app; "
            "[CliRunner().invoke(app, a) for a in (['--help'], ['-h'], ['--version'], ['export', '-h'])]; "
            "print([m for m in ('torch', 'transformers', 'diffusers', 'huggingface_hub') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC}, capture_output=True,
                         text=True, check=True, timeout=120).stdout
    assert out.strip() == "[]", out


def _complete(words: str, cword: int) -> list[str]:
    """What bash completion offers (the protocol typer's --install-completion script speaks)."""
    env = {**os.environ, "PYTHONPATH": SRC, "_OBLIVIATE_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(cword)}
    code = "from obliviate.cli import app; app(prog_name='obliviate')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return out.stdout.split()


def test_shell_completion():
    assert runner.invoke(app, ["--help"]).output.count("-completion") == 2  # --install- and --show-completion
    assert _complete("obliviate ex", 1) == ["export"]
    assert _complete("obliviate ls att", 2) == ["attacks"]  # the kinds complete too
    assert "--push-to-hub" in _complete("obliviate export --p", 2)
    shown = runner.invoke(app, ["--show-completion", "bash"], prog_name="obliviate")
    assert shown.exit_code == 0 and "_OBLIVIATE_COMPLETE" in shown.output, shown.output


def test_ls_attacks_lists_every_option_with_its_default():
    from obliviate.registry import ATTACKS

    r = runner.invoke(app, ["ls", "attacks"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # the option lines are wrapped
    for entry in ATTACKS.values():
        after = text.split(f" {entry.name} ", 1)[1]
        for f in dataclasses.fields(entry.load().Config):
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = repr(value) if isinstance(value, str) else str(value)
            assert f"{f.name}={' '.join(shown.split())}" in after, (entry.name, f.name)
    assert "steps=10" in text and "lr=1e-05" in text  # relearn's, as its Config says


def test_ls_all_points_to_the_attack_options():
    r = runner.invoke(app, ["ls"])
    assert r.exit_code == 0 and "obliviate ls attacks" in r.output


# ---- extras ----------------------------------------------------------------------------------------------------------

def test_a_missing_extra_is_one_line_naming_it(monkeypatch, tmp_path):
    from obliviate.errors import ObliviateError
    from obliviate.families import get

    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails as if not installed
    with pytest.raises(ObliviateError, match=r"^diffusers is not installed: pip install 'obliviate\[t2i\]'$"):
        get("t2i").load("runner")
    cfg = tmp_path / "t2i.toml"
    cfg.write_text(f'family = "t2i"\nmethod = "ESD-x"\nconcept = "star"\noutput_dir = "{tmp_path / "runs"}"\n')
    one_line_error(runner.invoke(app, ["validate", str(cfg)]), "pip install 'obliviate[t2i]'")
    one_line_error(runner.invoke(app, ["world", "build", "canvas"]), "pip install 'obliviate[t2i]'")

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ObliviateError, match=r"pyarrow is not installed: pip install 'obliviate\[mllm\]'"):
        get("mllm").load("runner")
    get("lm").load("runner")  # the core install serves language models


def test_the_quantize_attacks_name_their_extra(monkeypatch):
    from obliviate.attacks.lm.quantize import QuantizeInt4, QuantizeConfig
    from obliviate.errors import ObliviateError

    QuantizeInt4(QuantizeConfig()).check(None)  # installed: nothing to say
    monkeypatch.setitem(sys.modules, "optimum", None)
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # as if never installed, though an earlier test imported it
    with pytest.raises(ObliviateError, match=r"optimum is not installed: pip install 'obliviate\[attacks\]'"):
        QuantizeInt4(QuantizeConfig()).check(None)


def test_config_reads_toml_through_tomli_where_tomllib_is_missing(monkeypatch, tmp_path):
    """Python 3.10 has no tomllib: the tomli package (a dependency there; tomllib is tomli taken into the standard
    library, so here tomllib stands in for it) parses the same files, and its errors are caught the same way."""
    try:
        import tomllib as parser  # novermin
    except ModuleNotFoundError:  # Python 3.10 itself
        import tomli as parser
    from obliviate.config import load_config
    from obliviate.errors import ObliviateError

    monkeypatch.setitem(sys.modules, "tomli", parser)
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` fails as on 3.10
    with pytest.raises(ImportError):
        import tomllib  # noqa: F401  # novermin
    cfg = tmp_path / "c.toml"
    cfg.write_text('method = "NPO"\n[train]\nlr = 2e-5\n')
    assert load_config(cfg).train.lr == 2e-5
    cfg.write_text('method = "NPO"\n[train\n')
    with pytest.raises(ObliviateError, match="malformed config"):
        load_config(cfg)


def test_extras_in_pyproject_cover_every_family():
    """Each family's `needs` are installed by its extra, and `make` installs them all."""
    try:
        import tomllib  # novermin
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    from obliviate.families import FAMILIES

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names = {e: {s.split(">")[0].split("[")[0].strip().lower() for s in specs} for e, specs in extras.items()}
    modules = {"diffusers": "diffusers", "torchmetrics": "torchmetrics", "pyarrow": "pyarrow",
               "optimum.quanto": "optimum-quanto", "tensorboard": "tensorboard", "wandb": "wandb"}
    for family in FAMILIES.values():
        for module in family.needs:
            assert modules[module] in names[family.extra], (family.name, module)
    core = {s.split(">")[0].strip().lower() for s in project["dependencies"]}
    assert not core & {"diffusers", "pyarrow", "optimum-quanto"}  # the core install serves language models
    assert "huggingface_hub" in core
    assert "all" in (root / "Makefile").read_text()


# ---- export: model card and the Hub --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def user_run(tmp_path_factory, tiny_lm_dir):
    """A language-model run on the user's own files, evaluated (its metrics go on the card)."""
    tmp = tmp_path_factory.mktemp("card")
    items = tiny_items()
    forget, retain = tmp / "forget.jsonl", tmp / "retain.jsonl"
    forget.write_text("\n".join(json.dumps({"question": i.question, "answer": i.answer}) for i in items[:2]) + "\n")
    retain.write_text("\n".join(json.dumps({"question": i.question, "answer": i.answer}) for i in items[2:]) + "\n")
    cfg = tmp / "run.yaml"
    cfg.write_text(f"method: NPO\nmodel: {tiny_lm_dir}\nforget_file: {forget}\nretain_file: {retain}\n"
                   f"output_dir: {tmp / 'runs'}\nname: npo\ntrain: {{max_steps: 2, lr: 0.001, batch_size: 2}}\n"
                   "method_args: {beta: 0.2}\n")
    r = runner.invoke(app, ["run", str(cfg), "--quiet"])
    assert r.exit_code == 0, r.output
    return tmp / "runs" / "npo", forget


def test_export_writes_a_model_card(user_run, tmp_path):
    from huggingface_hub import ModelCard

    from obliviate.bench.scorecard import cell
    from obliviate.registry import METRICS

    run_dir, forget = user_run
    r = runner.invoke(app, ["export", str(run_dir), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"obliviate", "machine-unlearning", "NPO"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local base: no Hub id to claim
    metrics = json.loads((run_dir / "metrics.json").read_text())
    text = card.text
    assert f"forgotten: forget file {forget.name}" in text and "method: **NPO**" in text
    assert str(forget.parent) not in text  # the user's folders stay off a published card
    assert "learning rate 0.001" in text and "2 steps" in text and "`beta = 0.2`" in text
    shown = [m for m in METRICS.values() if m.header and m.better and isinstance(metrics.get(m.name), (int, float))]
    assert {"forget_accuracy", "retain_accuracy"} <= {m.name for m in shown}
    assert "| metric | this model | original |" in text  # the original model's row beside the unlearned one's
    for m in shown:  # the run's own numbers, as the scorecard formats them, then the original's
        assert f"| {m.header} | {cell(metrics, m.name, m.fmt)} | {cell(metrics['original'], m.name, m.fmt)} |" \
            in text, m.name


def test_the_card_names_the_base_models_hub_id(user_run, tmp_path, tiny_lm_dir):
    import shutil

    from huggingface_hub import ModelCard

    from obliviate.api import export_run

    run_dir, _ = user_run
    base = tmp_path / "base"
    shutil.copytree(tiny_lm_dir, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": "example-org/tiny-llama"}))
    export_run(run_dir, tmp_path / "out", base=base)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "example-org/tiny-llama"
    assert "[example-org/tiny-llama](https://huggingface.co/example-org/tiny-llama)" in card.text


def test_push_to_hub_uploads_the_exported_folder(user_run, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, **kw: calls.append(("create_repo", kw)) or f"https://huggingface.co/{kw['repo_id']}")

    def upload_folder(self, **kw):
        calls.append(("upload_folder", {**kw, "files": sorted(os.listdir(kw["folder_path"]))}))
        return "https://huggingface.co/me/forgetful/commit/abc"
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    run_dir, _ = user_run
    out = tmp_path / "out"
    r = runner.invoke(app, ["export", str(run_dir), str(out), "--push-to-hub", "me/forgetful", "--private"])
    assert r.exit_code == 0, r.output
    assert "pushed it to https://huggingface.co/me/forgetful" in r.output
    (create, create_kw), (upload, upload_kw) = calls
    assert create == "create_repo" and create_kw == {"repo_id": "me/forgetful", "repo_type": "model",
                                                     "private": True, "exist_ok": True}
    assert upload == "upload_folder" and upload_kw["repo_id"] == "me/forgetful"
    assert Path(upload_kw["folder_path"]) == out and upload_kw["repo_type"] == "model"
    assert "README.md" in upload_kw["files"] and "config.json" in upload_kw["files"]
    assert "# me/forgetful" in (out / "README.md").read_text()


def test_a_failed_push_is_one_line_and_keeps_the_folder(user_run, tmp_path, monkeypatch):
    import huggingface_hub

    def refuse(self, **kw):
        raise OSError("401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create\nmore")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    run_dir, _ = user_run
    one_line_error(runner.invoke(app, ["export", str(run_dir), str(tmp_path / "out"), "--push-to-hub", "me/x"]),
                   "push to me/x failed: 401", "is kept")
    assert (tmp_path / "out" / "README.md").is_file()
    one_line_error(runner.invoke(app, ["export", str(run_dir), str(tmp_path / "out2"), "--push-to-hub", "no id"]),
                   "USER/NAME")
    assert not (tmp_path / "out2").exists()  # refused before any work


# ---- training curves -------------------------------------------------------------------------------------------------

def _config(tmp_path, **train):
    from obliviate.config import build_config

    return build_config({"method": "GradDiff", "output_dir": str(tmp_path / "runs"), "name": "curves",
                         "train": train})


def _steps():
    return [{"step": 0, "loss": 1.5, "forget_loss": 2.0, "note": "text"}, {"step": 1, "loss": 1.25, "forget_loss": 3.0}]


def test_report_to_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from obliviate import tracking

    lines = []
    with tracking.session(_config(tmp_path, report_to="tensorboard"), log=lines.append):
        for logs in _steps():
            tracking.log(logs)
    tracking.log({"step": 9, "loss": 0.0})  # outside a session: nothing
    folder = tmp_path / "runs" / "tensorboard" / "curves"
    assert lines == [f"TensorBoard: {folder} (tensorboard --logdir {folder.parent})"]
    events = EventAccumulator(str(folder))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/forget_loss", "train/loss"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(0, 1.5), (1, 1.25)]


def test_report_to_wandb_logs_each_step(tmp_path, monkeypatch):
    import types

    from obliviate import tracking

    logged, inits = [], []
    fake_run = types.SimpleNamespace(log=lambda data, step: logged.append((step, data)),
                                     finish=lambda: logged.append("finished"))
    fake = types.ModuleType("wandb")
    fake.__spec__ = types.SimpleNamespace(name="wandb")
    fake.init = lambda **kw: inits.append(kw) or fake_run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    config = _config(tmp_path, report_to=["wandb"])
    with tracking.session(config, log=lambda *_: None):
        for logs in _steps():
            tracking.log(logs)
    assert inits[0]["project"] == "my-project" and inits[0]["name"] == "curves"
    assert inits[0]["config"]["train"]["report_to"] == ["wandb"]
    assert logged == [(0, {"train/loss": 1.5, "train/forget_loss": 2.0}),
                      (1, {"train/loss": 1.25, "train/forget_loss": 3.0}), "finished"]


def test_report_to_a_missing_package_is_one_line(tmp_path, monkeypatch):
    from obliviate import tracking
    from obliviate.errors import ObliviateError

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ObliviateError, match=r"^wandb is not installed: pip install 'obliviate\[wandb\]'$"):
        with tracking.session(_config(tmp_path, report_to="wandb")):
            pass
    cfg = tmp_path / "c.toml"
    cfg.write_text('method = "GradDiff"\n[train]\nreport_to = "wandb"\n')
    one_line_error(runner.invoke(app, ["validate", str(cfg)]), "pip install 'obliviate[wandb]'")
    with pytest.raises(ObliviateError, match="train.report_to"):
        _config(tmp_path, report_to="mlflow")


def test_a_run_sends_its_steps_to_the_tracker(user_run, tmp_path, monkeypatch):
    """The loops hand every step's logs over: the tracker sees what history.json holds."""
    from obliviate import tracking

    seen = []
    monkeypatch.setattr(tracking._Session, "_open", lambda self: [types_writer(seen)])
    monkeypatch.setattr(tracking, "check", lambda config: None)
    run_dir, forget = user_run
    config = json.loads((run_dir / "config.json").read_text())
    config.update(name="tracked", evaluate=False)
    config["train"]["report_to"] = "tensorboard"
    cfg = tmp_path / "tracked.json"
    cfg.write_text(json.dumps(config))
    r = runner.invoke(app, ["run", str(cfg), "--quiet"])
    assert r.exit_code == 0, r.output
    history = json.loads((Path(config["output_dir"]) / "tracked" / "history.json").read_text())
    assert len(history) == 2 and seen == [(h["step"], h["loss"]) for h in history]


def types_writer(seen: list):
    import types

    return types.SimpleNamespace(write=lambda scalars, step: seen.append((step, scalars["loss"])), close=lambda: None)
