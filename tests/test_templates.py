"""Prompt formats: chat templates (ChatML, Llama-2 [INST], Llama-3 headers) written here as the models ship them,
named and custom tags, the raw format; which tokens each term and metric counts; and the whole path of a run on an
instruct model through its template."""
from __future__ import annotations

import pytest
import torch

from chat_models import TEMPLATES, chat_tokenizer
from conftest import tiny_items
from obliviate.errors import ObliviateError
from obliviate.models import causal_lm as lm
from obliviate.models import prompt_format as pf

QUESTION, ANSWER = "Where was Ada Lind born?", "Ada Lind was born in Lisbon."


def _tokenizer(kind):
    tok = chat_tokenizer(kind, [QUESTION + " " + ANSWER, "You are a helpful assistant."])
    lm.prepare_tokenizer(tok)
    return tok


@pytest.mark.parametrize("kind", list(TEMPLATES))
def test_a_chat_template_is_used_and_its_prompt_is_an_exact_prefix(kind):
    tok = _tokenizer(kind)
    assert pf.of(tok).kind == "chat"  # "auto": the template the tokenizer carries
    messages = [{"role": "user", "content": QUESTION}]
    prompt = lm.question_prompt(tok, QUESTION)
    # what generation continues is exactly what the model's own template asks
    assert prompt == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    enc = lm.encode_qa(tok, QUESTION, ANSWER)
    assert enc.input_ids[:len(prompt)] == prompt  # the prefix property, by tokens
    assert all(label == lm.IGNORE for label in enc.labels[:len(prompt)])
    assert all(label != lm.IGNORE for label in enc.labels[len(prompt):])
    # the whole sequence renders as the template's conversation (up to the newline before a next turn)
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": ANSWER}], tokenize=False)
    assert tok.decode(enc.input_ids) == full.rstrip()
    # the end of turn is counted apart from the answer, and generation stops at it
    end = enc.input_ids[len(enc.input_ids) - enc.n_end:]
    assert tok.decode(enc.input_ids[len(prompt):len(enc.input_ids) - enc.n_end]).strip() == ANSWER
    assert set(end) & set(lm.stop_ids(tok))


def test_a_system_prompt_goes_through_the_template():
    tok = _tokenizer("llama2")
    pf.use(tok, pf.resolve(tok, "chat", system_prompt="You are a helpful assistant."))
    text = tok.decode(lm.question_prompt(tok, QUESTION))
    assert text == "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n" + QUESTION + " [/INST]"


def test_named_tags_render_what_the_family_template_renders():
    """llama3 tags on a tokenizer without a template give the Llama-3 chat template's tokens after the BOS (which
    comes from the tokenizer's own special tokens there)."""
    with_template = _tokenizer("llama3")
    bare = _tokenizer("llama3")
    bare.chat_template = None
    pf.use(bare, pf.resolve(bare, "llama3"))
    assert pf.of(bare).kind == "tags"
    tags, chat = lm.encode_qa(bare, QUESTION, ANSWER), lm.encode_qa(with_template, QUESTION, ANSWER)
    assert tags.input_ids[1:] == chat.input_ids[1:] and tags.n_end == chat.n_end == 1
    assert bare.convert_ids_to_tokens(tags.input_ids[-1]) == "<|eot_id|>"


def test_the_raw_format_is_the_worlds_and_a_custom_one_takes_tags(tiny_lm):
    _, tok = tiny_lm
    assert pf.of(tok) == pf.QA  # no chat template: raw
    assert tok.decode(lm.question_prompt(tok, "Q?")) == "<s>Question: Q?\nAnswer:"
    pf.use(tok, pf.resolve(tok, "custom", tags={"user_start": "User: ", "user_end": "\n",
                                                "assistant_start": "Bot:"}))
    try:
        enc = lm.encode_qa(tok, "Q?", " yes")
        assert tok.decode(enc.input_ids) == "<s>User: Q?\nBot: yes</s>"
    finally:
        pf.use(tok, pf.QA)


