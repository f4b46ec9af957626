"""The run routine every family shares (runners/common.py) and the method contract: every family's run records what
the others record (truncated items, the CPU capability and threads), finishes its processes, and takes the retrain
reference as a run kind of its own (`method = "Retrain"`, `method_args = {seed = S}`), never as a method. The worlds
are stubbed here: the runs read a stub world's reference folders, so no world is built."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import one_line_error, tiny_items, tiny_prompts, tiny_task
from obliviate.cli import app
from obliviate.config import build_config
from obliviate.errors import ObliviateError

SRC = Path(__file__).resolve().parents[1] / "src" / "obliviate"


class StubWorld:
    """A built world's reference folders: `retrain_dir(target)` is seed 0's; `ensure_retrain(target, seed)` records
    what it was asked and returns the folder of that seed."""

    def __init__(self, seed0: Path, other: Path):
        self.seed0, self.other, self.asked = seed0, other, []

    def retrain_dir(self, target, seed=0):
        assert seed == 0
        return self.seed0

    def ensure_retrain(self, target, seed=0, log=print):
        self.asked.append((target, seed))
        return self.other


def _quiet(*_):
    pass


def _stub_lm(monkeypatch, world):
    import obliviate.runners.lm as runner

    items = tiny_items()
    monkeypatch.setattr(runner, "prepare", lambda config, log: (
        Path("unused"), items[:2], items[2:], ({}, {}, None, config.split), world))


def _stub_mllm(monkeypatch, world):
    import obliviate.runners.mllm as runner

    picture = np.zeros((32, 32, 3), np.uint8)
    monkeypatch.setattr(runner, "prepare", lambda config, log: (
        Path("unused"), [], [], {}, lambda _: picture, f"portraits {config.split}", world, {}))


def _stub_t2i(monkeypatch, world):
    import obliviate.runners.t2i as runner

    monkeypatch.setattr(runner, "prepare", lambda config, log: (Path("unused"), tiny_task(config.concept), world))


@pytest.mark.parametrize("family", ["lm", "mllm", "t2i"])
def test_retrain_seed_s_runs_the_worlds_reference_of_that_seed(family, tmp_path, monkeypatch, tiny_lm_dir, llava_dir,
                                                               tiny_pipeline_dir):
    """Seed 0 is the world's reference folder as built; seed S > 0 is `ensure_retrain(target, S)`'s. Either is the
    run's model as it is: the run records that folder as its base, and no tensor changed."""
    folder = {"lm": tiny_lm_dir, "mllm": llava_dir, "t2i": tiny_pipeline_dir}[family]
    world = StubWorld(folder, folder)
    {"lm": _stub_lm, "mllm": _stub_mllm, "t2i": _stub_t2i}[family](monkeypatch, world)
    from obliviate.runners import run

    target = {"concept": "striped"} if family == "t2i" else {"split": "forget10"}
    settings = {"family": family, "method": "Retrain", "evaluate": False, "output_dir": str(tmp_path), **target}
    out = run(build_config({**settings, "name": "seed0"}), log=_quiet)
    assert world.asked == []  # seed 0: the reference the world's build made
    out1 = run(build_config({**settings, "name": "seed1", "method_args": {"seed": 1}}), log=_quiet)
    assert world.asked == [(target.get("split", "striped"), 1)]
    for folder_out in (out, out1):
        metrics = json.loads((folder_out / "metrics.json").read_text())
        assert metrics["method"] == "Retrain" and metrics["status"] == "completed"
        assert metrics["unlearn_seconds"] == 0 and json.loads((folder_out / "history.json").read_text()) == []
        assert json.loads((folder_out / "environment.json").read_text())["base_model"] == str(folder.resolve())
        assert load_file(str(folder_out / "changed.safetensors")) == {}  # export gives the reference as it is
    assert json.loads((out1 / "config.json").read_text())["method_args"] == {"seed": 1}


