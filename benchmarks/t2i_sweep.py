"""One row of the text-to-image preset sweep: erase a canvas concept with one method and settings, evaluate.

Usage: python benchmarks/t2i_sweep.py [--seeds N] [--steps N] [--attack] CONCEPT METHOD ['{"lr": 2e-4, "max_steps": 100, "batch_size": 8}'] ['{method args}']
Prints UA, UA on paraphrases, IRA, CRA, FID against the original's samples and alignment (by default one seed per
prompt and 25 DDIM steps; the demo's settings are --seeds 1 --steps 10, the full-size ones --seeds 2), next to the
original's and the retrain reference's; with --attack also the prompt attack's pre-ASR, ASR and UA attacked (the
demo's attack). Writes the grid to /tmp/grid-CONCEPT-METHOD.png. The world (default cache) must be built: `obliviate world build canvas`.
"""
import json
import sys
import time

import torch

from obliviate import progress
from obliviate.config import T2IConfig, TrainConfig
from obliviate.loops.t2i import erase
from obliviate.methods.common import make_method
from obliviate.evals.canvas import evaluate_erasure
from obliviate.models.diffusion import load_pipeline
from obliviate.runners.t2i import canvas_task
from obliviate.worlds.canvas import CanvasWorld

torch.set_num_threads(1)  # as the demo runs each part: its seconds compare with the demo's
progress.set_enabled(False)
argv = sys.argv[1:]
seeds, steps, attack = 1, T2IConfig().sample_steps, "--attack" in argv
argv = [a for a in argv if a != "--attack"]
while argv[:1] in (["--seeds"], ["--steps"]):
    if argv[0] == "--seeds":
        seeds = int(argv[1])
    else:
        steps = int(argv[1])
    argv = argv[2:]
if len(argv) < 2:
    sys.exit(__doc__)
concept, method = argv[0], argv[1]
train = json.loads(argv[2]) if len(argv) > 2 else {}
args = json.loads(argv[3]) if len(argv) > 3 else {}
world = CanvasWorld()
world.require_built()
t2i = T2IConfig(eval_seeds=seeds, sample_steps=steps)
pipe = load_pipeline(world.pipeline_dir)
t0 = time.time()
erase(pipe, canvas_task(world, concept), make_method("t2i", method, args), TrainConfig(**train), t2i.images_per_prompt,
      t2i.sample_steps, t2i.guidance)
t1 = time.time()
evaluation = evaluate_erasure(world, pipe, concept, t2i, method)
agg = evaluation["aggregate"]
keys = ["ua", "ua_paraphrase", "ira", "cra", "fid_original", "alignment", "original_ua", "original_ira",
        "original_cra", "retrain_ua", "retrain_ira", "retrain_cra"]
t2 = time.time()
if attack:
    from obliviate.attacks.t2i.canvas import attack_erasure
    from obliviate.attacks.t2i.unlearn_diff_atk import UnlearnDiffAtk
    models = attack_erasure(world, pipe, concept, t2i, "prompt_attack", UnlearnDiffAtk(UnlearnDiffAtk.Config()),
                            method)["per_item"]
    from obliviate.attacks.t2i.common import summarize
    agg.update(summarize(models[method]))
    agg.update({f"{m}_{k}": v for m in ("original", "retrain") if m in models for k, v in summarize(models[m]).items()})
    keys += ["pre_asr", "ua_attacked", "original_ua_attacked", "retrain_ua_attacked"]
print(method, concept, train, args, f"erase {t1 - t0:.0f}s eval {t2 - t1:.0f}s" +
      (f" attack {time.time() - t2:.0f}s" if attack else ""),
      {k: round(agg[k], 3) for k in keys if agg.get(k) is not None}, flush=True)
evaluation["grid"].save(f"/tmp/grid-{concept}-{method}.png")
