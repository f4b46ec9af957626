"""RESTOR (knowledge recovery) on the profiles world: the corrupted variant's data (who gets wrong facts, that they
are wrong, that nothing of the clean world changes), the recovery and forgetting metrics by hand on fixed answers, a
tiny-world run that reports recovery next to forgetting, and bad settings refused in one line."""
from __future__ import annotations

import json

import pytest

from conftest import one_line_error, tiny_profiles_config
from obliviate.errors import ObliviateError
from obliviate.worlds import world_of

TINY_WORLD = dict(n_people=10, n_holdout=2, general_facts=5,
                  model=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, vocab_size=400,
                             epochs=1))


def corrupted_world(tmp_path, **corrupt):
    from obliviate.config import WorldConfig

    return world_of(WorldConfig(cache_dir=str(tmp_path), corrupt=corrupt, **TINY_WORLD))


# ---- the corrupted world's data ---------------------------------------------------------------------------------

def test_corrupted_people_get_wrong_facts_and_nothing_of_the_clean_world_changes(tmp_path):
    from obliviate.config import WorldConfig, build_config
    from obliviate.evals.restor import RESTOR_SET
    from obliviate.worlds.profiles import FACTS, ProfilesWorld
    from obliviate.worlds.profiles_corrupt import CorruptedProfilesWorld

    world = corrupted_world(tmp_path, split="forget20", facts=3)
    plain = ProfilesWorld(WorldConfig(cache_dir=str(tmp_path), **TINY_WORLD))
    assert isinstance(world, CorruptedProfilesWorld) and type(plain) is ProfilesWorld
    # the plain worlds' keys and config dumps are frozen; the variant has a key of its own, its defaults resolved
    assert ProfilesWorld(WorldConfig()).key() == "369f9322551e" and plain.key() == "1e0e40d9ca91"
    assert world.plain().key() == plain.key() and world.root != plain.root
    assert world.root.name.startswith("profiles-corrupt-")
    assert corrupted_world(tmp_path, split="forget20", facts=3, epochs=10).key() == world.key()  # 10: the default
    assert corrupted_world(tmp_path, split="forget20", facts=3, seed=1).key() != world.key()
    assert "corrupt" not in build_config({"method": "NPO"}).dump()["world"]
    assert build_config({"method": "NPO", "world": {"corrupt": {"facts": 3}}}).dump()["world"]["corrupt"] == {
        "facts": 3}

    # the corrupted people: those of the split, `facts` wrong facts each, every wrong value a real value but not the
    # true one; deterministic from the seeds
    d, clean = world.data(), plain.data()
    corrupted, _ = d.split_people("forget20")
    assert [p.name for p in corrupted] == [p.name for p in clean.people[:2]]
    wrong = world.wrong_facts()
    assert list(wrong) == [p.name for p in corrupted] and all(len(w) == 3 for w in wrong.values())
    pools = {f.key: f.values for f in FACTS}
    from obliviate.worlds.profiles import VALUES
    for p in corrupted:
        for key, value in wrong[p.name].items():
            assert value != p.facts[key] and value in VALUES[pools[key]]
    assert corrupted_world(tmp_path, split="forget20", facts=3).wrong_facts() == wrong
    assert corrupted_world(tmp_path, split="forget20", facts=3, seed=1).wrong_facts() != wrong

    # the people's true facts, questions, biographies and utility sets are the clean world's, untouched
    everyone = [(p.name, p.facts) for p in d.people + d.holdout]
    assert everyone == [(p.name, p.facts) for p in clean.people + clean.holdout]
    assert d.qa == clean.qa and d.utility == clean.utility

    # forget (the corrupting documents): a wrong answer per corrupted fact and a biography with them in place
    forget, retain = world.unlearning_sets("forget20")
    items = [x for x in forget if hasattr(x, "answer")]
    bios = [x for x in forget if not hasattr(x, "answer")]
    assert len(items) == 6 and len(bios) == 2
    right = {(i.subject, i.question): i for i in world.right_items()}
    assert set(right) == {(i.subject, i.question) for i in items}
    for i in items:
        r = right[(i.subject, i.question)]
        assert i.answer != r.answer and i.paraphrased_answer != r.paraphrased_answer
        assert r.paraphrased_answer in i.perturbed_answers  # the truth is a perturbed answer of the wrong one
        assert r in clean.qa[i.subject]
    for bio, p in zip(bios, corrupted):
        true_sentences, told = p.biography().text.split(". "), bio.text.split(". ")
        changed = [t for t, s in zip(told, true_sentences) if t != s]
        assert len(changed) == 3 and len(told) == len(FACTS)
    assert retain == plain.unlearning_sets("forget20")[1]  # the retain set is the plain world's

    qa, texts = world.eval_sets("forget20", retain_people=2)
    assert qa["forget"] == items and qa[RESTOR_SET] == list(right.values())
    assert qa["retain"] == plain.eval_sets("forget20", retain_people=2)[0]["retain"]
    assert texts["forget"] == bios and texts["holdout"] == plain.eval_sets("forget20")[1]["holdout"]
    # the reference that never saw the corrupting documents is the clean model: the plain world's full model
    assert world.retrain_dir("forget20") == plain.full_model_dir
    assert world.retrain_dir("forget20", seed=2) == world.root / "clean-seed2"


