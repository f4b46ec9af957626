"""A metric is declared once (registry.METRICS) and computed through its declaration: a language-model metric added as
one entry and one function is computed by evaluate_lm (or compare_to_retrain when it needs the retrain reference),
shown by the scorecard and the report with the declared title and direction; every aggregate key an evaluation
writes has its declaration."""
from __future__ import annotations

import pytest

from conftest import tiny_items, tiny_texts
from obliviate import registry
from obliviate.data import QAItem
from obliviate.registry import Metric


# ---- the functions of the metrics this test declares (what a contributor writes: one function each)
def forget_answer_nll(e) -> float:
    """Run metric: the mean answer NLL of the forget set, read from the per-item rows."""
    rows = e.per_item[e.forget]
    return sum(r["answer_nll"] for r in rows) / len(rows)


def forget_nll_gap(e) -> float:
    """Run metric that needs the retrain reference: its forget answer NLL minus the model's."""
    return forget_answer_nll(type(e)(e.retrain["per_item"], {}, e.config)) - forget_answer_nll(e)


def scored_positions(x) -> int:
    """Item metric on the likelihood pass: the answer's scored positions (answer and end tokens)."""
    return int(x.answer.mask.sum())


def answer_words(g) -> int:
    """Item metric on the greedy answers: words in the answer."""
    return len(g.text.split())


HERE = "test_metric_declarations:"
ADDED = {
    "forget_answer_nll": Metric("forget_answer_nll", HERE + "forget_answer_nll", "Mean forget answer NLL.", "", "lm",
                                "higher", "mean over items", "forget NLL", "{:.4f}", needs=("forget_set", "logprobs")),
    "forget_nll_gap": Metric("forget_nll_gap", HERE + "forget_nll_gap", "Retrain minus model forget NLL.", "", "lm",
                             "zero", "difference of two aggregates", "NLL gap", "{:+.3f}",
                             needs=("retrain", "forget_set")),
    "scored_positions": Metric("scored_positions", HERE + "scored_positions", "Scored positions.", "", "lm",
                               scope="item", needs=("logprobs",)),
    "answer_words": Metric("answer_words", HERE + "answer_words", "Words in the greedy answer.", "", "lm",
                           scope="item", needs=("generations",)),
}


def _evaluate(model, tok, **kwargs):
    from obliviate.evals.evaluate import evaluate_lm

    items = tiny_items()
    return evaluate_lm(model, tok, {"forget": items[:2], "retain": items[2:4]}, batch_size=4, max_new_tokens=3,
                       **kwargs)


@pytest.mark.filterwarnings("ignore:.*greedy answers")
def test_a_metric_added_as_one_declaration_and_one_function_is_computed_scored_and_reported(tiny_lm, monkeypatch,
                                                                                           capsys):
    from obliviate.bench.report import scorecard_html
    from obliviate.bench.scorecard import columns, print_scorecard
    from obliviate.evals.evaluate import compare_to_retrain

    model, tok = tiny_lm
    before = _evaluate(model, tok)
    assert not set(ADDED) & set(before["aggregate"]) and "scored_positions" not in before["per_item"]["forget"][0]
    for name, metric in ADDED.items():
        monkeypatch.setitem(registry.METRICS, name, metric)
    result = _evaluate(model, tok)
    forget = result["per_item"]["forget"]
    # the item metrics: a value per item, and (aggregate "mean over items") the set's mean in its block
    for row in forget:
        assert row["answer_words"] == len(row["generated"].split()) and row["scored_positions"] >= 1
    assert result["aggregate"]["forget"]["answer_words"] == pytest.approx(
        sum(r["answer_words"] for r in forget) / len(forget))
    # the run metric, from the same rows as before: nothing else changed
    assert result["aggregate"]["forget_answer_nll"] == pytest.approx(
        sum(r["answer_nll"] for r in before["per_item"]["forget"]) / 2)
    assert "forget_nll_gap" not in result["aggregate"]  # it needs the retrain reference
    sets = ("forget", "retain")
    assert {k: v for k, v in result["aggregate"].items() if k not in ADDED and k not in sets} == \
        {k: v for k, v in before["aggregate"].items() if k not in sets}
    for name in sets:
        assert {k: v for k, v in result["aggregate"][name].items() if k not in ADDED} == \
            before["aggregate"][name]
    compared = compare_to_retrain(result, result)["aggregate"]
    assert compared["forget_nll_gap"] == 0.0 and compared["forget_quality"] == 1.0

    # the scorecard and the report take its column, title and direction from the declaration
    assert ("forget_answer_nll", "forget NLL ↑", "{:.4f}") in columns() and ("forget_nll_gap", "NLL gap →0",
                                                                              "{:+.3f}") in columns()
    assert registry.METRICS["forget_answer_nll"].higher_is_better is True
    assert registry.METRICS["forget_nll_gap"].higher_is_better is None
    print_scorecard({"GradDiff": compared})
    terminal = capsys.readouterr().out
    assert "forget NLL ↑" in terminal and f"{compared['forget_answer_nll']:.4f}" in terminal
    page = scorecard_html({"GradDiff": compared})
    assert "<th>forget NLL ↑</th>" in page and "<th>NLL gap →0</th>" in page and "<td>+0.000</td>" in page


