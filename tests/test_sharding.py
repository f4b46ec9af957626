"""Sharded training (train.shard = "fsdp", PyTorch FSDP2): 2 processes (torchrun, gloo on CPU) holding half of every
parameter, gradient and AdamW state take the same steps as 1 unsharded process on the same global batch, for a
token-mean loss (GradDiff), a sequence-mean loss with a sharded reference model (NPO) and the restricted gradient,
whose dot products and norms are summed over the shards (RGD); `obliviate run` under torchrun writes one run folder;
what sharding cannot go with is refused in one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent


def _torchrun(*args, env=None):
    return subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("method,batch", [("GradDiff", 4), ("NPO", 4), ("RGD", 4),
                                          # uneven: 4 forget items in batches of 3 split 2 + 1, then a tail of 1 that
                                          # leaves the second process no item (it still takes part in every gather)
                                          ("NPO", 3), ("RGD", 3)])
def test_two_sharded_processes_take_the_same_steps_as_one(tiny_lm_dir, tmp_path, method, batch):
    from safetensors import safe_open

    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    single = subprocess.run([sys.executable, str(HERE / "fsdp_worker.py"), str(tiny_lm_dir), str(one), method, "no",
                             str(batch)], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    double = _torchrun(HERE / "fsdp_worker.py", tiny_lm_dir, two, method, "fsdp", batch)
    assert double.returncode == 0, double.stderr[-2000:]
    with safe_open(str(one), "pt") as a, safe_open(str(two), "pt") as b:
        for field in ("losses", "cosines"):
            values_a = [float(x) for x in a.metadata()[field].split(",")]
            values_b = [float(x) for x in b.metadata()[field].split(",")]
            assert values_a == pytest.approx(values_b, rel=1e-4, abs=1e-5), field
        if method == "RGD":  # the surgery acted: the gradients conflicted at every step
            assert all(float(c) < 0 for c in a.metadata()["cosines"].split(","))
        assert set(a.keys()) == set(b.keys()) and a.keys()
        for key in a.keys():
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_obliviate_run_sharded_under_torchrun_writes_one_run_folder(tiny_lm_dir, tmp_path):
    """The sharded model is gathered after the loop: evaluated on both processes and saved by the first, with the
    same changed tensors and evaluation as one unsharded process."""
    from safetensors import safe_open

    from conftest import tiny_items

    items = tiny_items()
    for name, part in (("forget", items[:2]), ("retain", items[2:])):
        (tmp_path / f"{name}.json").write_text("".join(json.dumps({
            "question": i.question, "answer": i.answer, "paraphrased_answer": i.paraphrased_answer,
            "perturbed_answer": list(i.perturbed_answers)}) + "\n" for i in part))
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"method": "NPO", "model": str(tiny_lm_dir), "output_dir": str(tmp_path / "runs"),
                               "forget_file": str(tmp_path / "forget.json"),
                               "retain_file": str(tmp_path / "retain.json"),
                               "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3}, "eval": {"batch_size": 2}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = _torchrun("-m", "obliviate.cli", "run", cfg, "name=fsdp", "train.shard=fsdp", "--quiet", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    single = subprocess.run([sys.executable, "-m", "obliviate.cli", "run", str(cfg), "name=one", "--quiet"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    runs = tmp_path / "runs"
    assert sorted(r.name for r in runs.iterdir()) == ["fsdp", "one"]
    sharded, one = (json.loads((runs / n / "metrics.json").read_text()) for n in ("fsdp", "one"))
    assert sharded["status"] == "completed" and sharded["eval_processes"] == 2
    for key in ("forget_accuracy", "retain_accuracy", "forget_truth_ratio_score", "model_utility"):
        assert sharded[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    assert json.loads((runs / "fsdp" / "config.json").read_text())["train"]["shard"] == "fsdp"
    with safe_open(str(runs / "fsdp" / "changed.safetensors"), "pt") as a, \
            safe_open(str(runs / "one" / "changed.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys()) and a.keys()
        for key in a.keys():  # full tensors, not one process's shard
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), rtol=1e-4, atol=1e-5)


def test_sharding_in_one_process_is_refused_in_one_line(tiny_lm):
    from conftest import tiny_items
    from obliviate.config import LMTrainConfig
    from obliviate.errors import ObliviateError
    from obliviate.loops.lm import unlearn

    model, tok = tiny_lm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ObliviateError, match="needs several processes.*torchrun"):
        unlearn(model, tok, tiny_items()[:2], tiny_items()[2:], "GradDiff", LMTrainConfig(max_steps=1, shard="fsdp"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model untouched


@pytest.mark.parametrize("extra, message", [({"lora": {"r": 4}}, "with \\[lora\\] is not supported"),
                                            ({"train": {"shard": "fsdp", "checkpoint_every": 2}, "name": "x"},
                                             "checkpoint_every is not supported")])
def test_validate_refuses_what_sharding_cannot_go_with(tiny_lm_dir, tmp_path, extra, message):
    from conftest import tiny_items
    from obliviate.config import build_config
    from obliviate.errors import ObliviateError
    from obliviate.runners.lm_checks import check_lm

    items = tiny_items()
    for name, part in (("forget", items[:2]), ("retain", items[2:])):
        (tmp_path / f"{name}.json").write_text("".join(json.dumps({"question": i.question, "answer": i.answer}) + "\n"
                                                       for i in part))
    raw = {"method": "GradDiff", "model": str(tiny_lm_dir), "output_dir": str(tmp_path / "runs"),
           "forget_file": str(tmp_path / "forget.json"), "retain_file": str(tmp_path / "retain.json"),
           "train": {"shard": "fsdp"}, **extra}
    with pytest.raises(ObliviateError, match=message):
        check_lm(build_config(raw))


def test_text_to_image_refuses_train_shard():
    from obliviate.config import build_config
    from obliviate.errors import ObliviateError

    with pytest.raises(ObliviateError, match="train.shard is a language-model key; this is a text-to-image run"):
        build_config({"family": "t2i", "method": "ESD-x", "concept": "star", "train": {"shard": "fsdp"}})