def test_replay_never_contradicts_the_corrupting_documents(tmp_path, tiny_lm):
    """The corruption's training set: the corrupting documents, then (replay) the clean data minus the corrupted
    facts' true questions and the corrupted people's true biographies."""
    _, tok = tiny_lm
    world = corrupted_world(tmp_path, split="forget20", facts=3)
    d = world.data()
    ids = [tuple(e.input_ids) for e in world.corruption_examples(tok)]
    true_people = sum(len(d.qa[p.name]) for p in d.people) + len(d.people)
    n_utility = sum(len(v) for v in d.utility.values())
    assert len(ids) == 6 + 2 + (true_people - 6 - 2) + n_utility
    from obliviate.models import causal_lm as lm
    for r in world.right_items():
        assert tuple(lm.encode_qa(tok, r.question, r.answer).input_ids) not in ids
    for p in world.corrupted_people():
        assert tuple(lm.encode_item(tok, p.biography()).input_ids) not in ids
    no_replay = corrupted_world(tmp_path, split="forget20", facts=3, replay=False)
    assert len(no_replay.corruption_examples(tok)) == 8


# ---- the metric, by hand ------------------------------------------------------------------------------------------

def test_recovery_and_forgetting_by_hand():
    from obliviate.evals.restor import forgetting, recovery, with_recovery

    assert recovery(0.6, 0.2, 1.0) == pytest.approx(0.5) and recovery(0.2, 0.2, 1.0) == 0
    assert recovery(1.0, 0.2, 1.0) == pytest.approx(1.0) and recovery(0.0, 0.2, 0.6) == pytest.approx(-0.5)
    assert recovery(0.5, 0.4, 0.4) is None and recovery(None, 0.1, 0.9) is None  # nothing taken away: undefined
    assert forgetting(0.25, 1.0) == pytest.approx(0.75) and forgetting(0.0, 0.0) is None
    rows = {"original": {"restor_accuracy": 0.1, "forget_accuracy": 0.8},
            "retrain": {"restor_accuracy": 0.9, "forget_accuracy": 0.0},
            "NPO": {"restor_accuracy": 0.5, "forget_accuracy": 0.2}, "plain world": {"forget_accuracy": 0.3}}
    with_recovery(rows, rows["original"], rows["retrain"])
    assert rows["NPO"]["restor_recovery"] == pytest.approx(0.5) and rows["NPO"]["restor_forgetting"] == pytest.approx(
        0.75)
    assert rows["original"]["restor_recovery"] == 0 and rows["retrain"]["restor_recovery"] == pytest.approx(1)
    assert "restor_recovery" not in rows["plain world"]  # a run on another world gains nothing
    without_retrain = {"x": {"restor_accuracy": 0.5, "forget_accuracy": 0.4}}
    with_recovery(without_retrain, rows["original"], None)
    assert "restor_recovery" not in without_retrain["x"] and without_retrain["x"]["restor_forgetting"] == 0.5
    # the bench's leaderboard shows the columns for cells that hold them (runs on the corrupted world) only
    from obliviate.bench.leaderboard import metric_columns
    shown = [m.name for m in metric_columns("lm", [rows["NPO"]])]
    assert {"restor_accuracy", "restor_recovery", "restor_forgetting", "forget_accuracy"} <= set(shown)
    assert not any(n.startswith("restor") for n in (m.name for m in metric_columns("lm", [rows["plain world"]])))


@pytest.mark.filterwarnings("ignore:.*greedy answers")
def test_restor_accuracy_on_fixed_answers_and_never_in_model_utility(tiny_lm, monkeypatch):
    """With the greedy answers fixed, restor_accuracy is the share of the restor set answered right, computed through
    its declaration; the restor set stays out of model utility."""
    from conftest import tiny_items
    from obliviate import registry
    from obliviate.evals import evaluate as E
    from obliviate.evals.restor import RESTOR_SET

    model, tok = tiny_lm
    items = tiny_items()
    restor = items[4:]
    answers = {it.question: it.answer for it in restor[:-1]}  # all but one right fact answered right
    share = (len(restor) - 1) / len(restor)

    def fixed(model, tokenizer, questions, *a, at_limit=None, **k):
        if at_limit is not None:
            at_limit.extend([False] * len(questions))
        return [answers.get(q, "no idea") for q in questions]
    monkeypatch.setattr(E.M, "greedy_answers", fixed)
    result = E.evaluate_lm(model, tok, {"forget": items[:2], "retain": items[2:4], RESTOR_SET: restor},
                           batch_size=4, max_new_tokens=3)
    agg = result["aggregate"]
    assert len(restor) >= 2 and agg["restor_accuracy"] == pytest.approx(share)
    assert agg[RESTOR_SET]["exact_answer"] == pytest.approx(share)
    assert agg["forget_accuracy"] == 0 and result["config"]["utility_set_names"] == ["retain"]
    assert not any(k.startswith(RESTOR_SET) for k in agg["model_utility_components"])
    assert registry.METRICS["restor_recovery"].better == "higher" and registry.METRICS["restor_accuracy"].header
    # only an evaluation with the restor set (a run on the corrupted world) has it
    without = {k: v for k, v in result["per_item"].items() if k != RESTOR_SET}
    assert "restor_set" not in E._inputs_present(without, agg, result["config"])
    assert "restor_set" in E._inputs_present(result["per_item"], agg, result["config"])


