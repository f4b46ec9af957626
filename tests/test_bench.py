"""`obliviate bench`: spec errors, cell keys, resume, locks between processes, failures, selection on the validation
target only, sustainability's chain, and one real tiny grid. The engine tests swap the run for a fast fake
(tests/bench_fakes.py); the last test runs real tiny runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bench_fakes import install
from conftest import one_line_error, tiny_items

from obliviate.errors import ObliviateError

HERE = Path(__file__).parent


def write_spec(tmp_path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


FAKE_SPEC = """
name = "fake"
base = {{model = "/nowhere", train = {{lr = 1e-4}}}}
seeds = [0, 1, 2]
validation = "val10"
reported = "forget10"
noise_floor = {noise}
select = {{maximize = "forget_quality", constraints = ["utility_ratio >= 0.9"]}}
{extra}

[[methods]]
name = "NPO"
grid = {{"train.lr" = [1e-4, 3e-4, 1e-3]}}

[[methods]]
name = "GradDiff"
overrides = {{"method_args.alpha" = 2.0}}
grid = {{"train.lr" = [1e-4, 2e-4]}}
"""


def fake_spec(tmp_path, extra: str = "", noise: str = "[]", name: str = "spec.toml") -> Path:
    return write_spec(tmp_path, FAKE_SPEC.format(extra=extra, noise=noise), name)


def records(out: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}


def calls(tmp_path) -> list[str]:
    path = tmp_path / "calls.txt"
    return path.read_text().split() if path.exists() else []


@pytest.fixture
def fake(monkeypatch, tmp_path):
    install(monkeypatch)
    monkeypatch.setenv("FAKE_RUN_LOG", str(tmp_path / "calls.txt"))


def bench(spec, out, **kw):
    from obliviate.bench.engine import run_bench
    return run_bench(spec, out, log=lambda *_: None, **kw)


# ---- the spec ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, needles", [
    ("base = {}\nvalidation='val10'\nreported='forget10'\nselect={maximize='forget_quality'}\nmethods=[{name='NPO'}]"
     "\ncolour = 1", ["colour: unknown key"]),
    ("base = {}\nvalidation='val10'\nreported='forget10'\nselect={maximize='forget_qualty'}\nmethods=[{name='NPO'}]",
     ["select", "unknown metric 'forget_qualty'"]),
    ("base = {}\nvalidation='val10'\nreported='forget10'\nselect={maximize='forget_quality', constraints=['mu > x']}"
     "\nmethods=[{name='NPO'}]", ["select", "constraint 'mu > x'"]),
    ("base = {}\nvalidation='val10'\nreported='forget10'\nselect={maximize='forget_quality'}\nseeds=[0]\n"
     "methods=[{name='NPO'}]", ["seeds", "at least 3 seeds", "allow_fewer_seeds"]),
    ("base = {}\nvalidation='val10'\nreported='forget10'\nselect={maximize='forget_quality'}\n"
     "methods=[{name='NPO', grid={'train.lr'=[]}}]", ["methods.0.grid", "has no values"]),
    ("base = {}\nvalidation='val10'\nreported='forget10'\nselect={maximize='forget_quality'}\n"
     "methods=[{name='NPO', colour=1}]", ["methods.0.colour: unknown key"]),
])
def test_spec_errors_name_the_key_and_the_file(tmp_path, text, needles):
    from obliviate.bench.spec import read_spec

    path = write_spec(tmp_path, text)
    with pytest.raises(ObliviateError) as e:
        read_spec(path)
    assert str(e.value).startswith(str(path)), e.value
    for n in needles:
        assert n in str(e.value), e.value


def test_a_bad_base_or_method_is_one_line_from_the_cli_before_any_cell_runs(tmp_path):
    from typer.testing import CliRunner

    from obliviate.cli import app

    spec = write_spec(tmp_path, "base = {train = {lr = -1}}\nvalidation='val10'\nreported='forget10'\n"
                                "select={maximize='forget_quality'}\nmethods=[{name='NPO'}]")
    out = tmp_path / "out"
    one_line_error(CliRunner().invoke(app, ["bench", str(spec), "--out", str(out)]), str(spec), "train.lr")
    assert not (out / "cells").exists()
    spec.write_text("base = {}\nvalidation='val10'\nreported='forget10'\nselect={maximize='forget_quality'}\n"
                    "methods=[{name='NPOO'}]")
    one_line_error(CliRunner().invoke(app, ["bench", str(spec), "--out", str(out)]), "unknown", "NPOO")


# ---- cells ---------------------------------------------------------------------------------------------------------

def test_cell_keys_are_stable_and_one_changed_config_changes_only_its_key(tmp_path):
    from obliviate.bench.engine import Bench
    from obliviate.bench.spec import read_spec

    def keys(path):
        spec, data = read_spec(path)
        return [c.key for c in Bench(spec, data, str(path), tmp_path / "out").validation_cells()]

    first = keys(fake_spec(tmp_path))
    assert first == keys(fake_spec(tmp_path)) and len(set(first)) == 5
    assert all(len(k) == 16 and int(k, 16) >= 0 for k in first)
    changed = keys(write_spec(tmp_path, FAKE_SPEC.format(extra="", noise="[]").replace("3e-4", "4e-4"), "b.toml"))
    assert [a == b for a, b in zip(first, changed)] == [True, False, True, True, True]
    # the kind is part of the key: the same config as a reported cell is another cell
    from obliviate.bench.cells import cell_key
    assert cell_key({"a": 1}, "validation", tmp_path) != cell_key({"a": 1}, "reported", tmp_path)
    # where the bench folder lies is not: a path inside it counts relative to it
    assert cell_key({"model": str(tmp_path / "x" / "m")}, "reported", tmp_path / "x") == \
        cell_key({"model": str(tmp_path / "y" / "m")}, "reported", tmp_path / "y")


def test_resume_skips_done_cells_and_reruns_only_a_changed_one(tmp_path, fake):
    out = tmp_path / "out"
    result = bench(fake_spec(tmp_path), out)
    assert len(calls(tmp_path)) == 5 + 2 * 3  # the grid, then each method's chosen setting over 3 seeds
    assert all(r["status"] == "done" for r in result["cells"])
    folder = out / "cells" / result["cells"][0]["key"]
    assert (folder / "metrics.json").is_file() and (out / "leaderboard.md").is_file()
    bench_json = json.loads((out / "bench.json").read_text())
    assert bench_json["name"] == "fake" and bench_json["family"] == "lm" and bench_json["spec"]["seeds"] == [0, 1, 2]

    bench(fake_spec(tmp_path), out)
    assert len(calls(tmp_path)) == 11  # nothing ran again
    bench(write_spec(tmp_path, FAKE_SPEC.format(extra="", noise="[]").replace("[1e-4, 2e-4]", "[1e-4, 2.5e-4]")),
          out)
    new = calls(tmp_path)[11:]
    # GradDiff's changed grid point, and GradDiff's reported cells (its winner changed from 2e-4 to 2.5e-4)
    assert len(new) == 1 + 3, new
    # the earlier cells stay (a spec changed back reuses them) but the grid, and its leaderboard, are the new cells
    assert len(records(out)) == 11 + 4
    current = json.loads((out / "bench.json").read_text())["cells"]
    assert len(current) == 11 and set(new) <= set(current)
    board = (out / "leaderboard.md").read_text()  # the changed grid's cells only: 3 seeds, not the old grid's too
    assert "| GradDiff | lr=0.00025 | 3 seeds |" in board and "6 seeds" not in board


def test_a_failing_cell_is_recorded_with_its_reason_and_the_grid_goes_on(tmp_path, fake):
    out = tmp_path / "out"
    spec = fake_spec(tmp_path)
    text = spec.read_text().replace('grid = {"train.lr" = [1e-4, 2e-4]}',
                                    'grid = {"train.lr" = [1e-4, 2e-4], "train.fail" = ["no", "nan", "oom"]}')
    spec.write_text(text)
    result = bench(spec, out)
    failed = [r for r in result["cells"] if r["status"] == "failed"]
    reasons = sorted(r["reason"] for r in failed)
    assert len(failed) == 4 and len(reasons[0].splitlines()) == 1
    assert sum("stopped: loss is nan at step 3" in r for r in reasons) == 2
    assert sum(r.startswith("out of memory") for r in reasons) == 2
    assert all(r["kind"] == "validation" for r in failed)
    selection = json.loads((out / "selection.json").read_text())["GradDiff"]
    assert selection["chosen"] == {"train.lr": 2e-4, "train.fail": "no"}
    assert sorted(c["status"] for c in selection["candidates"]).count("failed") == 4
    # the grid went on: the chosen settings ran on the reported target
    assert sum(r["kind"] == "reported" and r["status"] == "done" for r in result["cells"]) == 6
    n = len(calls(tmp_path))
    bench(spec, out)
    assert len(calls(tmp_path)) == n  # failed cells are settled...
    bench(spec, out, retry_failed=True)
    assert len(calls(tmp_path)) == n + 4  # ... until --retry-failed, which runs each once


def test_selection_uses_the_validation_cells_only(tmp_path, fake):
    """The made-up metrics rank the learning rates one way on val10 and the opposite way on forget10: the choice
    follows val10, whatever the reported cells say."""
    out = tmp_path / "out"
    result = bench(fake_spec(tmp_path), out)
    selection = json.loads((out / "selection.json").read_text())
    assert selection["NPO"]["chosen"] == {"train.lr": 1e-3}  # best on val10; the worst on forget10
    assert selection["GradDiff"]["chosen"] == {"train.lr": 2e-4}
    assert selection["NPO"]["margin"] == pytest.approx(1.0 - 0.3)
    assert selection["NPO"]["rule"] == ("the highest forget_quality on the validation target among the settings "
                                        "with utility_ratio at least 0.9")
    assert len(selection["NPO"]["candidates"]) == 3
    validation = {r["key"] for r in result["cells"] if r["kind"] == "validation"}
    assert {c["cell"] for m in selection.values() for c in m["candidates"]} <= validation
    reported = [r for r in result["cells"] if r["kind"] == "reported"]
    assert {r["seed"] for r in reported} == {0, 1, 2}
    assert all(r["config"]["split"] == "forget10" and r["config"]["train"]["seed"] == r["seed"] for r in reported)
    assert {r["config"]["train"]["lr"] for r in reported if r["method"] == "NPO"} == {1e-3}
    assert {r["config"]["method_args"]["alpha"] for r in reported if r["method"] == "GradDiff"} == {2.0}
    # the reported numbers themselves never feed back: change them and select again
    from obliviate.bench.engine import Bench
    from obliviate.bench.spec import read_spec
    for r in reported:
        (out / "cells" / r["key"] / "metrics.json").write_text(json.dumps({"forget_quality": 99.0,
                                                                              "utility_ratio": 1.0}))
    spec, data = read_spec(tmp_path / "spec.toml")
    b = Bench(spec, data, "spec", out)
    assert b.select(b.validation_cells()) == selection


def test_constraints_make_candidates_ineligible_and_relative_bounds_read_the_original(tmp_path, fake):
    out = tmp_path / "out"
    spec = fake_spec(tmp_path)
    spec.write_text(spec.read_text().replace('grid = {"train.lr" = [1e-4, 3e-4, 1e-3]}',
                                             'grid = {"train.lr" = [1e-4, 3e-4, 1e-3]}\n'
                                             'overrides = {"train.utility" = 0.5}')
                    .replace('"utility_ratio >= 0.9"', '"utility_ratio >= 0.9", "model_utility >= 0.9 * original"'))
    bench(spec, out)
    npo = json.loads((out / "selection.json").read_text())["NPO"]
    assert not npo["met_rule"] and "note" in npo and npo["chosen"] == {"train.lr": 1e-3}
    assert all(not c["eligible"] and "utility_ratio 0.5 not >= 0.9" in c["reason"] for c in npo["candidates"])
    assert json.loads((out / "selection.json").read_text())["GradDiff"]["met_rule"]


def test_the_step_is_a_candidate_with_eval_every(tmp_path, fake):
    out = tmp_path / "out"
    spec = fake_spec(tmp_path)
    spec.write_text(spec.read_text().replace("train = {lr = 1e-4}", "train = {lr = 1e-4, eval_every = 2}"))
    result = bench(spec, out)
    npo = json.loads((out / "selection.json").read_text())["NPO"]
    assert npo["chosen"] == {"train.lr": 1e-3, "train.max_steps": 2} and "step_note" in npo
    assert sorted({c["step"] for c in npo["candidates"]}) == [2, 4]  # step 0 is the original model
    reported = [r for r in result["cells"] if r["kind"] == "reported" and r["method"] == "NPO"]
    assert {r["config"]["train"]["max_steps"] for r in reported} == {2}


def test_reference_cells_and_scalability_and_the_sustainability_chain(tmp_path, fake):
    out = tmp_path / "out"
    spec = fake_spec(tmp_path, noise="[1, 2]", extra='scalability = ["forget05", "forget20"]\n'
                                                      'sustainability = ["forget05", "forget10", "forget20"]')
    result = bench(spec, out)
    by_kind = {}
    for r in result["cells"]:
        by_kind.setdefault(r["kind"], []).append(r)
    refs = by_kind["reference"]
    assert sorted((r["target"], r["config"]["method_args"]["seed"]) for r in refs) == sorted(
        (t, s) for t in ("forget10", "forget05", "forget20") for s in (1, 2))
    assert all(r["config"]["method"] == "Retrain" for r in refs)
    assert sorted((r["method"], r["size"]) for r in by_kind["scalability"]) == [
        ("GradDiff", 5.0), ("GradDiff", 20.0), ("NPO", 5.0), ("NPO", 20.0)]
    chain = sorted((r for r in by_kind["sustainability"] if r["method"] == "NPO"), key=lambda r: r["request"])
    assert [r["request"] for r in chain] == [1, 2, 3] and [r["target"] for r in chain] == ["forget05", "forget10",
                                                                                          "forget20"]
    assert chain[0]["config"]["model"] == "/nowhere" and "forgotten_before" not in chain[0]["config"]
    for prev, r in zip(chain, chain[1:]):
        assert r["config"]["model"] == str(out / "cells" / prev["key"] / "export")
        assert r["config"]["forgotten_before"] == prev["target"]
        assert r["config"]["train"]["lr"] == 1e-3  # NPO's chosen setting


@pytest.mark.slow  # 7-11 s: the default suite was at its 5-minute budget (305 s on 2 idle cores)
def test_a_method_can_be_left_out_of_scalability_and_sustainability(tmp_path, fake):
    """`scalability = false` / `sustainability = false` on a method: its chosen setting runs the reported cells only;
    the other method's cells, and their keys, are those of the spec without the flags."""
    extra = 'scalability = ["forget05", "forget20"]\nsustainability = ["forget05", "forget10"]'
    plain = bench(fake_spec(tmp_path, extra=extra), tmp_path / "plain")
    spec = fake_spec(tmp_path, extra=extra, name="out.toml")
    spec.write_text(spec.read_text().replace('[[methods]]\nname = "GradDiff"\n',
                                             '[[methods]]\nname = "GradDiff"\nscalability = false\n', 1))
    left = bench(spec, tmp_path / "left")
    cells = {kind: sorted((r["method"], r["key"]) for r in left["cells"] if r["kind"] == kind)
             for kind in ("scalability", "sustainability", "reported")}
    before = {kind: sorted((r["method"], r["key"]) for r in plain["cells"] if r["kind"] == kind) for kind in cells}
    assert cells["scalability"] == [c for c in before["scalability"] if c[0] == "NPO"] and cells["scalability"]
    assert cells["sustainability"] == before["sustainability"] and cells["reported"] == before["reported"]
    spec.write_text(spec.read_text().replace("scalability = false", "scalability = false\nsustainability = false"))
    from obliviate.bench.engine import run_bench
    lines = []
    run_bench(spec, tmp_path / "dry", dry_run=True, log=lines.append)
    assert "up to 10 reported, scalability and sustainability cells" in lines[-2]  # 2 x 3 seeds + NPO's 2 + 2


