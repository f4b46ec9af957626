"""Progress when the output is a log or a pipe (not a terminal): plain flushed lines, not a live bar that shows
nothing for minutes; nothing at all when disabled (--quiet)."""
from __future__ import annotations

import re

import pytest

from obliviate import progress


@pytest.fixture(autouse=True)
def enabled_again():
    progress.set_enabled(True)  # an earlier CLI test may have run with --quiet
    yield
    progress.set_enabled(True)


def lines(capsys) -> list[str]:
    return [l for l in capsys.readouterr().out.splitlines() if l.strip()]


def test_a_bar_prints_plain_lines_when_the_output_is_not_a_terminal(capsys):
    with progress.bar("unlearn NPO", 20) as advance:
        for i in range(20):
            advance(loss=-0.1 * i, step=i)
    out = lines(capsys)
    assert 3 <= len(out) <= 12, out
    assert out[0] == "unlearn NPO: 0/20"
    assert re.fullmatch(r"unlearn NPO: 20/20 \(100%\) \d+s loss=-1\.9 step=19", out[-1]), out[-1]
    assert any(l.startswith("unlearn NPO: 10/20 (50%) ") for l in out), out
    assert len(set(out)) == len(out)  # no line twice


def test_a_long_bar_prints_about_ten_lines_and_a_stopped_one_says_where(capsys):
    with progress.bar("erase", 1000) as advance:
        for _ in range(1000):
            advance()
    out = lines(capsys)
    assert len(out) == 11 and out[-1].startswith("erase: 1000/1000 (100%)"), out
    with progress.bar("unlearn GradDiff", 120) as advance:
        for i in range(7):  # the loop breaks early (a non-finite loss)
            advance(loss=float(i))
    out = lines(capsys)
    assert out[-1].startswith("unlearn GradDiff: 7/120 (6%)") and out[-1].endswith("loss=6"), out


def test_a_disabled_bar_prints_nothing(capsys):
    progress.set_enabled(False)
    with progress.bar("unlearn NPO", 20) as advance:
        for _ in range(20):
            advance(loss=1.0)
    assert capsys.readouterr().out == ""
