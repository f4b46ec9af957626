"""Where bench cells run (obliviate.bench.execute): serially, in spawned worker processes, on a local Ray instance.
The workers' functions live at this module's top level: spawned processes and Ray workers import them by name."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from obliviate.bench.execute import execute
from obliviate.errors import ObliviateError

from conftest import tiny_items


def work(task):
    """A cheap cell, or one that fails in each way a cell can: raises, exits, is killed (as by the OOM killer)."""
    if isinstance(task, dict):
        return run_cell(task)
    if task == "raise":
        raise ValueError("no such\nsetting")
    if task == "exit":
        os._exit(3)
    if task == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    import torch

    return {"task": task, "pid": os.getpid(), "threads": torch.get_num_threads(), "omp": os.environ["OMP_NUM_THREADS"]}


def run_cell(task: dict) -> str:
    """A real cell: a two-step NPO run of the tiny model on forget/retain files, into its own run folder."""
    from obliviate.config import load_config
    from obliviate.runners import run

    return str(run(load_config(task["config"], [f"name={task['name']}"]), log=lambda *_: None))


def failures(results) -> dict:
    return {r["task"]: r["reason"] for r in results if isinstance(r, dict) and r.get("status") == "failed"}


def test_serially_a_failing_cell_is_a_failed_result_and_threads_are_restored():
    import torch

    before = torch.get_num_threads()
    results = list(execute(["a", "raise", {"key": "0123abcd", "x": 1}, "b"], work, threads=2))
    assert [r["task"] for r in results] == ["a", "raise", {"key": "0123abcd", "x": 1}, "b"]
    assert results[0]["threads"] == 2 and results[0]["pid"] == os.getpid() and results[0]["omp"] == "2"
    assert results[1] == {"status": "failed", "reason": "task 'raise': ValueError: no such setting", "task": "raise",
                          "seconds": results[1]["seconds"]}
    assert results[2]["key"] == "0123abcd" and results[2]["reason"].startswith("cell 0123abcd: KeyError")
    assert torch.get_num_threads() == before


@pytest.mark.slow  # spawned workers, each importing torch: 4-15 s
def test_workers_survive_a_killed_cell_and_name_it():
    """Spawned workers with one thread each; a worker that is SIGKILLed mid-cell gives a failed result
    naming its cell, and the other cells (before and after it, on a fresh process) complete."""
    tasks = ["a", "kill", "b", "raise", "c"]
    results = list(execute(tasks, work, workers=2, threads=1))
    assert sorted(map(str, (r["task"] for r in results))) == sorted(tasks)
    done = {r["task"]: r for r in results if "pid" in r}
    assert set(done) == {"a", "b", "c"}
    assert all(r["threads"] == 1 and r["omp"] == "1" and r["pid"] != os.getpid() for r in done.values())
    reasons = failures(results)
    assert "SIGKILL" in reasons["kill"] and "out of memory" in reasons["kill"] and "\n" not in reasons["kill"]
    assert reasons["raise"] == "task 'raise': ValueError: no such setting"


def test_inside_a_pool_worker_the_cells_run_here(monkeypatch):
    """A daemon process (a pool's worker, a demo part) may not start processes: workers > 1 runs the cells serially."""
    monkeypatch.setattr("obliviate.workers.can_start_processes", lambda: False)
    results = list(execute(["a", "b"], work, workers=2, threads=1))
    assert [(r["task"], r["pid"]) for r in results] == [("a", os.getpid()), ("b", os.getpid())]


def test_bad_arguments_and_a_missing_ray_are_one_line(monkeypatch):
    with pytest.raises(ObliviateError, match="--workers must be at least 1"):
        execute(["a"], work, workers=0)
    with pytest.raises(ObliviateError, match="--threads must be at least 1"):
        execute(["a"], work, threads=0)
    assert list(execute([], work, workers=4)) == []
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ObliviateError, match=r"^ray is not installed: pip install 'obliviate\[ray\]'$"):
        list(execute(["a"], work, use_ray=True))


