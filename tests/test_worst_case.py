"""Worst-case forget sets (worlds/worst_case.py): the per-person scores against a hand computation on a tiny model,
determinism, the ranking and the worst-case splits it makes (outside val10, nested, cached with a key, recorded), the
retrain reference built without the chosen people, the splits as bench targets next to the forget splits, and bad
settings in one line."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from bench_fakes import install
from conftest import one_line_error, tiny_items, tiny_profiles_config
from typer.testing import CliRunner

from obliviate.config import WorldConfig
from obliviate.errors import ObliviateError
from obliviate.worlds import world_of
from obliviate.models import causal_lm as lm
from obliviate.worlds import worst_case as wc
from obliviate.worlds.profiles import ProfilesWorld, check_split

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "vocab_size": 400,
              "epochs": 1}


def people_examples(tokenizer) -> list[list]:
    """Three "people" of two question-answer pairs each, encoded as the world encodes its training pairs."""
    items = tiny_items()
    return [[lm.encode_qa(tokenizer, i.question, i.answer) for i in items[j:j + 2]] for j in (0, 2, 4)]


def loss_by_hand(model, encoded: list) -> torch.Tensor:
    """The mean over sequences of each sequence's mean NLL on its scored tokens, written out."""
    per_sequence = []
    for e in encoded:
        ids = torch.tensor([e.input_ids])
        logits = model(input_ids=ids).logits[0, :-1]
        targets = torch.tensor(e.labels[1:])
        scored = targets != -100
        per_sequence.append(F.cross_entropy(logits[scored], targets[scored]))
    return torch.stack(per_sequence).mean()


def test_scores_are_the_loss_left_after_sign_sgd_ascent_on_each_person_alone(tiny_lm):
    model, tokenizer = tiny_lm
    examples = people_examples(tokenizer)
    settings = wc.Selection(steps=2, theta_lr=1e-2)
    before_weights = copy.deepcopy(model.state_dict())
    scores = wc.score(model, examples, settings, tokenizer.pad_token_id, log=lambda *_: None)
    for i, encoded in enumerate(examples):
        copy_ = copy.deepcopy(model)
        with torch.no_grad():
            original = float(loss_by_hand(copy_, encoded))
        for _ in range(2):  # each person unlearned alone, from the original model
            copy_.zero_grad()
            loss_by_hand(copy_, encoded).backward()
            with torch.no_grad():
                for p in copy_.parameters():
                    p.add_(1e-2 * p.grad.sign())
        with torch.no_grad():
            after = float(loss_by_hand(copy_, encoded))
        assert scores["loss_original"][i] == pytest.approx(original, rel=1e-5)
        assert scores["loss_after"][i] == pytest.approx(after, rel=1e-5)
        assert after > original  # ascent raised the person's loss
    # the model is given back untouched
    assert all(torch.equal(before_weights[k], v) for k, v in model.state_dict().items())
    # with no steps, the score is the original loss
    none = wc.score(model, examples, wc.Selection(steps=0), tokenizer.pad_token_id, log=lambda *_: None)
    assert none["loss_after"] == none["loss_original"] == pytest.approx(scores["loss_original"])


def test_scores_are_deterministic_and_the_ranking_puts_the_lowest_loss_left_first(tiny_lm):
    model, tokenizer = tiny_lm
    examples = people_examples(tokenizer)
    settings = wc.Selection(steps=1, theta_lr=1e-2)
    first, second = (wc.score(model, examples, settings, tokenizer.pad_token_id, log=lambda *_: None)
                     for _ in range(2))
    assert first["loss_after"] == second["loss_after"] and first["loss_original"] == second["loss_original"]
    assert wc.rank(first) == sorted(range(3), key=lambda i: first["loss_after"][i])
    # ties go to the lower original loss, then to the given order
    assert wc.rank({"loss_after": [2.0, 1.0, 2.0, 1.0], "loss_original": [0.5, 0.9, 0.5, 0.3]}) == [3, 1, 0, 2]


