"""Generation stops where the model stops: on the end ids its generation_config.json declares, the tokenizer's EOS
and the prompt format's end of turn, even when that end is an ordinary added token; answers that run to
max_new_tokens are counted and warned about; the run records which ids stop generation."""
from __future__ import annotations

import json
import warnings

import pytest

from conftest import tiny_items
from obliviate.models import causal_lm as lm
from obliviate.models import prompt_format as pf

TURN_END = "<|turn_end|>"


@pytest.fixture(scope="module")
def added_turns_dir(tmp_path_factory):
    """A tiny chat model that ends its turn with <|turn_end|>: an added token, neither special nor EOS, named as an
    end id in generation_config.json only. Plain `model.generate` answers and stops there."""
    from chat_models import train_chat_model

    path = train_chat_model(tmp_path_factory.mktemp("added_turns"), tiny_items(), kind="added_turns")
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == [
        json.loads((path / "tokenizer.json").read_text())["added_tokens"][-1]["id"]]
    return path


def _jsonl(path, items):
    path.write_text("".join(json.dumps({"question": i.question, "answer": i.answer,
                                        "paraphrased_answer": i.paraphrased_answer,
                                        "perturbed_answer": list(i.perturbed_answers),
                                        "paraphrased_question": i.paraphrased_question}) + "\n" for i in items))
    return path


def test_the_end_of_turn_is_an_added_token_the_tokenizer_does_not_mark(added_turns_dir):
    model, tok = lm.load(added_turns_dir)
    end = tok.convert_tokens_to_ids(TURN_END)
    assert tok.eos_token == "</s>" and end not in tok.all_special_ids  # neither EOS nor special
    ids = lm.question_prompt(tok, tiny_items()[0].question)
    import torch
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=30, do_sample=False)[0, len(ids):].tolist()
    assert tok.decode(out) == tiny_items()[0].answer + TURN_END  # plain generate answers, and stops there
    assert lm.stop_ids(tok, model)[0] == end


def test_eval_scores_the_answers_where_the_model_stops(added_turns_dir, tmp_path):
    from typer.testing import CliRunner

    from obliviate.cli import app

    items = tiny_items()
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(app, ["eval", str(added_turns_dir), "--forget-file", str(_jsonl(tmp_path / "f.json",
                                                                                              items[:2])),
                                 "--retain-file", str(_jsonl(tmp_path / "r.json", items[2:])), "--out", str(out),
                                 "--batch-size", "8", "--quiet"])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    agg = result["aggregate"]
    assert agg["forget_accuracy"] == 1.0 and agg["retain_accuracy"] == 1.0, [
        row["generated"] for rows in result["per_item"].values() for row in rows]  # the old code: 0.0 and 0.0
    assert agg["answers_at_token_limit"] == 0 and agg["answers_generated"] == len(items) + 2  # + 2 paraphrased
    stops = result["prompt_format"]
    assert TURN_END in stops["stop_tokens"] and "</s>" in stops["stop_tokens"]
    assert stops["stop_ids"][stops["stop_tokens"].index(TURN_END)] == json.loads(
        (added_turns_dir / "generation_config.json").read_text())["eos_token_id"][0]


def test_a_run_on_it_scores_above_zero_and_records_the_stop_ids(added_turns_dir, tmp_path):
    from obliviate.config import build_config
    from obliviate.runners import run

    items = tiny_items()
    cfg = build_config({
        "method": "GradDiff", "model": str(added_turns_dir), "output_dir": str(tmp_path / "runs"), "name": "gd",
        "forget_file": str(_jsonl(tmp_path / "forget.json", items[:1])),
        "retain_file": str(_jsonl(tmp_path / "retain.json", items[1:])),
        "train": {"lr": 1e-5, "max_steps": 1, "batch_size": 5}, "eval": {"batch_size": 8}})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ran to max_new_tokens.*")
        folder = run(cfg, log=lambda *_: None)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["retain_accuracy"] > 0.5 and metrics["forget_accuracy"] > 0  # a tiny step keeps the answers
    assert metrics["answers_at_token_limit"] == 0
    assert TURN_END in metrics["prompt_format"]["stop_tokens"]
    generated = [r["generated"] for rows in json.loads((folder / "per_item.json").read_text()).values() for r in rows]
    assert not any(TURN_END in g for g in generated)


def test_every_declared_end_id_stops_generation(tiny_lm):
    """generation_config.eos_token_id, an int or a list, stops generation even where the format does not name it:
    the first token the model would write, declared an end id, leaves an empty answer."""
    model, tok = tiny_lm
    prompt = lm.question_prompt(tok, tiny_items()[0].question)
    free = []
    lm.generate(model, tok, [prompt], max_new_tokens=6, at_limit=free)
    first = model.generate(input_ids=__import__("torch").tensor([prompt]), max_new_tokens=1, do_sample=False,
                           pad_token_id=tok.pad_token_id)[0, -1].item()
    assert first != tok.eos_token_id and free == [True]  # an untrained model runs on
    for declared in (first, [tok.eos_token_id, first]):
        model.generation_config.eos_token_id = declared
        assert first in lm.stop_ids(tok, model) and tok.eos_token_id in lm.stop_ids(tok, model)
        hit = []
        assert lm.generate(model, tok, [prompt], max_new_tokens=6, at_limit=hit) == [""] and hit == [False]


def test_the_loader_records_the_declared_ids_for_the_tokenizer(added_turns_dir):
    _, tok = lm.load(added_turns_dir)
    record = pf.stops_record(tok, pf.resolve(tok, "qa"))  # the raw format does not name <|turn_end|>; the model does
    assert TURN_END in record["stop_tokens"]
    assert TURN_END not in pf.stops_record(lm.load_tokenizer(added_turns_dir), pf.resolve(tok, "qa"))["stop_tokens"]


def test_an_end_of_plain_text_is_matched_as_text(tiny_lm):
    _, tok = tiny_lm
    fmt = pf.resolve(tok, "custom", tags={"system_start": "", "system_end": "", "user_start": "Q: ",
                                          "user_end": "\n", "assistant_start": "A: ", "assistant_end": "\n## end"})
    assert pf.stop_text(tok, fmt) == "## end"
    ids = tok("Lisbon\n## end Oslo", add_special_tokens=False)["input_ids"]
    assert pf.reply(tok, ids, [], "## end") == ("Lisbon", True)
    assert pf.reply(tok, ids, [], None) == ("Lisbon\n## end Oslo", False)


def test_answers_that_run_to_the_limit_are_counted_and_warned_about(tiny_lm):
    from obliviate.evals.evaluate import evaluate_lm

    model, tok = tiny_lm  # untrained: it rarely writes EOS
    items = tiny_items()
    with pytest.warns(UserWarning, match=r"greedy answers \(\d+%\) ran to max_new_tokens \(4\)"):
        result = evaluate_lm(model, tok, {"forget": items[:2], "retain": items[2:]}, batch_size=8, max_new_tokens=4)
    agg = result["aggregate"]
    flags = [r["at_token_limit"] for rows in result["per_item"].values() for r in rows] + [
        r["at_token_limit_paraphrased"] for r in result["per_item"]["forget"]]
    assert agg["answers_generated"] == len(flags) == 8
    assert agg["answers_at_token_limit"] == sum(flags) > 0.05 * len(flags)
    assert agg["retain"]["at_token_limit"] == pytest.approx(sum(r["at_token_limit"] for r in
                                                                result["per_item"]["retain"]) / 4)
