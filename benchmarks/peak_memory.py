"""Benchmark (c): peak memory of a reference-free method (SimNPO) against reference-based ones (NPO, IdkPO).

Usage: python benchmarks/peak_memory.py [--tofu-dir ../shared/data/tofu]
Each method runs in its own process (50 unlearning steps on forget10 of the profiles world, batch 32); the number
is the process's peak resident memory (ru_maxrss) minus its resident memory after loading the model.
"""
import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys
from obliviate import progress
from obliviate.config import TrainConfig, WorldConfig
from obliviate.models import causal_lm as lm
from obliviate.loops.lm import unlearn
from obliviate.worlds.profiles import ProfilesWorld
progress.set_enabled(False)
world = ProfilesWorld(WorldConfig(tofu_dir=sys.argv[2] or None))
forget, retain = world.unlearning_sets("forget10")
model, tok = lm.load(world.full_model_dir)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = unlearn(model, tok, forget, retain, sys.argv[1], TrainConfig(max_steps=50, lr=1e-4))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"method": sys.argv[1], "rss_after_load_mib": round(before / 1024, 1),
                  "peak_rss_mib": round(peak / 1024, 1), "increase_mib": round((peak - before) / 1024, 1),
                  "model_mib": round(params * 4 / 2**20, 1), "seconds": round(result.seconds, 1)}))
"""

parser = argparse.ArgumentParser()
parser.add_argument("--tofu-dir", default="")
parser.add_argument("--methods", default="SimNPO,GradDiff,NPO,IdkPO")
args = parser.parse_args()
subprocess.run([sys.executable, "-m", "obliviate.cli", "world", "build", "--quiet"]
               + (["--tofu-dir", args.tofu_dir] if args.tofu_dir else []), check=True, stdout=subprocess.DEVNULL)
rows = []
for method in args.methods.split(","):
    out = subprocess.run([sys.executable, "-c", CHILD, method, args.tofu_dir], check=True, capture_output=True,
                         text=True).stdout
    rows.append(json.loads(out.strip().splitlines()[-1]))
print(json.dumps(rows, indent=2))
