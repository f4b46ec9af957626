"""Bad input ends in one ObliviateError line naming the file (and line), never a traceback or a half-written file."""
import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error
from obliviate.cli import app
from obliviate.config import load_config
from obliviate.data import load_lines, load_prompts, load_qa_jsonl
from obliviate.errors import ObliviateError

runner = CliRunner()




def write_items(path, items):
    path.write_text("\n".join(json.dumps({"question": i.question, "answer": i.answer}) for i in items) + "\n")


# ---- 1. non-UTF-8 bytes --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, body", [("run.toml", b'method = "NPO"\nname = "caf\xe9"\n'),
                                        ("run.yaml", b"method: NPO\nname: caf\xe9\n")])
def test_non_utf8_config_names_file_line_and_offset(tmp_path, name, body):
    cfg = tmp_path / name
    cfg.write_bytes(body)
    offset = body.index(b"\xe9")
    one_line_error(runner.invoke(app, ["validate", str(cfg)]), f"{name}:2:", "not UTF-8", f"offset {offset}", "0xe9")


def test_non_utf8_data_files_name_file_line_and_offset(tmp_path):
    good = '{"question": "Q1?", "answer": "A1"}\n'.encode()
    data = tmp_path / "forget.jsonl"
    body = good + b'{"question": "Q2?", "answer": "\xff"}\n'
    data.write_bytes(body)
    offset = body.index(b"\xff")
    with pytest.raises(ObliviateError, match=rf"forget.jsonl:2: not UTF-8 text \(byte 0xff at offset {offset}\)"):
        load_qa_jsonl(data)
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red star\n\na blue star in \x96striped\x96 style\n")
    with pytest.raises(ObliviateError, match=r"prompts.txt:3: not UTF-8"):
        load_prompts(prompts)
    idk = tmp_path / "idk.txt"
    idk.write_bytes(b"I don\x92t know.\n")
    with pytest.raises(ObliviateError, match=r"idk.txt:1: not UTF-8 text \(byte 0x92 at offset 5\)"):
        load_lines(idk)


