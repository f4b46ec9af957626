"""The benchmarks' real files in their published formats (TOFU's release, MUSE's repository layout), each set's role
stated or taken from TOFU's file names, and a retrain reference for runs on a user's model: a model folder, an earlier
evaluation, or TOFU's and OpenUnlearning's published per-item logs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import tiny_items
from obliviate.benchmark_files import load_eval_set, load_muse, load_tofu, tofu_role
from obliviate.errors import ObliviateError

SHARED_TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


def _row(item, perturbed: bool) -> dict:
    row = {"question": item.question, "answer": item.answer}
    if perturbed:
        row.update(paraphrased_answer=item.paraphrased_answer, perturbed_answer=list(item.perturbed_answers),
                   paraphrased_question=item.paraphrased_question)
    return row


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_tofu(folder: Path, holdout: bool = True) -> Path:
    """TOFU's release layout, with forget10 = the first two items, retain90 = the others."""
    folder.mkdir(parents=True, exist_ok=True)
    items = tiny_items()
    _jsonl(folder / "forget10.json", [_row(i, False) for i in items[:2]])
    _jsonl(folder / "forget10_perturbed.json", [_row(i, True) for i in items[:2]])
    _jsonl(folder / "retain90.json", [_row(i, False) for i in items[2:]])
    _jsonl(folder / "retain_perturbed.json", [_row(i, True) for i in items[2:]])
    facts = [{"question": "Where is the Eiffel Tower?", "answer": "Paris", "perturbed_answer": ["Oslo", "Rome"]}]
    _jsonl(folder / "world_facts_perturbed.json", facts)
    _jsonl(folder / "real_authors_perturbed.json", [{"question": "Who wrote Hamlet?", "answer": "Shakespeare",
                                                     "perturbed_answer": ["Dickens", "Austen"]}])
    if holdout:
        _jsonl(folder / "holdout10.json", [{"question": f"Where was {n} born?", "answer": f"{n} was born in {c}."}
                                           for n, c in (("Gus Penn", "Lima"), ("Ivy Rook", "Cairo"))])
    return folder


def test_tofu_release_is_read_with_each_sets_role(tmp_path):
    bench = load_tofu(write_tofu(tmp_path / "TOFU"), "forget10")
    assert [i.answer for i in bench.forget] == [i.answer for i in tiny_items()[:2]] and len(bench.retain) == 4
    data = bench.evaluation
    assert data.roles == {"forget": "forget", "retain": "retain", "real_authors": "utility_normalised",
                          "world_facts": "utility_normalised"}
    assert data.qa_sets["forget"][0].perturbed_answers and data.label == "TOFU forget10"
    assert len(data.holdout_texts) == 2 and data.member_texts == bench.forget  # membership: forget vs holdout
    with pytest.raises(ObliviateError, match="forget05.json"):
        load_tofu(tmp_path / "TOFU", "forget05")
    with pytest.raises(ObliviateError, match="TOFU's splits"):
        load_tofu(tmp_path / "TOFU", "forget20")


def test_tofu_file_names_carry_their_role_and_other_files_must_state_it(tmp_path):
    assert tofu_role("x/world_facts_perturbed.json") == "utility_normalised"
    assert tofu_role("forget05_perturbed.json") == "forget" and tofu_role("holdout01.json") == "holdout"
    path = _jsonl(tmp_path / "my_facts.json", [{"question": "Q?", "answer": "A", "perturbed_answer": ["B"]}])
    with pytest.raises(ObliviateError, match="my_facts.json: state the set's role"):
        load_eval_set(path, None)
    assert load_eval_set(path, "utility_normalised")[:2] == ("my_facts", "utility_normalised")
    with pytest.raises(ObliviateError, match="unknown role 'keep'"):
        load_eval_set(path, "keep")