def test_a_ray_cluster_that_is_not_there_is_one_line(monkeypatch):
    import importlib.machinery
    import types

    def init(**options):
        raise ConnectionError("Could not find any running Ray instance.\nPlease specify the one to connect to.")

    fake = types.SimpleNamespace(__spec__=importlib.machinery.ModuleSpec("ray", None), is_initialized=lambda: False,
                                 init=init)
    monkeypatch.setitem(sys.modules, "ray", fake)
    with pytest.raises(ObliviateError) as e:
        list(execute(["a"], work, ray_address="auto"))
    assert str(e.value) == ("--ray-address auto: cannot join a Ray cluster there (ConnectionError: Could not find "
                            "any running Ray instance.)")


@pytest.fixture(scope="module")
def cell_config(tmp_path_factory, tiny_lm_dir):
    tmp = tmp_path_factory.mktemp("cells")
    items = tiny_items()
    forget, retain = tmp / "forget.jsonl", tmp / "retain.jsonl"
    forget.write_text("\n".join(json.dumps({"question": i.question, "answer": i.answer}) for i in items[:2]) + "\n")
    retain.write_text("\n".join(json.dumps({"question": i.question, "answer": i.answer}) for i in items[2:]) + "\n")
    cfg = tmp / "run.yaml"
    cfg.write_text(f"method: NPO\nmodel: {tiny_lm_dir}\nforget_file: {forget}\nretain_file: {retain}\n"
                   f"output_dir: {tmp / 'runs'}\ntrain: {{max_steps: 3, lr: 0.001, batch_size: 2}}\n"
                   "method_args: {beta: 0.2}\n")
    return cfg


def without_timings(metrics):
    """metrics.json less what measures time (it differs between any two runs)."""
    if isinstance(metrics, dict):
        return {k: without_timings(v) for k, v in metrics.items() if not any(
            t in k for t in ("second", "time", "duration", "elapsed"))}
    if isinstance(metrics, list):
        return [without_timings(v) for v in metrics]
    return metrics


@pytest.mark.slow
def test_a_cell_gives_the_same_numbers_serially_in_a_worker_and_on_ray(cell_config, tiny_lm_dir, monkeypatch):
    """Issue 18 section 5: same seed, same hardware, same numbers, wherever the cell ran; and Ray's failure paths
    (the local instance is started and shut down here)."""
    pytest.importorskip("ray", reason="Ray is an extra: pip install 'obliviate[ray]'")
    import ray
    from safetensors.torch import load_file

    # the Ray workers import this module by name, as the spawned workers do (those get sys.path from multiprocessing)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    serial = list(execute([{"config": str(cell_config), "name": "serial"}], work, threads=1))
    worker = list(execute([{"config": str(cell_config), "name": "worker"}, "a"], work, workers=2, threads=1))
    on_ray = list(execute([{"config": str(cell_config), "name": "ray"}, "a", "exit", "raise"], work, use_ray=True,
                          workers=2, threads=1))
    assert not ray.is_initialized()  # the local instance was shut down
    folders = [Path(r) for r in serial + worker + on_ray if isinstance(r, str)]
    assert [f.name for f in folders] == ["serial", "worker", "ray"]
    remote = next(r for r in on_ray if isinstance(r, dict) and r.get("task") == "a")
    assert remote["threads"] == 1 and remote["pid"] != os.getpid()
    reasons = failures(on_ray)
    assert reasons["exit"].startswith("task 'exit': WorkerCrashedError") and "\n" not in reasons["exit"]
    assert reasons["raise"] == "task 'raise': ValueError: no such setting"

    metrics = [json.loads((f / "metrics.json").read_text()) for f in folders]
    assert "forget_quality" in metrics[0] or "forget_accuracy" in metrics[0]
    assert without_timings(metrics[1]) == without_timings(metrics[0])
    assert without_timings(metrics[2]) == without_timings(metrics[0])
    changed = [load_file(f / "changed.safetensors") for f in folders]
    assert changed[0] and all(c.keys() == changed[0].keys() for c in changed)
    base = load_file(tiny_lm_dir / "model.safetensors")
    assert any(not t.equal(base[n]) for n, t in changed[0].items() if n in base)  # the cell did unlearn something
    for name, tensor in changed[0].items():
        assert changed[1][name].equal(tensor) and changed[2][name].equal(tensor), name
