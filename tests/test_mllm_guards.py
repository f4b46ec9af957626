"""Vision-language generation-time guards (obliviate.guards.mllm): ICU and GUARD on a tiny random LLaVA saved with
save_pretrained, with MLLMU-Bench's files written in the published schema. ICU's text turns go before the question
with its picture; GUARD restricts every question that holds a picture (and every text naming a forget person),
scoring passes and `generate` alike, and leaves the other texts' logits bit for bit; a guard run changes no tensor,
records its configuration, evaluates (generation and every likelihood) through the guard, exports a folder that
`load_guarded` loads with it, and runs as a bench cell."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from conftest import one_line_error
from obliviate.data import VQAItem
from obliviate.errors import ObliviateError
from obliviate.methods.common import make_method
from test_mllm_family import _profile, write_mllmu


@pytest.fixture(scope="module")
def mllmu(tmp_path_factory):
    from obliviate.benchmark_files import load_mllmu

    folder = write_mllmu(tmp_path_factory.mktemp("mllmu"))
    return folder, load_mllmu(folder, "forget10")


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _load(folder, guard=None):
    from obliviate.models import vlm

    model, processor = vlm.load(folder)
    if guard is not None:
        guard.install(model.eval(), processor.tokenizer)
    return model.eval(), processor


PORTRAIT = VQAItem("Ada Lind", "birthplace", "Ada Lind#0", "Where was this person born?",
                   answer="This person was born in Lisbon.", options=("Oslo", "Lisbon", "Quito", "Hanoi"),
                   correct="B", cloze="This person was born in __.", cloze_answer="Lisbon")


# ---- the items the text guards take ----------------------------------------------------------------------------------
def test_a_pictures_items_become_question_answer_items_with_wrong_options_as_wrong_answers():
    from dataclasses import replace

    from obliviate.guards.mllm import as_questions, wrong_answers

    assert wrong_answers(PORTRAIT) == tuple(f"This person was born in {c}." for c in ("Oslo", "Quito", "Hanoi"))
    choice = replace(PORTRAIT, answer="B. Lisbon")  # the world's multiple-choice form
    assert wrong_answers(choice) == ("A. Oslo", "C. Quito", "D. Hanoi")
    assert wrong_answers(replace(PORTRAIT, answer="Somewhere warm.")) == ()
    by_name = replace(PORTRAIT, image=None, question="Where was Ada Lind born?", answer="Ada Lind was born in Lisbon.")
    # the same fact with a second picture is one text turn; an item without a free answer (cloze, choice) is none
    items = as_questions([PORTRAIT, replace(PORTRAIT, image="Ada Lind#1"), by_name, replace(PORTRAIT, answer=None)])
    assert [(i.question, i.subject) for i in items] == [(PORTRAIT.question, "Ada Lind"), (by_name.question,
                                                                                        "Ada Lind")]
    assert items[1].perturbed_answers[0] == "Ada Lind was born in Oslo."


# ---- ICU: text turns, then the question with its picture -------------------------------------------------------------
def test_icu_puts_text_turns_before_the_question_and_keeps_its_picture(llava_dir, mllmu):
    from obliviate.models import vlm

    _, data = mllmu
    guard = make_method("mllm", "ICU", {"forget_examples": 1, "correct_examples": 1}).bind_items(data.forget,
                                                                                                data.retain)
    assert guard.family == "mllm" and len(guard.material["forget"]) == 2  # the two forget people's QA pairs
    # no options on MLLMU-Bench's unlearning pairs: the refusal, not the other forget person's (true) answer
    assert [e["answer"] for e in guard.material["forget"]] == ["I don't know.", "I don't know."]
    _, processor = _load(llava_dir)
    plain = vlm.VisionLanguageAdapter(processor, data.picture)
    item = data.forget[0]
    ids, pixels = plain.prompt(processor.tokenizer, item)
    guard.install(None, processor.tokenizer)
    asked, guarded_pixels = plain.prompt(processor.tokenizer, item)
    assert torch.equal(pixels, guarded_pixels)  # the question keeps its picture, one image token run
    assert asked.count(plain.image_token_id) == plain.n_image_tokens == ids.count(plain.image_token_id)
    text = processor.tokenizer.decode(asked, skip_special_tokens=True)
    correct = guard.material["correct"][0]
    # the raw format: the nearest forget example (its own item: ties broken by set order) with its flipped answer,
    # the retain example with its true answer, then the question
    assert text == (f"Question: {item.question}\nAnswer: I don't know.\n\nQuestion: {correct['question']}"
                    f"\nAnswer: {correct['answer']}\n\nQuestion: \n{item.question}\nAnswer:")
    guard.remove(None, processor.tokenizer)
    assert plain.prompt(processor.tokenizer, item)[0] == ids


def test_icu_through_a_content_parts_chat_template(tmp_path):
    """LLaVA-1.5's processor template (content as parts): earlier turns are text messages, the image part goes in
    the last user message only, rendered by the template itself."""
    from vlm_models import LLAVA_15_CHAT_TEMPLATE, tiny_llava

    from obliviate.models import prompt_format, vlm
    from obliviate.worlds.portraits import portraits_data

    folder = tiny_llava(tmp_path / "chat", portraits_data(10, 2, 2, seed=0), chat_template=LLAVA_15_CHAT_TEMPLATE)
    processor = vlm.load_processor(folder)
    tokenizer = processor.tokenizer
    if not getattr(tokenizer, "chat_template", None):  # the processor's template, as a run resolves it
        tokenizer.chat_template = processor.chat_template
    prompt_format.use(tokenizer, prompt_format.resolve(tokenizer, "chat"))
    forget = [PORTRAIT]
    retain = [VQAItem("Bo Karsk", "job", None, "What is Bo Karsk's job?", answer="Bo Karsk is a baker.")]
    guard = make_method("mllm", "ICU", {"forget_examples": 1, "correct_examples": 1}).bind_items(forget, retain)
    guard.install(None, tokenizer)
    adapter = vlm.VisionLanguageAdapter(processor, lambda _: __import__("numpy").zeros((32, 32, 3), "uint8"))
    ids = adapter.prompt_ids(tokenizer, PORTRAIT.question, with_image=True)
    flipped = guard.material["forget"][0]["answer"]
    assert flipped in PORTRAIT_WRONG
    parts = lambda text, image=False: [{"type": "image"}] * image + [{"type": "text", "text": text}]  # noqa: E731
    want = tokenizer.apply_chat_template([
        {"role": "user", "content": parts(PORTRAIT.question)}, {"role": "assistant", "content": parts(flipped)},
        {"role": "user", "content": parts(retain[0].question)},
        {"role": "assistant", "content": parts(retain[0].answer)},
        {"role": "user", "content": parts(PORTRAIT.question, image=True)}], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids) == tokenizer.bos_token + want and ids.count(adapter.image_token_id) == 1
    assert want.count("<image>") == 1 and want.rindex("<image>") > want.rindex(flipped)


PORTRAIT_WRONG = tuple(f"This person was born in {c}." for c in ("Oslo", "Quito", "Hanoi"))


# ---- GUARD: pictures flag, scoring and generation agree --------------------------------------------------------------
def test_guard_restricts_pictured_questions_and_leaves_other_texts_exactly(llava_dir, mllmu):
    from obliviate.evals.mllmu import answer_nlls
    from obliviate.guards.text.guard import restrict
    from obliviate.models import sequences as seq
    from obliviate.models import vlm

    _, data = mllmu
    plain, processor = _load(llava_dir)
    adapter = vlm.VisionLanguageAdapter(processor, data.picture)
    tok = processor.tokenizer
    item = data.eval_sets["forget"][0]  # asked with its picture
    text_item = next(i for i in data.eval_sets["retain"] if i.image is None and i.answer)
    # forbid exactly the words the unguarded model says first, so the restriction has something to hold back
    said = adapter.generate(plain, tok, [item], max_new_tokens=6)[0]
    words = [w for w in said.replace(".", " ").split() if len(w) >= 2][:3]
    assert words, said
    guard = make_method("mllm", "GUARD", {}).bind_items(data.forget, data.retain)
    assert guard.config.detect == "pictures" and guard.material == {"words": {"0": ["poet"], "1": ["nurse"]}}
    guard.restore({"words": {"0": words}})
    guarded, gprocessor = _load(llava_dir, guard)
    gadapter = vlm.VisionLanguageAdapter(gprocessor, data.picture)
    gtok = gprocessor.tokenizer
    answer = gadapter.generate(guarded, gtok, [item], max_new_tokens=6)[0]
    assert answer != said and not any(w in answer.split() for w in words[:1])
    # greedy decoding through the logits processor and a scoring pass through the hooks agree token by token, and
    # the first answer position is the rule applied by hand to the plain model's logits
    prompt, pixels = gadapter.prompt(gtok, item)
    ids = torch.tensor([prompt])
    inputs = {"attention_mask": torch.ones_like(ids), "pixel_values": pixels[None]}
    out = guarded.generate(input_ids=ids, **inputs, max_new_tokens=6, do_sample=False, pad_token_id=gtok.pad_token_id)
    new = out[0, len(prompt):].tolist()
    with torch.no_grad():
        full = {"attention_mask": torch.ones_like(out), "pixel_values": pixels[None]}
        scored, raw = guarded(input_ids=out, **full).logits[0], plain(input_ids=out, **full).logits[0]
    assert scored[len(prompt) - 1:len(prompt) - 1 + len(new)].argmax(-1).tolist() == new
    banned = torch.zeros(raw.shape[-1], dtype=torch.bool)
    banned[list({tok(w, add_special_tokens=False)["input_ids"][0] for word in words for w in (" " + word, word)})] = 1
    torch.testing.assert_close(scored[len(prompt) - 1], restrict(raw[len(prompt) - 1], banned, 1e-10))
    assert not banned[new[0]] and raw[len(prompt) - 1].argmax() != new[0]  # the plain model's pick was held back
    # before the picture's token nothing is restricted; a text-only question naming no one keeps its logits exactly
    first_image = prompt.index(adapter.image_token_id)
    torch.testing.assert_close(scored[:first_image], raw[:first_image], rtol=0, atol=0)
    assert answer_nlls(guarded, gadapter, gtok, [text_item], [text_item.answer]) == answer_nlls(
        plain, adapter, tok, [text_item], [text_item.answer])
    guard.remove(guarded, gtok)
    assert gadapter.generate(guarded, gtok, [item], max_new_tokens=6)[0] == said


def test_guard_detects_a_forget_persons_name_in_a_text_question(llava_dir):
    from obliviate.guards.text.guard import Restriction

    named = VQAItem("Ada Lind", "birthplace", None, "Where was Ada Lind born?", answer="Ada Lind was born in Lisbon.")
    guard = make_method("mllm", "GUARD", {}).bind_items([PORTRAIT, named], [])
    assert guard.material == {"words": {"Ada Lind": ["Lisbon"]}}
    model, processor = _load(llava_dir)
    tok = processor.tokenizer
    rule = Restriction(guard, tok, guard.picture_token(model))
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert rule.named(ids("Where was Ada Lind born?")) == ["Ada Lind"]
    assert rule.named(ids("Where was Bo Karsk born?")) == []
    assert rule.named(ids("Who is this?") + [guard.picture_token(model)]) == ["Ada Lind"]
    subjects = make_method("mllm", "GUARD", {"detect": "subjects"}).bind_items([PORTRAIT, named], [])
    assert Restriction(subjects, tok, guard.picture_token(model)).named(ids("Who is this?") +
                                                                        [guard.picture_token(model)]) == []


# ---- a guard run -----------------------------------------------------------------------------------------------------
def _run(tmp, model_dir, mllmu_dir, method, args=None, name="g", retrain=True):
    from obliviate.config import build_config
    from obliviate.runners import run

    config = build_config({"family": "mllm", "method": method, "method_args": args or {}, "model": str(model_dir),
                           "mllmu_dir": str(mllmu_dir), "split": "forget10",
                           **({"retrain_model": str(model_dir)} if retrain else {}),
                           "mllm": {"max_new_tokens": 4}, "eval": {"batch_size": 8},
                           "output_dir": str(tmp / "runs"), "name": name})
    return run(config, log=lambda *_: None)


@pytest.fixture(scope="module")
def guard_run(llava_dir, mllmu, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mllm_guard_run")
    before = _digest(llava_dir)
    run = _run(tmp, llava_dir, mllmu[0], "GUARD")
    assert _digest(llava_dir) == before  # the user's folder untouched
    return run, tmp


def test_guard_run_records_its_configuration_and_evaluates_through_it(guard_run, llava_dir, mllmu):
    from safetensors.torch import load_file

    run, _ = guard_run
    assert load_file(str(run / "changed.safetensors")) == {}
    record = json.loads((run / "obliviate_guard.json").read_text())
    assert record["guard"] == "GUARD" and record["family"] == "mllm" and record["config"]["detect"] == "pictures"
    assert record["material"] == {"words": {"0": ["poet"], "1": ["nurse"]}}
    assert record["prompt_format"]["name"] == "auto" and record["load"] == "obliviate.guards.load_guarded(FOLDER)"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["guard"] == record
    assert "GUARD is a generation-time guard: no weight changed" in (run / "report.html").read_text()
    # the likelihoods went through the guard: every cloze sentence with "poet" or "nurse" asked with a picture is
    # held at the floor, so the truth ratios move and forget quality against the same weights unguarded falls
    assert metrics["original"]["forget_quality"] == pytest.approx(1.0)  # the retrain folder is the base itself
    assert metrics["forget_truth_ratio"] != metrics["original"]["forget_truth_ratio"]
    assert metrics["forget_quality"] < 1.0
    # questions asked as text alone name no forget person here: their answers are the original's exactly
    for key in ("forget_rouge_l_text", "retain_classification_text", "public_cloze_text"):
        assert metrics[key] == metrics["original"][key], key


def test_guard_run_exports_a_folder_that_loads_with_the_guard(guard_run, mllmu):
    from transformers import AutoModelForImageTextToText
    from typer.testing import CliRunner

    from obliviate.cli import app
    from obliviate.guards import load_guarded
    from obliviate.models import vlm

    run, tmp = guard_run
    result = CliRunner().invoke(app, ["export", str(run), str(tmp / "exported")])
    assert result.exit_code == 0, result.output
    assert "obliviate.guards.load_guarded(" in result.output and "transformers' from_pretrained" in result.output
    exported = tmp / "exported"
    assert json.loads((exported / "obliviate_guard.json").read_text()) == json.loads(
        (run / "obliviate_guard.json").read_text())
    assert "transformers' `from_pretrained` alone gives the unguarded model" in (exported / "README.md").read_text()
    AutoModelForImageTextToText.from_pretrained(exported)  # the unguarded model, as transformers loads it
    model, processor = load_guarded(exported)
    assert model._obliviate_guard[0].family == "mllm"
    rows = json.loads((run / "per_item.json").read_text())["forget"]
    data = mllmu[1]
    asked = [(k, i) for k, i in enumerate(data.eval_sets["forget"]) if i.answer is not None]
    again = vlm.VisionLanguageAdapter(processor, data.picture).generate(
        model, processor.tokenizer, [i for _, i in asked], max_new_tokens=4)
    assert again == [rows[k]["generated"] for k, _ in asked]
    # a run on the guarded folder would drop the guard: refused in one line
    from obliviate.runners.mllm_checks import check_mllm
    from obliviate.config import build_config
    with pytest.raises(ObliviateError, match="carries a generation-time guard") as e:
        check_mllm(build_config({"family": "mllm", "method": "GradDiff", "model": str(exported),
                                 "mllmu_dir": str(mllmu[0]), "output_dir": str(tmp / "again")}))
    assert "\n" not in str(e.value)


def test_icu_run_changes_no_tensor_and_asks_after_its_examples(llava_dir, mllmu, tmp_path):
    from safetensors.torch import load_file

    from obliviate.guards import read_guard

    run = _run(tmp_path, llava_dir, mllmu[0], "ICU", {"correct_examples": 2}, retrain=False)
    assert load_file(str(run / "changed.safetensors")) == {}
    guard, record = read_guard(run)
    assert record["guard"] == "ICU" and record["family"] == "mllm" and guard.material == record["material"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["prompt_format"]["context"] == {"guard": "ICU", "forget_examples": 2, "pool": 2, "correct": 2}
    assert "Question: What is this person's job?\nAnswer: I don't know." in metrics["prompt_format"]["example"]
    # every question, with its picture or as text, was asked after the context: the likelihoods moved
    assert metrics["forget_truth_ratio"] != metrics["original"]["forget_truth_ratio"]


# ---- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, args, message", [
    ("GUARD", {"detect": "mlp"}, "detect must be one of pictures, subjects, always"),
    ("GUARD", {"floor": 0.5}, "floor must be a probability in (0, 0.001)"),
    ("ICU", {"forget_examples": 0}, "forget_examples must be at least 1"),
    ("ICU", {"images": True}, "unknown key(s) ['images'] for ICU"),
])
def test_bad_guard_settings_are_one_line_errors(name, args, message):
    with pytest.raises(ObliviateError) as e:
        make_method("mllm", name, args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_what_a_vision_language_guard_cannot_serve_is_one_line(mllm, tmp_path, llava_dir):
    _, data = mllm
    with pytest.raises(ObliviateError) as e:  # MLLMU-Bench names people by id: no text can name them
        make_method("mllm", "GUARD", {"detect": "subjects"}).bind_items(data.forget, data.retain)
    assert "the forget subjects are ids (0, 1, ...)" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ObliviateError, match="correct_examples = 9 but the run has 4 retain questions"):
        make_method("mllm", "ICU", {"correct_examples": 9}).bind_items(data.forget, data.retain)
    with pytest.raises(ObliviateError, match="GUARD needs forget questions"):
        make_method("mllm", "GUARD", {}).bind_items([VQAItem("0", "cloze", None, "A __.", cloze="A __.")], [])
    config = tmp_path / "bad.toml"
    config.write_text(f'family = "mllm"\nmethod = "GUARD"\nmodel = "{llava_dir}"\nmllmu_dir = "{mllm[0]}"\n'
                      f'output_dir = "{tmp_path / "runs"}"\n[method_args]\ndetect = "subjects"\n')
    from typer.testing import CliRunner

    from obliviate.cli import app
    one_line_error(CliRunner().invoke(app, ["run", str(config), "--quiet"]), "the forget subjects are ids")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing half-written
    result = CliRunner().invoke(app, ["ls", "mllm-methods"])
    assert "ICU (guard)" in result.output and "GUARD (guard)" in result.output


@pytest.fixture
def mllm(mllmu):
    return mllmu


# ---- the bench ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # three guard cells on a LLaVA, each its own process: about a minute on 2 shared cores
def test_vision_language_guards_in_a_bench_grid(tmp_path, llava_dir, mllmu, monkeypatch):
    from obliviate.bench.engine import run_bench

    monkeypatch.setenv("OBLIVIATE_CACHE", str(tmp_path / "cache"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""
base:
  family: mllm
  model: {llava_dir}
  mllmu_dir: {mllmu[0]}
  retrain_model: {llava_dir}
  mllm: {{max_new_tokens: 4}}
  eval: {{batch_size: 8}}
seeds: [0]
allow_fewer_seeds: true
validation: forget10
reported: forget10
noise_floor: []
select: {{minimize: forget_classification_image}}
methods:
  - name: GUARD
    grid: {{method_args.detect: [pictures, always]}}
  - name: ICU
    grid: {{method_args.correct_examples: [2]}}
""")
    result = run_bench(spec, tmp_path / "out", log=lambda *_: None)
    assert all(r["status"] == "done" for r in result["cells"]), [r.get("reason") for r in result["cells"]]
    board = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "GUARD" in board and "ICU" in board


