"""AltPO on the built-in worlds (`method_args.alternates = "world"`): the profiles and portraits worlds draw the
alternate answers generate.py would ask an instruct model for. They are of the same kind as the true answer, never
the true answer nor any wrong answer the evaluation scores, the same every time, written once into the world's folder
without changing its key, and a run records where they came from."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
from typer.testing import CliRunner

from conftest import one_line_error, tiny_profiles_config
from obliviate.config import WorldConfig
from obliviate.errors import ObliviateError
from obliviate.worlds.profiles import FACTS, VALUES, ProfilesWorld


def _value(template: str, name: str, text: str, pool: list[str]) -> str:
    """The pool's value that `template` renders as `text` for `name` (exactly one)."""
    found = [v for v in pool if template.format(n=name, v=v) == text]
    assert len(found) == 1, (template, text)
    return found[0]


def test_profiles_alternates_are_of_the_same_kind_and_never_what_the_evaluation_scores(tmp_path):
    from obliviate.worlds.profiles import ALTERNATES, alternate_rows, generate

    world = ProfilesWorld(WorldConfig(n_people=20, n_holdout=2, cache_dir=str(tmp_path)))
    data = world.data()
    rows = world.alternate_rows()
    assert {r["subject"] for r in rows} == {p.name for p in data.people}  # every trained person, no holdout one
    by_item: dict = {}
    for r in rows:
        by_item.setdefault((r["subject"], r.get("question"), r.get("answer"), r.get("text")), []).append(r["alternate"])
    for p in data.people:
        items = {i.question: i for i in data.qa[p.name]}
        for f in FACTS:
            item = items[f.question.format(n=p.name)]
            alternates = by_item[(p.name, item.question, item.answer, None)]
            values = [_value(f.answer, p.name, a, VALUES[f.values]) for a in alternates]  # the answer's template
            wrong = {_value(f.paraphrase, p.name, x, VALUES[f.values]) for x in item.perturbed_answers}
            assert len(wrong) == 3 and p.facts[f.key] not in values and not set(values) & wrong
            assert len(set(values)) == len(values) == min(ALTERNATES, len(VALUES[f.values]) - 4)
        biography = p.biography()
        for alternate in by_item[(p.name, None, None, biography.text)]:
            sentences = [s + "." for s in alternate.split(". ")]
            sentences[-1] = sentences[-1][:-1]
            assert len(sentences) == len(FACTS)
            for f, sentence in zip(FACTS, sentences):  # each fact one of that item's alternate values
                value = _value(f.paraphrase, p.name, sentence, VALUES[f.values])
                answers = by_item[(p.name, f.question.format(n=p.name), items[f.question.format(n=p.name)].answer,
                                   None)]
                assert f.answer.format(n=p.name, v=value) in answers
    # deterministic, and a person's alternates do not depend on the others (their order, who else is there)
    assert world.alternate_rows() == rows
    first = data.people[0].name
    alone = alternate_rows(dataclasses.replace(data, people=data.people[:0:-1] + data.people[:1]), 0)
    assert [r for r in alone if r["subject"] == first] == [r for r in rows if r["subject"] == first]
    other_seed = ProfilesWorld(WorldConfig(n_people=20, n_holdout=2, seed=1, cache_dir=str(tmp_path)))
    assert other_seed.alternate_rows() != rows
    assert generate(20, 2, 0).qa == data.qa  # the world's data are untouched by the draw