def test_split_names():
    assert [wc.is_worst_split(s) for s in ("worst01", "worst10", "worst50", "worst5", "worst00", "worst51",
                                           "worst100", "forget10", None)] == [True] * 3 + [False] * 6
    check_split("worst20")
    with pytest.raises(ObliviateError, match=r"unknown split 'worst60'. Valid: forget01, .*val10, worst01 ... worst50"):
        check_split("worst60")
    from obliviate.worlds.portraits import SPLITS as PORTRAITS_SPLITS
    with pytest.raises(ObliviateError, match="unknown split 'worst10'"):  # the profiles world's only
        check_split("worst10", PORTRAITS_SPLITS)


@pytest.mark.parametrize("settings, needle", [
    (wc.Selection(steps=-1), "steps = -1: a whole number >= 0"),
    (wc.Selection(steps=1.5), "steps = 1.5"),
    (wc.Selection(theta_lr=0), "theta_lr = 0: a number > 0"),
    (wc.Selection(theta_lr=float("nan")), "theta_lr = nan"),
    (wc.Selection(eval_batch_size=0), "eval_batch_size = 0"),
])
def test_bad_settings_are_one_line(settings, needle):
    with pytest.raises(ObliviateError) as e:
        settings.check()
    assert needle in str(e.value) and "\n" not in str(e.value)


# ---- the worst-case splits of a world ------------------------------------------------------------------------------

def tiny_world(root) -> ProfilesWorld:
    return ProfilesWorld(WorldConfig(n_people=20, n_holdout=2, general_facts=5, cache_dir=str(root), model=TINY_MODEL))


SCORING = wc.Selection(steps=1, theta_lr=1e-2)


def fake_full_model(tiny_lm_dir):
    """The tiny model as the world's "full model" (copied, not trained: any tokenizer encodes the people)."""
    def copy_full(self, record, log):
        if not (self.full_model_dir / "config.json").is_file():
            shutil.copytree(tiny_lm_dir, self.full_model_dir)
            record["full"] = {"copied": True}
    return copy_full


@pytest.fixture(scope="module")
def scored_root(tmp_path_factory, tiny_lm_dir):
    """A 20-person world scored once (one step per person) for the tests of this file to copy."""
    root = tmp_path_factory.mktemp("scored")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(wc, "SETTINGS", SCORING)
        m.setattr(ProfilesWorld, "_train_full", fake_full_model(tiny_lm_dir))
        tiny_world(root).worst_case_people("worst10", log=lambda *_: None)
    return root


@pytest.fixture
def world(tmp_path, scored_root, tiny_lm_dir, monkeypatch):
    """A copy of the scored world (its full model, build record and scores); nothing is trained."""
    monkeypatch.setattr(wc, "SETTINGS", SCORING)
    monkeypatch.setattr(ProfilesWorld, "_train_full", fake_full_model(tiny_lm_dir))
    shutil.copytree(scored_root, tmp_path / "world")
    return tiny_world(tmp_path / "world")


@pytest.fixture
def unscored(tmp_path, tiny_lm_dir, monkeypatch):
    """The same world before its scores."""
    monkeypatch.setattr(wc, "SETTINGS", SCORING)
    monkeypatch.setattr(ProfilesWorld, "_train_full", fake_full_model(tiny_lm_dir))
    return tiny_world(tmp_path / "fresh")


@pytest.mark.slow  # 4-8 s: the default suite took 337 s on CI, over its 5 minutes
def test_worst_splits_take_the_hardest_people_outside_val10_nested_and_recorded(world):
    d = world.data()
    val = {p.name for p in d.split_people("val10")[0]}
    worst10, worst20 = (world.worst_case_people(s, log=lambda *_: None) for s in ("worst10", "worst20"))
    assert len(worst10) == 2 and len(worst20) == 4 and set(worst10) < set(worst20) and not set(worst20) & val
    record = json.loads(world.worst_case_file.read_text())
    people = record["people"]
    assert record["candidates"] == len(people) == 18 and record["excluded"] == "val10"
    assert record["settings"] == {"steps": 1, "theta_lr": 1e-2} and len(record["key"]) == 12
    # the ranking is the scores' order, and a split is its first people (listed in the world's order)
    assert [r["rank"] for r in people] == list(range(1, 19))
    assert [r["loss_after"] for r in people] == sorted(r["loss_after"] for r in people)
    assert set(worst20) == {r["name"] for r in people[:4]}
    assert worst20 == [p.name for p in d.people if p.name in set(worst20)]
    forget, retain = d.split_people("worst20")
    assert [p.name for p in forget] == worst20 and len(retain) == 16
    assert world.read_record()["selection-worst-case"]["key"] == record["key"]
    # the run's sets follow: everything about the chosen people, and nothing else
    unlearn_forget, unlearn_retain = world.unlearning_sets("worst20")
    assert {i.subject for i in unlearn_forget} == set(worst20) and not {i.subject for i in unlearn_retain} & set(
        worst20)
    qa, texts = world.eval_sets("worst20")
    assert {i.subject for i in qa["forget"]} == set(worst20)


