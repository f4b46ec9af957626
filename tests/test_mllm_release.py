"""Vision-language models and MLLMU-Bench as released: a LLaVA-1.5 folder whose processor carries the content-parts
chat template today's transformers saves (chat_template.jinja), and MLLMU-Bench's parquet files in their published
schemas (the release: one QA pair per person; the baselines' training split: `metadata` with many), with the
release's quirks (a Test_Set with `image`, git-lfs pointer files)."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import one_line_error
from obliviate.cli import app
from obliviate.errors import ObliviateError
from test_mllm_family import _png, _profile, write_mllmu

cli = CliRunner()


@pytest.fixture(scope="module")
def portraits():
    from obliviate.worlds.portraits import portraits_data

    return portraits_data(10, 2, 2, seed=0)


@pytest.fixture(scope="module")
def llava15_dir(tmp_path_factory, portraits):
    from vlm_models import LLAVA_15_CHAT_TEMPLATE, tiny_llava

    folder = tiny_llava(tmp_path_factory.mktemp("llava15") / "model", portraits, LLAVA_15_CHAT_TEMPLATE)
    assert (folder / "chat_template.jinja").read_text() == LLAVA_15_CHAT_TEMPLATE  # as save_pretrained writes it
    return folder


def _train_row(i: int, n_pairs: int = 3) -> dict:
    """One row of the baselines' training split (hub MLLMMU/baseline_train_split, read by the baselines' GA.py ...):
    `image`, `ID`, `metadata` (a JSON string: the person's fine-tuning QA pairs)."""
    job = ["poet", "nurse", "baker", "pilot"][i % 4]
    pairs = [{"Question": f"Question {k} about this person?", "Answer": f"Answer {k}: a {job}."}
             for k in range(n_pairs)]
    return {"image": {"bytes": _png((40 * i % 255, 90, 160)), "path": f"{i}.png"}, "ID": str(i),
            "metadata": json.dumps(pairs)}


def write_train_split(folder, forget=(0, 1), retain=(2, 3, 4, 5)):
    return write_mllmu(folder, {"forget_10": [_train_row(i) for i in forget],
                                "retain_90": [_train_row(i) for i in retain]})


def test_a_llava15_content_parts_template_asks_the_question_as_the_processor_does(llava15_dir, portraits):
    """Given a plain string, LLaVA-1.5's template renders "USER: ASSISTANT:"; the format finds that the template
    takes content parts, and the adapter's prompt is exactly `processor.apply_chat_template`'s, question included."""
    from PIL import Image

    from obliviate.models import prompt_format, vlm

    processor = vlm.load_processor(llava15_dir)
    tokenizer = processor.tokenizer
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Where?"}], tokenize=False,
                                         add_generation_prompt=True) == "USER: ASSISTANT:"
    fmt = prompt_format.resolve(tokenizer, "auto")
    assert fmt.kind == "chat" and fmt.content_parts
    prompt_format.use(tokenizer, fmt)
    picture = np.full((32, 32, 3), 128, dtype=np.uint8)
    adapter = vlm.VisionLanguageAdapter(processor, lambda _: picture)
    item = portraits.train[portraits.people[0].name][0]
    ids, pixels = adapter.prompt(tokenizer, item)
    expected = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(picture)},
                                      {"type": "text", "text": item.question}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert ids == expected["input_ids"][0].tolist()
    assert np.allclose(pixels.numpy(), expected["pixel_values"][0].numpy())
    assert item.question in tokenizer.decode(ids)
    text_only = tokenizer.decode(adapter.prompt(tokenizer, dataclasses.replace(item, image=None))[0])
    assert text_only == f"<s>USER: {item.question} ASSISTANT:"


def test_validate_runs_the_same_render_check_as_run(tmp_path, portraits):
    """A processor template that renders no question fails `validate` in one line naming the problem, not `run`
    after loading the model with a hint about reasoning templates."""
    from vlm_models import tiny_llava

    folder = tiny_llava(tmp_path / "model", portraits, "{% for m in messages %}{{ m['role'].upper() }}: {% endfor %}")
    write_mllmu(tmp_path / "mllmu")
    (tmp_path / "run.toml").write_text(f'family = "mllm"\nmethod = "GradDiff"\nmodel = "{folder}"\n'
                                       f'mllmu_dir = "{tmp_path / "mllmu"}"\noutput_dir = "{tmp_path / "runs"}"\n')
    one_line_error(cli.invoke(app, ["validate", str(tmp_path / "run.toml")]),
                   "the tokenizer's chat template drops the question")
    # custom tags make the same folder usable: validate says ok
    tags = '[template]\nname = "custom"\nuser_start = "USER: "\nuser_end = " "\nassistant_start = "ASSISTANT:"\n'
    (tmp_path / "run.toml").write_text((tmp_path / "run.toml").read_text() + tags)
    ok = cli.invoke(app, ["validate", str(tmp_path / "run.toml")])
    assert ok.exit_code == 0, ok.output