def test_a_sustainability_request_exports_the_previous_one_and_a_failed_request_fails_the_next(tmp_path, fake,
                                                                                                 monkeypatch):
    import obliviate.run_actions as run_actions

    exported = []

    def fake_export(run_dir, out, *a, **k):
        exported.append((Path(run_dir).name, out.parent.parent.name))
        out.mkdir()
        (out / "README.md").write_text("card")
        return out
    monkeypatch.setattr(run_actions, "export_run", fake_export)
    out = tmp_path / "out"
    result = bench(fake_spec(tmp_path, extra='sustainability = ["forget05", "forget10"]'), out)
    sus = {(r["method"], r["request"]): r for r in result["cells"] if r["kind"] == "sustainability"}
    firsts = sorted(sus[(m, 1)]["key"] for m in ("NPO", "GradDiff"))
    assert sorted(e[0] for e in exported) == firsts  # request 1's runs, each exported into its own cell folder
    assert all(run == into for run, into in exported)
    assert all((out / "cells" / k / "export" / "README.md").is_file() for k in firsts)
    assert all(r["status"] == "done" for r in sus.values())

    # request 1 fails (a non-finite loss): request 2 is recorded failed with its reason, never run
    before = len(calls(tmp_path))
    result = bench(fake_spec(tmp_path, extra='sustainability = [{split = "forget05", train = {fail = "nan"}}, '
                                             '"forget10"]', name="failing.toml"), tmp_path / "out2")
    sus = {(r["method"], r["request"]): r for r in result["cells"] if r["kind"] == "sustainability"}
    assert sus[("NPO", 1)]["status"] == "failed" and "loss is nan" in sus[("NPO", 1)]["reason"]
    assert sus[("NPO", 2)]["status"] == "failed"
    assert sus[("NPO", 2)]["reason"].startswith("the previous request failed: NPO stopped: loss is nan")
    assert sus[("NPO", 2)]["key"] not in calls(tmp_path)[before:]


