"""Fast stand-ins for the bench's engine tests: a run that writes a run folder's metrics.json at once (its numbers a
function of the config, so that selection has something to choose by), and a permissive config resolver for the keys
other parts of issue 18 add (train.eval_every, forgotten_before, method "Retrain"). Also a script: run a bench spec
with the fake run in a separate process (tests/test_bench.py runs two at once, and kills one)."""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path


class FakeConfig:
    def __init__(self, data: dict):
        self.data = copy.deepcopy(data)
        self.family = self.data["family"] = "lm"
        for key in ("output_dir", "name"):
            self.data.setdefault(key, None)

    def dump(self) -> dict:
        return copy.deepcopy(self.data)

    def __getattr__(self, name):
        return self.data.get(name)


def score(config: dict) -> dict:
    """Made-up metrics: on the validation split the highest lr forgets best; on the reported split the lowest."""
    lr = config["train"]["lr"]
    forget_quality = lr * 1000 if config["split"] == "val10" else 1 / (lr * 1000)
    return {"forget_quality": forget_quality, "utility_ratio": config["train"].get("utility", 1.0),
            "model_utility": 0.5, "original": {"model_utility": 0.5, "utility_ratio": 1.0}}


def fake_run(config, log=print, resume=False):
    """Stands for obliviate.runners.run: the run folder with its metrics, or the failure a config asks for."""
    data = config.dump()
    calls = os.environ.get("FAKE_RUN_LOG")
    if calls:
        with open(calls, "a") as f:
            f.write(data["name"] + "\n")
        with open(calls + ".pids", "a") as f:
            f.write(f"{os.getpid()}\n")
    if os.environ.get("FAKE_RUN_SLEEP"):
        time.sleep(float(os.environ["FAKE_RUN_SLEEP"]))
    fail = data["train"].get("fail")
    if fail == "nan":
        from obliviate.errors import NonFiniteLoss
        raise NonFiniteLoss(f"{data['method']} stopped: loss is nan at step 3")
    if fail == "oom":
        raise MemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    folder = Path(data["output_dir"]) / data["name"]
    folder.mkdir(parents=True)
    if os.environ.get("FAKE_RUN_KILL_AT") and len(Path(calls).read_text().split()) == int(os.environ[
            "FAKE_RUN_KILL_AT"]):
        os._exit(9)  # killed half-way: the run folder is there, the record is not
    (folder / "config.json").write_text(json.dumps(data))
    metrics = score(data)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    every = data["train"].get("eval_every")
    if every:  # the evaluations along the way: step 2 is the best forget quality, step 4 the last
        (folder / "evaluations.json").write_text(json.dumps([
            {"step": s, "epoch": s / 4, "metrics": {**metrics, "forget_quality": fq}}
            for s, fq in ((0, 0.0), (2, metrics["forget_quality"] * 2), (4, metrics["forget_quality"]))]))
    return folder


def install(monkeypatch=None):
    """Swap the real run (and the resolver) for the fakes; in a script, without pytest's monkeypatch."""
    import obliviate.bench.cells as cells
    import obliviate.runners as runners

    def resolve(data, source):
        return FakeConfig(data)
    for obj, name, value in ((runners, "run", fake_run), (cells, "resolve", resolve)):
        if monkeypatch is not None:
            monkeypatch.setattr(obj, name, value)
        else:
            setattr(obj, name, value)


if __name__ == "__main__":
    install()
    from obliviate.bench.engine import run_bench

    run_bench(sys.argv[1], sys.argv[2], log=lambda *_: None)