def test_a_run_on_a_llava15_folder_and_mllmu_files_records_its_format_and_data(tmp_path, llava15_dir, capsys):
    """`validate` and `run` work on a LLaVA-1.5 folder; the run records the prompt as the model reads it, which
    QA pairs it unlearned (the baselines' training split, found in the release folder), how many retain people it
    scored, and why there is no membership inference."""
    from obliviate.config import build_config
    from obliviate.runners import run
    from obliviate.runners.mllm_checks import check_mllm

    mllmu = write_mllmu(tmp_path / "mllmu")
    write_train_split(mllmu / "baseline_train_split")
    config = build_config({"family": "mllm", "method": "GradDiff", "model": str(llava15_dir), "mllmu_dir": str(mllmu),
                           "mllm": {"max_new_tokens": 2}, "train": {"max_steps": 1, "batch_size": 2},
                           "output_dir": str(tmp_path / "runs"), "name": "r"})
    check_mllm(config)
    out = run(config)
    metrics = json.loads((out / "metrics.json").read_text())
    fmt = metrics["prompt_format"]
    assert fmt["kind"] == "chat" and fmt["content_parts"]
    assert fmt["example"] == "<s>USER: <image>\n{question} ASSISTANT: {answer}</s>"
    data = metrics["mllmu_data"]
    assert "baselines' training split" in data["unlearning_data"] and "6 QA pairs of 2 forget people" in \
        data["unlearning_data"]
    assert (data["retain_people_scored"], data["retain_people"]) == (4, 4)
    assert "no membership AUC or PrivLeak" in data["membership_inference"]
    assert "mia_loss_auc" not in metrics and "privleak" not in metrics
    printed = capsys.readouterr().out
    assert "unlearning on the baselines' training split" in printed and "no membership AUC or PrivLeak" in printed
    assert "retain set: 4 of 4 people scored" in printed
    assert "no membership AUC or PrivLeak" in (out / "report.html").read_text()


