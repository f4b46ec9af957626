"""The vision-language family end to end: MLLMU-Bench's parquet files (written here in the published schema with
pyarrow) are read, and their faults named by file and row; every method runs on a tiny random LLaVA saved with
save_pretrained; a run's changed tensors export to a folder `AutoModelForImageTextToText` loads; the portraits world
runs through `obliviate run` with the MLLMU-Bench table, forget quality and membership inference."""
from __future__ import annotations

import io
import re
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from obliviate.errors import ObliviateError

OBLIVIATE = [sys.executable, "-m", "obliviate.cli"]


def _png(colour) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), colour, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _profile(i: int, test: bool = False) -> dict:
    """One MLLMU-Bench row in the release's schema (the dataset card's features; eval.py's fields): one QA pair per
    person in `question` / `answer`, no `metadata` (that is the baselines' training split's)."""
    job = ["poet", "nurse", "baker", "pilot"][i % 4]
    picture = {"bytes": _png((40 * i % 255, 90, 160)), "path": f"{i}.png"}
    row = {"ID": str(i), "biography": f"Person {i} is a {job}.",
           "question": "What is this person's job?", "answer": f"This person is a {job}.",
           "Classification_Task": {
               "Image_Textual_Questions": [{"Question": "What is this person's job?",
                                            "Options": {"A": "poet", "B": "nurse", "C": "baker", "D": "pilot"},
                                            "Correct_Answer": "ABCD"[i % 4]}],
               "Pure_Text_Questions": [{"Question": f"What is the job of person {i}?",
                                        "Options": {"A": "poet", "B": "nurse", "C": "baker", "D": "pilot"},
                                        "Correct_Answer": "ABCD"[i % 4]}]},
           "Generation_Task": [{"Question": "What does this person do?", "Ground_Truth": f"A {job}.",
                                "Type": "Image_Textual"},
                               {"Question": f"What does person {i} do?", "Ground_Truth": f"A {job}.",
                                "Type": "Pure_Text"}],
           "Mask_Task": [{"Question": "This person works as a __.", "Ground_Truth": job, "Type": "Image_Textual"}]}
    if test:
        row["images"] = [picture, {"bytes": _png((0, 0, 0)), "path": "other.png"}]
    else:
        row["image"] = picture
    return row


def write_mllmu(folder: Path, rows_by_set: dict | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows_by_set = rows_by_set or {"forget_10": [_profile(0), _profile(1)],
                                  "retain_90": [_profile(i) for i in range(2, 6)],
                                  "Retain_Set": [_profile(i) for i in (10, 11)],
                                  "Test_Set": [_profile(0, test=True), _profile(1, test=True)]}
    for name, rows in rows_by_set.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), folder / name / "train-00000-of-00001.parquet")
    return folder


def test_mllmu_files_load_in_the_published_schema(tmp_path):
    from obliviate.benchmark_files import load_mllmu

    data = load_mllmu(write_mllmu(tmp_path), "forget10")
    assert [i.answer for i in data.forget] == ["This person is a poet.", "This person is a nurse."]
    assert all(i.image == f"forget:{i.subject}" for i in data.forget)
    assert len(data.retain) == 4
    forget = data.eval_sets["forget"]
    mc = [i for i in forget if i.options]
    assert [(i.image, i.correct) for i in mc] == [("forget:0", "A"), (None, "A"), ("forget:1", "B"), (None, "B")]
    assert {i.cloze_answer for i in forget if i.cloze} == {"poet", "nurse"}
    assert {i.subject for i in data.eval_sets["test"]} == {"0", "1"}
    assert {i.subject for i in data.eval_sets["public"]} == {"10", "11"}
    # the test set asks about another picture: the first of the row's `images`, not the forget row's `image`
    assert data.picture("test:0").shape == (32, 32, 3) and (data.picture("test:0") == data.picture("forget:0")).all()