@pytest.mark.skipif(not SHARED_TOFU.is_dir(), reason="../shared/data/tofu is not beside the clone")
def test_tofus_real_utility_files_get_the_normalised_probability(chat_lm_dir):
    """The real world_facts_perturbed.json (read from ../shared) is scored with TOFU's normalised probability, not the
    retain set's: its file name states its role."""
    from obliviate.evals.evaluate import evaluate_lm
    from obliviate.models import causal_lm as lm
    from obliviate.runners.lm import evaluation_of

    name, role, items = load_eval_set(SHARED_TOFU / "world_facts_perturbed.json", None)
    assert (name, role) == ("world_facts", "utility_normalised")
    model, tok = lm.load(chat_lm_dir)
    qa = {"retain": tiny_items()[:2], name: items[:4]}
    from obliviate.config import EvalConfig
    result = evaluation_of(model, tok, qa, {}, EvalConfig(batch_size=8), roles={"retain": "retain", name: role})
    agg = result["aggregate"][name]
    assert agg["normalised_prob"] is True
    rows = result["per_item"][name]
    assert agg["probability_score"] == pytest.approx(sum(r["answer_prob_normalised"] for r in rows) / len(rows))
    from obliviate.data import load_qa_jsonl
    plain = load_qa_jsonl(SHARED_TOFU / "world_facts_perturbed.json")[:4]  # what a guess from the name gave
    guessed = evaluate_lm(model, tok, {"retain": tiny_items()[:2], "world_facts_perturbed": plain})
    assert guessed["aggregate"]["world_facts_perturbed"]["normalised_prob"] is False