def test_a_format_that_cannot_serve_fails_in_one_line(tiny_lm):
    _, tok = tiny_lm
    with pytest.raises(ObliviateError, match="has no chat template"):
        pf.resolve(tok, "chat")
    with pytest.raises(ObliviateError, match="unknown template 'vicuna'"):
        pf.resolve(tok, "vicuna")
    with pytest.raises(ObliviateError, match="unknown tag"):
        pf.resolve(tok, "custom", tags={"user_begin": "U:"})
    broken = _tokenizer("chatml")
    broken.chat_template = "{{ messages[0]['content'] }}{% if add_generation_prompt %}!{% endif %}"
    with pytest.raises(ObliviateError, match="prefix of prompt"):
        pf.resolve(broken, "chat")


def test_the_config_names_the_template_and_refuses_an_unknown_one(tmp_path):
    from obliviate.config import build_config

    cfg = build_config({"method": "GradDiff", "template": {"name": "llama3", "system_prompt": "Be brief."}})
    assert cfg.template.name == "llama3" and cfg.dump()["template"]["system_prompt"] == "Be brief."
    with pytest.raises(ObliviateError, match="template.name"):
        build_config({"method": "GradDiff", "template": {"name": "vicuna"}})
    with pytest.raises(ObliviateError, match="template is a language model / vision-language model key"):
        build_config({"family": "t2i", "method": "ESD-x", "concept": "star", "template": {"name": "chatml"}})


# ------------------------------------------------------------------------------------------ which tokens count
def _scored_in_forget_batch(monkeypatch, tok, model, **train_args):
    from obliviate.config import LMTrainConfig
    from obliviate.loops.lm import unlearn
    from obliviate.methods.common import make_method

    seen = {}
    method = make_method("lm", "GradDiff")
    original = method.losses

    def spy(model_, reference, forget, retain):
        seen.setdefault("forget", int((forget["labels"] != lm.IGNORE).sum()))
        seen.setdefault("retain", int((retain["labels"] != lm.IGNORE).sum()))
        return original(model_, reference, forget, retain)

    monkeypatch.setattr(method, "losses", spy)
    items = tiny_items()
    unlearn(model, tok, items[:1], items[1:2], method, LMTrainConfig(max_steps=1, batch_size=1, lr=1e-5, **train_args))
    return seen


def test_the_forget_term_counts_the_answer_and_the_retain_term_its_end_too(monkeypatch):
    tok = _tokenizer("chatml")
    from obliviate.worlds.train import LMRecipe, new_model

    model = new_model(LMRecipe(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2), tok)
    items = tiny_items()
    f, r = lm.encode_qa(tok, items[0].question, items[0].answer), lm.encode_qa(tok, items[1].question, items[1].answer)
    n = lambda e: sum(1 for x in e.labels if x != lm.IGNORE)  # noqa: E731
    assert f.n_end == 1 and r.n_end == 1
    seen = _scored_in_forget_batch(monkeypatch, tok, model)
    assert seen == {"forget": n(f) - 1, "retain": n(r)}  # default: the forget term skips <|im_end|>
    seen = _scored_in_forget_batch(monkeypatch, tok, model, forget_tokens="answer+end", retain_tokens="answer")
    assert seen == {"forget": n(f), "retain": n(r) - 1}


def test_memorisation_metrics_read_the_answer_and_probability_reads_the_end_too():
    """Exact memorisation of an answer the model gets right but whose end of turn it never predicts is 1 (the end
    is not the answer); the answer probability still counts the end token."""
    from obliviate.evals import metrics as M

    tok = _tokenizer("chatml")
    enc = lm.encode_qa(tok, QUESTION, ANSWER)
    labels = torch.tensor([enc.labels])
    vocab = len(tok)
    logits = torch.full((1, len(enc.input_ids), vocab), -10.0)
    for t in range(len(enc.input_ids) - 1):
        target = enc.input_ids[t + 1]
        right = t + 1 < len(enc.input_ids) - enc.n_end  # every answer token right, the end token wrong
        logits[0, t, target if right else 0] = 10.0
    stats = M.token_stats(logits, labels)
    stats.answer_mask = torch.tensor([enc.answer_only().labels])[:, 1:] != lm.IGNORE
    record = M._item_record(stats.row(0), None, [], 0.4)
    assert record["exact_memorization"] == 1.0 and record["extraction_strength"] == 1.0
    assert record["n_end_tokens"] == 1
    assert record["answer_nll"] > 1.0  # the missed end token is in the probability


