"""Bad input ends in one ObliviateError line naming the file (and line), never a traceback or a half-written file."""
import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from obliviate.cli import app
from obliviate.config import load_config
from obliviate.data import load_lines, load_prompts, load_qa_jsonl
from obliviate.errors import ObliviateError

runner = CliRunner()


def one_line_error(result, *needles: str) -> str:
    """A CLI failure: exit 2, a single `error: ...` line holding every needle, no traceback."""
    out = result.output.strip()
    assert result.exit_code == 2, result.output
    assert len(out.splitlines()) == 1 and out.startswith("error: ") and "Traceback" not in out, out
    for n in needles:
        assert n in out, out
    return out


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


