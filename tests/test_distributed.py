"""Data parallel unlearning: 2 processes (torchrun, gloo on CPU) give the same model and history as 1 process on the
same global batch, for every method, with even and uneven splits, a share with no item and gradient accumulation
(token means, sequence means, the restricted gradient with its surgery on the global gradients); `obliviate run`
under torchrun writes one run folder; a bad input under torchrun prints its one-line error once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from obliviate.registry import LM_METHODS

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent


def _torchrun(*args, env=None):
    return subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env)


def _same_run(one: Path, two: Path) -> None:
    """The same history (every logged value: the loss and the method's logs are global means) and tensors."""
    from safetensors import safe_open

    with safe_open(str(one), "pt") as a, safe_open(str(two), "pt") as b:
        assert a.metadata().keys() == b.metadata().keys() and "loss" in a.metadata()
        for key, values in a.metadata().items():
            assert [float(x) for x in values.split(",")] == pytest.approx(
                [float(x) for x in b.metadata()[key].split(",")], rel=1e-4, abs=1e-5), key
        assert set(a.keys()) == set(b.keys()) and a.keys()
        for key in a.keys():
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), rtol=1e-4, atol=1e-5)


def _one_and_two(model_dir, out: Path, methods: list[str], *args) -> tuple[Path, Path]:
    """Every method of `methods` unlearnt by one process and by two (torchrun), one launch each: the folders of
    their METHOD.safetensors."""
    one, two = out / "one", out / "two"
    single = subprocess.run([sys.executable, str(HERE / "dp_worker.py"), str(model_dir), str(one), ",".join(methods),
                             *map(str, args)], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    double = _torchrun(HERE / "dp_worker.py", model_dir, two, ",".join(methods), *args)
    assert double.returncode == 0, double.stderr[-2000:]
    return one, two


EVERY_METHOD = [n for n, entry in LM_METHODS.items()  # UOE: test_lm_moe.py; guards train nothing
                if n not in ("Retrain", "UOE") and not getattr(entry, "guard", False)]
EVEN = ["GradDiff", "NPO", "RGD"]
ACCUMULATED = ["NPO", "RGD"]


@pytest.fixture(scope="module")
def launches(tiny_lm_dir, tmp_path_factory):
    """(batch size, accumulation steps) -> the one- and two-process folders: each setting's methods share a launch."""
    done = {}

    def launch(methods: list[str], *args) -> tuple[Path, Path]:
        if args not in done:
            done[args] = _one_and_two(tiny_lm_dir, tmp_path_factory.mktemp("dp"), methods, *args)
        return done[args]

    return launch


@pytest.mark.slow
@pytest.mark.parametrize("method", EVEN)
def test_two_processes_take_the_same_steps_as_one(launches, method):
    one, two = launches(EVEN, 4)
    _same_run(one / f"{method}.safetensors", two / f"{method}.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("method", EVERY_METHOD)
def test_every_method_takes_the_same_steps_with_an_uneven_split_and_an_empty_share(launches, method):
    """Batch 3 of 4 items: 2 + 1 items, then a tail of 1 item that leaves the second process none (forget and
    retain alike); every loss is a mean over the global batch, so the steps are one process's."""
    one, two = launches(EVERY_METHOD, 3)
    _same_run(one / f"{method}.safetensors", two / f"{method}.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("method", ACCUMULATED)
def test_two_processes_with_gradient_accumulation_take_the_same_steps_as_one(launches, method):
    one, two = launches(ACCUMULATED, 3, 2)
    _same_run(one / f"{method}.safetensors", two / f"{method}.safetensors")


@pytest.mark.slow
def test_obliviate_run_under_torchrun_writes_one_run_folder_with_the_same_evaluation(tiny_lm_dir, tmp_path):
    """Two processes train and evaluate (each its share of every set, gathered): the one run folder they write holds
    the evaluation one process writes for the same config."""
    from conftest import tiny_items, tiny_texts

    items = tiny_items()
    for name, part in (("forget", items[:2]), ("retain", items[2:])):
        (tmp_path / f"{name}.json").write_text("".join(json.dumps({
            "question": i.question, "answer": i.answer, "paraphrased_answer": i.paraphrased_answer,
            "perturbed_answer": list(i.perturbed_answers)}) + "\n" for i in part))
    (tmp_path / "holdout.json").write_text("".join(json.dumps({"question": f"Who is {t.subject}?", "answer": t.text})
                                                   + "\n" for t in tiny_texts()[:3]))
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"method": "GradDiff", "model": str(tiny_lm_dir), "output_dir": str(tmp_path / "runs"),
                               "forget_file": str(tmp_path / "forget.json"),
                               "retain_file": str(tmp_path / "retain.json"),
                               "eval_sets": [{"file": str(tmp_path / "holdout.json"), "role": "holdout"}],
                               "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3}, "eval": {"batch_size": 2}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = _torchrun("-m", "obliviate.cli", "run", cfg, "name=dp", "--quiet", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    single = subprocess.run([sys.executable, "-m", "obliviate.cli", "run", str(cfg), "name=one", "--quiet"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    assert sorted(r.name for r in (tmp_path / "runs").iterdir()) == ["dp", "one"]
    dp, one = (json.loads((tmp_path / "runs" / n / "metrics.json").read_text()) for n in ("dp", "one"))
    assert dp["status"] == "completed" and (dp["eval_processes"], one["eval_processes"]) == (2, 1)
    for key in ("forget_accuracy", "retain_accuracy", "knowmem_forget", "forget_truth_ratio_score", "model_utility"):
        assert dp[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    assert dp["mia"] == pytest.approx(one["mia"], abs=1e-6)
    assert (dp["answers_generated"], dp["answers_at_token_limit"]) == (one["answers_generated"],
                                                                        one["answers_at_token_limit"])
    rows = [json.loads((tmp_path / "runs" / n / "per_item.json").read_text()) for n in ("dp", "one")]
    for name in ("forget", "retain"):
        assert [r["question"] for r in rows[0][name]] == [r["question"] for r in rows[1][name]]  # the same order
        assert [r["generated"] for r in rows[0][name]] == [r["generated"] for r in rows[1][name]]
        assert [r["answer_nll"] for r in rows[0][name]] == pytest.approx([r["answer_nll"] for r in rows[1][name]],
                                                                         rel=1e-4)


def test_a_text_to_image_run_under_several_processes_is_refused_in_one_line(monkeypatch, tmp_path):
    from obliviate.config import build_config
    from obliviate.errors import ObliviateError
    from obliviate.runners.t2i_checks import check_t2i

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; refused before any process group is made
    with pytest.raises(ObliviateError, match="not data parallel yet"):
        check_t2i(build_config({"family": "t2i", "method": "ESD-x", "concept": "star", "output_dir": str(tmp_path)}))


@pytest.mark.slow
def test_a_bad_input_under_two_processes_prints_its_one_line_error_once(tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"method": "NPO", "bogus": 1}))
    result = _torchrun("-m", "obliviate.cli", "run", cfg, "--quiet", env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and lines == [f"error: {cfg}: bogus: unknown key"], result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr  # the first process's code, in torchrun's own report
    assert "obliviate/" not in result.stderr  # no process printed a traceback of its own


def test_only_the_first_process_prints_an_error_at_once_the_others_wait_for_the_launcher(monkeypatch, capsys):
    import typer

    from obliviate import cli

    waits = []
    monkeypatch.setattr("time.sleep", waits.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, waited in (("0", []), ("1", [cli.FAILURE_WAIT_S])):
        monkeypatch.setenv("RANK", rank)
        waits.clear()
        with pytest.raises(typer.Exit) as exit_:
            cli._fail(ValueError("bad"))
        # a process that outlives the wait (the first did not fail) still prints it: an error is never lost
        assert exit_.value.exit_code == 2 and capsys.readouterr().err == "error: bad\n" and waits == waited
