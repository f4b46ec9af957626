"""The portraits the multimodal world will give its people: deterministic, one distinct appearance per person,
several pictures that differ as photographs of one person do, and people that a small model tells apart from held-out
pictures."""
from __future__ import annotations

import numpy as np
import pytest

from obliviate.worlds.portraits_draw import MIN_TRAIT_DISTANCE, appearances, picture, portrait
from obliviate.worlds.profiles import generate


@pytest.fixture(scope="module")
def names():
    return [p.name for p in generate(40, 0, seed=0).people]


def test_portraits_are_deterministic_and_an_appearance_does_not_depend_on_later_people(names):
    looks = appearances(names)
    assert appearances(names[:10]) == {n: looks[n] for n in names[:10]}
    again = appearances(names)
    for name in names[:5]:
        for i in range(3):
            assert np.array_equal(portrait(name, looks[name], i), portrait(name, again[name], i))
    image = portrait(names[0], looks[names[0]], 1)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert appearances(names, seed=1) != looks  # another world, other faces


def test_every_two_people_differ_in_several_traits(names):
    traits = [look.traits() for look in appearances(names).values()]
    assert min(sum(a != b for a, b in zip(s, t)) for i, s in enumerate(traits) for t in traits[i + 1:]) \
        >= MIN_TRAIT_DISTANCE


def test_pictures_of_one_person_differ_as_photographs_do(names):
    look = appearances(names)[names[0]]
    shots = [picture(names[0], i) for i in range(6)]
    assert shots[0].tilt == 0 and shots[0].expression == "neutral"  # the frontal portrait
    assert len({(s.dx, s.tilt, s.brightness) for s in shots}) == 6
    images = [portrait(names[0], look, i).astype(float) for i in range(6)]
    assert all(np.abs(images[0] - im).mean() > 1.0 for im in images[1:])


@pytest.mark.slow  # 15-70 s on 2 cores: kept out of the 5-minute default suite; CI runs it
def test_a_linear_model_tells_people_apart_on_held_out_pictures(names):
    """Trained on 4 pictures of each of 40 people, a logistic regression on the pixels names the person in 2 pictures
    it never saw (chance: 2.5 %). A proxy for the world's real vision tower, which is much stronger."""
    from sklearn.linear_model import LogisticRegression

    looks = appearances(names)

    def pictures(indices):
        x = [portrait(n, looks[n], i).reshape(-1) / 255.0 for n in names for i in indices]
        y = [k for k, _ in enumerate(names) for _ in indices]
        return np.asarray(x), np.asarray(y)

    x_train, y_train = pictures(range(4))
    x_test, y_test = pictures(range(4, 6))
    accuracy = LogisticRegression(max_iter=2000).fit(x_train, y_train).score(x_test, y_test)
    assert accuracy >= 0.6, accuracy
