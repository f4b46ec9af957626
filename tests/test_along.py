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
from obliviate.config import TrainConfig, build_config
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
    numbers = {k for k, v in metrics.items() if isinstance(v, (int, float)) and k not in TIMINGS}
    assert numbers and all(set(e["metrics"]) <= set(metrics) for e in evaluations)
    assert {k: evaluations[-1]["metrics"][k] for k in numbers if k in evaluations[-1]["metrics"]} == {
        k: metrics[k] for k in numbers if k in evaluations[-1]["metrics"]}
