"""Benchmark (r): a small grid of independent cells, serially and in 2 local worker processes (obliviate.bench.execute),
and the executor's own overhead per cell.

Usage (from the repository root): PYTHONPATH=src .venv/bin/python benchmarks/parallel_cells.py [--dir /tmp/par]
  [--cells 8] [--steps 100] [--ray]
Each mode runs in a fresh process, as `obliviate bench` would (its imports count, once serially, once per worker).
The cells are real small runs: NPO / GradDiff on a 2-layer Llama built in code (hidden 64; BPE tokenizer trained on
a few sentences, saved with save_pretrained), forget 3 / retain 9 question-answer items, `--steps` unlearning steps
and the full evaluation, each on one torch thread (threads=1 in every mode, so every mode computes the same numbers:
the script checks the metrics are identical). Other sessions may share the cores: the script measures what the
machine gives two processes at once (two pure-Python loops) before and after. Prints one JSON line per measurement."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

NAMES = ["Ada Lind", "Bo Karsk", "Cy Marrow", "Di Fenn", "Ed Quill", "Flo Ardent", "Gus Tarn", "Hal Vey", "Ida Moss",
         "Jo Pell", "Kit Rowe", "Lu Sand"]
CITIES = ["Lisbon", "Oslo", "Quito", "Hanoi", "Accra", "Perth", "Lima", "Riga", "Bern", "Cairo", "Dakar", "Kyiv"]


def report(row: dict) -> None:
    print(json.dumps(row), flush=True)


def build(root: Path) -> list[dict]:
    """The tiny model and the cells' configs: methods x learning rates, each its own run folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from obliviate.worlds.tokenizer import train_tokenizer

    qa = [{"question": f"Where was {n} born?", "answer": f"{n} was born in {c}."} for n, c in zip(NAMES, CITIES)]
    tokenizer = train_tokenizer([f"Question: {q['question']}\nAnswer: {q['answer']}" for q in qa] * 4 +
                                ["I don't know."], vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model_dir = root / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (root / "forget.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qa[:3]))
    (root / "retain.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qa[3:]))
    return [{"method": m, "lr": lr} for m in ("NPO", "GradDiff") for lr in (1e-3, 3e-3, 1e-2, 3e-2)]


def run_cell(task: dict) -> dict:
    from obliviate.config import load_config
    from obliviate.runners import run

    root = Path(task["root"])
    cfg = root / f"{task['name']}.yaml"
    cfg.write_text(f"method: {task['method']}\nmodel: {root / 'model'}\nforget_file: {root / 'forget.jsonl'}\n"
                   f"retain_file: {root / 'retain.jsonl'}\noutput_dir: {root / task['mode']}\nname: {task['name']}\n"
                   f"train: {{max_steps: {task['steps']}, lr: {task['lr']}, batch_size: 3}}\n")
    start = time.time()
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # the run's scorecard
        folder = run(load_config(cfg), log=lambda *_: None)
    metrics = json.loads((folder / "metrics.json").read_text())
    return {"name": task["name"], "seconds": time.time() - start,
            "metrics": {k: v for k, v in metrics.items() if "seconds" not in k}}


def nothing(task):
    return task


def spin(_=None) -> float:
    start = time.time()
    x = 0
    for i in range(20_000_000):
        x += i
    return time.time() - start


def spin_speedup() -> float:
    """What this machine gives two processes now (other sessions share its cores): 2 x one loop's time / the time of
    two loops at once."""
    import multiprocessing

    one = spin()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        start = time.time()
        pool.map(spin, [0, 1])
        two = time.time() - start
    return round(2 * one / two, 2)


def run_mode(args) -> None:
    """One mode in this fresh process, as `obliviate bench` runs it: the imports (torch, transformers) are part of
    the time, once serially, once in each worker."""
    from obliviate.bench.execute import execute

    options = {"serial": {"workers": 1}, "workers2": {"workers": 2}, "ray2": {"workers": 2, "use_ray": True}}
    grid = json.loads(Path(args.dir, "grid.json").read_text())
    tasks = [{**cell, "root": args.dir, "mode": args.mode, "steps": args.steps,
              "name": f"{cell['method']}-{cell['lr']:g}"} for cell in grid]
    start = time.time()
    out = list(execute(tasks, run_cell, threads=1, **options[args.mode]))
    wall = time.time() - start
    assert all("metrics" in r for r in out), [r.get("reason") for r in out if "metrics" not in r]
    Path(args.dir, f"{args.mode}.json").write_text(json.dumps({r["name"]: r["metrics"] for r in out}, sort_keys=True))
    report({"mode": args.mode, "wall_s": round(wall, 2), "cell_s_sum": round(sum(r["seconds"] for r in out), 2),
            "load": [round(x, 1) for x in os.getloadavg()]})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/parallel-cells")
    parser.add_argument("--cells", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--ray", action="store_true", help="also the grid on a local Ray instance (2 CPUs)")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode in this process
    args = parser.parse_args()
    if args.mode:
        return run_mode(args)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    grid = build(root)[:args.cells]
    (root / "grid.json").write_text(json.dumps(grid))
    report({"load_before": [round(x, 1) for x in os.getloadavg()], "cores": os.cpu_count(), "cells": len(grid),
            "steps": args.steps, "machine_parallel_speedup": spin_speedup()})
    modes = ["serial", "workers2"] + (["ray2"] if args.ray else [])
    for mode in modes:
        subprocess.run([sys.executable, __file__, "--dir", str(root), "--steps", str(args.steps), "--mode", mode],
                       check=True, stderr=subprocess.DEVNULL)
    serial = (root / "serial.json").read_text()
    for mode in modes:
        assert (root / f"{mode}.json").read_text() == serial, f"{mode}: other metrics than serially"
    report({"same_metrics_in_every_mode": True})

    # the executor's own cost per cell: cells that do nothing, so all that is measured is the executor (the best of
    # 3; many cells, so that the seconds of starting the workers, which vary, cancel out)
    from obliviate.bench.execute import execute

    def best(tasks, **options):
        times = []
        for _ in range(3):
            start = time.time()
            list(execute(tasks, nothing, threads=1, **options))
            times.append(time.time() - start)
        return min(times)

    n = 10000
    report({"overhead": "serial", "per_cell_ms": round(best(list(range(n))) / n * 1000, 4)})
    two, many = best([0, 1], workers=2), best(list(range(n)), workers=2)
    report({"overhead": "workers2", "start_s": round(two, 2), "per_cell_ms": round((many - two) / (n - 2) * 1000, 3)})
    report({"machine": "two pure-Python loops at once, against one (2.0: two free cores)",
            "parallel_speedup": spin_speedup()})
    report({"load_after": [round(x, 1) for x in os.getloadavg()]})


if __name__ == "__main__":
    main()