def test_a_retrain_seed_run_is_evaluated_against_the_seed_0_reference(tmp_path, monkeypatch, tiny_lm_dir):
    """A reference of another seed is scored like an unlearned model: against the seed-0 reference's evaluation, with
    the seed-0 model as the membership-inference reference (seed 0 itself has none: it would be its own)."""
    import obliviate.runners.lm as runner

    import shutil

    other = tmp_path / "seed1"
    shutil.copytree(tiny_lm_dir, other)
    world = StubWorld(tiny_lm_dir, other)
    _stub_lm(monkeypatch, world)
    seen = {}
    monkeypatch.setattr(runner, "retrain_evaluation", lambda *a, **k: {"aggregate": {}})
    monkeypatch.setattr(runner, "original_evaluation", lambda *a, **k: {"aggregate": {"model_utility": 1.0}})

    def evaluation(model, tokenizer, qa_sets, texts, eval_config, reference_model=None, roles=None, sharded=False,
                   harness=None):
        seen.setdefault("references", []).append(reference_model)
        return {"aggregate": {"model_utility": 0.5}, "per_item": {}, "config": {"processes": 1}}
    monkeypatch.setattr(runner, "evaluation_of", evaluation)
    import obliviate.evals.evaluate as evaluate
    monkeypatch.setattr(evaluate, "compare_to_retrain", lambda e, r: e)
    from obliviate.runners import run

    settings = {"method": "Retrain", "split": "forget10", "output_dir": str(tmp_path / "runs")}
    run(build_config({**settings, "name": "s0"}), log=_quiet)
    out = run(build_config({**settings, "name": "s1", "method_args": {"seed": 1}}), log=_quiet)
    assert seen["references"][0] is None and seen["references"][1] is not None
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_utility"] == 0.5 and metrics["utility_ratio"] == 0.5 and "original" in metrics


def test_the_retrain_reference_is_no_method(tmp_path):
    from obliviate.methods.common import make_method
    from obliviate.runners.common import reference_seed

    with pytest.raises(ObliviateError, match="retrain reference, not a method"):
        make_method("lm", "Retrain")
    with pytest.raises(ObliviateError, match="unknown family"):
        make_method("audio", "NPO")
    assert type(make_method("mllm", "npo")).__name__ == "NPO"  # one function for every family, names as `run` takes
    assert make_method("t2i", "ESD-x", {"eta": 2.0}).config.eta == 2.0
    config = build_config({"method": "retrain", "method_args": {"seed": 3}})
    assert config.method == "Retrain" and reference_seed(config) == 3
    assert reference_seed(build_config({"method": "NPO"})) is None
    for args, message in [({"seeds": 1}, "unknown key"), ({"seed": -1}, "seed must be an integer >= 0"),
                          ({"seed": 1.5}, "seed must be an integer >= 0")]:
        with pytest.raises(ObliviateError, match=message):
            reference_seed(build_config({"method": "Retrain", "method_args": args}))
    # obliviate ls lists it with the methods, marked as the reference
    listed = CliRunner().invoke(app, ["ls", "t2i-methods"]).output
    assert "Retrain (reference)" in listed and "not a method" in listed


def test_a_retrain_run_on_your_own_model_fails_in_one_line(tmp_path, tiny_pipeline_dir, llava_dir):
    forget, retain = tmp_path / "forget.txt", tmp_path / "retain.txt"
    forget.write_text("\n".join(p for p in tiny_prompts() if "striped" in p) + "\n")
    retain.write_text("\n".join(p for p in tiny_prompts() if "striped" not in p) + "\n")
    t2i = tmp_path / "t2i.toml"
    t2i.write_text(f'family = "t2i"\nmethod = "Retrain"\nconcept = "striped"\nmodel = "{tiny_pipeline_dir}"\n'
                   f'forget_prompts = "{forget}"\nretain_prompts = "{retain}"\noutput_dir = "{tmp_path}"\n')
    one_line_error(CliRunner().invoke(app, ["validate", str(t2i)]), "Retrain needs a built-in world (canvas)")
    one_line_error(CliRunner().invoke(app, ["run", str(t2i), "--quiet"]), "Retrain needs a built-in world")
    mllm = tmp_path / "mllm.toml"
    mllm.write_text(f'family = "mllm"\nmethod = "Retrain"\nmodel = "{llava_dir}"\nmllmu_dir = "{tmp_path}"\n'
                    f'output_dir = "{tmp_path}"\n')
    one_line_error(CliRunner().invoke(app, ["run", str(mllm), "--quiet"]), "Retrain needs a built-in world",
                   "retrain_model")
    assert not list(tmp_path.glob("*-Retrain-*"))  # refused before any run folder was claimed