# ----------------------------------------------------------------------------------- the whole path, on a chat model
def _write_jsonl(path, items):
    import json

    path.write_text("".join(json.dumps({"question": i.question, "answer": i.answer,
                                        "paraphrased_answer": i.paraphrased_answer,
                                        "perturbed_answer": list(i.perturbed_answers)}) + "\n" for i in items))
    return path


def _answers(folder, questions):
    from obliviate.evals.metrics import greedy_answers

    model, tok = lm.load(folder)  # a reload: the format comes from the saved tokenizer's template
    assert pf.of(tok).kind == "chat"
    return greedy_answers(model, tok, questions)


def test_a_fact_unlearned_through_the_template_is_not_produced_through_it(chat_lm_dir, tmp_path):
    from obliviate.api import export_run
    from obliviate.config import build_config
    from obliviate.runners import run

    items = tiny_items()
    assert _answers(chat_lm_dir, [i.question for i in items]) == [i.answer for i in items]  # it knows them
    cfg = build_config({
        "method": "GradDiff", "model": str(chat_lm_dir), "output_dir": str(tmp_path / "runs"), "name": "gd",
        "forget_file": str(_write_jsonl(tmp_path / "forget.json", items[:1])),
        "retain_file": str(_write_jsonl(tmp_path / "retain.json", items[1:])),
        "train": {"lr": 1e-3, "max_steps": 8, "batch_size": 5}, "eval": {"batch_size": 8}})
    folder = run(cfg, log=lambda *_: None)
    import json
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["prompt_format"]["kind"] == "chat" and "<|im_start|>assistant" in metrics["prompt_format"]["example"]
    per_item = json.loads((folder / "per_item.json").read_text())
    assert per_item["forget"][0]["generated"] != items[0].answer  # the run's own evaluation asks through the template
    export_run(folder, tmp_path / "exported")
    after = _answers(tmp_path / "exported", [i.question for i in items])
    assert after[0] != items[0].answer and "Lisbon" not in after[0]
    assert sum(a == i.answer for a, i in zip(after[1:], items[1:])) >= 4, after  # the others are kept


@pytest.mark.parametrize("method,lora", [("NPO", False), ("SimNPO", False), ("GradDiff", True), ("NPO", True),
                                         ("SimNPO", True)])
def test_every_method_runs_through_the_template(chat_lm_dir, tmp_path, method, lora):
    import json

    from obliviate.config import build_config
    from obliviate.runners import run

    items = tiny_items()
    cfg = build_config({
        "method": method, "model": str(chat_lm_dir), "output_dir": str(tmp_path), "name": "r",
        "forget_file": str(_write_jsonl(tmp_path / "forget.json", items[:1])),
        "retain_file": str(_write_jsonl(tmp_path / "retain.json", items[1:])),
        "train": {"lr": 1e-3, "max_steps": 2, "batch_size": 1}, "eval": {"batch_size": 8},
        **({"lora": {"r": 4}} if lora else {})})
    folder = run(cfg, log=lambda *_: None)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["prompt_format"]["kind"] == "chat" and metrics["status"] == "completed"


