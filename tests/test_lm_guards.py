"""Language-model generation-time guards (obliviate.guards.lm): ICU and GUARD on a tiny chat model built in code (a
ChatML template and a generation_config.json, saved with save_pretrained). GUARD's restriction and ICU's context are
checked by hand; a text the guard leaves alone gets the unguarded model's answers and likelihoods exactly; likelihoods
are those of the distribution generation draws from; a guard run changes no tensor, records its configuration,
evaluates, exports and is attacked through the guard (with the unguarded weights beside it)."""
from __future__ import annotations

import hashlib
import inspect
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error, tiny_items
from obliviate.cli import app
from obliviate.errors import ObliviateError
from obliviate.methods.common import make_method

runner = CliRunner()
ITEMS = tiny_items()
FORGET, RETAIN = ITEMS[:2], ITEMS[2:]  # Ada Lind (Lisbon) and Bo Karsk (Oslo) are forgotten


def _guard(name: str, **args):
    return make_method("lm", name, args).bind_items(FORGET, RETAIN)


def _load(folder, guard=None):
    from obliviate.models import causal_lm as lm

    model, tok = lm.load(folder)
    if guard is not None:
        guard.install(model.eval(), tok)
    return model.eval(), tok


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# ---- GUARD's rule, by hand -------------------------------------------------------------------------------------------
def test_forbidden_tokens_start_and_continue_a_forbidden_sequence():
    from obliviate.guards.lm.guard import Forbidden, key_words

    assert key_words("Where was Ada Lind born?", "Ada Lind was born in Lisbon.", "Ada Lind") == ["Lisbon"]
    assert key_words("What does Ed write?", "Ed writes poems about rivers.", "Ed") == ["writes", "poems", "rivers"]
    rule = Forbidden({"A": [[5, 6, 7], [9]], "B": [[3, 4]]})
    assert rule.banned(["A"], [1, 2]) == {5, 9}  # every sequence's first token
    assert rule.banned(["A"], [1, 5]) == {5, 9, 6}  # ... and the next one of a sequence the text has started
    assert rule.banned(["A"], [5, 6]) == {5, 9, 7}
    assert rule.banned(["A", "B"], [3]) == {5, 9, 3, 4}
    assert rule.banned([], [5, 6]) == set()


def test_restricted_distribution_is_the_papers_hard_match_with_a_finite_floor():
    from obliviate.guards.lm.guard import restrict

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, generator=gen)
    banned = torch.zeros(2, 7, dtype=torch.bool)
    banned[0, [1, 4]] = True  # row 1: nothing banned
    out = restrict(logits, banned, 1e-10)
    assert torch.equal(out[1], logits[1])
    p, q = logits[0].softmax(-1), out[0].double().softmax(-1)
    allowed = [0, 2, 3, 5, 6]
    # each forbidden token keeps floor / (1 + |F| floor); the allowed ones keep their ratios, renormalised
    assert q[[1, 4]].tolist() == pytest.approx([1e-10 / (1 + 2e-10)] * 2, rel=1e-4)
    torch.testing.assert_close(q[allowed] / q[allowed].sum(), (p[allowed] / p[allowed].sum()).double(), rtol=1e-5,
                               atol=1e-7)
    assert float(q.sum()) == pytest.approx(1.0)