def test_portraits_alternates_avoid_every_option_and_name_no_one_of_the_world():
    from obliviate.evals.mllmu import LETTERS
    from obliviate.worlds.portraits import alternate_rows, portraits_data
    from obliviate.worlds.portraits_train import WHO, all_forms, training_items

    data = portraits_data(n_people=10, n_public=3, n_holdout=3, train_pictures=2, test_pictures=1,
                          public_pictures=3)
    rows = alternate_rows(data, seed=0)
    assert rows == alternate_rows(data, seed=0) and rows != alternate_rows(data, seed=1)
    table: dict = {}
    for r in rows:
        table.setdefault((r["subject"], r["question"], r["answer"]), []).append(r["alternate"])
    everyone = {p.name for p in data.people + data.public + data.holdout}
    pools = {f.key: f for f in FACTS}
    for p in data.people:
        forget = training_items(data, [p])
        assert all((p.name, i.question, i.answer) in table for i in forget)  # every item AltPO will be given
        for item in data.train[p.name]:
            f = pools[item.fact]
            options = {o for i in data.train[p.name] + data.test[p.name] if i.fact == item.fact for o in i.options}
            free, choice, cloze = all_forms(item)
            values = table[(p.name, cloze.question, cloze.answer)]
            assert values and set(values) <= set(VALUES[f.values]) and not set(values) & options
            who = "this person" if item.image else p.name
            assert table[(p.name, free.question, free.answer)] == [
                (lambda t: t[0].upper() + t[1:])(f.answer.format(n=who, v=v)) for v in values]
            assert table[(p.name, choice.question, choice.answer)] == [f"{item.correct}. {v}" for v in values]
            assert item.correct in LETTERS
        names = [a.removeprefix("This is ").removesuffix(".") for a in table[(p.name, WHO, f"This is {p.name}.")]]
        assert names and not set(names) & everyone


def test_the_alternates_file_is_written_once_into_the_worlds_folder_and_keeps_its_key(tmp_path):
    world = ProfilesWorld(WorldConfig(n_people=10, n_holdout=2, cache_dir=str(tmp_path)))
    key = world.key()
    path, digest, rows = world.alternates_file()
    assert path.parent == world.root and path.name == f"alternates-{digest[:12]}.jsonl" and world.key() == key
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == world.alternate_rows() and rows == len(lines)
    stamp = path.stat().st_mtime_ns
    assert world.alternates_file() == (path, digest, rows) and path.stat().st_mtime_ns == stamp  # not rewritten
    assert [p.name for p in world.root.iterdir() if not p.name.startswith(".")] == [path.name]  # nothing else
    path.write_text(path.read_text().replace("born", "borne"))
    with pytest.raises(ObliviateError, match="not the world's alternates") as e:
        world.alternates_file()
    assert "\n" not in str(e.value)


def test_altpo_takes_the_worlds_alternates_and_pairs_every_forget_item(tmp_path):
    """from_world reads the world's file; every forget item of a split (questions and biographies) gets a companion
    from it, the item kept but for its answer (a biography: its text); the record names the file."""
    from obliviate.methods.common import make_method

    world = ProfilesWorld(WorldConfig(n_people=10, n_holdout=2, cache_dir=str(tmp_path)))
    method = make_method("lm", "AltPO", {"alternates": "world"})
    assert method.needs_world
    record = method.from_world(world)["alternates"]
    path, digest, rows = world.alternates_file()
    assert record == {"source": "world", "world": "profiles", "file": str(path), "sha256": digest, "rows": rows}
    forget, retain = world.unlearning_sets("forget10")
    pairs = method.companions(forget, retain, random.Random(0))
    assert len(pairs) == len(forget)
    for item, pair in zip(forget, pairs):
        assert pair.subject == item.subject
        if hasattr(item, "question"):
            assert pair.question == item.question and pair.answer != item.answer
        else:
            assert pair.text != item.text and pair.text.split()[:4] == item.text.split()[:4]
    again = make_method("lm", "AltPO", {"alternates": "world"})
    again.from_world(world)
    assert [p for p in again.companions(forget, retain, random.Random(0))] == pairs  # the run's seed decides
    # RG over AltPO hands the world on to its base
    rg = make_method("lm", "RG", {"base": "AltPO", "base_args": {"alternates": "world"}})
    assert rg.needs_world and rg.from_world(world)["alternates"]["file"] == str(path)