def test_run_prints_the_headline_metrics_and_names_the_file(chat_lm_dir, tmp_path):
    from obliviate.cli import app
    from typer.testing import CliRunner

    items = tiny_items()
    cfg = tmp_path / "run.json"
    import json
    cfg.write_text(json.dumps({
        "method": "NPO", "model": str(chat_lm_dir), "output_dir": str(tmp_path / "runs"),
        "forget_file": str(_write_jsonl(tmp_path / "people_to_forget.json", items[:1])),
        "retain_file": str(_write_jsonl(tmp_path / "retain.json", items[1:])),
        "train": {"lr": 1e-3, "max_steps": 2, "batch_size": 2}, "eval": {"batch_size": 8}}))
    r = CliRunner().invoke(app, ["run", str(cfg), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "NPO on people_to_forget.json" in r.output and "forget10" not in r.output
    assert "model utility" in r.output and "no retrain reference" in r.output


@pytest.mark.parametrize("settings", [
    {"train": {"mixed_precision": "bf16", "gradient_checkpointing": True}},
    {"dtype": "bfloat16", "lora": {"r": 4}},
])
def test_bf16_and_gradient_checkpointing_run_through_the_template(chat_lm_dir, tmp_path, settings):
    """Autocast with float32 master weights plus gradient checkpointing, and pure bf16 weights with LoRA: the run
    completes, the changed tensors differ from the base, and the base folder is untouched."""
    import json

    from safetensors.torch import load_file

    from obliviate.config import build_config
    from obliviate.runners import run

    before = {p.name: p.read_bytes() for p in chat_lm_dir.iterdir() if p.suffix == ".safetensors"}
    items = tiny_items()
    train = {"lr": 1e-3, "max_steps": 2, "batch_size": 2, **settings.get("train", {})}
    cfg = build_config({
        "method": "GradDiff", "model": str(chat_lm_dir), "output_dir": str(tmp_path), "name": "r",
        "forget_file": str(_write_jsonl(tmp_path / "forget.json", items[:1])),
        "retain_file": str(_write_jsonl(tmp_path / "retain.json", items[1:])), "eval": {"batch_size": 8},
        **{k: v for k, v in settings.items() if k != "train"}, "train": train})
    folder = run(cfg, log=lambda *_: None)
    assert json.loads((folder / "metrics.json").read_text())["status"] == "completed"
    base, _ = lm.load(chat_lm_dir)
    state = base.state_dict()
    changed = load_file(str(folder / "changed.safetensors"))
    assert any(not torch.equal(t.float(), state[k].float()) for k, t in changed.items())
    assert {p.name: p.read_bytes() for p in chat_lm_dir.iterdir() if p.suffix == ".safetensors"} == before


def test_a_named_template_is_exported_as_the_chat_template(tiny_lm_dir, tmp_path):
    """A run on a model without a chat template, asked in llama3-style custom tags, exports a tokenizer whose chat
    template renders exactly the tokens the run used (so the exported model is asked as it was unlearned)."""
    import json

    from obliviate.api import export_run
    from obliviate.config import build_config
    from obliviate.runners import run

    items = tiny_items()
    tags = {"user_start": "User: ", "user_end": "\n", "assistant_start": "Bot:", "assistant_end": ""}
    cfg = build_config({
        "method": "GradDiff", "model": str(tiny_lm_dir), "output_dir": str(tmp_path), "name": "r",
        "template": {"name": "custom", "system_prompt": "Be brief.", **tags},
        "forget_file": str(_write_jsonl(tmp_path / "forget.json", items[:1])),
        "retain_file": str(_write_jsonl(tmp_path / "retain.json", items[1:])),
        "train": {"lr": 1e-3, "max_steps": 1, "batch_size": 2}, "evaluate": False})
    folder = run(cfg, log=lambda *_: None)
    assert json.loads((folder / "metrics.json").read_text())["prompt_format"]["kind"] == "tags"
    _, base_tok = lm.load(tiny_lm_dir)
    pf.use(base_tok, pf.resolve(base_tok, "custom", "Be brief.", tags))
    export_run(folder, tmp_path / "exported")
    _, tok = lm.load(tmp_path / "exported")
    assert pf.of(tok).kind == "chat"
    pf.use(tok, pf.resolve(tok, "chat", system_prompt="Be brief."))
    for item in items[:2]:
        assert lm.encode_qa(tok, item.question, item.answer).input_ids == \
            lm.encode_qa(base_tok, item.question, item.answer).input_ids


def test_validate_checks_the_template_against_the_models_tokenizer(tiny_lm_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from conftest import one_line_error
    from obliviate.cli import app

    items = tiny_items()
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"method": "NPO", "model": str(tiny_lm_dir), "template": {"name": "chat"},
                               "forget_file": str(_write_jsonl(tmp_path / "f.json", items[:1])),
                               "retain_file": str(_write_jsonl(tmp_path / "r.json", items[1:]))}))
    one_line_error(CliRunner().invoke(app, ["validate", str(cfg)]), "has no chat template")
    r = CliRunner().invoke(app, ["run", str(cfg), f"output_dir={tmp_path / 'runs'}"])
    one_line_error(r, "has no chat template")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing claimed
