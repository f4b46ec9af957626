"""Benchmark (l): can a small LLaVA learn the portraits world on 2 cores? A feasibility probe for issue 9, section 2.

Usage: python benchmarks/llava_feasibility.py [--all-forms]
  --all-forms: train every item in its three forms (free answer, multiple choice answered "B. Oslo", cloze answered
  with the value) for 300 s instead of the free answer alone for 240 s.
Builds the tiny LLaVA of tests/vlm_models.py (CLIP vision tower on 32x32 pictures, 2-layer Llama, 0.2M parameters)
on a portraits world of 100 fictitious people and 10 public figures, trains it for 240 s (AdamW lr 3e-3, batch 64,
two threads) on every training item in its generation form (each fact with each trained picture and by name), then
scores MLLMU-Bench's three tasks on 10 people's birthplace and occupation items: trained pictures and, for the test
set, paraphrased questions on held-out pictures. Not a recipe: the world's real recipe is still to be written.
"""
import random
import sys
import time

sys.path.insert(0, "tests")  # the tiny LLaVA builder lives with the tests until the world has its recipe
import torch; torch.set_num_threads(2)
from vlm_models import tiny_llava
from obliviate.worlds.portraits import portraits_data
from obliviate.worlds.portraits_draw import draw, picture
from obliviate.models import vlm
from obliviate.models.sequences import mean_nll
from obliviate.evals import mllmu
d = portraits_data(n_people=100, n_public=10, n_holdout=10, seed=0)
path = tiny_llava("/tmp/llava_w", d)
model, proc = vlm.load(path)
tok = proc.tokenizer
def pictures(i):
    n, _, k = i.rpartition("#"); return draw(d.looks[n], picture(n, int(k)))
ad = vlm.VisionLanguageAdapter(proc, pictures)
items = [i for p in d.people + d.public for i in d.train[p.name]]
t0 = time.time()
all_forms = "--all-forms" in sys.argv
if all_forms:
    from dataclasses import replace

    from obliviate.evals.mllmu import classification_question, cloze_question
    def choice(i):
        return f"{i.correct}. {i.options['ABCD'.index(i.correct)]}"
    items = [x for i in items for x in (i, replace(i, question=classification_question(i), answer=choice(i)),
                                        replace(i, question=cloze_question(i), answer=i.cloze_answer))]
enc = [ad.encode_item(tok, i) for i in items]
print("items", len(items), "encode s", round(time.time() - t0, 1),
      "tokens/item", sum(len(e.input_ids) for e in enc) / len(enc))
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
rng = random.Random(0); model.train(); t0 = time.time(); step = 0
while time.time() - t0 < (300 if all_forms else 240):
    batch = ad.collate(rng.sample(enc, 64), tok.pad_token_id)
    loss = mean_nll(model, batch); opt.zero_grad(); loss.backward(); opt.step(); step += 1
    if step % 50 == 0: print(step, round(time.time()-t0), float(loss), flush=True)
print("steps", step, "s/step", (time.time()-t0)/step)
model.eval()
sample = [i for p in d.people[:10] for i in d.train[p.name] if i.fact in ("birthplace", "occupation")]
rows = mllmu.evaluate_items(model, ad, tok, sample, max_new_tokens=12)
print(mllmu.aggregate(rows))
test = [i for p in d.people[:10] for i in d.test[p.name] if i.fact in ("birthplace", "occupation")]
print("test", mllmu.aggregate(mllmu.evaluate_items(model, ad, tok, test, max_new_tokens=12)))