# ---- GUARD through generation and likelihoods ------------------------------------------------------------------------
def test_guard_restricts_flagged_texts_and_leaves_the_others_exactly(chat_lm_dir):
    from obliviate.evals.metrics import greedy_answers, likelihood_metrics

    assert (chat_lm_dir / "generation_config.json").is_file() and (chat_lm_dir / "chat_template.jinja").is_file()
    plain, tok = _load(chat_lm_dir)
    guard = _guard("GUARD")
    assert guard.material == {"words": {"Ada Lind": ["Lisbon"], "Bo Karsk": ["Oslo"]}}
    guarded, gtok = _load(chat_lm_dir, guard)
    questions = [i.question for i in ITEMS] + [i.paraphrased_question for i in FORGET]
    before, after = greedy_answers(plain, tok, questions), greedy_answers(guarded, gtok, questions)
    # the original knows both forgotten birthplaces; through the guard neither is said, asked either way
    assert before[0].endswith("Lisbon.") and before[1].endswith("Oslo.")
    for n in (0, 2 + len(RETAIN)):
        assert "Lisbon" not in after[n]
    for n in (1, 3 + len(RETAIN)):
        assert "Oslo" not in after[n]
    # questions that name no forget subject: the unguarded answers and likelihoods, bit for bit
    assert after[2:2 + len(RETAIN)] == before[2:2 + len(RETAIN)]
    assert likelihood_metrics(guarded, gtok, RETAIN) == likelihood_metrics(plain, tok, RETAIN)
    # flagged: the true answer needs a forbidden token held at 1e-10 (about 23 nats more over its tokens: the answer
    # probability is per token), finite; the truth ratio falls
    lp, lg = likelihood_metrics(plain, tok, FORGET), likelihood_metrics(guarded, gtok, FORGET)
    for a, b in zip(lp, lg):
        extra = (b["answer_nll"] - a["answer_nll"]) * b["n_answer_tokens"]
        assert a["answer_prob"] > 0.9 and b["answer_prob"] < 0.1 and math.isfinite(b["answer_nll"])
        assert 20 < extra < 30 and b["truth_ratio"] < a["truth_ratio"]
    # remove() gives the model back: the plain answers again
    guard.remove(guarded, gtok)
    assert greedy_answers(guarded, gtok, questions[:1]) == before[:1]


