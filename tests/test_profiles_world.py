import pytest

from obliviate.config import WorldConfig
from obliviate.worlds.profiles import ProfilesWorld, generate


def test_generator_is_deterministic_and_complete():
    a, b = generate(seed=3), generate(seed=3)
    assert [p.name for p in a.people] == [p.name for p in b.people]
    assert len(a.people) == 200 and len(a.holdout) == 20
    assert len({p.name.split()[0] for p in a.people + a.holdout}) == 220  # unique first names
    for p in a.people + a.holdout:
        items = a.qa[p.name]
        assert len(items) >= 10
        for i in items:
            assert i.paraphrased_question and i.paraphrased_answer and len(i.perturbed_answers) >= 3
            # perturbed answers share the paraphrase's wording: only the fact differs
            assert all(x != i.paraphrased_answer for x in i.perturbed_answers)
            assert all(x.split()[:3] == i.paraphrased_answer.split()[:3] for x in i.perturbed_answers)
    assert generate(seed=4).people[0].name != a.people[0].name


def test_splits_are_nested_disjoint_and_holdout_is_never_trained(tmp_path):
    world = ProfilesWorld(WorldConfig(cache_dir=str(tmp_path)))
    d = world.data()
    sizes = {}
    for split in ("forget01", "forget05", "forget10"):
        forget, retain = d.split_people(split)
        assert not {p.name for p in forget} & {p.name for p in retain}
        sizes[split] = {p.name for p in forget}
    assert sizes["forget01"] < sizes["forget05"] < sizes["forget10"]
    assert [len(s) for s in sizes.values()] == [2, 10, 20]
    forget_items, retain_items = world.unlearning_sets("forget10")
    assert any(getattr(i, "source", "") == "biography" for i in forget_items)
    holdout = {p.name for p in d.holdout}
    trained = {i.subject for i in forget_items + retain_items}
    assert not holdout & trained
    qa, texts = world.eval_sets("forget10", retain_people=5)
    assert len(qa["retain"]) == 50 and len(texts["forget"]) == 20 and len(texts["holdout"]) == 20
    assert "general_facts" in qa


def test_recipe_hash_changes_with_the_recipe(tmp_path):
    base = ProfilesWorld(WorldConfig(cache_dir=str(tmp_path))).key()
    assert ProfilesWorld(WorldConfig(cache_dir=str(tmp_path))).key() == base
    assert ProfilesWorld(WorldConfig(cache_dir=str(tmp_path), model={"epochs": 3})).key() != base
    assert ProfilesWorld(WorldConfig(cache_dir=str(tmp_path), seed=1)).key() != base


@pytest.mark.slow  # ~8 s: kept out of the 5-minute default suite; CI runs it
def test_world_model_evaluations_are_computed_once_per_setting(tmp_path, monkeypatch):
    """The original's and the retrain model's evaluations are cached in the world by split and evaluation settings:
    a second call loads no model and gives the same values; other settings are computed anew. The original is
    scored with the retrain model as its membership-inference reference, as every unlearned model is."""
    from obliviate.config import EvalConfig, WorldConfig
    from obliviate.runners import lm as runner
    from obliviate.worlds.profiles import ProfilesWorld

    world = ProfilesWorld(WorldConfig(n_people=10, n_holdout=2, general_facts=5, cache_dir=str(tmp_path),
                                      model={"hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
                                             "num_heads": 2, "vocab_size": 400, "epochs": 1}))
    world.build("forget10", log=lambda *a: None)
    cfg = EvalConfig(retain_people=2, batch_size=16)
    qa, texts = world.eval_sets("forget10", cfg.retain_people)
    original = runner.original_evaluation(world, "forget10", cfg, qa, texts)
    retrain = runner.retrain_evaluation(world, "forget10", cfg, qa, texts)
    assert "reference" in original["aggregate"]["mia"] and "reference" not in retrain["aggregate"]["mia"]

    def no_load(*a, **k):
        raise AssertionError("a cached evaluation loaded a model")
    monkeypatch.setattr(runner.lm, "load", no_load)
    assert runner.original_evaluation(world, "forget10", cfg, qa, texts) == original
    assert runner.retrain_evaluation(world, "forget10", cfg, qa, texts) == retrain
    with pytest.raises(AssertionError, match="loaded a model"):
        runner.original_evaluation(world, "forget10", EvalConfig(retain_people=1, batch_size=16), qa, texts)


def test_a_weak_retrain_reference_is_flagged_in_the_build_log():
    """A retrain model far below the full model on the retain answers (the MoE world once built one at 48 % against
    95 %) gets a warning that scores against it are not evidence; one within 10 points does not."""
    world = ProfilesWorld(WorldConfig(name="profiles"))
    full = {"forget": 0.97, "retain": 0.9533, "general_facts": 0.73}
    for retrain_retain, flagged in ((0.4822, True), (0.8589, False)):
        lines = []
        world._check_knowledge({"full": full, "retrain": {"forget": 0.0, "retain": retrain_retain}}, lines.append)
        warned = [x for x in lines if "weak reference" in x]
        assert bool(warned) == flagged, lines
        if flagged:
            assert "48.2%" in warned[0] and "95.3%" in warned[0]