@pytest.mark.slow  # the tiny portraits world built, a guard run from the CLI: 20-70 s on 2 shared cores
def test_guard_on_the_portraits_world_from_the_cli(tmp_path):
    import subprocess
    import sys

    from test_mllm_family import TINY_WORLD

    from obliviate.api import attack_run

    model = "\n".join(f"{k} = {v}" for k, v in TINY_WORLD["model"].items())
    (tmp_path / "run.toml").write_text(
        f'method = "GUARD"\nsplit = "forget10"\noutput_dir = "{tmp_path / "runs"}"\nname = "guard"\n'
        f'[world]\nname = "portraits"\nn_people = 10\nn_holdout = 2\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[world.model]\n{model}\n[eval]\nretain_people = 2\n')
    out = subprocess.run([sys.executable, "-m", "obliviate.cli", "run", str(tmp_path / "run.toml"), "--quiet"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "runs" / "guard"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["guard"]["family"] == "mllm" and metrics["guard"]["config"]["detect"] == "pictures"
    # the world's people are named (forget10 of 10 people: one): the forget person's words, keyed by the name
    words = metrics["guard"]["material"]["words"]
    assert len(words) == 1 and all(" " in name and found for name, found in words.items()), words
    for key in ("forget_quality", "forget_classification_image", "retain_cloze_text", "mia_loss_auc"):
        assert key in metrics, key
    # the default attacks, through the guard: one forget person is too few to relearn on some and score the others
    lines = []
    results = attack_run(run, log=lines.append)
    assert any(line.startswith("skipped mllm_relearn: ") and "1 person" in line for line in lines), lines
    assert list(results) == ["mllm_in_context"]
    assert list(results["mllm_in_context"]["models"]) == ["GUARD", "original", "retrain", "GUARD (unguarded)"]
