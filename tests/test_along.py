"""Evaluation along the way (`train.eval_every`, runners/along.py): a run evaluates its model before the first step,
every eval_every optimiser steps and after the last, and writes evaluations.json ([{"step", "epoch", "metrics"}],
metrics.json's aggregate keys); the evaluations change nothing of the training (the same changed tensors and
metrics as a run without them), for the language-model loop (which the vision-language family runs) and the
text-to-image loop."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_items
from obliviate.config import LMTrainConfig, TrainConfig, build_config
from obliviate.errors import ObliviateError

TIMINGS = ("unlearn_seconds", "eval_seconds")


def _untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMINGS}


def _jsonl(path: Path, items) -> str:
    path.write_text("\n".join(json.dumps({"question": i.question, "answer": i.answer,
                                          "paraphrased_answer": i.paraphrased_answer,
                                          "perturbed_answer": list(i.perturbed_answers)}) for i in items))
    return str(path)


def test_the_loop_evaluates_at_0_every_n_and_the_last_step_without_changing_the_training(tiny_lm_dir):
    """An evaluation that draws random numbers (torch, Python, NumPy) and sets the model to training mode leaves the
    trajectory as it was: the same tensors as a loop without it; it sees the model in evaluation mode."""
    from obliviate.loops.lm import unlearn
    from obliviate.models.causal_lm import load

    def run(on_eval):
        model, tok = load(tiny_lm_dir)
        model.config.attention_dropout = 0.3  # dropout draws from torch's generator at every training step
        for m in model.modules():
            if hasattr(m, "attention_dropout"):
                m.attention_dropout = 0.3
        result = unlearn(model, tok, tiny_items()[:2], tiny_items()[2:], "NPO",
                         TrainConfig(max_steps=5, batch_size=1, lr=1e-2, eval_every=2), on_eval=on_eval)
        return {n: p.detach().clone() for n, p in result.model.named_parameters()}, result.history

    seen = []

    def greedy(step, epoch, model):  # a careless evaluation
        seen.append((step, epoch, model.training))
        torch.rand(10), random.random(), np.random.rand()
        model.train()

    plain, plain_history = run(None)
    along, along_history = run(greedy)
    assert seen == [(0, 0.0, False), (2, 1.0, False), (4, 2.0, False), (5, 2.5, False)]
    assert along_history == plain_history
    assert all(torch.equal(plain[n], along[n]) for n in plain)
    assert any(not torch.equal(plain[n], load(tiny_lm_dir)[0].state_dict()[n]) for n in plain)  # it trained


@pytest.mark.slow  # 10-70 s on 2 cores (alone / shared): two runs, one evaluated five times
def test_a_language_model_run_writes_its_evaluations_and_the_same_final_numbers(chat_lm_dir, chat_retrain_dir,
                                                                                 tmp_path):
    from obliviate.runners import run

    items = tiny_items()
    base = {"method": "GradDiff", "model": str(chat_lm_dir), "retrain_model": str(chat_retrain_dir),
            "forget_file": _jsonl(tmp_path / "forget.jsonl", items[:2]),
            "retain_file": _jsonl(tmp_path / "retain.jsonl", items[2:]),
            "output_dir": str(tmp_path / "runs"), "world": {"cache_dir": str(tmp_path / "cache")},
            "eval": {"batch_size": 8}}
    folders = {}
    for name, every in (("plain", None), ("along", 2)):
        config = build_config({**base, "name": name, "train": {"max_steps": 3, "batch_size": 1, "lr": 1e-2,
                                                               "eval_every": every}})
        folders[name] = run(config, log=lambda *_: None)
    plain, along = folders["plain"], folders["along"]
    assert not (plain / "evaluations.json").exists()
    assert (plain / "changed.safetensors").read_bytes() == (along / "changed.safetensors").read_bytes()
    metrics = json.loads((along / "metrics.json").read_text())
    assert _untimed(metrics) == _untimed(json.loads((plain / "metrics.json").read_text()))
    evaluations = json.loads((along / "evaluations.json").read_text())
    assert [(e["step"], e["epoch"]) for e in evaluations] == [(0, 0.0), (2, 1.0), (3, 1.5)]
    for e in evaluations:  # metrics.json's top-level aggregate keys, compared to the retrain reference
        assert set(e["metrics"]) <= set(metrics) and {"forget_quality", "model_utility", "utility_ratio"} <= set(
            e["metrics"])
    first, last = evaluations[0]["metrics"], evaluations[-1]["metrics"]
    assert first["utility_ratio"] == 1.0 and first["model_utility"] == metrics["original"]["model_utility"]
    assert last == {k: metrics[k] for k in last}  # the last step's model is the run's model
    assert first["forget_quality"] != last["forget_quality"] or first["model_utility"] != last["model_utility"]


def test_the_text_to_image_loop_evaluates_along_the_way_without_changing_the_training(tiny_pipeline_dir):
    from conftest import tiny_task
    from obliviate.loops.t2i import changed_pipeline_tensors, erase
    from obliviate.models.diffusion import load_pipeline

    seen = []

    def greedy(step, epoch, pipe):
        seen.append((step, epoch, pipe.unet.training))
        torch.rand(3), random.random(), np.random.rand()
        pipe.unet.train()

    tensors = []
    for on_eval in (None, greedy):
        result = erase(load_pipeline(tiny_pipeline_dir), tiny_task(), "ESD-x",
                       TrainConfig(max_steps=3, batch_size=2, lr=1e-2, eval_every=2), images_per_prompt=1,
                       sample_steps=2, on_eval=on_eval)
        tensors.append(changed_pipeline_tensors(result))
    assert seen == [(0, 0.0, False), (2, 4 / 3, False), (3, 2.0, False)]  # 3 forget images, 2 a step
    assert tensors[0].keys() == tensors[1].keys() and all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


def test_evaluations_json_holds_each_step_with_its_finished_metrics(tmp_path):
    from obliviate.runners.along import Along

    along = Along(lambda model, scale: {"aggregate": {"score": model * scale}, "per_item": []})
    on_eval = along.bind(10)
    for step, model in ((0, 1.0), (2, 0.5), (3, 0.25)):
        on_eval(step, step / 3, model)
    along.write(tmp_path, lambda evaluation: {**evaluation["aggregate"], "ratio": evaluation["aggregate"]["score"] / 10})
    assert json.loads((tmp_path / "evaluations.json").read_text()) == [
        {"step": 0, "epoch": 0.0, "metrics": {"score": 10.0, "ratio": 1.0}},
        {"step": 2, "epoch": 0.6667, "metrics": {"score": 5.0, "ratio": 0.5}},
        {"step": 3, "epoch": 1.0, "metrics": {"score": 2.5, "ratio": 0.25}}]
    Along(lambda model: {}).write(tmp_path / "none")  # a method without steps: no file
    assert not (tmp_path / "none" / "evaluations.json").exists()


def test_a_canvas_run_evaluates_along_the_way_as_it_evaluates_at_the_end(monkeypatch):
    """The canvas world's evaluation (`evaluate_erasure`, stubbed here: a world is hours of CPU), its numbers kept
    without its images."""
    from obliviate.evals import canvas
    from obliviate.runners.t2i import t2i_along

    calls = []

    def evaluate_erasure(world, pipe, concept, t2i, label):
        calls.append((world, pipe, concept, t2i.eval_seeds, label))
        return {"aggregate": {"ua": 0.5}, "per_item": [{"image": 1}], "grid": object()}
    monkeypatch.setattr(canvas, "evaluate_erasure", evaluate_erasure)
    config = build_config({"family": "t2i", "method": "ESD-x", "concept": "star", "train": {"eval_every": 3}})
    along = t2i_along(config, "world", None, None, "cpu")
    along.bind()(0, 0.0, "pipe")
    assert calls == [("world", "pipe", "star", config.t2i.eval_seeds, "ESD-x")]
    assert along.entries == [(0, 0.0, {"aggregate": {"ua": 0.5}})]
    assert t2i_along(build_config({"family": "t2i", "method": "ESD-x", "concept": "star"}), "world", None, None, "cpu") is None


def test_evaluation_along_the_way_is_refused_with_several_processes(tiny_lm, monkeypatch):
    from obliviate import distributed
    from obliviate.loops.lm import unlearn

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "setup", lambda: None)
    model, tok = tiny_lm
    with pytest.raises(ObliviateError, match=r"^train.eval_every: evaluation along the way runs in one process, not "
                                             r"in 2 \(torchrun"):
        unlearn(model, tok, tiny_items()[:2], tiny_items()[2:], "GradDiff", TrainConfig(max_steps=1, eval_every=1))
    from obliviate import sharding
    with pytest.raises(ObliviateError, match='^train.shard = "fsdp" with train.eval_every is not supported'):
        sharding.check(LMTrainConfig(shard="fsdp", eval_every=1))  # `obliviate validate` says it before any work


@pytest.mark.slow  # two CLI runs with evaluations: 4-11 s
def test_a_text_to_image_run_writes_its_evaluations_and_the_same_final_numbers(tiny_pipeline_dir, tmp_path):
    from test_t2i_runs import _config
    from typer.testing import CliRunner

    from obliviate.cli import app

    folders = {}
    for name, every in (("plain", None), ("along", 1)):
        root = tmp_path / name
        root.mkdir()
        cfg = _config(root, tiny_pipeline_dir, "ESD-x", eval_prompts=1)
        if every:
            cfg.write_text(cfg.read_text().replace("[train]\n", f"[train]\neval_every = {every}\n"))
        result = CliRunner().invoke(app, ["run", str(cfg), "--quiet"])
        assert result.exit_code == 0, result.output
        folders[name] = root / "runs" / "r1"
    plain, along = folders["plain"], folders["along"]
    assert (plain / "changed.safetensors").read_bytes() == (along / "changed.safetensors").read_bytes()
    metrics = json.loads((along / "metrics.json").read_text())
    assert _untimed(metrics) == _untimed(json.loads((plain / "metrics.json").read_text()))
    evaluations = json.loads((along / "evaluations.json").read_text())
    assert [e["step"] for e in evaluations] == [0, 1, 2]
    assert all(set(e["metrics"]) <= set(metrics) for e in evaluations)
    last = evaluations[-1]["metrics"]  # the last step's pipeline is the run's
    numbers = {k for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numbers and {k: last[k] for k in numbers} == {k: metrics[k] for k in numbers}


@pytest.mark.slow  # 10-50 s on 2 cores (alone / shared): two runs, seven MLLMU-Bench evaluations
def test_a_vision_language_run_writes_its_evaluations_and_the_same_final_numbers(tmp_path):
    from test_mllm_family import _profile, write_mllmu
    from vlm_models import tiny_llava

    from obliviate.runners import run
    from obliviate.worlds.portraits import portraits_data

    llava = tiny_llava(tmp_path / "llava", portraits_data(10, 2, 2, seed=0))
    mllmu = write_mllmu(tmp_path / "mllmu", {"forget_10": [_profile(0), _profile(1)],
                                             "retain_90": [_profile(2), _profile(3)],
                                             "Retain_Set": [_profile(10)],
                                             "Test_Set": [_profile(0, test=True), _profile(1, test=True)]})
    folders = {}
    for name, every in (("plain", None), ("along", 1)):
        config = build_config({"family": "mllm", "method": "GradDiff", "model": str(llava), "mllmu_dir": str(mllmu),
                               "retrain_model": str(llava), "mllm": {"train_parts": "all", "max_new_tokens": 2},
                               "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-2, "eval_every": every},
                               "world": {"cache_dir": str(tmp_path / "cache")}, "output_dir": str(tmp_path / "runs"),
                               "name": name})
        folders[name] = run(config, log=lambda *_: None)
    plain, along = folders["plain"], folders["along"]
    assert (plain / "changed.safetensors").read_bytes() == (along / "changed.safetensors").read_bytes()
    metrics = json.loads((along / "metrics.json").read_text())
    assert _untimed(metrics) == _untimed(json.loads((plain / "metrics.json").read_text()))
    evaluations = json.loads((along / "evaluations.json").read_text())
    assert [(e["step"], e["epoch"]) for e in evaluations] == [(0, 0.0), (1, 1.0), (2, 2.0)]
    last = evaluations[-1]["metrics"]
    assert "forget_quality" in last and last == {k: metrics[k] for k in last}
    assert evaluations[0]["metrics"]["forget_classification_image"] == metrics["original"][
        "forget_classification_image"]
