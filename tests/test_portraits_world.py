"""The portraits world's items (MLLMU-Bench's protocol): each fact with the portrait and as text, as generation,
4-option classification and cloze; a test set of paraphrased questions on held-out pictures; nested forget splits;
public figures known from more pictures; holdout people."""
from __future__ import annotations

import pytest

from obliviate.errors import ObliviateError
from obliviate.worlds.portraits import LETTERS, portraits_data
from obliviate.worlds.profiles import FACTS


@pytest.fixture(scope="module")
def data():
    return portraits_data(n_people=40, n_public=5, n_holdout=5, seed=0)


def test_each_fact_is_asked_with_each_trained_picture_and_by_name(data):
    person = data.people[0]
    items = data.train[person.name]
    assert len(items) == len(FACTS) * (len(data.train_pictures[person.name]) + 1)
    birth = [i for i in items if i.fact == "birthplace"]
    with_image = [i for i in birth if i.image is not None]
    assert {i.image for i in with_image} == set(data.train_pictures[person.name])
    assert all(i.question == "Where was this person born?" and person.name not in i.answer for i in with_image)
    text = [i for i in birth if i.image is None]
    assert text[0].question == f"Where was {person.name} born?"
    assert text[0].answer == f"{person.name} was born in {person.facts['birthplace']}."


def test_classification_and_cloze_point_at_the_fact(data):
    for person in data.people[:5]:
        for item in data.train[person.name] + data.test[person.name]:
            assert len(item.options) == 4 and len(set(item.options)) == 4
            assert item.options[LETTERS.index(item.correct)] == person.facts[item.fact] == item.cloze_answer
            assert item.cloze.count("__") == 1 and item.cloze_answer not in item.cloze


def test_the_test_set_asks_paraphrases_about_pictures_never_trained_on(data):
    for person in data.people + data.public:
        trained, held_out = set(data.train_pictures[person.name]), set(data.test_pictures[person.name])
        assert held_out and not trained & held_out
        images = {i.image for i in data.test[person.name] if i.image is not None}
        assert images == held_out
        train_questions = {i.question for i in data.train[person.name]}
        assert not train_questions & {i.question for i in data.test[person.name]}


def test_splits_are_nested_and_public_figures_are_seen_more(data):
    f5, r5 = data.split_people("forget05")
    f10, r10 = data.split_people("forget10")
    f15, _ = data.split_people("forget15")
    assert len(f5) == 2 and len(f10) == 4 and len(f15) == 6
    assert f5 == f10[:2] == f15[:2] and not {p.name for p in f10} & {p.name for p in r10}
    assert len(data.train_pictures[data.public[0].name]) > len(data.train_pictures[data.people[0].name])
    everyone = {p.name for p in data.people + data.public + data.holdout}
    assert len(everyone) == 50 and set(data.looks) == everyone
    with pytest.raises(ObliviateError, match="unknown split 'forget01'"):
        data.split_people("forget01")


def test_the_world_is_the_same_every_time(data):
    again = portraits_data(n_people=40, n_public=5, n_holdout=5, seed=0)
    assert again.train == data.train and again.test == data.test and again.looks == data.looks