def test_worst_split_follows_the_scores_not_the_positions(unscored, monkeypatch):
    """Scores that make the candidates at the end of the list the hardest choose them: the split then differs from
    the positional forget split of the same size."""
    def scores(model, examples, settings, pad_id, log=print):
        n = len(examples)
        return {"loss_after": [float(n - i) for i in range(n)], "loss_original": [0.0] * n, "seconds": 0.0}
    monkeypatch.setattr(wc, "score", scores)
    d = unscored.data()
    worst = unscored.worst_case_people("worst10", log=lambda *_: None)
    candidates = [p.name for p in d.people if p not in d.split_people("val10")[0]]
    assert worst == candidates[-2:]
    assert set(worst).isdisjoint(p.name for p in d.split_people("forget10")[0])


def test_scored_once_per_world_and_a_changed_setting_stops_with_the_file_named(world, tmp_path, monkeypatch):
    def must_not_score(*a, **k):
        raise AssertionError("scored again")
    monkeypatch.setattr(wc, "score", must_not_score)
    chosen = world.worst_case_people("worst10", log=lambda *_: None)  # the file written by the first scoring
    again = tiny_world(tmp_path / "world")  # another process: reads the file too
    assert again.worst_case_people("worst10") == chosen and again.data().split_people("worst10")[0]
    monkeypatch.setattr(wc, "SETTINGS", wc.Selection(steps=3, theta_lr=1e-2))
    with pytest.raises(ObliviateError, match=r"selection-worst-case.json: scored under other selection settings") \
            as e:
        tiny_world(tmp_path / "world").worst_case_people("worst10")
    assert "\n" not in str(e.value)


def test_the_retrain_reference_leaves_out_exactly_the_chosen_people(world, monkeypatch):
    trained = []

    def fake_train(self, out_dir, exclude, name, log, seed=0):
        trained.append((out_dir.name, set(exclude), seed))
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        return {"sequences": 0}
    monkeypatch.setattr(ProfilesWorld, "_train_model", fake_train)
    monkeypatch.setattr(ProfilesWorld, "accuracy_report", lambda self, split: {})
    quiet = lambda *a: None  # noqa: E731
    assert world.ensure_retrain("worst20", log=quiet) == world.root / "retrain-worst20"
    assert world.ensure_retrain("worst20", 1, log=quiet) == world.root / "retrain-worst20-seed1"
    chosen = set(world.worst_case_people("worst20"))
    assert trained == [("retrain-worst20", chosen, 0), ("retrain-worst20-seed1", chosen, 1)]


def test_sequential_requests_nest_worst_splits_and_the_variants_refuse_them(world, tmp_path):
    later, _ = world.unlearning_sets("worst20", forgotten_before="worst10")  # worst10 is worst20's head
    assert {i.subject for i in later} == set(world.worst_case_people("worst20")) - set(
        world.worst_case_people("worst10")) and later
    for split, before in (("forget20", "worst10"), ("worst20", "forget10")):
        with pytest.raises(ObliviateError, match="a worst-case split and a forget split need not nest"):
            world.unlearning_sets(split, forgotten_before=before)
    with pytest.raises(ObliviateError, match="must be a split inside split = 'worst10'"):
        world.unlearning_sets("worst10", forgotten_before="worst20")
    from obliviate.worlds.profiles_dp2 import DP2ProfilesWorld
    dp2 = world_of(WorldConfig(n_people=20, n_holdout=2, general_facts=5, cache_dir=str(tmp_path),
                                                model=TINY_MODEL, dp2={"noise_multiplier": 1.0}))
    assert isinstance(dp2, DP2ProfilesWorld)
    with pytest.raises(ObliviateError, match="offered on the plain profiles world only"):
        dp2.data().split_people("worst10")


