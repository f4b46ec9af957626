"""Benchmark (m): build the portraits world cold (fresh cache): the full and retrain LLaVAs side by side, then the
multiple-choice accuracy report. Prints the wall time and the build record (build.json) without the recipe.

Usage: python benchmarks/portraits_build.py [CACHE_DIR]   (default: a fresh temporary folder, removed after)
"""
import json
import shutil
import sys
import tempfile
import time

from obliviate.config import WorldConfig
from obliviate.worlds.portraits import PortraitsWorld

if __name__ == "__main__":  # the build starts worker processes (spawn): they import this file
    cache = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
    t0 = time.time()
    record = PortraitsWorld(WorldConfig(name="portraits", cache_dir=cache)).build("forget10")
    print(json.dumps({"wall_seconds": round(time.time() - t0, 1),
                      **{k: v for k, v in record.items() if k != "recipe"}}, indent=1))
    if len(sys.argv) == 1:
        shutil.rmtree(cache)
