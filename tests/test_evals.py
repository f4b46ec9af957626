"""The evaluation package end to end on the tiny model: ranges, forward-pass counts, one-pass == naive, extraction
strength == brute-force greedy decoding."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_items, tiny_texts
from obliviate.data import TextItem
from obliviate.errors import ObliviateError
from obliviate.evals import metrics as M
from obliviate.evals import mia as MIA
from obliviate.evals import muse as MUSE
from obliviate.evals import tofu as TOFU
from obliviate.evals.evaluate import compare_to_retrain, evaluate_lm
from obliviate.models import causal_lm as lm
from obliviate.models import sequences


@pytest.fixture(scope="module")
def trained_lm(tiny_lm_dir):
    """The tiny model after a few steps on the QA answers, so that answers are partly memorised (non-trivial argmax
    patterns: some answers fully right, some wrong in places)."""
    model, tok = lm.load(tiny_lm_dir)
    torch.manual_seed(0)
    batch = lm.collate([lm.encode_qa(tok, i.question, i.answer) for i in tiny_items()], tok.pad_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = sequences.mean_nll(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    return model, tok


def _sets():
    items = tiny_items()
    return {"forget": items[:3], "retain": items[3:]}


@pytest.fixture(scope="module")
def result(trained_lm):
    model, tok = trained_lm
    texts = tiny_texts()
    calls = []
    out = evaluate_lm(model, tok, _sets(), texts[:3], texts[3:], batch_size=4, verbmem_max_new_tokens=24,
                      max_new_tokens=16, progress=lambda stage, done, total: calls.append((stage, done, total)))
    assert calls[-1][1] == calls[-1][2] == len(out["forward_passes_by_stage"])
    return out


def test_evaluate_lm_end_to_end_ranges(result):
    json.dumps(result, allow_nan=False)  # JSON-serialisable, no NaN
    agg = result["aggregate"]
    for name in ("forget", "retain"):
        assert len(result["per_item"][name]) == 3
        for row in result["per_item"][name]:
            assert isinstance(row["generated"], str)
            for key in ("answer_prob", "exact_memorization", "extraction_strength", "rouge_l_recall", "exact_answer",
                        "answer_prob_normalised"):
                assert 0.0 <= row[key] <= 1.0, (key, row[key])
            assert row["truth_ratio"] > 0 and math.isfinite(row["truth_ratio"])
            assert row["min_k"] <= 0 and math.isfinite(row["min_k_plus_plus"])
            assert row["answer_prob"] == pytest.approx(math.exp(-row["answer_nll"]))
        for key in ("probability_score", "truth_ratio_score", "rouge_l_recall", "exact_answer"):
            assert 0.0 <= agg[name][key] <= 1.0
    for key in ("model_utility", "forget_truth_ratio_score", "verbmem", "knowmem_forget", "knowmem_retain",
                "forget_accuracy", "retain_accuracy", "forget_paraphrased_accuracy", "privleak_auc"):
        assert 0.0 <= agg[key] <= 1.0, key
    assert set(agg["model_utility_components"]) == {"retain/prob", "retain/rouge", "retain/truth_ratio"}
    assert set(agg["mia"]) == set(MIA.DEFAULT_ATTACKS)
    assert all(0.0 <= v <= 1.0 for v in agg["mia"].values())
    # one likelihood pass per set (3 items <= chunk of 4); the total counts every decoding step too
    assert result["forward_passes_by_stage"]["forget:likelihood"] == 1
    assert result["forward_passes_by_stage"]["mia"] == 2  # 3 forget + 3 holdout texts share chunks of 4
    assert result["forward_passes"] == sum(result["forward_passes_by_stage"].values())


def test_one_pass_counts_and_matches_naive(trained_lm):
    model, tok = trained_lm
    items = tiny_items()  # 6 items, 2 + 3 sequences each
    chunk = 4
    with M.count_forward_passes(model) as fast:
        one = M.likelihood_metrics(model, tok, items, batch_size=chunk)
    with M.count_forward_passes(model) as slow:
        naive = M.likelihood_metrics(model, tok, items, naive=True)
    assert fast.n == math.ceil(len(items) / chunk) == 2
    assert slow.n > fast.n
    assert slow.n == len(items) * (5 + 1 + 3 + 1 + 3)  # 5 answer metrics, truth ratio 1+3, normalised prob 1+3
    for a, b in zip(one, naive):
        assert a.keys() == b.keys()
        for key in a:
            x, y = a[key], b[key]
            torch.testing.assert_close(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64),
                                       atol=1e-5, rtol=1e-5, msg=key)


def test_extraction_strength_equals_brute_force_greedy_decoding(trained_lm):
    model, tok = trained_lm
    items = tiny_items()
    rows = M.likelihood_metrics(model, tok, items)
    seen = set()
    for item, row in zip(items, rows):
        enc = lm.encode_qa(tok, item.question, item.answer)
        n_prompt = sum(1 for l in enc.labels if l == lm.IGNORE)
        # the answer's own tokens: extraction strength does not read the end-of-sequence token (OpenUnlearning)
        assert enc.n_end == 1 and enc.input_ids[-1] == tok.eos_token_id
        prompt, answer = enc.input_ids[:n_prompt], enc.input_ids[n_prompt:-enc.n_end]
        n = len(answer)
        k_star = n
        for k in range(n):  # shortest prefix from which real greedy decoding reproduces the rest
            ids = torch.tensor([prompt + answer[:k]])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n - k,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            if out[0, ids.shape[1]:].tolist() == answer[k:]:
                k_star = k
                break
        assert row["extraction_strength"] == pytest.approx(1 - k_star / n, abs=1e-6)
        seen.add(round(row["extraction_strength"], 3))
        if k_star == 0:  # the adapter's batched generate gives the full answer too
            assert lm.generate(model, tok, [prompt], max_new_tokens=n + 2)[0] == item.answer
    assert len(seen) >= 2  # the check is not vacuous: different items sit at different k*


def test_forget_quality_of_a_sample_against_itself_is_one(result):
    tr = [r["truth_ratio"] for r in result["per_item"]["forget"]]
    assert TOFU.forget_quality(tr, tr) == pytest.approx(1.0)


def test_compare_to_retrain(result, tiny_lm):
    model, tok = tiny_lm  # untrained model stands in for the retrain model
    texts = tiny_texts()
    retrain = evaluate_lm(model, tok, _sets(), texts[:3], texts[3:], batch_size=4, verbmem_max_new_tokens=8,
                          max_new_tokens=8)
    cmp = compare_to_retrain(result, retrain)
    assert 0.0 <= cmp["aggregate"]["forget_quality"] <= 1.0
    assert math.isfinite(cmp["aggregate"]["privleak"])
    assert "forget_quality" not in result["aggregate"]  # the input is not mutated
    same = compare_to_retrain(retrain, retrain)["aggregate"]
    assert same["forget_quality"] == pytest.approx(1.0) and same["privleak"] == pytest.approx(0.0)


def test_reference_and_gradnorm_attacks(trained_lm, tiny_lm):
    model, tok = trained_lm
    ref, _ = tiny_lm
    texts = tiny_texts()
    res = MIA.mia_aucs(model, tok, texts[:3], texts[3:], ["loss", "reference", "gradnorm"], reference_model=ref)
    assert set(res["auc"]) == {"loss", "reference", "gradnorm"}
    assert all(math.isfinite(s) for v in res["members"].values() for s in v)
    assert all(s <= 0 for s in res["members"]["gradnorm"])  # negated norms
    assert all(p.grad is None for p in model.parameters())  # GradNorm leaves no gradients behind
    with pytest.raises(ObliviateError, match="reference_model"):
        MIA.mia_scores(model, tok, texts, ["reference"])
    with pytest.raises(ObliviateError, match="unknown MIA attack"):
        MIA.mia_scores(model, tok, texts, ["bogus"])


def test_verbmem_needs_a_prefix(trained_lm):
    model, tok = trained_lm
    with pytest.raises(ObliviateError, match="prefix_chars"):
        MUSE.verbmem(model, tok, [TextItem("no prefix here")])


@pytest.mark.parametrize("template", ["qa", "chatml"])
def test_loss_and_zlib_of_an_answer_are_openunlearnings(trained_lm, template):
    """OpenUnlearning's LOSS and ZLib attacks (`evaluate_probability`, `extract_target_texts_from_processed_data`):
    avg_loss = cross-entropy summed over every labelled token (the answer and the format's end tokens) / their
    count; ZLib = avg_loss / len(zlib.compress(labels decoded without special tokens)). Recomputed here on one item
    from the logits; obliviate's scores are the same numbers, negated (higher = member)."""
    import zlib

    from obliviate.models import prompt_format as pf

    model, tok = trained_lm
    pf.use(tok, pf.resolve(tok, template))
    try:
        item = tiny_items()[0]
        e = lm.encode_qa(tok, item.question, item.answer)
        assert e.n_end >= 1  # the end token is there to be counted
        ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[..., :-1, :]
        ce = torch.nn.functional.cross_entropy(logits.transpose(-1, -2).double(), labels[..., 1:], ignore_index=-100,
                                               reduction="none").sum(-1)
        avg_loss = float(ce / (labels != -100).sum(-1))
        text = tok.decode(labels[labels != -100].tolist(), skip_special_tokens=True)
        scores = MIA.mia_scores(model, tok, [item], ["loss", "zlib"])
        assert -scores["loss"][0] == pytest.approx(avg_loss, rel=1e-6)
        assert -scores["zlib"][0] == pytest.approx(avg_loss / len(zlib.compress(text.encode("utf-8"))), rel=1e-6)
        answer_only = lm.encode_qa(tok, item.question, item.answer).answer_only()  # what was scored before
        stats = MIA.text_token_stats(model, tok, [item])[0]
        assert stats.answer.sum() == sum(x != -100 for x in answer_only.labels[1:])  # Min-K% keeps the answer's own
    finally:
        pf.use(tok, pf.resolve(tok, "auto"))
