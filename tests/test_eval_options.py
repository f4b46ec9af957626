"""`obliviate eval` on a user's instruct model: its chat template, TOFU's files, a retrain reference, and memory bounded
by the logits budget (no forward pass holds more tokens than it, and the numbers do not change)."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import one_line_error, tiny_items
from obliviate.cli import app
from test_benchmark_files import write_tofu


def test_eval_scores_tofu_files_through_the_template_against_a_retrain_model(tmp_path, chat_lm_dir,
                                                                             chat_retrain_dir):
    tofu = write_tofu(tmp_path / "TOFU")
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(app, ["eval", str(chat_lm_dir), "--tofu-dir", str(tofu), "--retrain-model",
                                 str(chat_retrain_dir), "--batch-size", "4", "--max-logit-tokens", "64",
                                 "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["forget_set"] == "TOFU forget10" and result["prompt_format"]["kind"] == "chat"
    agg = result["aggregate"]
    assert 0 <= agg["forget_quality"] <= 1 and agg["model_utility"] is not None
    assert result["config"]["max_logit_tokens"] == 64
    # the model knows the forget items through its template: greedy answers are exact
    assert [row["generated"] for row in result["per_item"]["forget"]] == [i.answer for i in tiny_items()[:2]]
    # the retrain model's evaluation from the first call serves as --retrain-eval with the same forget quality
    (tmp_path / "retrain.json").write_text(json.dumps({"per_item": {"forget": [
        {"truth_ratio": row["truth_ratio"]} for row in result["per_item"]["forget"]]}}))
    r = CliRunner().invoke(app, ["eval", str(chat_lm_dir), "--tofu-dir", str(tofu), "--retrain-eval",
                                 str(tmp_path / "retrain.json"), "--eval-set", f"{tofu / 'retain90.json'}:utility",
                                 "--out", str(tmp_path / "self.json"), "--quiet"])
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "self.json").read_text())
    assert again["aggregate"]["forget_quality"] == pytest.approx(1.0)
    assert "retain90" in again["config"]["utility_set_names"]  # FILE:ROLE: the stated role


def test_eval_options_are_checked_in_one_line(tmp_path, chat_lm_dir):
    tofu = write_tofu(tmp_path / "TOFU")
    base = ["eval", str(chat_lm_dir), "--tofu-dir", str(tofu), "--out", str(tmp_path / "e.json")]
    one_line_error(CliRunner().invoke(app, base + ["--dtype", "float8"]), "dtype")
    one_line_error(CliRunner().invoke(app, base + ["--template", "vicuna"]), "unknown template 'vicuna'")
    one_line_error(CliRunner().invoke(app, base + ["--eval-set", str(tofu / "retain90.json")]),
                   "retain90.json: state the set's role")
    one_line_error(CliRunner().invoke(app, base + ["--max-logit-tokens", "1"]), "max_logit_tokens")


def test_no_forward_pass_holds_more_logits_than_the_budget_and_the_numbers_do_not_change(chat_lm_dir):
    from obliviate.evals.evaluate import evaluate_lm
    from obliviate.models import causal_lm as lm

    model, tok = lm.load(chat_lm_dir)
    items = tiny_items()
    widths = []

    def record(_module, _args, output):  # tokens of logits each call holds (generation keeps the last position)
        widths.append(output.logits.shape[0] * output.logits.shape[1])
    handle = model.register_forward_hook(record)
    try:
        small = evaluate_lm(model, tok, {"forget": items[:3], "retain": items[3:]}, items[:3], items[3:],
                            max_logit_tokens=96, batch_size=32)
    finally:
        handle.remove()
    whole = evaluate_lm(model, tok, {"forget": items[:3], "retain": items[3:]}, items[:3], items[3:],
                        max_logit_tokens=10**6, batch_size=32)
    longest = max(len(lm.encode_qa(tok, i.question, p).input_ids) for i in items
                  for p in (i.answer, i.paraphrased_answer, *i.perturbed_answers))
    assert widths and max(widths) <= max(96, longest)
    for name in ("forget", "retain"):
        for a, b in zip(small["per_item"][name], whole["per_item"][name]):
            for key in ("answer_nll", "truth_ratio", "min_k_plus_plus", "extraction_strength"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert small["aggregate"]["mia"] == pytest.approx(whole["aggregate"]["mia"])


@pytest.mark.parametrize("method", ["GradDiff", "NPO", "SimNPO", "IdkPO"])
def test_a_training_logit_budget_gives_the_same_losses_and_gradients(chat_lm_dir, method):
    """Under train.max_logit_tokens the output head runs a few sequences at a time (each slice recomputed in the
    backward pass): the loss and every gradient are those of the whole batch at once."""
    import copy

    import torch

    from obliviate.methods.common import make_method
    from obliviate.models import causal_lm as lm

    model, tok = lm.load(chat_lm_dir)
    items = tiny_items()
    forget = lm.collate([lm.encode_qa(tok, i.question, i.answer) for i in items[:4]], tok.pad_token_id)
    forget["idk"] = lm.collate([lm.encode_qa(tok, i.question, "I don't know.") for i in items[:4]], tok.pad_token_id)
    retain = lm.collate([lm.encode_qa(tok, i.question, i.answer) for i in items[4:]], tok.pad_token_id)
    reference = copy.deepcopy(model).requires_grad_(False)
    m = make_method("lm", method)
    m.setup(model, reference)
    results = []
    for budget in (None, forget["input_ids"].shape[1]):  # whole batch; one sequence per slice
        model.zero_grad()
        with lm.logit_budget(budget):
            loss = m.losses(model, reference, forget, retain).total
        loss.backward()
        results.append((float(loss), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_training_budget_bounds_the_logits_each_pass_holds(chat_lm_dir):
    from obliviate.models import causal_lm as lm
    from obliviate.models import sequences

    model, tok = lm.load(chat_lm_dir)
    batch = lm.collate([lm.encode_qa(tok, i.question, i.answer) for i in tiny_items()], tok.pad_token_id)
    shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: shapes.append(out.shape))
    try:
        with lm.logit_budget(2 * batch["input_ids"].shape[1]):
            sequences.mean_nll(model, batch).backward()
    finally:
        handle.remove()
    assert shapes and all(s[0] * s[1] <= 2 * batch["input_ids"].shape[1] for s in shapes)
    assert len(shapes) == 6  # 3 slices, each made again in the backward pass


def test_the_evaluation_bar_counts_items_and_moves_within_a_stage(chat_lm_dir, capsys):
    """The bar's unit is an item (each set's items twice: likelihood and generation; the paraphrased questions; the
    membership texts), advanced batch by batch, so a long stage is not minutes of silence."""
    from obliviate import progress
    from obliviate.evals.evaluate import evaluate_lm
    from obliviate.models import causal_lm as lm

    model, tok = lm.load(chat_lm_dir)
    items = tiny_items()
    progress.set_enabled(True)
    progress.force_plain(True)
    try:
        evaluate_lm(model, tok, {"forget": items[:3], "retain": items[3:]}, items[:3], items[3:], batch_size=1)
    finally:
        progress.force_plain(False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("evaluate:")]
    total = 2 * 6 + 3 + 6  # likelihood and generation of 6 items, 3 paraphrased questions, 6 membership texts
    assert lines[-1].startswith(f"evaluate: {total}/{total} (100%)")
    assert len(lines) >= 5  # one line per tenth of the items, not one per stage