def test_validate_takes_worst_splits_and_names_a_bad_one(tmp_path):
    from obliviate.cli import app

    cfg = tiny_profiles_config(tmp_path)
    text = cfg.read_text()
    runner = CliRunner()
    cfg.write_text(text + "split: worst20\n")
    assert runner.invoke(app, ["validate", str(cfg)]).exit_code == 0  # nothing built or scored
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("selection-*.json"))
    cfg.write_text(text + "split: worst70\n")
    one_line_error(runner.invoke(app, ["validate", str(cfg)]), "unknown split 'worst70'", "worst01 ... worst50")
    cfg.write_text(text + "split: worst20\nforgotten_before: forget10\n")
    one_line_error(runner.invoke(app, ["validate", str(cfg)]), "a worst-case split and a forget split need not nest")
    cfg.write_text(text + "split: worst10\nforgotten_before: worst20\n")  # 2 people, then 1 of them: the wrong way
    one_line_error(runner.invoke(app, ["validate", str(cfg)]), "forgotten_before = 'worst20'", "inside split")


# ---- as bench targets ----------------------------------------------------------------------------------------------

SPEC = """
name = "worst"
base = {{model = "/nowhere", train = {{lr = 1e-4}}}}
validation = "val10"
reported = "forget10"
{extra}
noise_floor = [1]
select = {{maximize = "forget_quality"}}

[[methods]]
name = "NPO"
grid = {{"train.lr" = [1e-4, 3e-4]}}
"""


def test_a_worst_split_is_a_bench_target_next_to_the_forget_split(tmp_path, monkeypatch):
    from obliviate.bench.engine import run_bench

    install(monkeypatch)
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(extra='also_reported = ["worst10"]\nscalability = ["worst05", "worst10"]\n'
                                      'sustainability = ["worst05", "worst10"]'))
    result = run_bench(spec, tmp_path / "out", log=lambda *_: None)
    cells = result["cells"]
    reported = sorted((c["target"], c["seed"]) for c in cells if c["kind"] == "reported")
    assert reported == [(t, s) for t in ("forget10", "worst10") for s in (0, 1, 2)]
    assert all(c["config"]["split"] == c["target"] for c in cells)
    assert sorted(c["target"] for c in cells if c["kind"] == "reference") == ["forget10", "worst05", "worst10"]
    assert sorted(c["size"] for c in cells if c["kind"] == "scalability") == [5.0, 10.0]
    second = next(c for c in cells if c["kind"] == "sustainability" and c["request"] == 2)
    assert second["target"] == "worst10" and second["config"]["forgotten_before"] == "worst05"
    board = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "forgetting forget10" in board and "forgetting worst10" in board
    # a worst split is not a place to choose settings from, but nothing stops it being reported alone
    spec.write_text(SPEC.format(extra="").replace('reported = "forget10"', 'reported = "worst10"'))
    alone = run_bench(spec, tmp_path / "alone", dry_run=True, log=lambda *_: None)
    assert {c["target"] for c in alone["cells"] if c["kind"] == "reference"} == {"worst10"}


def test_also_reported_paths_are_resolved_and_bad_values_named(tmp_path):
    from obliviate.bench.spec import read_spec

    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(extra='also_reported = [{forget_file = "f.json"}]'))
    parsed, _ = read_spec(spec)
    assert parsed.also_reported == [{"forget_file": str(tmp_path / "f.json")}]
    spec.write_text(SPEC.format(extra='also_reported = "worst10"'))
    with pytest.raises(ObliviateError, match=r"spec.toml: also_reported: .*list"):
        read_spec(spec)


@pytest.mark.slow  # a tiny world built, scored, its worst20 reference trained and one short run: 20-60 s
def test_a_real_run_on_a_worst_split(tmp_path):
    from obliviate.config import load_config
    from obliviate.runners import run

    cfg = tiny_profiles_config(tmp_path, max_steps=2)
    cfg.write_text(cfg.read_text() + "split: worst20\n")
    folder = run(load_config(cfg), log=lambda *_: None)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert "forget_quality" in metrics
    world_root = next((tmp_path / "cache").glob("profiles-*"))
    chosen = json.loads((world_root / "selection-worst-case.json").read_text())["people"]
    assert (world_root / "retrain-worst20" / "config.json").is_file() and len(chosen) == 9
