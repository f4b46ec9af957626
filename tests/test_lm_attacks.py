"""Recovery attacks on language-model runs (`obliviate attack`): every attack runs on the unlearned model, the
original and the retrain reference, writes RUN_DIR/attacks/<name>.json in the shared format, and bad input is one
line."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error, tiny_items, tiny_profiles_config
from obliviate.cli import app
from obliviate.errors import ObliviateError

runner = CliRunner()
SMALL = ["relearn.steps=2", "relearn.lr=1e-3", "relearn.batch_size=4", "max_new_tokens=8", "account_tokens=8",
         "probe.folds=2"]


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacked")
    cfg = tiny_profiles_config(root, max_steps=3)
    r = runner.invoke(app, ["run", str(cfg), "--quiet", "name=gd"])
    assert r.exit_code == 0, r.output
    return root / "runs" / "gd", root


@pytest.mark.slow  # a world run and every attack, ~17 s: kept out of the 5-minute default suite; CI runs it
def test_every_attack_on_a_world_run_writes_its_result_next_to_the_references(world_run):
    from obliviate.config import load_config
    from obliviate.registry import ATTACKS, DEFAULT_ATTACKS
    from obliviate.worlds.profiles import ProfilesWorld

    run, root = world_run
    world = ProfilesWorld(load_config(root / "base.yaml").world)
    base, changed = _digest(world.full_model_dir), _digest(run)
    r = runner.invoke(app, ["attack", str(run), *SMALL, "--quiet"])
    assert r.exit_code == 0, r.output
    assert set(DEFAULT_ATTACKS["lm"]) == {n for n, e in ATTACKS.items() if e.family == "lm"}
    for name in DEFAULT_ATTACKS["lm"]:
        result = json.loads((run / "attacks" / f"{name}.json").read_text())
        assert list(result["models"]) == ["GradDiff", "original", "retrain"], name
        assert result["method"] == "GradDiff" and result["family"] == "lm" and result["seconds"] > 0
        for model, aggregate in result["models"].items():
            value = aggregate[result["headline"]]
            assert 0 <= value <= 1, (name, model, value)
            assert len(result["per_item"][model]) == aggregate["n"] == result["items"]
        assert f"wrote {run / 'attacks' / name}.json" in r.output.replace("\n", "")
    relearn = json.loads((run / "attacks" / "relearn.json").read_text())
    assert [p["step"] for p in relearn["curves"]["retrain"]] == [0, 1, 2] and relearn["config"]["steps"] == 2
    assert relearn["curves"]["GradDiff"][0]["recall"] == relearn["models"]["GradDiff"]["recall_before"]
    # fine-tuned on part of each forget person's questions, measured on the others: never the same question
    trained = {i["question"] for i in relearn["per_item"]["GradDiff"]}
    assert 0 < len(trained) < 10 * 1 and (run / "attacks" / "relearn.png").stat().st_size > 1000
    page = (run / "report.html").read_text()
    assert "Robustness" in page and "relearning curves" in page
    # nothing the attacks did (fine-tuning, quantizing) reached a file: neither the base model nor the run
    assert _digest(world.full_model_dir) == base and {k: v for k, v in _digest(run).items() if k != "report.html"} \
        == {k: v for k, v in changed.items() if k != "report.html"}


@pytest.mark.slow  # 4-8 s: the default suite took 337 s on CI, over its 5 minutes
def test_attack_options_and_bad_input_are_one_line(world_run):
    run, _ = world_run
    one_line_error(runner.invoke(app, ["attack", str(run), "--attack", "relearning"]), "unknown attack 'relearning'",
                   "Did you mean 'relearn'")
    one_line_error(runner.invoke(app, ["attack", str(run), "--attack", "relearn", "stepz=3"]),
                   "unknown attack option 'stepz'", "steps")
    one_line_error(runner.invoke(app, ["attack", str(run), "--attack", "relearn", "probe.c=3"]),
                   "'probe' is not among the attacks run")
    one_line_error(runner.invoke(app, ["attack", str(run), "--attack", "relearn", "data=everything"]),
                   "relearn data must be one of forget, biographies, retain")
    one_line_error(runner.invoke(app, ["attack", str(run), "--attack", "prompt_attack"]),
                   "the prompt_attack attack is for text-to-image runs")
    one_line_error(runner.invoke(app, ["attack", str(run), "--attack", "probe", "attributes=shoe_size"]),
                   "probe attribute 'shoe_size' is not known", "occupation")
    one_line_error(runner.invoke(app, ["attack", str(run), "--attack", "probe", "--detector", str(run)]),
                   "language-model attacks take no detector")
    one_line_error(runner.invoke(app, ["attack", str(run.parent)]), "is not a run folder")


def _write_tofu(path, items):
    path.write_text("".join(json.dumps({"question": i.question, "answer": i.answer,
                                        "paraphrased_answer": i.paraphrased_answer,
                                        "perturbed_answer": list(i.perturbed_answers)}) + "\n" for i in items))
    return path


@pytest.fixture(scope="module")
def user_run(chat_lm_dir, chat_retrain_dir, tmp_path_factory):
    """GradDiff on a tiny chat model (its template) unlearning the first item of TOFU-format files, with the user's
    retrain model as the reference."""
    from obliviate.config import build_config
    from obliviate.runners import run

    tmp = tmp_path_factory.mktemp("user_attacked")
    items = tiny_items()
    cfg = build_config({
        "method": "GradDiff", "model": str(chat_lm_dir), "output_dir": str(tmp / "runs"), "name": "gd",
        "forget_file": str(_write_tofu(tmp / "forget.json", items[:1])),
        "retain_file": str(_write_tofu(tmp / "retain.json", items[1:])), "retrain_model": str(chat_retrain_dir),
        "train": {"lr": 1e-3, "max_steps": 8, "batch_size": 5}, "eval": {"batch_size": 8}})
    return run(cfg, log=lambda *_: None)


@pytest.mark.slow  # 4-8 s: the default suite took 337 s on CI, over its 5 minutes
def test_attacks_on_a_chat_model_ask_through_its_template(user_run):
    from obliviate.api import attack_run

    results = attack_run(user_run, ["jailbreak", "multiple_choice", "quantize_int8", "quantize_int4", "relearn"],
                         {"relearn.steps": 3, "relearn.lr": 1e-3, "relearn.data": "retain"}, log=lambda *_: None)
    jailbreak = results["jailbreak"]
    assert list(jailbreak["models"]) == ["GradDiff", "original", "retrain"]
    # the original knows the forgotten item, the run forgot it (asked plainly, through the chat template)
    assert jailbreak["models"]["original"]["recall_plain"] == 1.0
    assert jailbreak["models"]["GradDiff"]["recall_plain"] == 0.0
    assert "<|im_start|>" not in jailbreak["per_item"]["original"][0]["answer"]
    # rounding the weights to 8 bits keeps what the original knows: the quantized model is still a working model
    assert results["quantize_int8"]["models"]["original"]["recall"] == 1.0
    assert results["multiple_choice"]["models"]["original"]["chance"] == 0.25
    # benign relearning on the retain people, measured on every forget question, for every model
    relearn = results["relearn_retain"]  # kept apart from relearning on forget items (relearn.json)
    assert (user_run / "attacks" / "relearn_retain.json").is_file() and relearn["attack"] == "relearn_retain"
    assert relearn["measured"] == "every forget question" and relearn["models"]["retrain"]["n_train"] == len(tiny_items()) - 1
    assert all(len(curve) == 4 for curve in relearn["curves"].values())
    assert relearn["models"]["original"]["recall_before"] == 1.0


def test_attacks_that_need_what_users_files_lack_say_so(user_run):
    from obliviate.api import attack_run

    for name, needle in (("probe", "needs each person's attributes"), ("in_context", "needs each forget subject's"),
                         ("paraphrase", "needs paraphrased questions"),
                         ("relearn", "needs subjects with at least two questions")):
        with pytest.raises(ObliviateError, match=needle):
            attack_run(user_run, name, log=lambda *_: None)


def test_recall_needs_the_fact_and_only_the_fact():
    from obliviate.attacks.lm.common import fact_words, recalled
    from obliviate.attacks.lm.rewording import answer_prefix

    item = tiny_items()[0]
    city = item.answer.split()[-1].rstrip(".")
    assert fact_words(item) == [city.lower()]
    assert recalled(f"Well, I believe it was {city}, long ago.", item)
    assert not recalled(item.answer.replace(city, "Oslo"), item)
    assert answer_prefix(item.answer, fact_words(item)) == item.answer.rsplit(" ", 1)[0]


def test_quantized_weights_are_rounded_and_computed_as_quanto_does():
    from optimum.quanto import freeze, qint4, quantize
    from transformers import LlamaConfig, LlamaForCausalLM

    from obliviate.attacks.lm.quantize import pure_torch_unpack, quantized

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    x = torch.randint(0, 64, (2, 8))
    reference = model(x).logits
    import copy
    from optimum.quanto.library.extensions import get_extension

    by_quanto = copy.deepcopy(model)
    quantize(by_quanto, weights=qint4, exclude=["lm_head"])
    freeze(by_quanto)
    ours = quantized(copy.deepcopy(model), 4)
    assert get_extension("quanto_cpp")._lib is None  # quanto's C++ extension was neither compiled nor loaded
    assert type(ours.model.layers[0].mlp.up_proj) is torch.nn.Linear  # plain layers: float speed
    assert len(torch.unique(ours.model.layers[0].mlp.up_proj.weight[0, :32])) <= 16  # 4 bits: 16 levels a group
    with pure_torch_unpack():  # quanto's own int4 layers, computing with its pure-torch unpack
        assert torch.allclose(ours(x).logits, by_quanto(x).logits, atol=1e-5)
    assert not torch.allclose(ours(x).logits, reference, atol=1e-3)
    assert torch.equal(ours.lm_head.weight, model.lm_head.weight)


def test_relearn_split_keeps_every_subject_on_both_sides():
    from obliviate.attacks.lm.relearn import split_by_subject

    items = tiny_items() + [type(i)(**{**i.__dict__, "question": "And? " + i.question}) for i in tiny_items()]
    train, held = split_by_subject(items, 0.5, seed=0)
    assert {i.subject for i in train} == {i.subject for i in held} == {i.subject for i in items}
    assert not {i.question for i in train} & {i.question for i in held} and len(train) + len(held) == len(items)
