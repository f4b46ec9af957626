"""Benchmark (n): a hand sweep of vision-language methods on the portraits world (forget10), behind the demo's
presets (demo/mllm.py). Each spec unlearns the world's original model from scratch and prints the multiple-choice
accuracy with the picture and as text on the forget, test, retain (8 people) and public-figure sets.

Usage: python benchmarks/mllm_sweep.py [orig] METHOD:LR:EPOCHS[:JSON_METHOD_ARGS] ...
  orig: also score the original and the retrain model. PARTS=language,projector,vision picks the trained parts
  (default: language); T=1 (default) or 2 torch threads. Builds the world first if the cache does not hold it.
Example: python benchmarks/mllm_sweep.py orig 'GradDiff:3e-4:4:{"alpha": 4.0}' 'NPO:2e-4:8:{"alpha": 4.0}'
"""
import json
import os
import sys
import time

import torch

from obliviate.config import RunConfig, TrainConfig, WorldConfig
from obliviate.evals.mllmu import classification_accuracy
from obliviate.loops.lm import unlearn
from obliviate.models import vlm
from obliviate.methods.common import make_method
from obliviate.runners.mllm import load_model
from obliviate.worlds.portraits import PortraitsWorld

if __name__ == "__main__":  # the world's build starts worker processes (spawn): they import this file
    torch.set_num_threads(int(os.environ.get("T", "1")))
    config = RunConfig(family="mllm", method="GradDiff", world=WorldConfig(name="portraits"),
                       mllm={"train_parts": os.environ.get("PARTS", "language").split(",")})
    world = PortraitsWorld(config.world)
    world.build("forget10")
    forget, retain = world.unlearning_sets("forget10")
    sets = world.eval_sets("forget10", 8)

    def score(model, processor):
        adapter = world.adapter(processor)
        return {k: classification_accuracy(model, adapter, processor.tokenizer, sets[k])
                for k in ("forget", "test", "retain", "public")}
    specs = sys.argv[1:]
    if "orig" in specs:
        for label, folder in (("original", world.full_model_dir), ("retrain", world.retrain_dir("forget10"))):
            print(label, score(*load_model(folder, config, "cpu")), flush=True)
    for spec in (s for s in specs if s != "orig"):
        name, lr, epochs, *rest = spec.split(":", 3)
        model, processor = load_model(world.full_model_dir, config, "cpu")
        t0 = time.time()
        result = unlearn(model, processor.tokenizer, forget, retain, make_method("mllm", name, json.loads(rest[0]) if rest
                                                                                  else {}),
                         TrainConfig(lr=float(lr), epochs=float(epochs)),
                         adapter=vlm.VisionLanguageAdapter(processor, world.pictures))
        print(spec, round(time.time() - t0, 1), "s", score(result.model, processor), flush=True)
