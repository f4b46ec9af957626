"""Memory on real-sized models (benchmarks/README.md (p)): evaluation runs the output head a few sequences at a time,
so the full-vocabulary logits of a whole forward pass never exist, with the same numbers; training holds at most
train.max_logit_tokens tokens of logits by default; the loop's result carries no gradients (one model's worth of
memory through evaluation and saving)."""
from __future__ import annotations

import pytest

from conftest import tiny_items


def test_evaluation_runs_the_head_a_slice_at_a_time_with_the_same_numbers(chat_lm_dir, monkeypatch):
    from obliviate.evals import metrics as M
    from obliviate.models import causal_lm as lm
    from obliviate.models import sequences

    model, tok = lm.load(chat_lm_dir)
    items = tiny_items()
    longest = max(len(lm.encode_qa(tok, i.question, a).input_ids) for i in items
                  for a in (i.answer, i.paraphrased_answer, *i.perturbed_answers))
    monkeypatch.setattr(M, "SLICE_TOKENS", 2 * longest)  # two sequences a slice; a pass holds all 30
    positions = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda _m, _a, out: positions.append(out.shape[0] * out.shape[1]))
    try:
        with M.count_forward_passes(model) as passes:
            sliced = M.likelihood_metrics(model, tok, items, batch_size=32, max_logit_tokens=10**6)
    finally:
        handle.remove()
    assert passes.n == 1  # one pass of the decoder over the 30 sequences: the slices are the head's alone
    assert len(positions) > 1 and max(positions) <= 2 * longest
    monkeypatch.setattr(sequences, "head_splits", lambda *_: False)  # the model's own forward: the whole pass's logits
    whole = M.likelihood_metrics(model, tok, items, batch_size=32, max_logit_tokens=10**6)
    for a, b in zip(sliced, whole):
        for key in ("answer_nll", "truth_ratio", "min_k", "min_k_plus_plus", "extraction_strength",
                    "exact_memorization"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_training_holds_a_logit_budget_by_default(tiny_lm, monkeypatch):
    from obliviate.config import LMTrainConfig, TrainConfig
    from obliviate.loops.lm import unlearn
    from obliviate.models import causal_lm as lm

    assert LMTrainConfig().max_logit_tokens == LMTrainConfig.of(TrainConfig()).max_logit_tokens == 1024
    budgets = []
    real = lm.logit_budget

    def recording(tokens):
        budgets.append(tokens)
        return real(tokens)
    monkeypatch.setattr(lm, "logit_budget", recording)
    model, tok = tiny_lm
    unlearn(model, tok, tiny_items()[:2], tiny_items()[2:], "GradDiff", TrainConfig(max_steps=1, lr=1e-3))
    assert budgets == [1024]


def test_the_unlearned_model_carries_no_gradients(tiny_lm):
    from obliviate.config import TrainConfig
    from obliviate.loops.lm import unlearn

    model, tok = tiny_lm
    result = unlearn(model, tok, tiny_items()[:2], tiny_items()[2:], "GradDiff", TrainConfig(max_steps=2, lr=1e-3))
    assert all(p.grad is None for p in result.model.parameters())
    assert all(p.requires_grad for p in result.model.parameters())  # trainable again, as it was given


_FRAGMENTS = r"""
import sys, torch
if sys.argv[1] == "cli":
    import obliviate.cli  # noqa: F401  (what the `obliviate` command runs first)
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
big = torch.ones(16 * 2**20 // 4); del big   # freeing a mapped 16 MB block raises glibc's threshold to 16 MB
base = rss_mib()
kept = [torch.ones(4 * 2**20 // 4) for _ in range(100)]  # 400 MB of 4 MB blocks, like a step's activations
last = kept[-1]
del kept  # all freed but the last, which pins the top of the heap
print(round(rss_mib() - base))
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.slow  # a fresh interpreter that allocates and frees: about 7 s on 2 cores
def test_the_command_line_gives_freed_tensor_memory_back():
    import subprocess
    import sys

    held = {how: int(subprocess.run([sys.executable, "-c", _FRAGMENTS, how], capture_output=True, text=True,
                                    check=True).stdout.strip()) for how in ("plain", "cli")}
    assert held["plain"] > 300  # the heap kept what was freed: glibc's default behaviour
    assert held["cli"] < 50
