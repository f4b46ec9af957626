"""The demo's parts run side by side in worker processes (one torch thread each) and come together in one folder;
a failing part fails the demo in one line and leaves no folder. The parts here are stand-ins (the real ones train
worlds for minutes: tests/test_slow_demo.py runs them)."""
import json
import os

import pytest

from obliviate.errors import ObliviateError


def lm_part(folder, log=print, tofu_dir=None, methods=(), size="demo"):
    import torch

    (folder / "lm-part.txt").write_text(f"{os.getpid()} {torch.get_num_threads()} {size}")
    row = {"forget_quality": 0.5, "model_utility": 0.8}
    return {"split": "forget10", "scorecard": {"original": row, **{m: row for m in methods}}, "notes": ["lm"],
            "winners": [], "histories": {m: [{"step": 0, "loss": 1.0}] for m in methods}}


def t2i_part(folder, log=print, methods=None, concepts=None, size="demo"):
    import torch

    (folder / "t2i-part.txt").write_text(f"{os.getpid()} {torch.get_num_threads()} {size}")
    return {"sections": [{"concept": c, "title": f"Erasing '{c}'", "scorecard": {"original": {"ua": 0.1}},
                          "notes": [], "grid": "none.png"} for c in concepts]}


def failing_part(folder, log=print, **options):
    raise ObliviateError("the canvas part failed")


@pytest.mark.parametrize("jobs,size", [(1, "demo"), pytest.param(2, "full", marks=pytest.mark.slow)])  # ~7 s
def test_parts_run_side_by_side_and_come_together(tmp_path, monkeypatch, jobs, size):
    import obliviate.demo as demo

    monkeypatch.setattr(demo, "PARTS", {"profiles": f"{__name__}:lm_part", "canvas": f"{__name__}:t2i_part"})
    summary = demo.run_demo(tmp_path / "demo", None, ["NPO"], log=lambda *a: None, concepts=["star"], jobs=jobs,
                            size=size)
    out = tmp_path / "demo"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["scorecard"] == summary["scorecard"] and set(saved["scorecard"]) == {"original", "NPO"}
    assert [s["concept"] for s in saved["t2i"]] == ["star"] and "histories" not in saved
    assert "Erasing &#x27;star&#x27;" in (out / "report.html").read_text()
    pids = {(out / f).read_text().split()[0] for f in ("lm-part.txt", "t2i-part.txt")}
    threads = {(out / f).read_text().split()[1] for f in ("lm-part.txt", "t2i-part.txt")}
    assert {(out / f).read_text().split()[2] for f in ("lm-part.txt", "t2i-part.txt")} == {size}
    assert saved["size"] == size
    if jobs == 2:  # two worker processes, one thread each
        assert len(pids) == 2 and str(os.getpid()) not in pids and threads == {"1"}
    else:
        assert pids == {str(os.getpid())}


@pytest.mark.slow  # the demo's parts in their own processes: about 8 s on 2 cores
def test_a_failing_part_fails_the_demo_and_leaves_no_folder(tmp_path, monkeypatch):
    import obliviate.demo as demo

    monkeypatch.setattr(demo, "PARTS", {"profiles": f"{__name__}:lm_part", "canvas": f"{__name__}:failing_part"})
    with pytest.raises(ObliviateError, match="the canvas part failed"):
        demo.run_demo(tmp_path / "demo", None, ["NPO"], log=lambda *a: None, jobs=2)
    assert not (tmp_path / "demo").exists() and not list(tmp_path.glob(".demo*"))


def test_an_unknown_size_is_refused_before_any_work(tmp_path):
    from obliviate.demo import run_demo

    with pytest.raises(ObliviateError, match="unknown demo size 'huge'; valid: demo, full"):
        run_demo(tmp_path / "demo", None, ["NPO"], log=lambda *a: None, size="huge")
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("flag,size", [([], "demo"), (["--full-size"], "full")])
def test_cli_demo_size_flag(tmp_path, monkeypatch, flag, size):
    """`obliviate demo` runs the demo size; `--full-size` hands "full" to every part."""
    from typer.testing import CliRunner

    import obliviate.demo as demo
    from obliviate.cli import app

    monkeypatch.setattr(demo, "PARTS", {"profiles": f"{__name__}:lm_part", "canvas": f"{__name__}:t2i_part"})
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--out", str(out), "--jobs", "1", "--quiet", *flag])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "summary.json").read_text())["size"] == size
    assert (out / "lm-part.txt").read_text().split()[2] == (out / "t2i-part.txt").read_text().split()[2] == size
