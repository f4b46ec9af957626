"""The worlds' shared base and the targets the bench stands on: cache keys and folder names unchanged, the validation
split val10 (disjoint from every forget split), retrain references per training seed (built once, cached next to
today's), the canvas world's validation concepts, and sequential requests (`forgotten_before`)."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import one_line_error, tiny_profiles_config
from obliviate.config import WorldConfig
from obliviate.errors import ObliviateError
from obliviate.worlds.canvas import DEFAULT_RETRAIN, CanvasWorld, concept_kind
from obliviate.worlds.portraits import PortraitsWorld
from obliviate.worlds.portraits import SPLITS as PORTRAITS_SPLITS
from obliviate.worlds.profiles import SPLITS, ProfilesWorld

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "vocab_size": 400,
              "epochs": 1}


def tiny_profiles(tmp_path) -> ProfilesWorld:
    return ProfilesWorld(WorldConfig(n_people=10, n_holdout=2, general_facts=5, cache_dir=str(tmp_path),
                                     model=TINY_MODEL))


def test_cache_keys_and_folder_names_are_unchanged(tmp_path, monkeypatch):
    """The built worlds in the cache took hours of CPU: their keys (computed on the code before the shared base) and
    the names of the folders in them must not move."""
    from obliviate.demo.lm import WORLDS

    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path))
    demo, full = (ProfilesWorld(WorldConfig(**WORLDS[size])) for size in ("demo", "full"))
    portraits = PortraitsWorld(WorldConfig(name="portraits"))
    canvas = CanvasWorld.from_config(WorldConfig(name="canvas"))
    assert (demo.key(), full.key()) == ("a3be6cdd33bc", "369f9322551e")
    assert portraits.key() == "68d785ce18e5"
    # a config written out whole and read back (a run's config.json, a bench cell's) names the same worlds
    again = lambda world: WorldConfig(**json.loads(json.dumps(world.config.model_dump())))  # noqa: E731
    assert PortraitsWorld(again(portraits)).key() == "68d785ce18e5"
    assert ProfilesWorld(again(demo)).key() == "a3be6cdd33bc" and ProfilesWorld(again(full)).key() == "369f9322551e"
    assert CanvasWorld.from_config(WorldConfig(**WorldConfig(name="canvas").model_dump())).key() == "5bef14aebafa"
    assert PortraitsWorld(WorldConfig(name="portraits", n_people=30)).key() != "68d785ce18e5"  # a size still resizes
    assert canvas.key() == CanvasWorld().key() == "5bef14aebafa"
    assert demo.root == tmp_path / "profiles-a3be6cdd33bc" and demo.full_model_dir == demo.root / "full"
    assert portraits.root == tmp_path / "portraits-68d785ce18e5"
    assert canvas.root == tmp_path / "canvas-5bef14aebafa" and canvas.full_model_dir == canvas.root / "pipeline"
    assert demo.retrain_dir("forget10") == demo.root / "retrain-forget10"
    assert portraits.retrain_dir("forget10") == portraits.root / "retrain-forget10"


def test_retrain_folders_are_named_by_target_and_seed(tmp_path):
    world = tiny_profiles(tmp_path)
    assert world.retrain_dir("forget10", 0).name == "retrain-forget10"
    assert world.retrain_dir("val10", 1).name == "retrain-val10-seed1"
    assert world.retrain_dir("forget20", 12).name == "retrain-forget20-seed12"
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ObliviateError, match="retrain seed: a whole number >= 0"):
            world.retrain_dir("forget10", bad)
    with pytest.raises(ObliviateError, match="unknown split 'forget15'. Valid: forget01, .*val10"):
        world.retrain_dir("forget15")


@pytest.mark.parametrize("n_people", [10, 24, 100, 200])
def test_val10_is_taken_from_the_end_and_meets_no_forget_split(n_people):
    from obliviate.worlds.profiles import generate

    d = generate(n_people, 2, seed=0)
    val, val_retain = d.split_people("val10")
    assert val == d.people[-len(val):] and len(val) == max(1, round(n_people / 10))
    assert {p.name for p in val} | {p.name for p in val_retain} == {p.name for p in d.people}
    assert not {p.name for p in val} & {p.name for p in val_retain}
    forgets = {s: {p.name for p in d.split_people(s)[0]} for s in SPLITS if s != "val10"}
    assert forgets["forget01"] <= forgets["forget05"] <= forgets["forget10"] < forgets["forget20"]
    for split, names in forgets.items():
        assert not names & {p.name for p in val}, split


def test_portraits_splits_include_forget20_and_val10():
    world = PortraitsWorld(WorldConfig(name="portraits"))
    d = world.data()
    val = {p.name for p in d.split_people("val10")[0]}
    assert val == {p.name for p in d.people[-len(val):]} and val
    for split in PORTRAITS_SPLITS:
        if split != "val10":
            assert not val & {p.name for p in d.split_people(split)[0]}, split
    assert len(d.split_people("forget20")[0]) == round(len(d.people) * 0.2)
    assert world.retrain_dir("val10", 2).name == "retrain-val10-seed2"


@pytest.mark.slow  # 3 tiny trainings and the build's accuracy check: 15-60 s on 2 shared cores
def test_ensure_retrain_trains_each_model_once_and_seeds_differ(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from obliviate.worlds import train as recipe_module

    trained = []
    real_train = recipe_module.train

    def counting(model, tokenizer, examples, recipe, description="train", collate=None):
        trained.append((description, recipe.seed, len(examples)))
        return real_train(model, tokenizer, examples, recipe, description, collate)
    monkeypatch.setattr(recipe_module, "train", counting)
    world = tiny_profiles(tmp_path)
    quiet = lambda *a: None  # noqa: E731
    folder = world.ensure_retrain("val10", 1, log=quiet)
    assert folder == world.root / "retrain-val10-seed1" and (folder / "config.json").is_file()
    # the full model, today's reference (seed 0) and the seed-1 reference: the recipe's seed + 1, the same data
    assert [(d, s) for d, s, _ in trained] == [("train full model", 0), ("train retrain (val10)", 0),
                                               ("train retrain (val10, seed 1)", 1)]
    assert trained[1][2] == trained[2][2] < trained[0][2]
    assert world.ensure_retrain("val10", 1, log=quiet) == folder
    assert world.ensure_retrain("val10", 0, log=quiet) == world.retrain_dir("val10")
    assert len(trained) == 3  # cached: nothing trained again
    record = world.read_record()
    assert record["retrain-val10-seed1"]["sequences"] == trained[2][2] and "accuracy-val10" in record
    seed0, seed1 = (load_file(world.retrain_dir("val10", s) / "model.safetensors") for s in (0, 1))
    assert seed0.keys() == seed1.keys()
    assert any(not (seed0[k] == seed1[k]).all() for k in seed0)


def test_cached_evaluation_is_computed_once_under_its_historical_name(tmp_path):
    import hashlib
    import json

    world = tiny_profiles(tmp_path)
    calls = []
    settings = ["forget10", {"batch_size": 16}, 3]
    compute = lambda: calls.append(1) or {"x": 1.5}  # noqa: E731
    assert world.cached_evaluation("retrain", "forget10", settings, compute) == {"x": 1.5}
    assert world.cached_evaluation("retrain", "forget10", settings, compute) == {"x": 1.5}
    assert calls == [1]
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    assert (world.root / f"eval-retrain-forget10-{key}.json").is_file()


def test_forgotten_before_leaves_the_earlier_request_out_of_the_forget_set(tmp_path):
    world = ProfilesWorld(WorldConfig(n_people=100, cache_dir=str(tmp_path)))
    d = world.data()
    forget, retain = world.unlearning_sets("forget10")
    later, later_retain = world.unlearning_sets("forget10", forgotten_before="forget05")
    names = lambda items: {i.subject for i in items}  # noqa: E731
    assert names(later) == {p.name for p in d.people[5:10]}
    assert names(later) == names(forget) - {p.name for p in d.split_people("forget05")[0]}
    assert later_retain == retain  # the retain set stays the people outside `split`
    for bad, why in (("forget20", "must be a split inside split = 'forget10'"),
                     ("forget10", "must be a split inside"), ("val10", "must be a split inside"),
                     ("forget15", "unknown split 'forget15'")):
        with pytest.raises(ObliviateError, match=why):
            world.unlearning_sets("forget10", forgotten_before=bad)


def test_portraits_forgotten_before(tmp_path):
    world = PortraitsWorld(WorldConfig(name="portraits", cache_dir=str(tmp_path)))
    d = world.data()
    later, retain = world.unlearning_sets("forget20", forgotten_before="forget10")
    assert {i.subject for i in later} == {p.name for p in d.split_people("forget20")[0][2:]}
    assert retain == world.unlearning_sets("forget20")[1]
    with pytest.raises(ObliviateError, match="must be a split inside"):
        world.unlearning_sets("forget10", forgotten_before="val10")


def test_forgotten_before_bad_values_are_one_line(tmp_path):
    from obliviate.cli import app

    cfg = tiny_profiles_config(tmp_path)
    runner = CliRunner()
    text = cfg.read_text()
    cfg.write_text(text + "forgotten_before: forget20\n")
    one_line_error(runner.invoke(app, ["validate", str(cfg)]), "forgotten_before = 'forget20'",
                   "inside split = 'forget10'")
    cfg.write_text(text + "split: forget20\nforgotten_before: forget10\n")  # 2 people, then 1 of them
    assert runner.invoke(app, ["validate", str(cfg)]).exit_code == 0
    t2i = tmp_path / "t2i.yaml"
    t2i.write_text("method: ESD\nconcept: striped\nforgotten_before: forget05\n")
    one_line_error(runner.invoke(app, ["validate", str(t2i)]), "forgotten_before")


def test_canvas_validation_concepts_are_one_style_and_one_object_besides_the_reported_ones(tmp_path):
    assert {k: concept_kind(c) for k, c in CanvasWorld.VALIDATION_CONCEPTS.items()} == {"style": "style",
                                                                                         "object": "object"}
    assert not set(CanvasWorld.VALIDATION_CONCEPTS.values()) & set(DEFAULT_RETRAIN)
    world = CanvasWorld(cache_dir=str(tmp_path))
    with pytest.raises(ObliviateError, match="no retrain reference for 'dotted'.*`ensure_retrain` builds it"):
        world.retrain_dir("dotted")
    with pytest.raises(ObliviateError, match="no concept 'plaid'"):
        world.ensure_retrain("plaid")


@pytest.mark.parametrize("family", ["lm", "mllm"])
def test_a_run_with_forgotten_before_trains_on_the_rest_of_its_split(tmp_path, monkeypatch, family):
    """The runners hand `forgotten_before` to the world: the forget set is split's people minus the earlier
    request's, the retain set and the evaluation stay split's (no model is trained here: the build is stubbed)."""
    from obliviate.config import RunConfig
    from obliviate.runners import lm, mllm

    runner, world_class = (lm, ProfilesWorld) if family == "lm" else (mllm, PortraitsWorld)
    monkeypatch.setattr(world_class, "build", lambda self, *a, **k: self.full_model_dir.mkdir(parents=True,
                                                                                              exist_ok=True))
    world = {"name": "portraits"} if family == "mllm" else {"n_people": 20}
    config = RunConfig(family=family, method="GradDiff", split="forget20", forgotten_before="forget10",
                       world={**world, "cache_dir": str(tmp_path)})
    out = runner.prepare(config, log=lambda *a: None)
    forget, retain = out[1], out[2]
    w = runner.world_for(config)
    people = w.data().split_people
    assert {i.subject for i in forget} == {p.name for p in people("forget20")[0]} - {
        p.name for p in people("forget10")[0]}
    assert {i.subject for i in retain} == {p.name for p in people("forget20")[1]}


def test_world_build_treats_every_world_alike(tmp_path, monkeypatch):
    """`obliviate world build NAME [--split TARGET]`: the world from its config, then its build or the target's
    retrain reference, with no branch on the world's name (the training is stubbed)."""
    from obliviate.cli import app

    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path))
    calls = []
    for cls in (ProfilesWorld, PortraitsWorld, CanvasWorld):
        monkeypatch.setattr(cls, "build", lambda self, *a, **k: calls.append((self.kind, "build", a)))
        monkeypatch.setattr(cls, "ensure_retrain", lambda self, t, *a, **k: calls.append((self.kind, "retrain", t)))
    runner = CliRunner()
    for args in (["canvas"], ["canvas", "--split", "dotted"], ["profiles", "--split", "val10"], ["portraits"]):
        result = runner.invoke(app, ["world", "build", *args, "--quiet"])
        assert result.exit_code == 0 and "world ready: " + str(tmp_path) in result.output, result.output
    assert calls == [("canvas", "build", ()), ("canvas", "retrain", "dotted"), ("profiles", "retrain", "val10"),
                     ("portraits", "build", ())]
