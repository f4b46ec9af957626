"""The whole loop on a shrunken profiles world: build (train full + retrain), unlearn through the CLI, evaluate,
write the run folder; bad runs fail cleanly. The shrunken world trains in seconds, so it knows little: these tests
check the plumbing and the guarantees, not the quality (benchmarks/ does that)."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_profiles_config
from obliviate.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    cfg = tiny_profiles_config(root)
    return root, cfg


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow  # two world runs, ~15 s: kept out of the 5-minute default suite; CI runs it
def test_run_writes_a_complete_folder_and_leaves_the_base_model_alone(tiny_world):
    from obliviate.models.causal_lm import load
    from obliviate.worlds.profiles import ProfilesWorld
    from obliviate.config import load_config

    root, cfg = tiny_world
    r = runner.invoke(app, ["run", str(cfg), "--quiet", "method=RG", "name=rg"])
    assert r.exit_code == 0, r.output
    world = ProfilesWorld(load_config(cfg).world)
    before = _digest(world.full_model_dir)
    r = runner.invoke(app, ["run", str(cfg), "--quiet", "method=NPO", "name=npo", "lora.r=4"])
    assert r.exit_code == 0, r.output
    assert _digest(world.full_model_dir) == before  # the base model on disk is never modified
    for name in ("rg", "npo"):
        run = root / "runs" / name
        assert {"config.json", "environment.json", "history.json", "metrics.json", "per_item.json",
                "changed.safetensors", "report.html"} <= {p.name for p in run.iterdir()}
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "completed"
        assert 0.0 <= metrics["forget_quality"] <= 1.0 and metrics["model_utility"] is not None
        assert "privleak" in metrics and "verbmem" in metrics
    # The changed tensors put onto the base give the unlearned model; with LoRA they are the merged targets only.
    changed = load_file(str(root / "runs" / "npo" / "changed.safetensors"))
    model, _ = load(world.full_model_dir)
    assert changed and all("proj" in k for k in changed)
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in changed.items())
    history = json.loads((root / "runs" / "rg" / "history.json").read_text())
    assert history and "grad_cosine" in history[0]


@pytest.mark.slow  # 7-11 s: the default suite was at its 5-minute budget (305 s on 2 idle cores)
def test_retrain_row_has_forget_quality_one(tiny_world):
    root, cfg = tiny_world
    r = runner.invoke(app, ["run", str(cfg), "--quiet", "method=Retrain", "name=retrain"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((root / "runs" / "retrain" / "metrics.json").read_text())
    assert metrics["forget_quality"] == pytest.approx(1.0)
    assert metrics["privleak"] == pytest.approx(0.0)


def test_non_finite_loss_stops_keeps_last_good_state_and_exits_nonzero(tiny_world):
    root, cfg = tiny_world
    r = runner.invoke(app, ["run", str(cfg), "--quiet", "method=GradAscent", "name=nan", "train.optimizer=sgd",
                            "train.lr=1e38", "train.max_grad_norm=null", "evaluate=false"])
    assert r.exit_code == 2
    assert "non-finite" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    metrics = json.loads((root / "runs" / "nan" / "metrics.json").read_text())
    assert metrics["status"] == "stopped"
    changed = load_file(str(root / "runs" / "nan" / "changed.safetensors"))
    assert all(torch.isfinite(v).all() for v in changed.values())


def test_unknown_split_and_existing_run_folder_are_clean_errors(tiny_world):
    root, cfg = tiny_world
    r = runner.invoke(app, ["run", str(cfg), "--quiet", "split=forget50"])
    assert r.exit_code == 2 and "unknown split 'forget50'" in r.output
    (root / "runs" / "taken").mkdir(parents=True)
    r = runner.invoke(app, ["run", str(cfg), "--quiet", "name=taken", "evaluate=false"])
    assert r.exit_code == 2 and "already exists" in r.output
    assert not list((root / "runs").glob(".*tmp*"))


def test_eval_on_user_files_and_report_rewrite(tiny_world, tmp_path):
    from conftest import tiny_items
    from obliviate.config import load_config
    from obliviate.worlds.profiles import ProfilesWorld

    root, cfg = tiny_world
    world = ProfilesWorld(load_config(cfg).world)
    world.build("forget10")
    items = tiny_items()
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    for path, rows in ((forget, items[:3]), (retain, items[3:])):
        path.write_text("\n".join(json.dumps({"question": i.question, "answer": i.answer,
                                              "paraphrased_answer": i.paraphrased_answer,
                                              "perturbed_answer": list(i.perturbed_answers)}) for i in rows))
    out = tmp_path / "eval.json"
    r = runner.invoke(app, ["eval", str(world.full_model_dir), "--forget-file", str(forget), "--retain-file",
                            str(retain), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert len(result["per_item"]["forget"]) == 3 and "forget_accuracy" in result["aggregate"]
    r = runner.invoke(app, ["run", str(cfg), "--quiet", "method=GradDiff", "name=report-me", "evaluate=false"])
    assert r.exit_code == 0, r.output
    run_dir = root / "runs" / "report-me"
    (run_dir / "report.html").unlink()
    r = runner.invoke(app, ["report", str(run_dir)])
    assert r.exit_code == 0 and (run_dir / "report.html").is_file()
    r = runner.invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "not a run, demo or bench folder" in r.stderr


def test_export_applies_the_changed_tensors_to_the_base(tiny_world, tmp_path):
    from obliviate.models.causal_lm import load

    root, cfg = tiny_world
    r = runner.invoke(app, ["run", str(cfg), "--quiet", "method=GradDiff", "name=export-me", "evaluate=false"])
    assert r.exit_code == 0, r.output
    run_dir = root / "runs" / "export-me"
    r = runner.invoke(app, ["export", str(run_dir), str(tmp_path / "full")])
    assert r.exit_code == 0, r.output
    exported, _ = load(tmp_path / "full")
    changed = load_file(str(run_dir / "changed.safetensors"))
    state = exported.state_dict()
    assert changed and all(torch.equal(state[k], v) for k, v in changed.items())
    r = runner.invoke(app, ["export", str(run_dir), str(tmp_path / "full")])
    assert r.exit_code == 2 and "already exists" in r.stderr
