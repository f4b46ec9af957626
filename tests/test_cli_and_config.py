import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from obliviate.cli import app
from obliviate.config import build_config, load_config
from obliviate.data import check_disjoint, load_qa_jsonl
from obliviate.errors import ObliviateError
from obliviate.registry import LM_METHODS as METHODS, METRICS, lookup

runner = CliRunner()


def test_help_and_ls_do_not_import_heavy_libraries():
    code = ("import sys; from typer.testing import CliRunner; from obliviate.cli import app; "
            "r = CliRunner().invoke(app, ['ls']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'peft') if m in sys.modules]; "
            "assert not heavy, heavy; print(r.output)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in METHODS:
        assert name in out
    assert "forget_quality" in out and "profiles" in out


def test_unknown_names_suggest_the_nearest():
    with pytest.raises(ObliviateError, match="Did you mean 'GradDiff'"):
        lookup(METHODS, "GradDif", "method")
    with pytest.raises(ObliviateError, match="Did you mean 'forget_quality'"):
        lookup(METRICS, "forget_qualty", "metric")
    assert lookup(METHODS, "npo", "method").name == "NPO"


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ObliviateError, match="train.lr"):
        build_config({"method": "NPO", "train": {"lr": -1}})
    with pytest.raises(ObliviateError, match="trian: unknown key"):
        build_config({"method": "NPO", "trian": {}})
    with pytest.raises(ObliviateError, match="Did you mean 'SimNPO'"):
        build_config({"method": "SimNP"})
    bad = tmp_path / "bad.toml"
    bad.write_text('method = "NPO"\n[train\nlr = 1\n')
    with pytest.raises(ObliviateError, match="bad.toml: malformed config.*line 2"):
        load_config(bad)


def test_overrides_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: GradDiff\ntrain:\n  lr: 0.001\n")
    cfg = load_config(path, ["train.lr=5e-4", "method_args.gamma=2", "split=forget05"])
    assert cfg.train.lr == 5e-4 and cfg.method_args == {"gamma": 2} and cfg.split == "forget05"
    assert build_config(json.loads(cfg.model_dump_json())) == cfg


def test_malformed_data_row_names_file_and_line(tmp_path):
    f = tmp_path / "forget.jsonl"
    f.write_text('{"question": "Q1?", "answer": "A1"}\n{"question": "Q2?"}\n')
    with pytest.raises(ObliviateError, match=r"forget.jsonl:2: needs non-empty"):
        load_qa_jsonl(f)
    f.write_text('{"question": "Q1?", "answer": "A1"}\n{oops\n')
    with pytest.raises(ObliviateError, match=r"forget.jsonl:2: malformed JSON"):
        load_qa_jsonl(f)


def test_real_tofu_files_load():
    from pathlib import Path
    tofu = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
    if not tofu.is_dir():
        pytest.skip("../shared/data/tofu not present")
    items = load_qa_jsonl(tofu / "world_facts_perturbed.json")
    assert len(items) == 117 and all(len(i.perturbed_answers) == 3 for i in items)


def test_empty_or_overlapping_sets_are_errors():
    from conftest import tiny_items
    items = tiny_items()
    with pytest.raises(ObliviateError, match="forget set is empty"):
        check_disjoint([], items)
    with pytest.raises(ObliviateError, match="overlap"):
        check_disjoint(items[:3], items[2:])


def test_cli_errors_are_one_line_and_nonzero(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('method = "GradDif"\n')
    r = runner.invoke(app, ["validate", str(cfg)])
    assert r.exit_code == 2
    assert "Did you mean 'GradDiff'" in r.output and len(r.output.strip().splitlines()) == 1
    cfg.write_text(f'method = "NPO"\nmodel = "{tmp_path / "nope"}"\nforget_file = "a"\nretain_file = "b"\n')
    r = runner.invoke(app, ["run", str(cfg), "--quiet"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    r = runner.invoke(app, ["validate", str(tmp_path / "missing.toml")])
    assert r.exit_code == 2 and "config file not found" in r.output


def test_every_shipped_config_states_its_family_and_validates():
    """The configs in configs/ (and the README's user-pipeline one) load as their family's config, each stating its
    family (`family`, or the world it names; "lm" is the documented default), and those on a built-in world pass
    `obliviate validate` (the others name files the user supplies)."""
    from pathlib import Path

    from obliviate.config import read_config_file

    root = Path(__file__).resolve().parents[1]
    families = {"esd_x_sd": "t2i", "uce_canvas": "t2i", "npo": "lm", "rgd": "lm", "portraits_graddiff": "mllm",
                "mllmu_llava_graddiff_lora": "mllm", "muse_news_npo": "lm", "tofu_graddiff_lora": "lm",
                "tofu_npo": "lm", "run": "t2i", "wmdp_rmu": "lm"}
    families["wagle"] = "lm"
    files = sorted(f for f in (root / "configs").rglob("*.toml") if "bench" not in f.parts)  # bench specs: test_bench
    files += [root / "docs" / "user_pipeline" / "run.toml"]
    assert {f.stem for f in files} == set(families)
    for f in files:
        data = read_config_file(f)
        assert data.get("family") or data.get("world", {}).get("name") or families[f.stem] == "lm", f
        assert load_config(f).family == families[f.stem], f
    for name in ("npo", "rgd", "uce_canvas", "portraits_graddiff", "wagle"):
        r = runner.invoke(app, ["validate", str(root / "configs" / f"{name}.toml")])
        assert r.exit_code == 0 and r.output.startswith("ok: "), r.output