# ---- processes -----------------------------------------------------------------------------------------------------

def _bench_process(tmp_path, spec, out, **env):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
                   "FAKE_RUN_LOG": str(tmp_path / "calls.txt"), **env}
    return subprocess.Popen([sys.executable, str(HERE / "bench_fakes.py"), str(spec), str(out)], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # two bench processes, each importing torch: 5-25 s
def test_two_bench_processes_never_run_the_same_cell_twice(tmp_path):
    out = tmp_path / "out"
    spec = fake_spec(tmp_path, noise="[]")
    procs = [_bench_process(tmp_path, spec, out, FAKE_RUN_SLEEP="0.5") for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    ran = calls(tmp_path)
    assert len(ran) == len(set(ran)) == 11, ran
    # both took part (each cell takes 0.5 s: the second starts well before the first could finish alone)
    assert {int(p) for p in (tmp_path / "calls.txt.pids").read_text().split()} == {p.pid for p in procs}
    assert all(r["status"] == "done" for r in records(out).values())
    assert not list((out / "cells").glob("*.lock"))


def test_a_killed_grid_goes_on_where_it_stopped(tmp_path, fake):
    out = tmp_path / "out"
    spec = fake_spec(tmp_path)
    proc = _bench_process(tmp_path, spec, out, FAKE_RUN_KILL_AT="3")
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 9, output
    killed = calls(tmp_path)[2]
    assert (out / "cells" / killed).is_dir() and not (out / "cells" / f"{killed}.json").exists()
    assert (out / "cells" / f"{killed}.lock").exists()  # the dead process's lock stays behind
    assert len(records(out)) == 2
    bench(spec, out)
    ran = calls(tmp_path)
    assert ran[3:].count(killed) == 1 and len(ran) == 3 + 5 + 6 - 2  # the two finished cells did not run again
    assert records(out)[killed]["status"] == "done"
    assert not list((out / "cells").glob("*.lock"))


def test_a_cell_locked_by_a_live_process_is_waited_for_not_run(tmp_path, fake, monkeypatch):
    import obliviate.bench.cells as C
    import obliviate.bench.engine as engine
    from obliviate.bench.spec import read_spec

    out = tmp_path / "out"
    spec_path = fake_spec(tmp_path)
    spec, data = read_spec(spec_path)
    b = engine.Bench(spec, data, str(spec_path), out)
    cell = b.validation_cells()[0]
    (out / "cells").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (out / "cells" / f"{cell.key}.lock").write_text(json.dumps({"pid": holder.pid, "host": __import__(
            "socket").gethostname(), "started": time.time()}))
        assert not C.try_lock(out, cell.key)
        finished = []

        def other_process_finishes(seconds):  # the holder "finishes" the cell while this one waits
            if not finished:
                C.write_record(out, cell.record(status="done", seconds=1.0))
                (out / "cells" / f"{cell.key}.lock").unlink()
                finished.append(seconds)
        monkeypatch.setattr(engine.time, "sleep", other_process_finishes)
        engine.run_cells(b, [cell], {"retry_failed": False, "workers": 1, "use_ray": False, "ray_address": None,
                                     "threads": None}, lambda *_: None, set())
        assert finished and calls(tmp_path) == []
    finally:
        holder.kill()
        holder.wait()
    # the lock of a dead process is taken over
    (out / "cells" / "abc.lock").write_text(json.dumps({"pid": holder.pid, "host": __import__("socket").gethostname()}))
    assert C.try_lock(out, "abc") and json.loads((out / "cells" / "abc.lock").read_text())["pid"] == os.getpid()


def test_dry_run_lists_the_cells_and_which_are_done(tmp_path, fake):
    from typer.testing import CliRunner

    from obliviate.cli import app

    out = tmp_path / "out"
    spec = fake_spec(tmp_path)
    result = CliRunner().invoke(app, ["bench", str(spec), "--out", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "5 cells listed, 0 done" in result.output and "after the validation grid" in result.output
    assert not out.exists() and calls(tmp_path) == []
    bench(spec, out)
    result = CliRunner().invoke(app, ["bench", str(spec), "--out", str(out), "--dry-run"])
    assert "11 cells listed, 11 done" in result.output, result.output
    # key=value overrides go to the base config: every cell is another cell
    result = CliRunner().invoke(app, ["bench", str(spec), "train.batch_size=8", "--out", str(out), "--dry-run"])
    assert "5 cells listed, 0 done" in result.output, result.output


# ---- one real grid -------------------------------------------------------------------------------------------------

def _tofu_file(path, items):
    path.write_text("".join(json.dumps({"question": i.question, "answer": i.answer,
                                        "paraphrased_answer": i.paraphrased_answer,
                                        "perturbed_answer": list(i.perturbed_answers)}) + "\n" for i in items))
    return path.name


@pytest.mark.slow  # four real tiny runs: about 30 s on 2 shared cores
def test_a_real_tiny_grid_on_a_users_model_end_to_end_and_resumed(tmp_path, tiny_lm_dir, monkeypatch):
    """A user's model: validation on a second forget file, reported on the first; ordinary run folders."""
    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path / "cache"))
    items = tiny_items()
    spec = write_spec(tmp_path, f"""
base:
  model: {tiny_lm_dir}
  retain_file: {_tofu_file(tmp_path / 'retain.json', items[2:])}
  train: {{max_steps: 1, batch_size: 4}}
  eval: {{batch_size: 8}}
seeds: [0, 1]
allow_fewer_seeds: true
validation: {{forget_file: {_tofu_file(tmp_path / 'val.json', items[1:2])}}}
reported: {{forget_file: {_tofu_file(tmp_path / 'forget.json', items[:1])}}}
noise_floor: []
select: {{minimize: model_utility, constraints: ["utility_ratio >= 0.5"]}}
methods:
  - name: GradDiff
    grid: {{train.lr: [1.0e-4, 1.0e-2]}}
""", "spec.yaml")
    out = tmp_path / "out"
    result = bench(spec, out)
    assert [r["status"] for r in result["cells"]] == ["done"] * 4, [r["reason"] for r in result["cells"]]
    selection = json.loads((out / "selection.json").read_text())["GradDiff"]
    scores = {c["params"]["train.lr"]: c["score"] for c in selection["candidates"]}
    assert selection["chosen"] == {"train.lr": min(scores, key=scores.get)}
    for r in result["cells"]:
        folder = out / "cells" / r["run"]
        assert (folder / "changed.safetensors").is_file() and (folder / "config.json").is_file()
        metrics = json.loads((folder / "metrics.json").read_text())
        assert "model_utility" in metrics and "original" in metrics
    reported = [r for r in result["cells"] if r["kind"] == "reported"]
    assert {Path(r["config"]["forget_file"]).name for r in reported} == {"forget.json"}
    board = (out / "leaderboard.md").read_text()
    assert "| 1 | GradDiff | lr=" in board and "Fewer than 3 seeds done for GradDiff" in board
    # a sustainability request starts from the previous request's export: the family's export, into its cell folder
    from obliviate.bench.cells import _export
    first = out / "cells" / reported[0]["run"]
    _export(first, first / "export")
    assert (first / "export" / "config.json").is_file() and (first / "export" / "README.md").is_file()
    assert sorted(p.name for p in first.iterdir() if p.name.startswith(".")) == []
    started = time.perf_counter()
    again = bench(spec, out)
    assert time.perf_counter() - started < 5 and again["cells"] == result["cells"]


def test_a_resumed_bench_whose_cells_are_done_imports_no_torch(tmp_path, fake):
    """Resolving a world's run config imports its training code (torch); resolutions are remembered in
    OUT/resolved.json, so a finished grid resumes without them (the fake resolver stood in the first time)."""
    out = tmp_path / "out"
    spec = fake_spec(tmp_path)
    spec.write_text(spec.read_text().replace('base = {model = "/nowhere", ',
                                             'base = {model = "/nowhere", world = {model = {epochs = 1}}, '))
    bench(spec, out)
    assert (out / "resolved.json").is_file()
    script = ("import sys; from obliviate.bench.engine import run_bench; "
              f"r = run_bench({str(spec)!r}, {str(out)!r}, log=lambda *_: None); "
              "assert all(c['status'] == 'done' for c in r['cells']) and len(r['cells']) == 11; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FAKE_RUN_LOG": str(tmp_path / "calls.txt")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]" and len(calls(tmp_path)) == 11


def test_attacks_run_once_on_each_reported_cell_and_failures_are_recorded(tmp_path, fake, monkeypatch):
    import obliviate.run_actions as run_actions

    attacked = []

    def fake_attack(run_dir, names, options, log=print):
        attacked.append((Path(run_dir).name, tuple(names), dict(options)))
        if names == ["quantize_int8"]:
            raise ObliviateError("the model has no int8 kernels here")
        (Path(run_dir) / "attacks").mkdir(exist_ok=True)
        (Path(run_dir) / "attacks" / f"{names[0]}.json").write_text("{}")
        return {}
    monkeypatch.setattr(run_actions, "attack_run", fake_attack)
    out = tmp_path / "out"
    spec = fake_spec(tmp_path, extra='attacks = {relearn = {steps = 4}, quantize_int8 = {}}')
    result = bench(spec, out)
    reported = {r["key"] for r in result["cells"] if r["kind"] == "reported"}
    assert {a[0] for a in attacked} == reported and len(attacked) == 2 * 6
    assert ("relearn", ) in {a[1] for a in attacked} and {"steps": 4} in [a[2] for a in attacked]
    for key in reported:
        assert records(out)[key]["attacks"] == {"relearn": "done",
                                                "quantize_int8": "failed: the model has no int8 kernels here"}
    bench(spec, out)
    assert len(attacked) == 12  # done and failed attacks are settled
    bench(spec, out, retry_failed=True)
    assert len(attacked) == 18 and {a[1] for a in attacked[12:]} == {("quantize_int8",)}


def test_unknown_attack_in_a_spec_is_named(tmp_path):
    from obliviate.bench.spec import read_spec

    with pytest.raises(ObliviateError, match="attacks: unknown attack 'relarn'"):
        read_spec(fake_spec(tmp_path, extra="attacks = {relarn = {}}"))


@pytest.mark.parametrize("name, module, methods", [
    ("profiles", "obliviate.demo.lm", ["GradDiff", "NPO", "SimNPO", "RG", "RGD"]),
    ("canvas-style", "obliviate.demo.t2i", ["ESD-x", "UCE", "RGD", "AdvUnlearn"]),
    ("canvas-object", "obliviate.demo.t2i", ["ESD-x", "UCE", "RGD", "AdvUnlearn"]),
    ("portraits", "obliviate.demo.mllm", ["GradDiff", "NPO", "SimNPO", "RGD", "MMUnlearner", "PromptDecouple"]),
])
def test_the_built_in_specs_grid_around_the_demos_presets_on_the_demos_worlds(name, module, methods, tmp_path):
    """The same world config as the demo (so the same cached world), the demo's methods first, and each preset inside
    its method's grid or fixed settings; at most 3 grid points per method. The canvas specs then add issue 19's
    methods and guards, which have no demo preset; the profiles and portraits specs issue 20's (the portraits spec
    without the guards, which are the language-model family's), which stay out of the profiles spec's scalability
    and sustainability cells (the demo's five keep theirs, so none of their cells changes)."""
    import importlib

    from obliviate.bench.engine import _grid_points
    from obliviate.bench.spec import read_spec
    from obliviate.config import WorldConfig

    demo = importlib.import_module(module)
    spec, data = read_spec(HERE.parent / "configs" / "bench" / f"{name}.toml")
    names = [m.name for m in spec.methods]
    assert names[:len(methods)] == methods and len(spec.seeds) >= 3 and spec.noise_floor
    if module.endswith("t2i"):
        from obliviate.registry import T2I_METHODS
        added = names[len(methods):]
        assert len(added) == len(set(added)) >= 17 and set(added) <= set(T2I_METHODS) - set(demo.PRESETS)
    else:
        from obliviate.registry import METHODS
        added = names[len(methods):]
        issue20 = ["WAGLE", "FLAT", "WGA", "SatImp", "CEU", "AltPO", "PDU"] + (["ICU", "GUARD"] if name == "profiles"
                                                                              else [])
        assert added == issue20 and set(added) <= set(METHODS[spec.base["family"]])
        assert all(m.scalability and m.sustainability for m in spec.methods[:len(methods)])
        if spec.scalability or spec.sustainability:
            assert not any(m.scalability or m.sustainability for m in spec.methods[len(methods):])
        altpo = next(m for m in spec.methods if m.name == "AltPO")
        assert altpo.overrides["method_args.alternates"] == "world"
        # every cell's config resolves and its method takes its method_args (what a run checks before it trains)
        from obliviate.bench.engine import Bench
        from obliviate.config import build_config
        from obliviate.runners.common import method_of

        path = HERE.parent / "configs" / "bench" / f"{name}.toml"
        cells = Bench(spec, data, str(path), tmp_path / "out").validation_cells()
        assert len(cells) == sum(len(_grid_points(m.grid)) for m in spec.methods)
        for cell in cells:
            method_of(build_config(cell.config))
    world = WorldConfig(**spec.base["world"]).model_dump()
    if name == "profiles":
        assert world == WorldConfig(**demo.WORLDS["demo"]).model_dump()
        assert spec.base["eval"] == {"retain_people": demo.RETAIN_PEOPLE["demo"]}
        assert spec.scalability == ["forget05", "forget10", "forget20"] == spec.sustainability
    elif module.endswith("t2i"):
        assert world == WorldConfig(name="canvas").model_dump() and spec.base["t2i"] == demo.SAMPLING["demo"]
        assert spec.reported in ("striped", "star") and spec.validation in ("dotted", "heart")
    else:
        assert world == WorldConfig(name="portraits").model_dump()
        assert spec.base["eval"] == {"retain_people": demo.RETAIN_PEOPLE}
    for m in spec.methods:
        assert len(_grid_points(m.grid)) <= 3, m.name
        if m.name not in methods:
            continue
        preset = {f"{section}.{k}": v for section, values in demo.PRESETS[m.name].items() for k, v in values.items()}
        for key, value in preset.items():
            assert value in m.grid[key] if key in m.grid else m.overrides[key] == value, (m.name, key)


@pytest.mark.parametrize("name, world", [("profiles-moe", {"arch": "moe"}),
                                         ("profiles-restor", {"corrupt": {"split": "forget10"}}),
                                         ("profiles-worst", {}),
                                         ("profiles-dp2", {"dp2": {"epsilon": 8.0}})])
def test_the_variant_specs_run_the_profiles_specs_methods_on_a_variant_of_its_world(name, world, tmp_path):
    """The MoE, RESTOR, worst-case and DP2 specs: the profiles spec's world and evaluation (the MoE and DP2 specs with
    one variant key in the spec, RESTOR's per target; the worst-case spec with another reported split beside
    forget10), the profiles spec's grids for the methods they share, and every cell's config resolving to the variant
    (a RESTOR cell validates on val10's corruption and reports on forget10's; its noise floor is a clean model of seed
    1 on the reported one)."""
    from obliviate.bench.engine import Bench, _grid_points
    from obliviate.bench.spec import read_spec
    from obliviate.config import build_config
    from obliviate.runners.common import method_of

    profiles, _ = read_spec(HERE.parent / "configs" / "bench" / "profiles.toml")
    path = HERE.parent / "configs" / "bench" / f"{name}.toml"
    spec, data = read_spec(path)
    shared = {m.name: m for m in profiles.methods}
    for m in spec.methods:
        if m.name in shared and m.row == m.name:
            assert (m.grid, m.overrides) == (shared[m.name].grid, shared[m.name].overrides), m.name
    assert {k: v for k, v in spec.base["world"].items() if k not in ("arch", "dp2")} == profiles.base["world"]
    assert spec.base["eval"] == profiles.base["eval"] and spec.select.constraints == profiles.select.constraints
    assert spec.select.metric == ("restor_recovery" if "corrupt" in world else "forget_quality")
    assert len(spec.seeds) >= 3 and spec.noise_floor
    bench = Bench(spec, data, str(path), tmp_path / "out")
    validation = bench.validation_cells()
    chosen = {m.row: {"chosen": dict(zip(m.grid, [v[0] for v in m.grid.values()]))} for m in spec.methods}
    for cell in validation + bench.reference_cells() + bench.reported_cells(chosen):
        config = build_config(cell.config)
        if cell.kind != "reference":
            method_of(config)
        if "arch" in world:
            assert config.world.arch == "moe"
        elif "dp2" in world:  # every cell, the Retrain reference too, names the variant (its reference is the plain one)
            assert config.world.dp2["epsilon"] == 8.0
        elif world:
            assert config.world.corrupt == {"split": config.split}
            assert config.split == ("val10" if cell.kind == "validation" else "forget10")
    assert len(validation) == sum(len(_grid_points(m.grid)) for m in spec.methods)
    if not world:  # the worst-case spec: every chosen setting and the noise floor on forget10 and on worst10 alike
        reported = bench.reported_cells(chosen)
        splits = [build_config(c.config).split for c in reported]
        assert splits.count("forget10") == splits.count("worst10") == len(spec.methods) * len(spec.seeds)
        assert sorted(build_config(c.config).split for c in bench.reference_cells()) == ["forget10", "worst10"]


def test_a_worker_that_dies_gives_a_failed_cell_and_leaves_no_lock(tmp_path, fake, monkeypatch):
    """execute() reports a worker that died (killed, out of memory) as a failed result; its cell is recorded failed
    with that line and the lock the worker held is removed (it may have held it on another host)."""
    import obliviate.bench.cells as C
    import obliviate.bench.execute as ex

    died = []

    def execute(tasks, run_one, **options):
        for task in tasks:
            if not died:  # the first worker takes its lock, then is killed
                C.try_lock(Path(task["out"]), task["key"], task["token"])
                lock = Path(task["out"]) / "cells" / f"{task['key']}.lock"
                lock.write_text(json.dumps({**json.loads(lock.read_text()), "host": "elsewhere"}))
                died.append(task["key"])
                yield {"task": task, "status": "failed", "reason": "the worker died (signal 9)"}
            else:
                yield run_one(task)
    monkeypatch.setattr(ex, "execute", execute)
    out = tmp_path / "out"
    bench(fake_spec(tmp_path), out)
    record = records(out)[died[0]]
    assert record["status"] == "failed" and record["reason"] == "the worker died (signal 9)"
    assert not list((out / "cells").glob("*.lock")) and len(calls(tmp_path)) == 4 + 6