@pytest.mark.filterwarnings("ignore:.*greedy answers")
def test_every_key_a_language_model_evaluation_writes_is_declared(tiny_lm, tiny_lm_dir):
    from obliviate.evals.evaluate import compare_to_retrain, evaluate_lm
    from obliviate.models.causal_lm import load

    model, tok = tiny_lm
    reference, _ = load(tiny_lm_dir)
    items, texts = tiny_items(), tiny_texts()
    sets = {"forget": items[:2], "retain": items[2:4],
            "world_facts": [QAItem(i.question, i.answer, perturbed_answers=i.perturbed_answers, source="world_facts")
                            for i in items[4:]],
            "plain": [QAItem(i.question, i.answer) for i in items[4:]]}  # no perturbed answers: utility error
    result = evaluate_lm(model, tok, sets, texts[:3], texts[3:], reference_model=reference, batch_size=4,
                         max_new_tokens=3, verbmem_max_new_tokens=4)
    compared = compare_to_retrain(result, result)["aggregate"]
    assert {"mia", "verbmem", "forget_quality", "privleak", "model_utility_error", "retrain_comparison",
            "forget_paraphrased_accuracy"} <= set(compared)  # every kind of key is there to check
    assert registry.undeclared(compared, "lm", sets=sets) == []
    # the keys the runner adds beside the evaluation's
    assert all(registry.declaration(k, "lm") for k in ("utility_ratio", "unlearn_seconds", "eval_seconds"))
    inputs = {"question", "answer", "generated", "paraphrased_question", "generated_paraphrased"}
    for rows in result["per_item"].values():
        for key in set(rows[0]) - inputs:
            assert registry.declaration(key, "lm", ("item",)) is not None, key
    # a key nobody declared is found
    assert registry.undeclared({**compared, "new_score": 1.0}, "lm", sets=sets) == ["new_score"]
    assert registry.undeclared({"forget": {"new_mean": 1.0}}, "lm", sets=sets) == ["forget.new_mean"]


def test_the_canvas_world_scores_and_their_reference_values_are_declared():
    from obliviate.evals.canvas import _HEADLINE

    keys = [*_HEADLINE, *(p + k for p in registry.REFERENCE_PREFIXES for k in _HEADLINE), "ira_vs_original",
            "cra_vs_original", "n_forget", "n_forget_paraphrase", "n_retain", "kid_real_std", "kid_original_std"]
    assert registry.undeclared(dict.fromkeys(keys, 0.0), "t2i") == []
    assert registry.undeclared({"original_forget_accuracy": 0.0}, "t2i") == ["original_forget_accuracy"]


def test_declarations_are_well_formed():
    for m in registry.METRICS.values():
        assert m.scope in registry.SCOPES and set(m.needs) <= set(registry.NEEDS), m.name
        assert m.better in registry.ARROWS and set(m.families) <= {"lm", "t2i", "mllm", "any"}, m.name
    # every language-model metric is computed by a function that exists
    for m in registry.METRICS.values():
        if m.family == "lm" and m.target.startswith("obliviate.evals."):
            assert callable(m.load()), m.name
