"""Hyper-parameter sweep on forget10 of the profiles world: unlearn from the original model with each setting,
evaluate with the full protocol, compare with the retrain model.

Usage: python benchmarks/sweep.py 'METHOD:LR:EPOCHS[:JSON method_args]' ...
  e.g. python benchmarks/sweep.py 'NPO:2e-4:10:{"alpha":4}' 'RGD:2e-4:15:{"forget_loss_cap":1.0}'
Prints one line per setting: forget quality, model utility, exact-answer accuracy on forget and retain questions,
PrivLeak, the forget truth-ratio score and the seconds taken (unlearning + evaluation). The world is the demo's
(`make demo`: the demo size, no TOFU files); set SIZE=full for the full-size world, TOFU_DIR to add TOFU's utility
files. Batches are grouped by length, as in the demo's presets (GROUP_BY_LENGTH=0 turns that off).
"""
import json
import os
import sys
import time

import torch

from obliviate import progress
from obliviate.config import EvalConfig, LMTrainConfig, WorldConfig
from obliviate.demo.lm import RETAIN_PEOPLE, WORLDS
from obliviate.evals.evaluate import compare_to_retrain, evaluate_lm
from obliviate.models import causal_lm as lm
from obliviate.runners.lm import retrain_evaluation
from obliviate.loops.lm import unlearn
from obliviate.methods.common import make_method
from obliviate.worlds.profiles import ProfilesWorld

torch.set_num_threads(1)  # as the demo runs each part: its seconds compare with the demo's
progress.set_enabled(False)
size = os.environ.get("SIZE", "demo")
world_cfg = WorldConfig(tofu_dir=os.environ.get("TOFU_DIR") or None, **WORLDS[size])
world = ProfilesWorld(world_cfg)
world.build("forget10")
eval_cfg = EvalConfig(retain_people=RETAIN_PEOPLE[size])
grouped = os.environ.get("GROUP_BY_LENGTH", "1") != "0"
qa_sets, texts = world.eval_sets("forget10", eval_cfg.retain_people)
retrain = retrain_evaluation(world, "forget10", eval_cfg, qa_sets, texts)
forget, retain = world.unlearning_sets("forget10")
for spec in sys.argv[1:]:
    name, lr, epochs, *rest = spec.split(":", 3)
    model, tok = lm.load(world.full_model_dir)
    t0 = time.time()
    result = unlearn(model, tok, forget, retain, make_method("lm", name, json.loads(rest[0]) if rest else {}),
                     LMTrainConfig(lr=float(lr), epochs=float(epochs), group_by_length=grouped))
    a = compare_to_retrain(evaluate_lm(result.model, tok, qa_sets, texts["forget"], texts["holdout"]),
                           retrain)["aggregate"]
    print(f"{spec:40s} FQ {a['forget_quality']:.3g} MU {a['model_utility']:.3f} forget_acc {a['forget_accuracy']:.2f} "
          f"retain_acc {a['retain_accuracy']:.2f} PrivLeak {a['privleak']:+.1f} "
          f"forget_TR {a['forget_truth_ratio_score']:.3f} {time.time() - t0:.0f}s", flush=True)
