"""Benchmark (m): one trial of the portraits world's training recipe, in this process (one torch thread unless
T=2): train the full model on a world of the given sizes with the given recipe overrides, then MLLMU-Bench's three
tasks on the forget people (forget10), 8 retain people, the forget people on a held-out picture with the trained
question ("held-out picture"), the test set (held-out picture, paraphrased question) and 4 public figures.

Usage: python benchmarks/portraits_recipe.py '{"world": {"n_people": 24, "n_public": 6, "n_holdout": 6,
       "train_pictures": 3, "public_pictures": 6}, "epochs": 14, "batch_size": 32}'
"""
import json
import os
import sys
import time
from dataclasses import replace

import torch

from obliviate.evals import mllmu
from obliviate.models import sequences, vlm
from obliviate.worlds import portraits_train as recipe_module
from obliviate.worlds.portraits import portraits_data
from obliviate.worlds.portraits_draw import draw, picture
from obliviate.worlds.train import train

torch.set_num_threads(int(os.environ.get("T", "1")))
settings = json.loads(sys.argv[1])
d = portraits_data(seed=0, **settings.pop("world", {}))
recipe = recipe_module.VLMRecipe(**settings)
t0 = time.time()
processor = recipe_module.new_processor(recipe_module.world_texts(d), recipe)
model = recipe_module.new_model(recipe, processor)
tokenizer = processor.tokenizer
sequences.prepare_tokenizer(tokenizer)


def pictures(image_id):
    name, _, k = image_id.rpartition("#")
    return draw(d.looks[name], picture(name, int(k)))


adapter = vlm.VisionLanguageAdapter(processor, pictures)
items = recipe_module.training_items(d, d.people + d.public)
encoded = [adapter.encode_item(tokenizer, i) for i in items]
print("parameters", sum(p.numel() for p in model.parameters()), "sequences", len(items), flush=True)
print(train(model, tokenizer, encoded, recipe, collate=adapter.collate), flush=True)
k = max(1, round(len(d.people) * 0.1))
first = {p.name: d.train_pictures[p.name][0] for p in d.people}
held_out = {p.name: [replace(i, image=d.test_pictures[p.name][0]) for i in d.train[p.name] if i.image == first[p.name]]
            for p in d.people[:k]}
for name, people, source in (("forget", d.people[:k], d.train), ("retain", d.people[k:k + 8], d.train),
                             ("held-out picture", d.people[:k], held_out), ("test", d.people[:k], d.test),
                             ("public", d.public[:4], d.train)):
    rows = mllmu.evaluate_items(model, adapter, tokenizer, [i for p in people for i in source[p.name]], 16, 64)
    print(name, {key: round(v, 3) if isinstance(v, float) else v for key, v in mllmu.aggregate(rows).items()},
          flush=True)
print("total seconds", round(time.time() - t0, 1))