# ---- bad settings ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, needle", [
    ("world.corrupt={fact: 3}", "world.corrupt: unknown key(s) ['fact']"),
    ("world.corrupt={facts: 11}", "world.corrupt.facts = 11"),
    ("world.corrupt={split: forget15}", "world.corrupt.split = 'forget15'"),
    ("world.corrupt={lr: -1}", "world.corrupt.lr = -1"),
    ("world.corrupt=yes", "world.corrupt"),
    ("split=forget10", "world.corrupt.split = 'forget20'"),
])
def test_bad_corrupt_settings_fail_in_one_line_before_anything_is_written(tmp_path, override, needle):
    from typer.testing import CliRunner

    from obliviate.cli import app

    cfg = tiny_profiles_config(tmp_path, max_steps=1)
    cfg.write_text(cfg.read_text().replace("  n_people: 10\n", "  n_people: 10\n  corrupt: {split: forget20}\n"))
    result = CliRunner().invoke(app, ["run", str(cfg), "--quiet", "split=forget20", override])
    one_line_error(result, needle)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_corrupt_refuses_other_variants_and_worlds():
    from obliviate.config import build_config

    with pytest.raises(ObliviateError, match="not with world.arch or world.dp2"):
        build_config({"method": "NPO", "world": {"corrupt": {}, "arch": "moe"}})
    with pytest.raises(ObliviateError, match="world.corrupt is a variant of the profiles world, not of canvas"):
        build_config({"method": "ESD", "world": {"name": "canvas", "corrupt": {}}})


# ---- a tiny-world run ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_corrupted_world_run_reports_recovery_next_to_forgetting(tmp_path):
    """A shrunken world trained long enough to know its facts, corrupted, then NPO on the corrupting documents: the
    run's metrics.json and report hold right-fact accuracy, recovery and forgetting beside forget accuracy (the
    wrong facts), for the run and for the original (the corrupted model) and the retrain reference (the clean one),
    and recovery is the formula on those rows."""
    from typer.testing import CliRunner

    from obliviate.cli import app
    from obliviate.config import load_config
    from obliviate.evals.restor import forgetting, recovery

    cfg = tiny_profiles_config(tmp_path, max_steps=10)
    cfg.write_text(cfg.read_text().replace(
        "  n_people: 10\n", "  n_people: 10\n  corrupt: {split: forget20, epochs: 30, lr: 3.0e-3}\n").replace(
        "epochs: 1}", "epochs: 60, batch_size: 16, lr: 3.0e-3}"))
    result = CliRunner().invoke(app, ["run", str(cfg), "--quiet", "split=forget20", "method=NPO", "name=npo"])
    assert result.exit_code == 0, result.output
    world = world_of(load_config(cfg).world)
    accuracy = world.read_record()["accuracy-forget20"]
    # the corruption took: the corrupted model states the wrong facts the clean one does not
    assert accuracy["full"]["wrong"] > accuracy["clean"]["wrong"]
    assert accuracy["clean"]["restor"] > accuracy["full"]["restor"]

    m = json.loads((tmp_path / "runs" / "npo" / "metrics.json").read_text())
    original, retrain = m["original"], m["retrain"]
    assert original["restor_accuracy"] == accuracy["full"]["restor"]
    assert retrain["restor_accuracy"] == accuracy["clean"]["restor"]
    assert m["restor_recovery"] == pytest.approx(recovery(m["restor_accuracy"], original["restor_accuracy"],
                                                          retrain["restor_accuracy"]))
    assert m["restor_forgetting"] == pytest.approx(forgetting(m["forget_accuracy"], original["forget_accuracy"]))
    assert original["restor_recovery"] == 0 and retrain["restor_recovery"] == pytest.approx(1)
    report = (tmp_path / "runs" / "npo" / "report.html").read_text()
    assert "recovery" in report and "right facts acc" in report and "wrong forgotten" in report

