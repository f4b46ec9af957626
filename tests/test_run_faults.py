"""Nothing lost at the run level: a taken name fails before any work, two runs of one name never both succeed, a
changed or foreign base is refused by export, cut items are counted, per-item files are strict JSON, and an
interrupted run resumes from its checkpoint to the metrics of an uninterrupted one."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_profiles_config
from obliviate.cli import app
from obliviate.config import load_config

runner = CliRunner()
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    cfg = tiny_profiles_config(root, max_steps=6)
    from obliviate.worlds.profiles import ProfilesWorld
    ProfilesWorld(load_config(cfg).world).build("forget10", retrain=True, log=lambda *a: None)
    return root, cfg


def test_a_taken_name_fails_before_the_world_is_built(tmp_path):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"method: NPO\nname: taken\noutput_dir: {tmp_path / 'runs'}\nworld: {{cache_dir: "
                   f"{tmp_path / 'cache'}}}\n")
    r = runner.invoke(app, ["run", str(cfg), "--quiet"])
    assert r.exit_code == 2 and "run folder already exists" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "cache").exists()  # no world was built, no model trained
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["taken"]


@pytest.mark.slow  # two whole runs racing: about 15 s on 2 cores
def test_two_runs_of_the_same_name_at_once_never_both_succeed(world):
    root, cfg = world
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "obliviate.cli", "run", str(cfg), "--quiet", "name=twin", "evaluate=false"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "twin" in loser and ("another run" in loser or "already exists" in loser), loser
    run = root / "runs" / "twin"
    assert {"config.json", "metrics.json", "changed.safetensors", "report.html"} <= {p.name for p in run.iterdir()}
    assert not list((root / "runs").glob(".twin*"))


def _run(world, name, *overrides):
    root, cfg = world
    r = runner.invoke(app, ["run", str(cfg), "--quiet", f"name={name}", *overrides])
    assert r.exit_code == 0, r.output
    return root / "runs" / name


@pytest.mark.slow  # 4-8 s: the default suite took 337 s on CI, over its 5 minutes
def test_export_refuses_a_base_that_changed_or_has_another_shape(world, tmp_path):
    from obliviate.worlds.profiles import ProfilesWorld

    root, cfg = world
    run_dir = _run(world, "export-base", "evaluate=false")
    env = json.loads((run_dir / "environment.json").read_text())
    base = Path(env["base_model"])
    assert base.is_absolute() and "model.safetensors" in env["base_weights_sha256"]
    # from another working directory, the recorded absolute path still finds the base
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = runner.invoke(app, ["export", str(run_dir), "full"])
    finally:
        os.chdir(here)
    assert r.exit_code == 0, r.output
    # a copy of the base whose weights changed is refused, naming the file
    changed_base = tmp_path / "changed-base"
    shutil.copytree(base, changed_base)
    from safetensors.torch import load_file, save_file
    state = load_file(str(changed_base / "model.safetensors"))
    first = sorted(state)[0]
    state[first] = state[first] + 1
    save_file(state, str(changed_base / "model.safetensors"), metadata={"format": "pt"})
    r = runner.invoke(app, ["export", str(run_dir), str(tmp_path / "out1"), "--base", str(changed_base)])
    assert r.exit_code == 2 and "model.safetensors changed since the run" in r.stderr, r.output
    assert not (tmp_path / "out1").exists()
    # a run whose record has no hashes (made before they were kept) with a base of another shape: one line
    other = ProfilesWorld(load_config(cfg, ["world.model.hidden_size=48"]).world)
    other.build("forget10", retrain=False, log=lambda *a: None)
    env.pop("base_weights_sha256")
    (run_dir / "environment.json").write_text(json.dumps(env))
    r = runner.invoke(app, ["export", str(run_dir), str(tmp_path / "out2"), "--base", str(other.full_model_dir)])
    assert r.exit_code == 2 and "has shape" in r.stderr and "wrong --base" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out2").exists()
    # a torn changed.safetensors: one line
    (run_dir / "changed.safetensors").write_bytes(b"\x00garbage")
    r = runner.invoke(app, ["export", str(run_dir), str(tmp_path / "out3"), "--base", str(base)])
    assert r.exit_code == 2 and "not a readable safetensors file" in r.stderr, r.output


@pytest.mark.slow  # ~9 s: kept out of the 5-minute default suite; CI runs it
def test_per_item_values_are_strict_json(world):
    run_dir = _run(world, "strict")

    def refuse(constant):
        raise AssertionError(f"bare {constant} in per_item.json")

    per_item = json.loads((run_dir / "per_item.json").read_text(), parse_constant=refuse)
    assert per_item and json.loads((run_dir / "metrics.json").read_text(), parse_constant=refuse)


def test_items_longer_than_the_context_are_counted_and_recorded(tiny_lm_dir, tmp_path):
    from conftest import tiny_items

    items = tiny_items()
    long = items[0].answer + " " + " ".join(["rivers and bread"] * 80)  # far beyond the tiny model's 128 positions
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    forget.write_text("\n".join(json.dumps({"question": i.question, "answer": a}) for i, a in
                                ((items[0], long), (items[1], items[1].answer))))
    retain.write_text("\n".join(json.dumps({"question": i.question, "answer": i.answer}) for i in items[2:]))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"method: GradDiff\nmodel: {tiny_lm_dir}\nforget_file: {forget}\nretain_file: {retain}\n"
                   f"output_dir: {tmp_path / 'runs'}\nname: cut\nevaluate: false\ntrain: {{max_steps: 1}}\n")
    with pytest.warns(UserWarning, match="longer than the model's context"):
        r = runner.invoke(app, ["run", str(cfg), "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "runs" / "cut" / "metrics.json").read_text())["truncated_items"] == 1


@pytest.mark.slow  # two world runs, ~10 s (kept out of the 5-minute default suite; CI runs it); the text-to-image resume stays in it
def test_an_interrupted_run_resumes_to_the_metrics_of_an_uninterrupted_one(world, monkeypatch):
    from obliviate.loops import lm as loop
    from obliviate.runners import run

    root, cfg = world
    settings = ["train.checkpoint_every=2", "method=NPO"]
    whole = _run(world, "whole", *settings)

    real_step = loop.gradient_step

    def killed_at_step_4(*args, **kwargs):
        if args[7] == 4:  # the step number
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    config = load_config(cfg, [*settings, "name=resumed"])
    monkeypatch.setattr(loop, "gradient_step", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(config, log=lambda *a: None)
    monkeypatch.setattr(loop, "gradient_step", real_step)
    checkpoint = root / "runs" / ".resumed.checkpoint"
    assert (checkpoint / "state.pt").is_file() and not (root / "runs" / "resumed").exists()
    assert torch.load(checkpoint / "state.pt", weights_only=True)["next_step"] == 4
    r = runner.invoke(app, ["run", str(cfg), "--quiet", *settings, "name=resumed"])
    assert r.exit_code == 2 and "--resume" in r.stderr  # a checkpoint is never silently ignored
    steps_taken = []

    def counted(*args, **kwargs):
        steps_taken.append(args[7])
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "gradient_step", counted)
    resumed = run(config, log=lambda *a: None, resume=True)
    monkeypatch.setattr(loop, "gradient_step", real_step)
    assert steps_taken == [4, 5]  # it went on from the checkpoint, not from the start
    assert not checkpoint.exists()

    def without_timings(path):
        return {k: v for k, v in json.loads(path.read_text()).items() if not k.endswith("_seconds")}

    assert without_timings(resumed / "metrics.json") == without_timings(whole / "metrics.json")
    assert json.loads((resumed / "history.json").read_text()) == json.loads((whole / "history.json").read_text())
    # a checkpoint of other settings is refused
    config = load_config(cfg, [*settings, "name=other", "train.lr=0.01"])
    monkeypatch.setattr(loop, "gradient_step", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(config, log=lambda *a: None)
    monkeypatch.setattr(loop, "gradient_step", real_step)
    r = runner.invoke(app, ["run", str(cfg), "--quiet", *settings, "name=other", "--resume"])
    assert r.exit_code == 2 and "checkpoint of a run with other settings" in r.stderr, r.output


def test_an_unwritable_output_fails_before_the_world_is_built(tmp_path, monkeypatch):
    import errno

    from obliviate import runs

    def read_only(folder):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(runs, "_probe_write", read_only)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"method: NPO\nname: r\noutput_dir: {tmp_path / 'runs'}\nworld: {{cache_dir: {tmp_path / 'cache'}}}\n")
    r = runner.invoke(app, ["run", str(cfg), "--quiet"])
    assert r.exit_code == 2 and "cannot write to" in r.stderr and "Read-only file system" in r.stderr, r.output
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()  # nothing built, nothing left


@pytest.mark.parametrize("method", ["ESD-x", "SPM"])  # SPM: the adapter's parameters, added by the method, resume too
def test_an_interrupted_erasure_resumes_to_the_same_tensors(tiny_pipeline_dir, tmp_path, monkeypatch, method):
    from safetensors.torch import load_file

    from conftest import tiny_prompts
    from obliviate.config import build_config
    from obliviate.loops import t2i as loop
    from obliviate.runners import run

    forget, retain = tmp_path / "forget.txt", tmp_path / "retain.txt"
    forget.write_text("\n".join(p for p in tiny_prompts() if "striped" in p))
    retain.write_text("\n".join(p for p in tiny_prompts() if "striped" not in p))

    def config(name):
        return build_config({"family": "t2i", "method": method, "concept": "striped", "model": str(tiny_pipeline_dir),
                             "forget_prompts": str(forget), "retain_prompts": str(retain), "evaluate": False,
                             "output_dir": str(tmp_path / "runs"), "name": name,
                             "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 2},
                             "t2i": {"images_per_prompt": 1, "sample_steps": 2}})

    whole = run(config("whole"), log=lambda *a: None)
    real_step = loop.gradient_step

    def killed_at_step_3(*args, **kwargs):
        if args[7] == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "gradient_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(config("resumed"), log=lambda *a: None)
    taken = []

    def counted(*args, **kwargs):
        taken.append(args[7])
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "gradient_step", counted)
    resumed = run(config("resumed"), log=lambda *a: None, resume=True)
    assert taken == [2, 3]
    a, b = load_file(str(whole / "changed.safetensors")), load_file(str(resumed / "changed.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "history.json").read_text()) == json.loads((whole / "history.json").read_text())