def test_eval_takes_custom_tags_and_a_retain_people_flag(tmp_path, llava15_dir):
    """`obliviate eval --template custom --tag KEY=VALUE ... --retain-people N`: the tags are the run config's
    [template] table, the flag its eval.retain_people; the result records both."""
    mllmu = write_mllmu(tmp_path / "mllmu")
    out = cli.invoke(app, ["eval", str(llava15_dir), "--mllmu-dir", str(mllmu), "--template", "custom",
                           "--tag", "user_start=USER: ", "--tag", "user_end=\\n",
                           "--tag", "assistant_start=ASSISTANT: ",
                           "--retain-people", "1", "--batch-size", "64", "--out", str(tmp_path / "eval.json"),
                           "--quiet"])
    assert out.exit_code == 0, out.output[-2000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["prompt_format"]["name"] == "custom"
    assert result["prompt_format"]["example"] == "<s>USER: <image>\n{question}\nASSISTANT: {answer}</s>"
    assert (result["mllmu_data"]["retain_people_scored"], result["mllmu_data"]["retain_people"]) == (1, 4)
    assert {r["subject"] for r in result["per_item"]["retain"]} == {"2"}
    one_line_error(cli.invoke(app, ["eval", str(llava15_dir), "--mllmu-dir", str(mllmu), "--template", "custom",
                                    "--tag", "user_begin=USER: ", "--out", str(tmp_path / "eval2.json")]),
                   "template.user_begin: unknown key")
    one_line_error(cli.invoke(app, ["eval", str(llava15_dir), "--mllmu-dir", str(mllmu), "--tag", "user_start"]),
                   "--tag 'user_start' must look like KEY=VALUE")


def test_benchmark_files_score_every_retain_person_unless_asked(tmp_path):
    """MLLMU-Bench scores all its retain people: no silent cap at the world's 40; `eval.retain_people` caps, and the
    run says so."""
    from obliviate.config import build_config
    from obliviate.runners.mllm import note_lines, prepare

    mllmu = write_mllmu(tmp_path / "mllmu", {"forget_10": [_profile(0)],
                                             "retain_90": [_profile(i) for i in range(1, 43)],
                                             "Retain_Set": [_profile(90)], "Test_Set": [_profile(0, test=True)]})
    base = {"family": "mllm", "method": "GradDiff", "model": str(tmp_path), "mllmu_dir": str(mllmu)}
    *_, sets, _, _, _, notes = prepare(build_config(base))
    assert len({i.subject for i in sets["retain"]}) == 42
    assert (notes["retain_people_scored"], notes["retain_people"]) == (42, 42)
    *_, sets, _, _, _, notes = prepare(build_config({**base, "eval": {"retain_people": 5}}))
    assert len({i.subject for i in sets["retain"]}) == 5
    assert "retain set: 5 of 42 people scored (eval.retain_people)" in note_lines(notes)


def test_unlearning_reads_the_baselines_training_split(tmp_path):
    """The release holds one QA pair per person; the baselines' training split (`metadata`) holds many: unlearning
    trains on it when given (mllm.train_dir) or found in the release folder, and says which it used."""
    from obliviate.benchmark_files import load_mllmu

    mllmu = write_mllmu(tmp_path / "mllmu")
    release = load_mllmu(mllmu, "forget10")
    assert [i.answer for i in release.forget] == ["This person is a poet.", "This person is a nurse."]
    assert "the release's question/answer, one per person" in release.unlearning_data

    split = write_train_split(tmp_path / "baseline_train_split")
    data = load_mllmu(mllmu, "forget10", train_dir=split)
    assert len(data.forget) == 6 and len(data.retain) == 12
    assert {i.subject for i in data.forget} == {"0", "1"} and data.forget[0].answer == "Answer 0: a poet."
    assert data.forget[0].image == "train_forget:0" and data.picture("train_forget:0").shape == (32, 32, 3)
    assert "baselines' training split" in data.unlearning_data
    assert data.eval_sets["forget"] == release.eval_sets["forget"]  # evaluation is the release's

    other = write_train_split(tmp_path / "other_split", forget=(0, 7))
    with pytest.raises(ObliviateError, match=r"forget_10: its 2 people are not the release's 2 forget people "
                                             r"\(1 shared\)"):
        load_mllmu(mllmu, "forget10", train_dir=other)
    other_retain = write_train_split(tmp_path / "other_retain", retain=(2, 3, 4))
    with pytest.raises(ObliviateError, match=r"retain_90: its 3 people are not the release's 4 retain people"):
        load_mllmu(mllmu, "forget10", train_dir=other_retain)
    with pytest.raises(ObliviateError, match="mllm.train_dir: folder not found"):
        load_mllmu(mllmu, "forget10", train_dir=tmp_path / "missing")
    from obliviate.config import build_config
    from obliviate.runners.mllm_checks import check_mllm

    with pytest.raises(ObliviateError, match=r"mllm.train_dir is MLLMU-Bench's training split, for runs on its files"):
        check_mllm(build_config({"family": "mllm", "method": "GradDiff", "mllm": {"train_dir": str(split)},
                                 "output_dir": str(tmp_path / "runs")}))
    broken = write_mllmu(tmp_path / "broken_split", {"forget_10": [{**_train_row(0), "metadata": "not json"}],
                                                     "retain_90": [_train_row(2)]})
    with pytest.raises(ObliviateError, match=r"forget_10/train-00000-of-00001.parquet: row 0: metadata is not JSON"):
        load_mllmu(mllmu, "forget10", train_dir=broken)


def test_a_test_set_with_image_instead_of_images_falls_back_as_eval_py_does(tmp_path):
    from obliviate.benchmark_files import load_mllmu

    test_rows = []
    for i in (0, 1):
        row = _profile(i, test=True)
        row.pop("images")
        row["image"] = {"bytes": _png((0, 200, 0)), "path": f"test{i}.png"}
        test_rows.append(row)
    mllmu = write_mllmu(tmp_path / "mllmu", {"forget_10": [_profile(0), _profile(1)], "retain_90": [_profile(2)],
                                             "Retain_Set": [_profile(10)], "Test_Set": test_rows})
    data = load_mllmu(mllmu, "forget10")
    assert {i.subject for i in data.eval_sets["test"]} == {"0", "1"}
    assert (data.picture("test:0") == np.array([0, 200, 0], dtype=np.uint8)).all()


def test_a_git_lfs_pointer_file_gets_a_hint(tmp_path):
    """A clone made without git-lfs holds 3-line pointer files where the parquet files should be."""
    from obliviate.benchmark_files import load_mllmu

    mllmu = write_mllmu(tmp_path / "mllmu")
    pointer = mllmu / "forget_10" / "train-00000-of-00001.parquet"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:3ef89f370891d73d63179fc5ed3133e7e7"
                       "36b50f060f0242468fab84608b14d1\nsize 237570306\n")
    with pytest.raises(ObliviateError, match=re.escape(f"{pointer}: a git-lfs pointer file, not the data")) as e:
        load_mllmu(mllmu, "forget10")
    assert "git lfs pull" in str(e.value)