@pytest.mark.parametrize("fault, message", [
    (lambda rows: rows["forget_10"][1].pop("Classification_Task"), "forget_10/train-00000-of-00001.parquet: row 1: "
                                                                   "no 'Classification_Task'"),
    (lambda rows: rows["retain_90"][0].update(image={"bytes": b"not a picture", "path": "x"}),
     "retain_90/train-00000-of-00001.parquet: row 0: the image bytes are not a readable picture"),
    (lambda rows: rows["forget_10"][0]["Mask_Task"][0].update(Question="no blank here"),
     "row 0: Mask_Task[0]: a Mask_Task question needs a '__' blank"),
    (lambda rows: rows.pop("Test_Set"), "MLLMU-Bench folder not found"),
])
def test_mllmu_faults_are_named_by_file_and_row(tmp_path, fault, message):
    from obliviate.benchmark_files import load_mllmu

    rows = {"forget_10": [_profile(0), _profile(1)], "retain_90": [_profile(2)], "Retain_Set": [_profile(10)],
            "Test_Set": [_profile(0, test=True)]}
    fault(rows)
    with pytest.raises(ObliviateError, match=re.escape(message)):
        load_mllmu(write_mllmu(tmp_path, rows), "forget10")


def _all_methods():
    from obliviate.registry import MLLM_METHODS

    # UOE needs an MoE language model: test_mllm_moe.py (a LLaVA over Mixtral); the guards change no tensor:
    # test_mllm_guards.py
    return [m for m, e in MLLM_METHODS.items() if m not in ("Retrain", "UOE") and not e.guard]


# the default suite runs one of each kind of step (plain losses, a rule over a base, a mask taken in fit, companions,
# a dual step after each step, the vision-language methods); the slow suite (CI) runs every method
DEFAULT_RUNS = {"GradDiff", "NPO", "RGD", "WAGLE", "AltPO", "PDU", "MMUnlearner", "PromptDecouple"}


@pytest.mark.parametrize("method", [m if m in DEFAULT_RUNS else pytest.param(m, marks=pytest.mark.slow)
                                    for m in _all_methods()])
