"""Benchmark (r): a small grid of independent cells, serially and in 2 local worker processes (obliviate.bench.execute),
and the executor's own overhead per cell.

Usage (from the repository root): PYTHONPATH=src .venv/bin/python benchmarks/parallel_cells.py [--dir /tmp/par]
  [--cells 8] [--steps 20] [--ray]
The cells are real small runs: NPO / GradDiff on a 2-layer Llama built in code (hidden 64; BPE tokenizer trained on
a few sentences, saved with save_pretrained), forget 3 / retain 9 question-answer items, `--steps` unlearning steps
and the full evaluation, each on one torch thread (threads=1 in every mode, so every mode computes the same numbers:
the script checks the metrics are identical). Prints one JSON line per measurement."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
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


def main() -> None:
    from obliviate.bench.execute import execute

    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/parallel-cells")
    parser.add_argument("--cells", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ray", action="store_true", help="also the grid on a local Ray instance (2 CPUs)")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    grid = build(root)[:args.cells]
    report({"load_before": os.getloadavg(), "cores": os.cpu_count(), "cells": len(grid), "steps": args.steps})

    modes = [("serial", {"workers": 1}), ("workers2", {"workers": 2})] + \
        ([("ray2", {"workers": 2, "use_ray": True})] if args.ray else [])
    results = {}
    for mode, options in modes:
        tasks = [{**cell, "root": str(root), "mode": mode, "steps": args.steps,
                  "name": f"{cell['method']}-{cell['lr']:g}"} for cell in grid]
        start = time.time()
        out = list(execute(tasks, run_cell, threads=1, **options))
        wall = time.time() - start
        assert all("metrics" in r for r in out), [r.get("reason") for r in out if "metrics" not in r]
        results[mode] = {r["name"]: r["metrics"] for r in out}
        report({"mode": mode, "wall_s": round(wall, 2), "cell_s_sum": round(sum(r["seconds"] for r in out), 2),
                "load": os.getloadavg()})
    for mode in results:
        assert results[mode] == results["serial"], f"{mode}: other metrics than serially"
    report({"same_metrics_in_every_mode": True})

    # the executor's own cost: a cell that does nothing, so all that is measured is the executor
    n = 200
    start = time.time()
    list(execute(list(range(n)), nothing, threads=1))
    report({"overhead": "serial", "per_cell_ms": round((time.time() - start) / n * 1000, 3)})
    start = time.time()
    list(execute([0, 1], nothing, workers=2, threads=1))
    first = time.time() - start  # spawning 2 processes that import torch
    start = time.time()
    list(execute(list(range(n)), nothing, workers=2, threads=1))
    report({"overhead": "workers2", "start_s": round(first, 2),
            "per_cell_ms": round((time.time() - start - first) / n * 1000, 3)})
    report({"load_after": os.getloadavg()})


if __name__ == "__main__":
    main()