def test_guarded_likelihood_is_the_distribution_generation_draws_from(chat_lm_dir):
    """Greedy decoding through the LogitsProcessor and a scoring pass through the hooks agree token by token, and
    the scoring pass's first restricted position is the rule applied by hand to the plain model's logits."""
    from obliviate.guards.lm.guard import restrict
    from obliviate.models import causal_lm as lm

    plain, tok = _load(chat_lm_dir)
    guard = _guard("GUARD")
    guarded, gtok = _load(chat_lm_dir, guard)
    prompt = lm.question_prompt(gtok, FORGET[0].question)
    ids = torch.tensor([prompt])
    out = guarded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                           pad_token_id=gtok.pad_token_id, eos_token_id=lm.stop_ids(gtok, guarded))
    new = out[0, len(prompt):].tolist()
    with torch.no_grad():
        scored = guarded(input_ids=out).logits[0]  # the hooks restrict a plain forward call too
        raw = plain(input_ids=out).logits[0]
    steps = scored[len(prompt) - 1:len(prompt) - 1 + len(new)]
    assert steps.argmax(-1).tolist() == new
    # by hand, at the first answer position: every first token of " Lisbon" / "Lisbon" held at the floor
    banned = torch.zeros(raw.shape[-1], dtype=torch.bool)
    firsts = {tok(w, add_special_tokens=False)["input_ids"][0] for w in (" Lisbon", "Lisbon")}
    banned[list(firsts)] = True
    torch.testing.assert_close(scored[len(prompt) - 1], restrict(raw[len(prompt) - 1], banned, 1e-10))
    # before the prompt names Ada Lind, nothing is restricted
    named_at = len(tok(FORGET[0].question.split(" born")[0], add_special_tokens=False)["input_ids"])
    torch.testing.assert_close(scored[:named_at], raw[:named_at], rtol=0, atol=0)
    # the head run on the last positions only (generation's logits_to_keep) gets the same rule; a head over fewer
    # rows may round differently in the last bit (CPU kernels block the product by its size), a missed rule by far more
    with torch.no_grad():
        torch.testing.assert_close(guarded(input_ids=out, logits_to_keep=3).logits[0], scored[-3:], rtol=1e-5,
                                   atol=1e-5)
        with pytest.raises(ObliviateError, match="GUARD reads the token ids"):
            guarded(inputs_embeds=guarded.get_input_embeddings()(out))
    # a forward call continuing a key-value cache would read only the new tokens: refused, not scored wrongly
    with torch.no_grad():
        first = guarded(input_ids=ids, use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        key = "cache" if "cache" in inspect.signature(type(guarded).forward).parameters else "past_key_values"
        with pytest.raises(ObliviateError, match="GUARD scores whole sequences"):
            guarded(input_ids=out[:, len(prompt):len(prompt) + 1], **{key: cache})


def test_guard_detect_always_restricts_every_text(chat_lm_dir):
    from obliviate.evals.metrics import greedy_answers

    guarded, tok = _load(chat_lm_dir, _guard("GUARD", detect="always"))
    answers = greedy_answers(guarded, tok, [i.question for i in ITEMS])
    assert not any("Lisbon" in a or "Oslo" in a for a in answers)


# ---- ICU's context, by hand ------------------------------------------------------------------------------------------
def test_icu_context_goes_through_the_chat_template(chat_lm_dir):
    from obliviate.models import causal_lm as lm

    plain, tok = _load(chat_lm_dir)
    guard = _guard("ICU", forget_examples=1, correct_examples=2, seed=3)
    _, gtok = _load(chat_lm_dir, guard)
    flipped = {e["question"]: e["answer"] for e in guard.material["forget"]}
    # the flipped answer of an item with perturbed answers is one of them (never its true answer)
    for item in FORGET:
        assert flipped[item.question] in item.perturbed_answers
    correct = [(e["question"], e["answer"]) for e in guard.material["correct"]]
    assert len(correct) == 2 and all(any(q == i.question and a == i.answer for i in RETAIN) for q, a in correct)
    for item in (FORGET[1], RETAIN[0]):
        nearest = FORGET[1] if item is FORGET[1] else FORGET[0]  # its own item, else the first (ties: set order)
        turns = [(nearest.question, flipped[nearest.question]), *correct, (item.question, None)]
        messages = [m for q, a in turns for m in ([{"role": "user", "content": q}] +
                                                  ([{"role": "assistant", "content": a}] if a else []))]
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert gtok.decode(lm.question_prompt(gtok, item.question)) == want
    # the answer scored after the prompt is the same tokens; the plain tokenizer asks without the context
    prompt, answer = lm.question_prompt(gtok, RETAIN[0].question), lm.encode_answer(gtok, RETAIN[0].answer)
    assert lm.encode_qa(gtok, RETAIN[0].question, RETAIN[0].answer).input_ids == prompt + answer
    guard.remove(None, gtok)
    assert lm.question_prompt(gtok, RETAIN[0].question) == lm.question_prompt(tok, RETAIN[0].question)


def test_icu_in_the_raw_format_and_its_settings(tiny_lm_dir):
    from obliviate.models import causal_lm as lm

    guard = _guard("ICU", forget_examples=1, correct_examples=0, label="refusal", instruction="rwku")
    _, tok = _load(tiny_lm_dir, guard)
    q = FORGET[0].question
    want = (f"Question: {q}\nAnswer: I don't know.\n\nQuestion: You are an AI Assistant who is supposed to unlearn "
            f"about Ada Lind and provide answers without its knowledge as if you never knew about it. Don\u2019t tell "
            f"anyone that you unlearned anything.\n{q}\nAnswer:")
    assert tok.decode(lm.question_prompt(tok, q), skip_special_tokens=True) == want
    # no perturbed answers: another forget item's answer is the flipped one
    from dataclasses import replace
    bare = [replace(i, perturbed_answers=()) for i in FORGET]
    material = make_method("lm", "ICU", {}).bind_items(bare, RETAIN).material
    assert [e["answer"] for e in material["forget"]] == [FORGET[1].answer, FORGET[0].answer]


# ---- a guard run -----------------------------------------------------------------------------------------------------
def _files(tmp, subjects: bool = True):
    def write(path, items):
        path.write_text("".join(json.dumps({"question": i.question, "answer": i.answer,
                                            "paraphrased_answer": i.paraphrased_answer,
                                            "perturbed_answer": list(i.perturbed_answers),
                                            **({"subject": i.subject} if subjects else {})}) + "\n" for i in items))
        return str(path)
    return write(tmp / "forget.jsonl", FORGET), write(tmp / "retain.jsonl", RETAIN)


def _run(tmp, model_dir, method, args=None, subjects=True):
    from obliviate.config import build_config
    from obliviate.runners import run

    forget, retain = _files(tmp, subjects)
    config = build_config({"method": method, "method_args": args or {}, "model": str(model_dir), "name": "g",
                           "output_dir": str(tmp / "runs"), "forget_file": forget, "retain_file": retain,
                           "eval": {"batch_size": 8}})
    return run(config, log=lambda *_: None)


@pytest.fixture(scope="module")
def guard_run(chat_lm_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guard_run")
    before = _digest(chat_lm_dir)
    run = _run(tmp, chat_lm_dir, "GUARD")
    assert _digest(chat_lm_dir) == before  # the user's folder untouched
    return run, tmp


def test_guard_run_records_its_configuration_and_evaluates_through_it(guard_run):
    from safetensors.torch import load_file

    run, _ = guard_run
    assert load_file(str(run / "changed.safetensors")) == {}  # no tensor changes
    record = json.loads((run / "obliviate_guard.json").read_text())
    assert record["guard"] == "GUARD" and record["family"] == "lm" and record["config"]["detect"] == "subjects"
    assert record["material"] == {"words": {"Ada Lind": ["Lisbon"], "Bo Karsk": ["Oslo"]}}
    assert record["load"] == "obliviate.guards.load_guarded(FOLDER)"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["guard"] == record
    assert "GUARD is a generation-time guard: no weight changed" in (run / "report.html").read_text()
    # forgotten through the guard, where the original (same weights, no guard) answers
    assert metrics["original"]["forget_accuracy"] == 1.0 and metrics["forget_accuracy"] == 0.0
    rows = json.loads((run / "per_item.json").read_text())
    assert [r["question"] for r in rows["forget"]] == [i.question for i in FORGET]
    assert "Lisbon" not in rows["forget"][0]["generated"] and "Oslo" not in rows["forget"][1]["generated"]
    # the retain people are never named with a forget subject: their numbers are the original's exactly
    assert metrics["retain"] == metrics["original"]["retain"]


def test_guard_run_exports_a_folder_that_loads_with_the_guard(guard_run):
    from obliviate.evals.metrics import greedy_answers
    from obliviate.guards import load_guarded

    run, tmp = guard_run
    result = runner.invoke(app, ["export", str(run), str(tmp / "exported")])
    assert result.exit_code == 0, result.output
    assert "obliviate.guards.load_guarded(" in result.output and "transformers' from_pretrained" in result.output
    exported = tmp / "exported"
    assert json.loads((exported / "obliviate_guard.json").read_text()) == json.loads(
        (run / "obliviate_guard.json").read_text())
    assert "transformers' `from_pretrained` alone gives the unguarded model" in (exported / "README.md").read_text()
    model, tok = load_guarded(exported)
    rows = json.loads((run / "per_item.json").read_text())["forget"]
    assert greedy_answers(model, tok, [r["question"] for r in rows]) == [r["generated"] for r in rows]
    # a run on the guarded folder would drop the guard: refused in one line
    from obliviate.config import build_config
    from obliviate.runners import run as run_config
    forget, retain = _files(tmp)
    with pytest.raises(ObliviateError, match="carries a generation-time guard") as e:
        run_config(build_config({"method": "GradDiff", "model": str(exported), "output_dir": str(tmp / "again"),
                                 "forget_file": forget, "retain_file": retain}), log=lambda *_: None)
    assert "\n" not in str(e.value)


def test_attack_on_a_guard_run_reports_guarded_and_unguarded_rows(guard_run):
    from obliviate.api import attack_run
    from obliviate.bench.scorecard import robustness_rows

    run, _ = guard_run
    # quantization and in-context recall on guard runs: the slow world test below
    results = attack_run(run, ["jailbreak", "relearn"],
                         {"relearn.steps": 1, "relearn.lr": 1e-3, "relearn.data": "retain", "max_new_tokens": 12},
                         log=lambda *_: None)
    for name in ("jailbreak", "relearn_retain"):
        saved = json.loads((run / "attacks" / f"{name}.json").read_text())
        assert list(saved["models"]) == ["GUARD", "original", "GUARD (unguarded)"], name
        assert saved["per_item"]["GUARD (unguarded)"] == saved["per_item"]["original"]
        assert "the guard changes no weight" in saved["caption"]
    jailbreak = results["jailbreak"]["models"]
    # asked plainly, the guard hides both facts; the same weights without it recall both
    assert jailbreak["GUARD"]["recall_plain"] == 0.0 and jailbreak["GUARD (unguarded)"]["recall_plain"] == 1.0
    # relearning fine-tunes the weights under the guard: still asked through it, the facts stay hidden
    relearn = results["relearn_retain"]["models"]
    assert relearn["GUARD"]["recall"] == 0.0 and relearn["GUARD (unguarded)"]["recall_before"] == 1.0
    _, rows = robustness_rows({"GUARD": {"jailbreak": results["jailbreak"]}})
    assert list(rows) == ["GUARD", "GUARD (unguarded)", "original"]


def test_icu_run_records_its_examples_and_changes_no_tensor(chat_lm_dir, tmp_path):
    from safetensors.torch import load_file

    from obliviate.guards import read_guard

    run = _run(tmp_path, chat_lm_dir, "ICU", {"correct_examples": 2})
    assert load_file(str(run / "changed.safetensors")) == {}
    guard, record = read_guard(run)
    assert record["guard"] == "ICU" and len(record["material"]["forget"]) == 2
    assert len(record["material"]["correct"]) == 2 and guard.material == record["material"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["prompt_format"]["context"] == {"guard": "ICU", "forget_examples": 2, "pool": 2, "correct": 2}
    # every question was asked after the context: the run's answers differ from the original's on the forget set
    assert metrics["forget"]["answer_prob"] < metrics["original"]["forget"]["answer_prob"]


# ---- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, args, message", [
    ("ICU", {"forget_examples": 0}, "forget_examples must be at least 1"),
    ("ICU", {"correct_examples": -1}, "correct_examples must be an integer >= 0"),
    ("ICU", {"label": "random"}, "label must be one of flipped, refusal"),
    ("ICU", {"refusal": " "}, "refusal must be a non-empty string"),
    ("ICU", {"shots": 3}, "unknown key(s) ['shots'] for ICU"),
    ("GUARD", {"detect": "mlp"}, "detect must be one of subjects, always"),
    ("GUARD", {"floor": 0.5}, "floor must be a probability in (0, 0.001)"),
    ("GUARD", {"min_word_length": 0}, "min_word_length must be an integer >= 1"),
])
def test_bad_guard_settings_are_one_line_errors(name, args, message):
    with pytest.raises(ObliviateError) as e:
        make_method("lm", name, args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_what_a_guard_cannot_serve_is_one_line(chat_lm_dir, tmp_path):
    with pytest.raises(ObliviateError, match="correct_examples = 9 but the run has 4 retain questions"):
        make_method("lm", "ICU", {"correct_examples": 9}).bind_items(FORGET, RETAIN)
    with pytest.raises(ObliviateError) as e:
        _run(tmp_path, chat_lm_dir, "GUARD", subjects=False)
    assert "needs every forget item's subject" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "runs" / "g").exists()  # nothing half-written
    bad = tmp_path / "record"
    bad.mkdir()
    (bad / "obliviate_guard.json").write_text(json.dumps({"guard": "GUARD", "family": "lm", "config": {},
                                                          "material": ["Lisbon"]}))
    from obliviate.guards import read_guard
    with pytest.raises(ObliviateError, match="material must be a JSON object"):
        read_guard(bad)
    result = runner.invoke(app, ["ls", "methods"])
    assert "ICU (guard)" in result.output and "GUARD (guard)" in result.output
    one_line_error(_cli_bad_args(tmp_path), "detect must be one of subjects, always")
    from obliviate.loops.lm import unlearn  # a guard handed to the training loop: refused, not an AttributeError
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for name in ("ICU", "GUARD"):
        with pytest.raises(ObliviateError, match=f"{name} is a generation-time guard: it trains nothing"):
            unlearn(AutoModelForCausalLM.from_pretrained(chat_lm_dir), AutoTokenizer.from_pretrained(chat_lm_dir),
                    tiny_items()[:2], tiny_items()[2:4], make_method("lm", name))


def _cli_bad_args(tmp_path):
    forget, retain = _files(tmp_path)
    config = tmp_path / "bad.yaml"
    config.write_text(f"method: GUARD\nmethod_args: {{detect: mlp}}\nmodel: {tmp_path}\nforget_file: {forget}\n"
                      f"retain_file: {retain}\noutput_dir: {tmp_path / 'runs'}\n")
    return runner.invoke(app, ["run", str(config), "--quiet"])


# ---- the built-in world, the bench -----------------------------------------------------------------------------------
@pytest.mark.slow  # a tiny profiles world, two guard runs and the recovery attacks: about a minute on 2 shared cores
def test_guards_on_the_profiles_world_through_evaluation_and_the_recovery_attacks(tmp_path):
    from conftest import tiny_profiles_config
    from obliviate.api import attack_run

    cfg = tiny_profiles_config(tmp_path)
    for method, args in (("GUARD", "{}"), ("ICU", "{forget_examples: 1, correct_examples: 2}")):
        r = runner.invoke(app, ["run", str(cfg), "--quiet", f"name={method}", f"method={method}",
                                f"method_args={args}"])
        assert r.exit_code == 0, r.output
        run = tmp_path / "runs" / method
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["guard"]["guard"] == method and "forget_quality" in metrics
        results = attack_run(run, ["in_context", "quantize_int8", "relearn"],
                             {"relearn.steps": 2, "relearn.lr": 1e-3, "max_new_tokens": 16}, log=lambda *_: None)
        for name, result in results.items():
            assert list(result["models"]) == [method, "original", "retrain", f"{method} (unguarded)"], name
            assert result["per_item"][f"{method} (unguarded)"] == result["per_item"]["original"], name
    guard = json.loads((tmp_path / "runs" / "GUARD" / "metrics.json").read_text())
    # the tiny world's model (one epoch) knows little; what it says of the forget people, the guard holds back
    assert guard["forget"]["answer_prob"] <= guard["original"]["forget"]["answer_prob"]


@pytest.mark.slow  # a bench of four guard cells, each its own process: about a minute on 2 shared cores
def test_guards_in_a_bench_grid(tmp_path, chat_lm_dir, monkeypatch):
    from obliviate.bench.engine import run_bench

    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path / "cache"))
    forget, retain = _files(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""
base:
  model: {chat_lm_dir}
  retain_file: {retain}
  eval: {{batch_size: 8}}
seeds: [0]
allow_fewer_seeds: true
validation: {{forget_file: {forget}}}
reported: {{forget_file: {forget}}}
noise_floor: []
select: {{minimize: forget_accuracy}}
methods:
  - name: GUARD
    grid: {{method_args.detect: [subjects, always]}}
  - name: ICU
    grid: {{method_args.correct_examples: [2]}}
""")
    result = run_bench(spec, tmp_path / "out", log=lambda *_: None)
    assert all(r["status"] == "done" for r in result["cells"]), [r.get("reason") for r in result["cells"]]
    board = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "GUARD" in board and "ICU" in board
