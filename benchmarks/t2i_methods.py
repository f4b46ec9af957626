"""Benchmark: every text-to-image method on the canvas world's pipeline, one process each.

Usage: python benchmarks/t2i_methods.py [--methods ESD-x,ESD-u,UCE,...] [--concept striped]
For each method, with the demo's settings (obliviate.demo.t2i.PRESETS): the whole erasure's wall time (drawing the
training images with the original pipeline included), seconds per unlearning step, UNet forward calls per step
(every call of any UNet2DConditionModel inside `losses`, frozen copies included) and the peak resident memory
(ru_maxrss) above the process's memory after loading the pipeline. Builds the world first if needed.
"""
import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
from diffusers import UNet2DConditionModel
from obliviate import progress
from obliviate.config import TrainConfig, T2IConfig
from obliviate.demo.t2i import PRESETS
from obliviate.loops.t2i import erase
from obliviate.methods.common import make_method
from obliviate.models.diffusion import load_pipeline
from obliviate.runners.t2i import canvas_task
from obliviate.worlds.canvas import CanvasWorld
progress.set_enabled(False)
name, concept = sys.argv[1], sys.argv[2]
world = CanvasWorld()
pipe = load_pipeline(world.pipeline_dir)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
calls = {"n": 0, "in_losses": False, "steps": 0, "loop_start": None}
forward = UNet2DConditionModel.forward
def counted(self, *a, **k):
    if calls["in_losses"]:
        calls["n"] += 1
    return forward(self, *a, **k)
UNet2DConditionModel.forward = counted
preset = PRESETS.get(name, {})
method = make_method("t2i", name, preset.get("method_args", {}))
if not method.closed_form:
    losses = method.losses
    def timed(*a, **k):
        if calls["loop_start"] is None:
            calls["loop_start"] = time.time()
        calls["in_losses"] = True
        try:
            return losses(*a, **k)
        finally:
            calls["in_losses"] = False
            calls["steps"] += 1
    method.losses = timed
t2i = T2IConfig()
t0 = time.time()
result = erase(pipe, canvas_task(world, concept), method, TrainConfig(**preset.get("train", {})),
               t2i.images_per_prompt, t2i.sample_steps, t2i.guidance)
end = time.time()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
steps = calls["steps"]
print(json.dumps({"method": name, "concept": concept, "erase_seconds": round(end - t0, 1), "steps": steps,
                  "seconds_per_step": round((end - calls["loop_start"]) / steps, 3) if steps else None,
                  "unet_calls_per_step": round(calls["n"] / steps, 2) if steps else 0,
                  "peak_increase_mib": round((peak - before) / 1024, 1),
                  "unet_mib": round(sum(p.numel() for p in pipe.unet.parameters()) * 4 / 2**20, 1)}))
"""

parser = argparse.ArgumentParser()
parser.add_argument("--methods", default="ESD-x,ESD-u,UCE,SalUn,ConceptAblation,GradDiff,RG,RGD")
parser.add_argument("--concept", default="striped")
args = parser.parse_args()
subprocess.run([sys.executable, "-m", "obliviate.cli", "world", "build", "canvas", "--quiet"], check=True,
               stdout=subprocess.DEVNULL)
rows = []
for method in args.methods.split(","):
    out = subprocess.run([sys.executable, "-c", CHILD, method, args.concept], check=True, capture_output=True,
                         text=True).stdout
    rows.append(json.loads(out.strip().splitlines()[-1]))
    print(json.dumps(rows[-1]), flush=True)
