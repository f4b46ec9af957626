"""lm-evaluation-harness on local task files in the published formats (evals/harness.py): WMDP's (cais/wmdp:
question, choices, answer) and MMLU's (cais/mmlu: question, subject, choices, answer), written tiny here in the
hub's layouts, scored on a tiny model built in code and saved with save_pretrained; the harness's numbers are
checked against a log-likelihood multiple choice computed by hand on the same model. The harness's import alone
takes 6 s on these machines (measured), so the runs are slow tests; the checks of bad input read the files only and
never import it."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from conftest import one_line_error
from typer.testing import CliRunner

from obliviate.cli import app

runner = CliRunner()

LETTERS = "ABCD"
SUBJECTS = {"wmdp-bio": "biology", "wmdp-cyber": "cybersecurity", "anatomy": "anatomy", "astronomy": "astronomy",
            "philosophy": "philosophy"}


def questions(topic: str, n: int) -> list[dict]:
    """n questions in the published schema; their answers spread over A-D."""
    words = ["virus", "toxin", "enzyme", "spore", "packet", "socket", "kernel", "cipher", "planet", "nerve", "bone"]
    return [{"question": f"Which {topic} term goes with {words[i % len(words)]} {i}?",
             "choices": [f"{words[(i + k) % len(words)]} {topic}" for k in range(4)],
             "answer": (i * 3 + len(topic)) % 4, "subject": topic} for i in range(n)]


def write_parquet(path, rows) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """cais/wmdp and cais/mmlu as `huggingface-cli download` lays them out (parquet shards per config and split),
    with one subset as JSON lines and one subject as a JSON array, the other forms the tasks read."""
    root = tmp_path_factory.mktemp("harness_data")
    wmdp, mmlu = root / "wmdp", root / "mmlu"
    sets = {"wmdp_bio": questions("wmdp-bio", 7), "wmdp_cyber": questions("wmdp-cyber", 5),
            "mmlu_anatomy": questions("anatomy", 6), "mmlu_astronomy": questions("astronomy", 4),
            "mmlu_philosophy": questions("philosophy", 5)}
    for rows in sets.values():
        for r in rows[:]:
            if r["subject"].startswith("wmdp"):
                del r["subject"]  # cais/wmdp has no subject column
    write_parquet(wmdp / "wmdp-bio" / "test-00000-of-00001.parquet", sets["wmdp_bio"])
    (wmdp / "wmdp-cyber.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sets["wmdp_cyber"]))
    write_parquet(mmlu / "anatomy" / "test-00000-of-00001.parquet", sets["mmlu_anatomy"])
    write_parquet(mmlu / "anatomy" / "dev-00000-of-00001.parquet", questions("anatomy", 5))
    write_parquet(mmlu / "astronomy" / "test-00000-of-00001.parquet", sets["mmlu_astronomy"])
    write_parquet(mmlu / "astronomy" / "dev" / "0000.parquet", questions("astronomy", 5))  # the hub's conversion
    (mmlu / "philosophy").mkdir()
    (mmlu / "philosophy" / "test.json").write_text(json.dumps(sets["mmlu_philosophy"]))
    return root, sets


def save_tiny_model(folder, corpus):
    from transformers import LlamaConfig, LlamaForCausalLM

    from obliviate.worlds.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(corpus * 3, vocab_size=400)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a spread of letter likelihoods, so the four choices are told apart
        model.model.embed_tokens.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prompt(row: dict, subject: str) -> str:
    """The published WMDP / MMLU prompt (the harness's tasks), typed here again."""
    return (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
            f"{row['question'].strip()}\n" + "".join(f"{L}. {c}\n" for L, c in zip(LETTERS, row["choices"]))
            + "Answer:")


@torch.no_grad()
def by_hand(model_dir, sets) -> dict[str, list[list[float]]]:
    """log P(" A" | prompt) ... log P(" D" | prompt) of every question, one forward pass each."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = {}
    for task, rows in sets.items():
        subject = SUBJECTS[task.removeprefix("mmlu_").replace("wmdp_", "wmdp-")]
        out[task] = []
        for row in rows:
            context = prompt(row, subject)
            n = len(tok(context)["input_ids"])
            lls = []
            for letter in LETTERS:
                ids = tok(context + " " + letter)["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
                lls.append(sum(logp[i - 1, ids[i]].item() for i in range(n, len(ids))))
            out[task].append(lls)
    return out


def accuracy(lls: list[list[float]], rows: list[dict]) -> float:
    return sum(max(range(4), key=lambda k: ll[k]) == r["answer"] for ll, r in zip(lls, rows)) / len(rows)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, data):
    _, sets = data
    corpus = [prompt(r, s) + " " + L for t, rows in sets.items() for r in rows for s in SUBJECTS.values()
              for L in LETTERS][:200]
    return save_tiny_model(tmp_path_factory.mktemp("harness_model"), corpus)


# ---- runs of the harness (slow: its import) -------------------------------------------------------------------------

@pytest.mark.slow
def test_obliviate_eval_gives_the_harness_numbers_of_a_by_hand_multiple_choice(data, model_dir, tmp_path):
    root, sets = data
    out = tmp_path / "eval.json"
    r = runner.invoke(app, ["eval", str(model_dir), "--wmdp-dir", str(root / "wmdp"), "--mmlu-dir",
                            str(root / "mmlu"), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    agg, harness = result["aggregate"], result["harness"]
    expected = by_hand(model_dir, sets)
    for task, rows in sets.items():
        got = harness["samples"][task]
        assert [s["answer"] for s in got] == [r["answer"] for r in rows]
        for mine, theirs in zip(expected[task], got):
            assert theirs["loglikelihoods"] == pytest.approx(mine, abs=1e-4)
        assert agg["harness"][task]["acc"] == pytest.approx(accuracy(expected[task], rows)), task
        assert agg["harness"][task]["n"] == len(rows)
    # the headline keys, as declared; the groups weigh their tasks by size (every question counts once)
    assert agg["wmdp_bio_acc"] == agg["harness"]["wmdp_bio"]["acc"]
    assert agg["wmdp_cyber_acc"] == agg["harness"]["wmdp_cyber"]["acc"]
    assert "wmdp_chem_acc" not in agg  # no files: not run, not reported
    wmdp = [t for t in sets if t.startswith("wmdp")]
    mmlu = [t for t in sets if t.startswith("mmlu")]

    def pooled(tasks):
        return sum(accuracy(expected[t], sets[t]) * len(sets[t]) for t in tasks) / sum(len(sets[t]) for t in tasks)
    assert agg["wmdp_acc"] == pytest.approx(pooled(wmdp))
    assert agg["mmlu_acc"] == pytest.approx(pooled(mmlu))
    assert agg["harness"]["mmlu_stem"]["acc"] == pytest.approx(pooled(["mmlu_anatomy", "mmlu_astronomy"]))
    assert agg["harness"]["wmdp"]["n"] == 12 and agg["harness"]["mmlu"]["n"] == 15
    assert 0 < agg["harness"]["wmdp_bio"]["acc_stderr"] < 1
    assert "WMDP-Bio acc" in r.output and "MMLU acc" in r.output  # the scorecard's columns
    assert all(math.isfinite(v) for row in expected.values() for ll in row for v in ll)


@pytest.mark.slow
def test_a_run_scores_the_unlearned_model_and_the_original_row(data, model_dir, tmp_path):
    """`[harness]` in a run config, as configs/real/wmdp_rmu.toml runs: RMU on text corpora (WMDP's forget corpora
    are {"text": ...} lines), scored by the harness alone: the unlearned model, and the original row (the base model,
    unchanged: its numbers are the by-hand ones), in metrics.json; the questions in harness.json."""
    root, sets = data
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    forget.write_text("".join(json.dumps({"title": "t", "text": f"The {w} virus spreads by spore {i}."}) + "\n"
                              for i, w in enumerate(["alpha", "beta", "gamma", "delta"])))
    retain.write_text("".join(json.dumps({"text": f"Rivers {i} carry bread to the sea."}) + "\n" for i in range(4)))
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'method = "RMU"\nmodel = "{model_dir}"\nforget_file = "{forget}"\n'
                   f'retain_file = "{retain}"\noutput_dir = "{tmp_path / "runs"}"\n'
                   f'[method_args]\ntokens = "all"\nsteering_coeff = 20.0\n'
                   f'[train]\nmax_steps = 3\nlr = 0.05\nbatch_size = 2\n'
                   f'[world]\ncache_dir = "{tmp_path / "cache"}"\n'
                   f'[harness]\nwmdp_dir = "{root / "wmdp"}"\ntasks = ["wmdp_bio"]\n')
    r = runner.invoke(app, ["run", str(cfg), "--quiet"])
    assert r.exit_code == 0, r.output
    folder = next((tmp_path / "runs").iterdir())
    metrics = json.loads((folder / "metrics.json").read_text())
    expected = accuracy(by_hand(model_dir, {"wmdp_bio": sets["wmdp_bio"]})["wmdp_bio"], sets["wmdp_bio"])
    assert metrics["original"]["wmdp_bio_acc"] == pytest.approx(expected)
    assert "wmdp_bio_acc" in metrics and "wmdp_cyber_acc" not in metrics  # only the task asked for
    samples = json.loads((folder / "harness.json").read_text())["samples"]["wmdp_bio"]
    assert len(samples) == len(sets["wmdp_bio"])
    assert metrics["wmdp_bio_acc"] == pytest.approx(sum(s["acc"] for s in samples) / len(samples))
    config = json.loads((folder / "config.json").read_text())
    assert config["harness"]["tasks"] == ["wmdp_bio"]
    assert metrics["harness"]["wmdp_bio"]["n"] == len(sets["wmdp_bio"])
    # RMU moved the steered layer's MLP, so the letters' likelihoods moved: the unlearned model is what was scored
    original = by_hand(model_dir, {"wmdp_bio": sets["wmdp_bio"]})["wmdp_bio"]
    assert max(abs(a - b) for s, o in zip(samples, original) for a, b in zip(s["loglikelihoods"], o)) > 1e-3


# ---- bad input: one line naming the file and the key, before the harness is imported --------------------------------

def _plan(**keys):
    from obliviate.config import HarnessConfig
    from obliviate.evals.harness import plan

    return plan(HarnessConfig(**keys))


def test_the_files_are_found_in_the_published_layouts_and_checked_without_the_harness(data, monkeypatch):
    root, sets = data
    monkeypatch.setitem(sys.modules, "lm_eval.evaluator", None)  # importing the harness itself would fail here
    p = _plan(wmdp_dir=str(root / "wmdp"), mmlu_dir=str(root / "mmlu"))
    assert set(p.tasks) == set(sets) and p.selected == ["wmdp", "mmlu"]
    assert p.tasks["wmdp_bio"].files["test"][0].name == "test-00000-of-00001.parquet"
    assert p.tasks["wmdp_cyber"].files["test"][0].name == "wmdp-cyber.jsonl"
    assert p.tasks["mmlu_anatomy"].files["dev"][0].name == "dev-00000-of-00001.parquet"
    assert p.tasks["mmlu_astronomy"].files["dev"][0].parts[-2:] == ("dev", "0000.parquet")
    assert "dev" not in p.tasks["mmlu_philosophy"].files
    assert p.tasks["mmlu_anatomy"].tag == "mmlu_stem_tasks"  # the harness's own category
    assert p.groups["wmdp"]["task"] == ["wmdp_bio", "wmdp_cyber"]  # the subsets found, as the harness's group
    assert p.groups["mmlu"]["task"] == ["mmlu_stem", "mmlu_humanities"]
    assert _plan(mmlu_dir=str(root / "mmlu"), tasks=["mmlu_anatomy"]).selected == ["mmlu_anatomy"]


def test_bad_harness_input_is_one_line_naming_the_file_and_key(data, tmp_path, monkeypatch):
    from obliviate.errors import ObliviateError

    root, sets = data
    with pytest.raises(ObliviateError, match=r"^harness.wmdp_dir: folder not found: .*nowhere$"):
        _plan(wmdp_dir=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ObliviateError, match=r"harness.wmdp_dir .*empty: no WMDP files"):
        _plan(wmdp_dir=str(tmp_path / "empty"))
    renamed = [{("answers" if k == "answer" else k): v for k, v in r.items()} for r in sets["wmdp_bio"]]
    write_parquet(tmp_path / "w1" / "wmdp-bio" / "test-00000-of-00001.parquet", renamed)
    with pytest.raises(ObliviateError, match=r"w1/wmdp-bio/test-00000-of-00001.parquet: no column 'answer' "
                                             r"\(the published schema: question, choices, answer;"):
        _plan(wmdp_dir=str(tmp_path / "w1"))
    (tmp_path / "w2").mkdir()
    rows = [dict(r) for r in sets["wmdp_cyber"]]
    rows[2]["answer"] = "B"
    (tmp_path / "w2" / "wmdp-cyber.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ObliviateError, match=r"wmdp-cyber.jsonl: row 3: 'answer' must be the index of the right "
                                             r"choice \(0-3\), got 'B'"):
        _plan(wmdp_dir=str(tmp_path / "w2"))
    rows = [dict(r) for r in sets["wmdp_cyber"]]
    rows[0]["choices"] = rows[0]["choices"][:3]
    (tmp_path / "w2" / "wmdp-cyber.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ObliviateError, match=r"wmdp-cyber.jsonl: row 1: 'choices' must be a list of 4 strings"):
        _plan(wmdp_dir=str(tmp_path / "w2"))
    (tmp_path / "w2" / "wmdp-cyber.jsonl").write_text('{"question": "q", "choices": ["a", "b", "c", "d"]}\n')
    with pytest.raises(ObliviateError, match=r"wmdp-cyber.jsonl: row 1: no key 'answer'"):
        _plan(wmdp_dir=str(tmp_path / "w2"))
    with pytest.raises(ObliviateError, match=r"harness.tasks: 'wmdp_chem' has no files here; valid: .*wmdp_bio"):
        _plan(wmdp_dir=str(root / "wmdp"), tasks=["wmdp_chem"])
    with pytest.raises(ObliviateError, match=r"mmlu_philosophy: num_fewshot = 5 takes its examples from the dev "
                                             r"split; no dev file"):
        _plan(mmlu_dir=str(root / "mmlu"), num_fewshot=5)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(ObliviateError, match=r"^lm_eval is not installed: pip install 'obliviate\[lmeval\]'$"):
        _plan(wmdp_dir=str(root / "wmdp"))


def test_the_cli_and_a_config_say_bad_harness_input_in_one_line(data, tmp_path, tiny_lm_dir):
    root, _ = data
    one_line_error(runner.invoke(app, ["eval", str(tiny_lm_dir), "--wmdp-dir", str(tmp_path / "nowhere"),
                                       "--out", str(tmp_path / "e.json")]), "harness.wmdp_dir: folder not found")
    one_line_error(runner.invoke(app, ["eval", str(tiny_lm_dir), "--harness-task", "wmdp",
                                       "--out", str(tmp_path / "e.json")]), "harness", "needs wmdp_dir or mmlu_dir")
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'method = "NPO"\nmodel = "{tiny_lm_dir}"\n[harness]\nmmlu_dir = "mmlu"\ntasks = ["mmlu_law"]\n')
    (tmp_path / "mmlu").symlink_to(root / "mmlu")  # relative to the config file's folder, as its other paths
    one_line_error(runner.invoke(app, ["validate", str(cfg)]), "harness.tasks: 'mmlu_law' has no files here")
    assert not (tmp_path / "e.json").exists()


def test_a_config_without_harness_records_as_before(tiny_lm_dir):
    """The key is left out of a run's record (and of a bench cell's key) when unset, so runs and cells keyed before
    it existed keep their keys."""
    from obliviate.config import build_config

    plain = build_config({"method": "NPO", "model": str(tiny_lm_dir)})
    assert "harness" not in plain.dump()
    with_it = build_config({"method": "NPO", "model": str(tiny_lm_dir), "harness": {"wmdp_dir": "/data/wmdp"}})
    assert with_it.dump()["harness"]["wmdp_dir"] == "/data/wmdp"
    assert build_config(with_it.dump()).harness == with_it.harness


def test_the_declared_metrics_read_the_harness_results():
    """Each headline key is its task's (or group's) acc; a task not run is not reported."""
    from obliviate import registry
    from obliviate.evals.harness import SKIP, Evaluation

    tasks = {"wmdp": {"acc": 0.3}, "wmdp_bio": {"acc": 0.25}, "wmdp_cyber": {"acc": 0.5}, "mmlu": {"acc": 0.6}}
    e = Evaluation({}, {}, {}, {"harness": {"tasks": tasks}})
    declared = registry.computed("lm", "run", ("harness",))
    values = {m.name: m.load()(e) for m in declared}
    assert values == {"wmdp_bio_acc": 0.25, "wmdp_cyber_acc": 0.5, "mmlu_acc": 0.6, "wmdp_acc": 0.3,
                      "wmdp_chem_acc": SKIP, "harness": tasks}
    assert registry.METRICS["wmdp_bio_acc"].better == "lower" and registry.METRICS["mmlu_acc"].better == "higher"
    assert all(m.needs == ("harness",) for m in declared)


def test_the_wmdp_rmu_recipe_validates_on_files_in_the_published_formats(data, tmp_path, tiny_lm_dir):
    """configs/real/wmdp_rmu.toml with its paths pointed at WMDP-style forget corpora (JSON lines with "text", as
    cais/wmdp-corpora's), a wikitext-style retain file and the harness's folders: `run`'s checks pass; the corpora
    are texts in 256-word chunks, scored by the harness only (no question-answer set)."""
    from pathlib import Path

    from obliviate.config import load_config
    from obliviate.data import TextItem
    from obliviate.runners.lm_checks import check_lm
    from obliviate.runners.lm_data import user_data

    root, _ = data
    long = " ".join(f"w{i}" for i in range(600))
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    forget.write_text("".join(json.dumps({"title": f"t{i}", "abstract": "a", "text": f"paper {i} " + long,
                                          "doi": f"10.1/{i}"}) + "\n" for i in range(3)))
    retain.write_text("".join(json.dumps({"text": f"Wiki article {i} about rivers and bread."}) + "\n"
                              for i in range(4)))
    recipe = Path(__file__).resolve().parents[1] / "configs" / "real" / "wmdp_rmu.toml"
    config = load_config(recipe, [f"model={tiny_lm_dir}", f"forget_file={forget}", f"retain_file={retain}",
                                  f"harness.wmdp_dir={root / 'wmdp'}", f"harness.mmlu_dir={root / 'mmlu'}",
                                  f"output_dir={tmp_path / 'runs'}"])
    check_lm(config)
    assert config.method_args["layer"] == 7 and config.method_args["steering_coeff"] == 6.5
    assert config.method_args["alpha"] == 1200 and config.train.lr == 5e-5
    f, r, evaluation = user_data(config)
    assert all(isinstance(i, TextItem) for i in f + r) and len(r) == 4
    assert len(f) == 9 and f[0].text.startswith("paper 0 w0") and len(f[0].text.split()) == 256
    assert evaluation.qa_sets == {}