def test_every_method_runs_on_a_users_llava_with_mllmu_files(tmp_path, llava_dir, method):
    """One step of each method on MLLMU-Bench's files and a LLaVA folder; the run folder holds the changed tensors,
    and the unlearned model differs from the base in exactly those tensors."""
    from safetensors.torch import load_file

    from obliviate.runners import run
    from obliviate.config import build_config

    before = _state(llava_dir)
    args = {}
    if method == "AltPO":  # its alternate answers, in OpenUnlearning's generate.py rows, for every forget question
        rows = [{"question": q, "alternate": "This person is a juggler."} for i in (0, 1)
                for q in (_profile(i)["question"], f"What is the job of person {i}?", "What does this person do?",
                          f"What does person {i} do?")]
        (tmp_path / "alt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        args = {"alternates": str(tmp_path / "alt.jsonl")}
    config = build_config({"family": "mllm", "method": method, "model": str(llava_dir), "method_args": args,
                           "mllmu_dir": str(write_mllmu(tmp_path / "mllmu")), "split": "forget10",
                           "train": {"max_steps": 1, "batch_size": 2, "lr": 1e-3}, "evaluate": False,
                           "output_dir": str(tmp_path / "runs"), "name": "r"})
    out = run(config)
    changed = load_file(out / "changed.safetensors")
    assert changed, "no tensor changed"
    assert any(not torch.equal(changed[k], before[k]) for k in changed)
    assert all(k.startswith(("model.language_model", "lm_head")) for k in changed)  # train_parts = language
    assert {k: v for k, v in _state(llava_dir).items() if not torch.equal(v, before[k])} == {}  # base untouched


def _state(folder) -> dict:
    """The model's state dict as transformers loads it (the names the run's changed tensors use)."""
    from obliviate.models import vlm

    return {k: v.clone() for k, v in vlm.load(folder)[0].state_dict().items()}


@pytest.mark.slow  # 3.5-4.5 s: the default suite took 312 s, over its 5 minutes
def test_a_run_evaluates_with_mllmu_and_exports_a_loadable_folder(tmp_path, llava_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from obliviate.api import export_run
    from obliviate.runners import run
    from obliviate.config import build_config

    config = build_config({"family": "mllm", "method": "GradDiff", "model": str(llava_dir),
                           "mllmu_dir": str(write_mllmu(tmp_path / "mllmu")), "retrain_model": str(llava_dir),
                           "mllm": {"train_parts": "all", "max_new_tokens": 4, "few_shot": 1},
                           "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-2},
                           "output_dir": str(tmp_path / "runs"), "name": "r"})
    out = run(config)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("forget_classification_image", "forget_classification_text", "test_cloze_image", "public_bleu_text",
                "retain_rouge_l_image", "forget_quality"):
        assert metrics[key] is not None, key
    assert metrics["retrain"]["forget_classification_image"] is not None
    per_item = json.loads((out / "per_item.json").read_text())
    assert set(per_item) == {"forget", "test", "retain", "public"}
    assert any(r["classification"] is not None and r["image"] for r in per_item["forget"])
    base = _state(llava_dir)
    export_run(out, tmp_path / "exported")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "exported")
    AutoProcessor.from_pretrained(tmp_path / "exported")
    from safetensors.torch import load_file

    delta = load_file(out / "changed.safetensors")
    state = model.state_dict()
    assert any(k.startswith("model.vision_tower") for k in delta)  # train_parts = all
    assert all(torch.equal(state[k], v) for k, v in delta.items())
    assert any(not torch.equal(base[k], v) for k, v in delta.items())


TINY_WORLD = {"model": {"epochs": 1, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                        "vision_hidden": 16, "vision_layers": 1, "vocab_size": 400}}


@pytest.mark.slow  # 15-70 s on 2 cores: kept out of the 5-minute default suite; CI runs it
def test_the_portraits_world_runs_from_the_cli(tmp_path):
    model = "\n".join(f"{k} = {v}" for k, v in TINY_WORLD["model"].items())
    (tmp_path / "run.toml").write_text(
        f'method = "NPO"\nsplit = "forget10"\noutput_dir = "{tmp_path / "runs"}"\nname = "npo"\n'
        f'[world]\nname = "portraits"\nn_people = 10\nn_holdout = 2\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[world.model]\n{model}\n[train]\nmax_steps = 2\nbatch_size = 4\n[eval]\nretain_people = 2\n')
    out = subprocess.run([*OBLIVIATE, "run", str(tmp_path / "run.toml"), "--quiet"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "forget classification" in out.stdout and "each cell: with the picture / as text alone" in out.stdout
    metrics = json.loads((tmp_path / "runs" / "npo" / "metrics.json").read_text())
    assert json.loads((tmp_path / "runs" / "npo" / "config.json").read_text())["family"] == "mllm"
    for key in ("forget_quality", "privleak", "mia_loss_auc", "test_classification_image", "public_cloze_text"):
        assert key in metrics, key
    assert set(metrics["original"]) >= {"forget_classification_image", "forget_quality"}
    build = json.loads(next((tmp_path / "cache").glob("portraits-*/build.json")).read_text())
    assert set(build["accuracy-forget10"]) == {"full", "retrain"}


@pytest.mark.parametrize("override, message", [
    ("split=forget50", "unknown split 'forget50'"),
    ("mllm.train_parts=[\"eyes\"]", "train_parts"),
    ("tofu_dir=/x", "tofu_dir is a language model key"),
    ("method=ESD-x", "unknown vision-language method 'ESD-x'"),
])
def test_bad_vision_language_configs_fail_in_one_line(tmp_path, override, message):
    cfg = tmp_path / "run.toml"
    cfg.write_text('family = "mllm"\nmethod = "GradDiff"\n')
    out = subprocess.run([*OBLIVIATE, "validate", str(cfg), override], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow  # 10-15 s on 2 cores: kept out of the 5-minute default suite; CI runs it
def test_obliviate_eval_scores_a_users_llava_on_mllmu_files(tmp_path, llava_dir):
    """`obliviate eval` on a LLaVA folder and MLLMU-Bench's files writes the table's numbers, with forget quality
    against a retrain folder; a missing file is one line naming it."""
    mllmu = write_mllmu(tmp_path / "mllmu")
    out = subprocess.run([*OBLIVIATE, "eval", str(llava_dir), "--mllmu-dir", str(mllmu), "--retrain-model",
                          str(llava_dir), "--out", str(tmp_path / "eval.json"), "--quiet"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["forget_set"] == "MLLMU-Bench forget10"
    assert result["aggregate"]["forget_quality"] == pytest.approx(1.0)  # the model is its own retrain reference
    assert {"forget", "test", "retain", "public"} == set(result["per_item"])
    (mllmu / "Retain_Set" / "train-00000-of-00001.parquet").unlink()
    bad = subprocess.run([*OBLIVIATE, "eval", str(llava_dir), "--mllmu-dir", str(mllmu), "--out",
                          str(tmp_path / "eval2.json")], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "no parquet files in" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "eval2.json").exists()


def test_lora_trains_only_the_chosen_parts(tmp_path, llava_dir):
    """LoRA wraps the linear layers of mllm.train_parts alone; the merged weights are the run's changed tensors."""
    from safetensors.torch import load_file

    from obliviate.config import build_config
    from obliviate.runners import run

    config = build_config({"family": "mllm", "method": "GradDiff", "model": str(llava_dir),
                           "mllmu_dir": str(write_mllmu(tmp_path / "mllmu")), "lora": {"r": 2},
                           "mllm": {"train_parts": ["projector"]}, "evaluate": False,
                           "train": {"max_steps": 1, "batch_size": 2, "lr": 1e-2},
                           "output_dir": str(tmp_path / "runs"), "name": "r"})
    changed = load_file(run(config) / "changed.safetensors")
    assert changed and all(k.startswith("model.multi_modal_projector.") for k in changed), sorted(changed)


@pytest.mark.parametrize("settings", [{"dtype": "bfloat16"}, {"train": {"mixed_precision": "bf16"}}])
def test_bf16_runs_on_a_llava(tmp_path, llava_dir, settings):
    """A LLaVA in bf16 weights, or float32 weights under bf16 autocast: the loop, the pictures and the evaluation run
    and give finite numbers."""
    from obliviate.config import build_config
    from obliviate.runners import run

    train = {"max_steps": 2, "batch_size": 2, "lr": 1e-3, **settings.get("train", {})}
    config = build_config({"family": "mllm", "method": "NPO", "model": str(llava_dir),
                           "mllmu_dir": str(write_mllmu(tmp_path / "mllmu")), "mllm": {"max_new_tokens": 4},
                           "train": train, "output_dir": str(tmp_path / "runs"), "name": "r",
                           **{k: v for k, v in settings.items() if k != "train"}})
    metrics = json.loads((run(config) / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert all(np.isfinite(metrics[k]) for k in ("forget_classification_image", "retain_rouge_l_text"))


def test_a_local_judge_rates_the_free_answers(tmp_path, llava_dir, chat_lm_dir):
    """`mllm.judge_model`: a causal LM folder (here a tiny chat model) rates every free answer; its replies are
    parsed to 1-10 or no score, never a guess, and the table gains the factuality line only when a judge was asked."""
    from obliviate.config import build_config
    from obliviate.evals.judge import parse_score
    from obliviate.runners import run

    assert [parse_score(r) for r in ("Factuality Score: 7", "10/10", "score 0 or 11", "3.5", "none")] == [
        7, 10, None, None, None]
    config = build_config({"family": "mllm", "method": "GradDiff", "model": str(llava_dir),
                           "mllmu_dir": str(write_mllmu(tmp_path / "mllmu")), "mllm": {"max_new_tokens": 4,
                                                                                      "judge_model": str(chat_lm_dir)},
                           "train": {"max_steps": 1, "batch_size": 2}, "output_dir": str(tmp_path / "runs"),
                           "name": "r"})
    out = run(config)
    rows = json.loads((out / "per_item.json").read_text())["forget"]
    rated = [r for r in rows if r["generated"] is not None]
    assert rated and all(r["factuality"] is None or 1 <= r["factuality"] <= 10 for r in rated)
    assert all(r["factuality"] is None for r in rows if r["generated"] is None)
    with pytest.raises(ObliviateError, match="model folder not found"):
        from obliviate.runners.mllm_checks import check_mllm
        check_mllm(build_config({"family": "mllm", "method": "GradDiff", "mllm": {"judge_model": str(tmp_path / "x")},
                                 "output_dir": str(tmp_path / "runs2")}))