def test_a_vision_language_run_records_truncated_items(tmp_path, llava_dir):
    from test_mllm_family import _profile, write_mllmu

    from obliviate.runners import run

    long = _profile(0)
    long["answer"] = " ".join(["This person is a poet and a nurse."] * 120)  # beyond the 512 positions the loop keeps
    rows = {"forget_10": [long, _profile(1)], "retain_90": [_profile(i) for i in range(2, 6)],
            "Retain_Set": [_profile(i) for i in (10, 11)], "Test_Set": [_profile(0, test=True), _profile(1, True)]}
    config = build_config({"family": "mllm", "method": "GradDiff", "model": str(llava_dir),
                           "mllmu_dir": str(write_mllmu(tmp_path / "mllmu", rows)), "split": "forget10",
                           "train": {"max_steps": 1, "batch_size": 2}, "evaluate": False,
                           "output_dir": str(tmp_path / "runs"), "name": "cut"})
    with pytest.warns(UserWarning, match="longer than the model's context"):
        out = run(config, log=_quiet)
    assert json.loads((out / "metrics.json").read_text())["truncated_items"] == 1


def test_a_text_to_image_run_finishes_its_processes_and_records_the_cpu(tmp_path, tiny_pipeline_dir, monkeypatch):
    import torch

    from obliviate import distributed
    from obliviate.runners import run

    finished = []
    monkeypatch.setattr(distributed, "finish", lambda: finished.append(True))
    forget, retain = tmp_path / "forget.txt", tmp_path / "retain.txt"
    forget.write_text("\n".join(p for p in tiny_prompts() if "striped" in p) + "\n")
    retain.write_text("\n".join(p for p in tiny_prompts() if "striped" not in p) + "\n")
    out = run(build_config({"family": "t2i", "method": "UCE", "concept": "striped", "model": str(tiny_pipeline_dir),
                            "forget_prompts": str(forget), "retain_prompts": str(retain), "evaluate": False,
                            "output_dir": str(tmp_path / "runs"), "name": "uce"}), log=_quiet)
    assert finished == [True]
    environment = json.loads((out / "environment.json").read_text())
    assert environment["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert environment["threads"] == torch.get_num_threads() and "torch" in environment["versions"]


def test_the_method_hooks_are_declared_on_the_base_classes():
    """The loops call the optional hooks directly: each base class declares them with a default that changes nothing,
    and no loop or runner probes a method with getattr/hasattr."""
    from obliviate.methods.lm.base import Method
    from obliviate.methods.t2i.base import DiffusionMethod

    m, batch = Method(), {"input_ids": None}
    assert m.companions([], [], None) is None and m.select_forget(None, batch) is batch
    assert m.fit(None, [], iter(()), iter(())) is None and m.combine_gradients is None
    assert DiffusionMethod().text_encoder_trainable("x", None) is False
    for base in (m, DiffusionMethod()):  # the world's material (AltPO's alternates = "world"): none by default
        assert base.needs_world is False and base.from_world(None) is None
    for folder in ("loops", "runners"):
        for path in (SRC / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr"):
                    probed = node.args[0]
                    assert not (isinstance(probed, ast.Name) and probed.id == "method"), \
                        f"{path.name}:{node.lineno} probes the method"