def write_muse(folder: Path) -> Path:
    """The MUSE repository's data/<corpus> layout: raw texts, verbmem prompt/gt, knowmem QA, privleak texts."""
    items = tiny_items()
    for sub in ("raw", "verbmem", "knowmem", "privleak"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    story = [f"{i.answer} {i.paraphrased_answer}" for i in items]
    (folder / "raw" / "forget.json").write_text(json.dumps(story[:2]))
    (folder / "raw" / "retain1.json").write_text(json.dumps(story[2:]))
    (folder / "raw" / "holdout.txt").write_text("Gus Penn was born in Lima.")
    (folder / "verbmem" / "forget.json").write_text(json.dumps([{"prompt": items[0].answer[:12],
                                                                 "gt": items[0].answer[12:]}]))
    (folder / "knowmem" / "forget_qa.json").write_text(json.dumps([_row(i, False) for i in items[:2]]))
    (folder / "knowmem" / "retain_qa.json").write_text(json.dumps([_row(i, False) for i in items[2:]]))
    (folder / "privleak" / "forget.json").write_text(json.dumps(story[:2]))
    (folder / "privleak" / "holdout.json").write_text(json.dumps(["Gus Penn was born in Lima.",
                                                                  "Ivy Rook was born in Cairo."]))
    return folder


def test_muse_folder_is_read_in_the_repositorys_layout(tmp_path):
    bench = load_muse(write_muse(tmp_path / "news"), chunk_words=5)
    assert all(len(t.text.split()) <= 5 for t in bench.forget) and len(bench.forget) > 2  # chunked corpora
    data = bench.evaluation
    assert data.roles == {"forget": "forget", "retain": "retain"}
    vm = data.verbmem_texts[0]
    assert vm.text[:vm.prefix_chars] == tiny_items()[0].answer[:12]
    assert len(data.member_texts) == 2 and len(data.holdout_texts) == 2
    (tmp_path / "news" / "knowmem" / "retain_qa.json").unlink()  # the Books release ships forget questions only
    assert set(load_muse(tmp_path / "news").evaluation.roles) == {"forget"}
    (tmp_path / "news" / "verbmem" / "forget.json").write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(ObliviateError, match="verbmem.forget.json: item 1: needs non-empty string fields"):
        load_muse(tmp_path / "news")


# ------------------------------------------------------------------------------------- retrain references
def test_retrain_logs_of_tofu_and_openunlearning_give_the_same_truth_ratios(tmp_path):
    from obliviate.evals.reference_logs import read_retrain_eval

    para, pert = {"0": 1.0, "1": 2.0}, {"0": [1.5, 2.5], "1": [1.0, 2.0]}
    tofu = tmp_path / "eval_log_forget.json"
    tofu.write_text(json.dumps({"avg_paraphrased_loss": para, "average_perturb_loss": pert}))
    ratios = [r["truth_ratio"] for r in read_retrain_eval(tofu)["per_item"]["forget"]]
    assert ratios == pytest.approx([math.exp(1.0), math.exp(-0.5)])
    aggregated = tmp_path / "aggregated.json"
    aggregated.write_text(json.dumps({"eval_log_forget.json": {"avg_paraphrased_loss": para,
                                                               "average_perturb_loss": pert}}))
    assert [r["truth_ratio"] for r in read_retrain_eval(aggregated)["per_item"]["forget"]] == pytest.approx(ratios)
    ou = tmp_path / "TOFU_EVAL.json"
    ou.write_text(json.dumps({"forget_truth_ratio": {"agg_value": 0.6, "value_by_index": {
        "1": {"score": 1 / ratios[1]}, "0": {"score": 1 / ratios[0]}}}}))  # false/true, keys out of order
    # OpenUnlearning's false/true is turned round: the KS test needs both models' ratios in one orientation
    assert [r["truth_ratio"] for r in read_retrain_eval(ou)["per_item"]["forget"]] == pytest.approx(ratios)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rouge": 1}))
    with pytest.raises(ObliviateError, match="bad.json: not an obliviate evaluation"):
        read_retrain_eval(bad)


def _run(tmp_path, chat_lm_dir, name, **keys):
    from obliviate.config import build_config
    from obliviate.runners import run

    cfg = build_config({"method": "GradDiff", "model": str(chat_lm_dir), "output_dir": str(tmp_path / "runs"),
                        "name": name, "train": {"lr": 1e-3, "max_steps": 2, "batch_size": 2},
                        "eval": {"batch_size": 8}, **keys})
    folder = run(cfg, log=lambda *_: None)
    return folder, json.loads((folder / "metrics.json").read_text())


def test_a_tofu_run_on_a_users_model_gets_forget_quality_from_a_retrain_model(tmp_path, chat_lm_dir,
                                                                               chat_retrain_dir):
    tofu = write_tofu(tmp_path / "TOFU")
    folder, metrics = _run(tmp_path, chat_lm_dir, "tofu", tofu_dir=str(tofu), split="forget10",
                           retrain_model=str(chat_retrain_dir))
    assert metrics["forget_set"] == "TOFU forget10" and metrics["split"] is None
    assert 0 <= metrics["forget_quality"] <= 1 and metrics["privleak"] is not None
    assert {k.split("/")[0] for k in metrics["model_utility_components"]} == {"retain", "real_authors", "world_facts"}
    assert metrics["world_facts"]["normalised_prob"] and not metrics["retain"]["normalised_prob"]
    assert "TOFU forget10" in (folder / "report.html").read_text()
    # the retrain model's evaluation is kept, and serves the next run as `retrain_eval` with the same result
    _, again = _run(tmp_path, chat_lm_dir, "again", tofu_dir=str(tofu), split="forget10",
                    retrain_eval=str(folder / "retrain_eval.json"))
    assert again["forget_quality"] == pytest.approx(metrics["forget_quality"])
    assert again["privleak"] == pytest.approx(metrics["privleak"])


def test_stated_eval_sets_join_a_run_on_files(tmp_path, chat_lm_dir):
    tofu = write_tofu(tmp_path / "TOFU")
    keys = {"forget_file": str(tofu / "forget10.json"), "retain_file": str(tofu / "retain90.json")}
    sets = [{"file": str(tofu / "forget10_perturbed.json")}, {"file": str(tofu / "world_facts_perturbed.json")},
            {"file": str(tofu / "holdout10.json")}]
    _, metrics = _run(tmp_path, chat_lm_dir, "sets", eval_sets=sets, **keys)
    assert metrics["forget_set"] == "forget10.json"
    assert metrics["world_facts"]["normalised_prob"] and "mia" in metrics  # holdout: membership inference runs
    assert "forget_quality" not in metrics  # no retrain reference given: no forget quality, and none invented


def test_a_muse_run_reports_verbmem_knowmem_and_privleak(tmp_path, chat_lm_dir, chat_retrain_dir):
    _, metrics = _run(tmp_path, chat_lm_dir, "muse", muse_dir=str(write_muse(tmp_path / "news")),
                      retrain_model=str(chat_retrain_dir))
    assert metrics["forget_set"] == "MUSE news forget"
    for key in ("verbmem", "knowmem_forget", "knowmem_retain", "privleak"):
        assert metrics[key] is not None, key


def test_bad_reference_and_source_combinations_fail_in_one_line(tmp_path, chat_lm_dir):
    from typer.testing import CliRunner

    from conftest import one_line_error
    from obliviate.cli import app

    tofu = write_tofu(tmp_path / "TOFU")

    def validate(**keys):
        path = tmp_path / "c.json"
        path.write_text(json.dumps({"method": "GradDiff", "model": str(chat_lm_dir), **keys}))
        return CliRunner().invoke(app, ["validate", str(path)])

    one_line_error(validate(tofu_dir=str(tofu), muse_dir=str(tmp_path)), "tofu_dir and muse_dir")
    one_line_error(validate(tofu_dir=str(tofu), retrain_eval=str(tofu / "forget10.json")), "forget10.json")
    one_line_error(validate(eval_sets=[{"file": str(tofu / "retain90.json")}]), "eval_sets is for runs on your own")
    one_line_error(validate(tofu_dir=str(tofu), eval_sets=[{"file": str(tofu / "retain90.json")}]),
                   "retain90.json: state the set's role")
    assert validate(tofu_dir=str(tofu)).exit_code == 0


@pytest.mark.parametrize("name", ["tofu_npo", "tofu_graddiff_lora", "muse_news_npo"])
def test_the_real_model_presets_validate_on_real_files(tmp_path, chat_lm_dir, chat_retrain_dir, name):
    """configs/real/*.toml hold only valid keys: with the paths pointed at files in the published formats, `run`'s
    checks pass."""
    from obliviate.config import load_config
    from obliviate.runners.lm_checks import check_lm

    config = Path(__file__).resolve().parents[1] / "configs" / "real" / f"{name}.toml"
    retrain = tmp_path / "TOFU_EVAL.json"
    retrain.write_text(json.dumps({"forget_truth_ratio": {"value_by_index": {"0": {"score": 0.5},
                                                                             "1": {"score": 0.8}}}}))
    paths = [f"model={chat_lm_dir}", f"output_dir={tmp_path / 'runs'}"]
    if name.startswith("tofu"):
        paths += [f"tofu_dir={write_tofu(tmp_path / 'TOFU')}", f"retrain_eval={retrain}"]
    else:
        paths += [f"muse_dir={write_muse(tmp_path / 'news')}", f"retrain_model={chat_retrain_dir}"]
    check_lm(load_config(config, paths))


def test_the_real_vision_language_preset_validates_on_mllmu_files(tmp_path):
    """configs/real/mllmu_llava_graddiff_lora.toml, its paths pointed at a LLaVA folder and MLLMU-Bench's files in
    the published schema, passes `run`'s checks."""
    from test_mllm_family import _profile, write_mllmu
    from vlm_models import tiny_llava

    from obliviate.config import load_config
    from obliviate.runners.mllm_checks import check_mllm
    from obliviate.worlds.portraits import portraits_data

    llava = tiny_llava(tmp_path / "llava", portraits_data(10, 2, 2, seed=0))
    rows = {"forget_5": [_profile(0)], "retain_95": [_profile(1)], "Retain_Set": [_profile(2)],
            "Test_Set": [_profile(0, test=True)]}
    config = Path(__file__).resolve().parents[1] / "configs" / "real" / "mllmu_llava_graddiff_lora.toml"
    check_mllm(load_config(config, [f"model={llava}", f"retrain_model={llava}",
                                    f"mllmu_dir={write_mllmu(tmp_path / 'mllmu', rows)}",
                                    f"output_dir={tmp_path / 'runs'}"]))