def test_world_alternates_refused_in_one_line_where_there_are_none(tmp_path, tiny_lm_dir):
    from obliviate.cli import app
    from obliviate.methods.common import make_method
    from obliviate.worlds import world_of

    method = make_method("lm", "AltPO", {"alternates": "world"})
    with pytest.raises(ObliviateError, match="read from the run's world") as e:  # the loop without the runner
        method.companions([], [], random.Random(0))
    assert "\n" not in str(e.value)
    with pytest.raises(ObliviateError, match="this run is on your own data"):
        method.from_world(None)
    corrupted = world_of(WorldConfig(n_people=10, n_holdout=2, corrupt={}, cache_dir=str(tmp_path)))
    with pytest.raises(ObliviateError, match="the corrupted world .* has none"):
        method.from_world(corrupted)
    # a user's model and files with "world": `obliviate validate` says so in one line, before anything is read
    for name in ("forget.jsonl", "retain.jsonl"):
        (tmp_path / name).write_text(json.dumps({"question": "Q?", "answer": f"A {name}."}) + "\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"method: AltPO\nmethod_args: {{alternates: world}}\nmodel: {tiny_lm_dir}\n"
                   f"forget_file: {tmp_path / 'forget.jsonl'}\nretain_file: {tmp_path / 'retain.jsonl'}\n")
    one_line_error(CliRunner().invoke(app, ["validate", str(cfg)]), "alternates = \"world\"", "your own data")
    # the same on MLLMU-Bench's files (the vision-language family's own data), before any file is read
    from obliviate.config import build_config
    from obliviate.runners.mllm_checks import check_mllm

    with pytest.raises(ObliviateError, match="this run is on your own data"):
        check_mllm(build_config({"family": "mllm", "method": "AltPO", "method_args": {"alternates": "world"},
                                 "model": str(tmp_path / "llava"), "mllmu_dir": str(tmp_path / "mllmu")}))
    # a world run without alternates is refused as before: "world" is never implied; with it, the config is valid
    cfg = tiny_profiles_config(tmp_path)
    text = cfg.read_text()
    cfg.write_text(text.replace("method: GradDiff", "method: AltPO"))
    one_line_error(CliRunner().invoke(app, ["validate", str(cfg)]), "AltPO needs alternate answers", "\"world\"")
    cfg.write_text(text.replace("method: GradDiff", "method: AltPO\nmethod_args: {alternates: world}"))
    assert CliRunner().invoke(app, ["validate", str(cfg)]).exit_code == 0
    assert not (tmp_path / "cache").exists()  # nothing built, nothing written


@pytest.mark.slow  # a tiny world built and one AltPO run (~20 s on 2 busy cores); CI runs it
def test_an_altpo_run_on_a_tiny_world_with_world_alternates(tmp_path):
    from obliviate.config import load_config
    from obliviate.runners.lm import run

    cfg = tiny_profiles_config(tmp_path, max_steps=2)
    cfg.write_text(cfg.read_text().replace("method: GradDiff", "method: AltPO\nmethod_args: {alternates: world}"))
    out = run(load_config(cfg), log=lambda *a: None)
    metrics = json.loads((out / "metrics.json").read_text())
    record = metrics["alternates"]
    world = ProfilesWorld(load_config(cfg).world)
    assert record["source"] == "world" and record["file"] == str(world.alternates_file()[0])
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2 and all(h["alternate_logp"] < 0 for h in history)
    assert metrics["status"] == "completed" and "forget_quality" in metrics


@pytest.mark.slow  # a tiny portraits world built and one AltPO run (~100 s on 2 busy cores); CI runs it
def test_an_altpo_run_on_a_tiny_portraits_world_with_world_alternates(tmp_path):
    """The vision-language family takes the same path: every forget item (each form, each picture) is paired."""
    from obliviate.config import load_config
    from obliviate.runners.mllm import run

    model = "\n".join(f"{k} = {v}" for k, v in {"epochs": 1, "hidden_size": 32, "intermediate_size": 64,
                                                 "num_layers": 1, "vision_hidden": 16, "vision_layers": 1,
                                                 "vocab_size": 400}.items())
    (tmp_path / "run.toml").write_text(
        f'family = "mllm"\nmethod = "AltPO"\nsplit = "forget10"\noutput_dir = "{tmp_path / "runs"}"\nname = "alt"\n'
        f'[method_args]\nalternates = "world"\n'
        f'[world]\nname = "portraits"\nn_people = 10\nn_holdout = 2\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[world.model]\n{model}\n[train]\nmax_steps = 2\nbatch_size = 4\n[eval]\nretain_people = 2\n')
    out = run(load_config(tmp_path / "run.toml"), log=lambda *a: None)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["alternates"]["source"] == "world" and metrics["alternates"]["world"] == "portraits"
    assert metrics["status"] == "completed"
    assert all(h["alternate_logp"] < 0 for h in json.loads((out / "history.json").read_text()))
