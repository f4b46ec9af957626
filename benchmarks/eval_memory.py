"""Benchmark (h): peak memory of `evaluate_lm` on a model with a 128k vocabulary (Llama-3's 128,256), built in code,
with the logits of a whole batch held at once (max_logit_tokens large: what evaluation did before the budget) and with
the default budget (8192 tokens of logits per forward pass).

Usage: python benchmarks/eval_memory.py [--before DIR] [--train]
  --train: instead, one GradDiff step (forward and backward on 32 forget and 32 retain items) with the training
  budget off (the whole batch's logits) and at train.max_logit_tokens 1024.
  --before DIR: also run the code of another checkout (e.g. `git worktree add /tmp/before 245dc9b` for the code
  before the budget existed), with its own defaults.
Each setting runs in its own process: a 2-layer Llama (hidden 64; its embedding and head are most of its 16.5M
parameters) and a byte-level tokenizer, 32 TOFU-shaped items with 3 perturbed answers (5 sequences each) in one
batch of 32 items, likelihood metrics only. The number is the process's peak resident memory (ru_maxrss) minus its
resident memory after loading; the per-item values of the two settings are compared.
"""
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
from obliviate import progress
from obliviate.data import QAItem
from obliviate.evals import metrics as M
from obliviate.worlds.tokenizer import train_tokenizer
progress.set_enabled(False)
items = [QAItem(f"Where was person {i} born, and what did they write?",
                f"Person {i} was born in city {i % 7} and wrote {i % 5} novels about the sea and the mountains.",
                paraphrased_answer=f"City {i % 7} is where person {i} was born; they wrote {i % 5} sea novels.",
                perturbed_answers=tuple(f"City {(i + j) % 7} is where person {i} was born; they wrote {j} novels."
                                        for j in (1, 2, 3))) for i in range(32)]
tok = train_tokenizer([i.question + " " + i.answer for i in items], vocab_size=400)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)).eval()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.time()
import inspect
if sys.argv[2] == "train":
    from obliviate.methods.common import make_method
    from obliviate.models import causal_lm as lm
    enc = [lm.encode_qa(tok, i.question, a) for i in items for a in (i.answer, i.paraphrased_answer)]
    forget, retain = lm.collate(enc[::2], tok.pad_token_id), lm.collate(enc[1::2], tok.pad_token_id)
    method = make_method("lm", "GradDiff")
    method.setup(model, None)
    with lm.logit_budget(int(sys.argv[1]) or None):
        parts = method.losses(model, None, forget, retain)
        parts.total.backward()
    rows = [{"truth_ratio": float(parts.total)}]
else:
    budget = {"max_logit_tokens": int(sys.argv[1])} if "max_logit_tokens" in inspect.signature(
        M.likelihood_metrics).parameters else {}
    rows = M.likelihood_metrics(model, tok, items, batch_size=32, **budget)
seconds = time.time() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"max_logit_tokens": int(sys.argv[1]), "rss_after_load_mib": round(before / 1024),
                  "peak_rss_mib": round(peak / 1024), "increase_mib": round((peak - before) / 1024),
                  "seconds": round(seconds, 1), "truth_ratios": [r["truth_ratio"] for r in rows]}))
"""

import os

mode = "train" if "--train" in sys.argv else "eval"
runs = [("whole batch", None, 10**9), ("4096 (default)", None, 4096), ("1024", None, 1024)]
if mode == "train":
    runs = [("no budget (the whole batch)", None, 0), ("train.max_logit_tokens 1024", None, 1024)]
if "--before" in sys.argv:
    runs.insert(0, ("code before the budget", sys.argv[sys.argv.index("--before") + 1], 0))
results = []
for label, src, budget in runs:
    env = dict(os.environ, PYTHONPATH=os.path.join(src, "src")) if src else None
    out = subprocess.run([sys.executable, "-c", CHILD, str(budget), mode], capture_output=True, text=True,
                         check=True, env=env)
    results.append({"label": label, **json.loads(out.stdout.strip().splitlines()[-1])})
same = all(max(abs(a - b) for a, b in zip(results[0]["truth_ratios"], r["truth_ratios"])) < 1e-4 for r in results)
print("| max_logit_tokens | after loading MiB | peak MiB | increase MiB | seconds |")
print("|---|---|---|---|---|")
for r in results:
    print(f"| {r['label']} | {r['rss_after_load_mib']} | {r['peak_rss_mib']} | {r['increase_mib']} | {r['seconds']} |")
print(f"{'per-item truth ratios' if mode == 'eval' else 'the losses'} equal across settings (to 1e-4): {same}")
