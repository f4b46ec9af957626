"""The bench runner's own overhead (issue 18, section 6): a grid of cells whose run does no work (it writes a
metrics.json at once), so the time per cell is the engine's own (resolving and keying the config, the lock, the
record, the selection); then the same grid resumed with every cell done, through the command line in a fresh process.

    PYTHONPATH=src python benchmarks/bench_overhead.py [N_LRS]
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def instant_run(config, log=print, resume=False):
    folder = Path(config.output_dir) / config.name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config.dump()))
    (folder / "metrics.json").write_text(json.dumps({"forget_quality": config.train.lr, "utility_ratio": 1.0}))
    return folder


def main(n_lrs: int = 10) -> None:
    import obliviate.runners as runners
    from obliviate.bench.engine import run_bench

    runners.run = instant_run  # run_one's own work stays: the config check, the record, the log
    root = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    lrs = ", ".join(f"{(i + 1) * 1e-5:g}" for i in range(n_lrs))
    spec = root / "spec.toml"
    spec.write_text(f"""
base = {{model = "{root}/model", forget_file = "{root}/forget.json", retain_file = "{root}/retain.json"}}
validation = {{forget_file = "{root}/val.json"}}
reported = {{forget_file = "{root}/forget.json"}}
noise_floor = []
select = {{maximize = "forget_quality", constraints = ["utility_ratio >= 0.9"]}}
methods = [{{name = "GradDiff", grid = {{"train.lr" = [{lrs}]}}}}, {{name = "NPO", grid = {{"train.lr" = [{lrs}]}}}}]
""")
    out = root / "out"
    started = time.perf_counter()
    result = run_bench(spec, out, log=lambda *_: None)
    cold = time.perf_counter() - started
    n = len(result["cells"])
    assert all(r["status"] == "done" for r in result["cells"]), result["cells"]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "obliviate.cli", "bench", str(spec), "--out", str(out)],
                          capture_output=True, text=True)
    resumed = time.perf_counter() - started
    assert done.returncode == 0 and f"{n} cells, 0 failed" in done.stdout, done.stdout + done.stderr
    print(f"{n} cells, each without work: {cold:.2f} s in all, {cold / n * 1000:.0f} ms of runner overhead per "
          f"cell (goal < 1 s)")
    print(f"the same grid resumed, every cell done, `obliviate bench` in a fresh process: {resumed:.2f} s (goal < 5 s)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