def test_utf8_bom_and_line_separators_inside_json_strings_load(tmp_path):
    data = tmp_path / "forget.jsonl"
    rows = [{"question": "Q1?", "answer": "A1\u2028still A1"}, {"question": "Q2?", "answer": "A2"}]
    data.write_text("\ufeff" + "\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    items = load_qa_jsonl(data)
    assert [i.answer for i in items] == ["A1\u2028still A1", "A2"]
    cfg = tmp_path / "run.toml"
    cfg.write_text('\ufeffmethod = "NPO"\n', encoding="utf-8")
    assert load_config(cfg).method == "NPO"


# ---- 2. malformed YAML / TOML keep the line ------------------------------------------------------------------------

@pytest.mark.parametrize("name, body, line", [
    ("run.yaml", "method: NPO\ntrain:\n  lr: 1e-4\n    batch_size: 8\n", 4),
    ("run.yaml", "method: NPO\nmethod_args: {beta: 0.1\nsplit: forget05\n", 3),
    ("run.toml", 'method = "NPO"\n[train\nlr = 1\n', 2),
])
def test_malformed_config_names_file_and_line(tmp_path, name, body, line):
    cfg = tmp_path / name
    cfg.write_text(body)
    one_line_error(runner.invoke(app, ["validate", str(cfg)]), f"{name}: malformed config", f"line {line}")


# ---- 3. model folders whose JSON is not JSON -----------------------------------------------------------------------

def test_model_index_not_json_names_file_and_line(tmp_path):
    from obliviate.models.diffusion import check_folder

    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text('{\n  "unet": ["diffusers", "UNet2DConditionModel"]\n  "vae": 1\n}\n')
    with pytest.raises(ObliviateError, match=r"model_index.json:3: malformed JSON \(Expecting ',' delimiter\)"):
        check_folder(folder)
    (folder / "model_index.json").write_text('["unet"]')
    with pytest.raises(ObliviateError, match=r"model_index.json: must be a JSON object"):
        check_folder(folder)


def test_model_config_not_json_fails_eval_in_one_line(tiny_lm_dir, tmp_path):
    from conftest import tiny_items

    model = tmp_path / "model"
    shutil.copytree(tiny_lm_dir, model)
    (model / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": 32,,\n}\n')
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    write_items(forget, tiny_items()[:3])
    write_items(retain, tiny_items()[3:])
    r = runner.invoke(app, ["eval", str(model), "--forget-file", str(forget), "--retain-file", str(retain),
                            "--out", str(tmp_path / "eval.json"), "--quiet"])
    one_line_error(r, "config.json:3: malformed JSON")
    assert not (tmp_path / "eval.json").exists()


# ---- 4. corrupt weights --------------------------------------------------------------------------------------------

@pytest.fixture
def bin_model_dir(tiny_lm_dir, tmp_path):
    """The tiny Llama with its weights as a pickle checkpoint (transformers 5 saves only safetensors, whatever
    safe_serialization says), checked to load before a test breaks it."""
    from obliviate.models.causal_lm import load

    folder = tmp_path / "bin_model"
    shutil.copytree(tiny_lm_dir, folder)
    model, _ = load(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    load(folder)
    return folder


@pytest.mark.parametrize("damage", ["garbage", "empty", "not-zip", "truncated"])
def test_corrupt_pickle_checkpoint_names_the_file(bin_model_dir, damage):
    from obliviate.models.causal_lm import load

    weights = bin_model_dir / "pytorch_model.bin"
    good = weights.read_bytes()
    weights.write_bytes({"garbage": b"\x80\x02not a checkpoint" * 8, "empty": b"",
                         "not-zip": b"PK\x03\x04" + bytes(100), "truncated": good[:len(good) // 2]}[damage])
    with pytest.raises(ObliviateError, match=f"cannot load model from {bin_model_dir}: pytorch_model.bin ") as e:
        load(bin_model_dir)
    assert len(str(e.value).splitlines()) == 1 and "weights_only=False" not in str(e.value)


def test_truncated_safetensors_fails_eval_in_one_line(tiny_lm_dir, tmp_path):
    from conftest import tiny_items

    model = tmp_path / "model"
    shutil.copytree(tiny_lm_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    write_items(forget, tiny_items()[:3])
    write_items(retain, tiny_items()[3:])
    r = runner.invoke(app, ["eval", str(model), "--forget-file", str(forget), "--retain-file", str(retain),
                            "--out", str(tmp_path / "eval.json"), "--quiet"])
    one_line_error(r, f"cannot load model from {model}", "model.safetensors is corrupt or truncated")
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("component, weights", [("text_encoder", "model.safetensors"),
                                                ("unet", "diffusion_pytorch_model.safetensors")])
def test_truncated_pipeline_weights_name_the_component(tiny_pipeline_dir, tmp_path, component, weights):
    from obliviate.models.diffusion import load_pipeline

    folder = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline_dir, folder)
    f = folder / component / weights
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    with pytest.raises(ObliviateError, match=f"{folder / component}: cannot load the pipeline's {component}") as e:
        load_pipeline(folder)
    assert len(str(e.value).splitlines()) == 1 and weights in str(e.value)


def test_corrupt_pickle_text_encoder_names_the_component(tiny_pipeline_dir, tmp_path):
    from obliviate.models.diffusion import load_pipeline

    folder = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline_dir, folder)
    (folder / "text_encoder" / "model.safetensors").unlink()
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ObliviateError, match=r"text_encoder: cannot load the pipeline's text_encoder: "
                                             r"pytorch_model.bin is corrupt"):
        load_pipeline(folder)


# ---- 5. strict JSON, nothing half-written --------------------------------------------------------------------------

def _no_nan(token):
    raise AssertionError(f"non-standard JSON constant {token}")


def test_write_json_writes_non_finite_values_as_null(tmp_path):
    import numpy as np

    from obliviate.runs import write_json

    data = {"a": float("nan"), "b": [1.5, float("inf"), {"c": -math.inf}], "d": np.float32("nan"),
            "e": torch.tensor(float("nan")), "f": (np.float64(2.0), torch.tensor(3)), "g": {"h": np.int64(4)}}
    path = tmp_path / "per_item.json"
    write_json(path, data)
    back = json.loads(path.read_text(), parse_constant=_no_nan)
    assert back == {"a": None, "b": [1.5, None, {"c": None}], "d": None, "e": None, "f": [2.0, 3], "g": {"h": 4}}
    assert [p.name for p in tmp_path.iterdir()] == ["per_item.json"]


def test_failed_write_json_leaves_no_file(tmp_path, monkeypatch):
    from obliviate import runs

    with pytest.raises(TypeError):
        runs.write_json(tmp_path / "out.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs.os, "replace", broken_replace)
    with pytest.raises(ObliviateError, match=r"cannot write to .*out.json: No space left on device"):
        runs.write_json(tmp_path / "out.json", {"x": 1})
    assert list(tmp_path.iterdir()) == []


# ---- 6. eval --out -------------------------------------------------------------------------------------------------

def test_eval_never_writes_over_its_input_files(tmp_path):
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    forget.write_text("not even read\n")
    retain.write_text("not even read\n")
    (tmp_path / "sub").mkdir()
    for out in (forget, tmp_path / "sub" / ".." / "retain.jsonl"):
        r = runner.invoke(app, ["eval", str(tmp_path / "no-model"), "--forget-file", str(forget),
                                "--retain-file", str(retain), "--out", str(out), "--force", "--quiet"])
        one_line_error(r, f"--out {out} is the input file")
    assert forget.read_text() == retain.read_text() == "not even read\n"


def test_eval_refuses_an_existing_out_unless_forced(tiny_lm_dir, tmp_path):
    from conftest import tiny_items

    forget, retain, out = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl", tmp_path / "eval.json"
    write_items(forget, tiny_items()[:3])
    write_items(retain, tiny_items()[3:])
    out.write_text("keep me")
    args = ["eval", str(tiny_lm_dir), "--forget-file", str(forget), "--retain-file", str(retain), "--out", str(out),
            "--quiet"]
    one_line_error(runner.invoke(app, args), f"--out {out} already exists; pass --force")
    assert out.read_text() == "keep me"
    r = runner.invoke(app, args + ["--force"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(out.read_text(), parse_constant=_no_nan)["per_item"]["forget"]) == 3


def test_torn_tokenizer_json_fails_eval_in_one_line(tiny_lm_dir, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_lm_dir, broken)
    text = (broken / "tokenizer.json").read_text()
    (broken / "tokenizer.json").write_text(text[: len(text) // 2])
    forget = tmp_path / "f.jsonl"
    forget.write_text('{"question": "q", "answer": "a"}\n')
    retain = tmp_path / "r.jsonl"
    retain.write_text('{"question": "q2", "answer": "b"}\n')
    result = runner.invoke(app, ["eval", str(broken), "--forget-file", str(forget), "--retain-file", str(retain),
                                 "--out", str(tmp_path / "e.json"), "--quiet"])
    one_line_error(result, "cannot load the tokenizer from", "tokenizer.json")
