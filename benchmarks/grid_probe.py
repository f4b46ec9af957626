"""Benchmark (u): a training-only probe that placed the grids of issue 20's methods in configs/bench/profiles.toml and
portraits.toml. Each spec unlearns the demo world's original model on val10 (the bench's validation split) and prints
the mean answer NLL per token on val10's questions and on retain questions: how far a rate moves the model, with no
evaluation (a cell's evaluation is most of its cost). Reads the cached world (`obliviate demo` builds it) and writes
nothing into it: AltPO's world alternates go to a temporary file.

Usage: python benchmarks/grid_probe.py profiles|portraits METHOD:LRS:EPOCHS[:JSON_METHOD_ARGS] ...
Example: python benchmarks/grid_probe.py profiles 'GradDiff:2.5e-4:10' 'CEU:3e-5,1e-4,3e-4:10'
         python benchmarks/grid_probe.py portraits 'GradDiff:3e-4:4:{"alpha": 4.0}' 'AltPO:3e-4:8'
"""
import copy
import json
import sys
import tempfile
import time

import torch

from obliviate import progress
from obliviate.config import LMTrainConfig, WorldConfig
from obliviate.demo.lm import WORLDS
from obliviate.loops.lm import unlearn
from obliviate.methods.common import make_method
from obliviate.models import sequences

torch.set_num_threads(1)
progress.set_enabled(False)


def cached(world):
    if not world.full_model_dir.is_dir():
        sys.exit(f"no cached world at {world.root}: run `obliviate demo` first")
    return world.full_model_dir


name, specs = sys.argv[1], sys.argv[2:]
if name == "profiles":
    from obliviate.models import causal_lm as lm
    from obliviate.worlds.profiles import ProfilesWorld

    world, family = ProfilesWorld(WorldConfig(**WORLDS["demo"])), "lm"
    base, tok = lm.load(cached(world))
    adapter = lm
    encode = lambda i: lm.encode_qa(tok, i.question, i.answer)  # noqa: E731
    asked = lambda items: [i for i in items if hasattr(i, "question")]  # noqa: E731  (not the biographies)
else:
    from obliviate.models import vlm
    from obliviate.worlds.portraits import PortraitsWorld

    world, family = PortraitsWorld(WorldConfig(name="portraits")), "mllm"
    base, processor = vlm.load(cached(world))
    tok = processor.tokenizer
    adapter = world.adapter(processor)
    encode = lambda i: adapter.encode_item(tok, i)  # noqa: E731
    # the free and the multiple-choice answers ("B. Oslo"), not the cloze values nor "Who is this person?"
    asked = lambda items: [i for i in items if i.answer and i.fact != "identity"  # noqa: E731
                           and not i.question.startswith("Fill")]
sequences.prepare_tokenizer(tok)
forget, retain = world.unlearning_sets("val10")
scored_forget, scored_retain = asked(forget)[:60 if family == "mllm" else None], asked(retain)[:200 if family == "lm"
                                                                                               else 120]
alternates = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
alternates.write("".join(json.dumps(r) + "\n" for r in world.alternate_rows()))
alternates.close()


def nll(model, items) -> float:
    model.eval()
    with torch.no_grad():
        return float(sequences.mean_nll(model, adapter.collate([encode(i) for i in items], tok.pad_token_id)))


print(f"original: forget {nll(base, scored_forget):.3f} retain {nll(base, scored_retain):.3f}", flush=True)
for spec in specs:
    method, rates, epochs, *args = spec.split(":", 3)
    method_args = json.loads(args[0]) if args else {}
    if method == "AltPO":
        method_args["alternates"] = alternates.name
    for lr in rates.split(","):
        t0 = time.time()
        kwargs = {"adapter": adapter} if family == "mllm" else {}
        result = unlearn(copy.deepcopy(base), tok, forget, retain, make_method(family, method, method_args),
                         LMTrainConfig(lr=float(lr), epochs=float(epochs)), **kwargs)
        print(f"{method} lr {lr}: forget {nll(result.model, scored_forget):.3f} retain "
              f"{nll(result.model, scored_retain):.3f} ({time.time() - t0:.0f} s"
              + (f", stopped: {result.stopped}" if result.stopped else "") + ")", flush=True)
