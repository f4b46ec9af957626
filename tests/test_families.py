"""The families keep to their places: running one family's method loads none of another family's loop, runner,
adapter or methods (checked in a fresh process, and statically over the imports); the API names stay the
functions the README shows whatever was imported first; a run states its family once and a config that mixes
families is an error naming the key; the language-model loop runs through the adapter it is given."""
from __future__ import annotations

import ast
import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import obliviate
from obliviate.config import build_config
from obliviate.errors import ObliviateError
from obliviate.families import FAMILIES

SRC = Path(obliviate.__file__).parent
LM_ONLY = ("obliviate.models.causal_lm", "obliviate.loops.lm", "obliviate.runners.lm", "obliviate.runners.lm_checks",
           "obliviate.methods.lm", "obliviate.demo.lm", "obliviate.runners.lm_attack", "obliviate.attacks.lm",
           "obliviate.guards.lm")
T2I_ONLY = ("obliviate.models.diffusion", "obliviate.models.dit", "obliviate.guards.t2i", "obliviate.loops.t2i", "obliviate.runners.t2i", "obliviate.runners.t2i_checks",
            "obliviate.methods.t2i", "obliviate.demo.t2i", "obliviate.runners.t2i_attack", "obliviate.attacks.t2i",
            "diffusers")
MLLM_ONLY = ("obliviate.models.vlm", "obliviate.runners.mllm", "obliviate.runners.mllm_checks", "obliviate.methods.mllm",
             "obliviate.demo.mllm", "obliviate.evals.mllmu", "obliviate.guards.mllm", "obliviate.runners.mllm_attack",
             "obliviate.attacks.mllm")
# the vision-language family runs the language-model loop and methods (its row's `reuses`), nothing else of that family
LM_REUSED = ("obliviate.loops.lm", "obliviate.methods.lm")
OWN = {"lm": LM_ONLY, "t2i": T2I_ONLY, "mllm": MLLM_ONLY}


def _foreign(family: str) -> tuple[str, ...]:
    """The modules a run of `family` must not load or import: every other family's own, but what it reuses."""
    return tuple(p for f, ps in OWN.items() if f != family for p in ps
                 if not (family == "mllm" and any(p == r or p.startswith(r + ".") for r in LM_REUSED)))


def _run_and_list_modules(code: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code += "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _loaded(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


@pytest.mark.slow  # a fresh interpreter that imports a family's whole path: 10-25 s on 2 cores; the static
# import check (test_no_family_file_imports_...) stays in the default suite
def test_a_text_to_image_erasure_loads_nothing_of_the_language_model_family(tiny_pipeline_dir):
    modules = _run_and_list_modules(f"""
import torch
from obliviate.config import TrainConfig
from obliviate.loops.t2i import erase
from obliviate.methods.t2i.base import EraseTask, RetainPrompt
from obliviate.models.diffusion import load_pipeline
pipe = load_pipeline({str(tiny_pipeline_dir)!r})
task = EraseTask("striped", ["a red star in striped style"], [RetainPrompt("a red star in solid style")], "solid")
result = erase(pipe, task, "ESD-x", TrainConfig(max_steps=1, batch_size=1), images_per_prompt=1, sample_steps=2)
assert result.history
""")
    assert "obliviate.loops.step" in modules  # the shared gradient step serves both families
    assert not _loaded(modules, _foreign("t2i")), _loaded(modules, _foreign("t2i"))


@pytest.mark.slow  # a fresh interpreter that imports a family's whole path: 10-25 s on 2 cores; the static
# import check (test_no_family_file_imports_...) stays in the default suite
def test_a_text_to_image_run_from_the_cli_loads_nothing_of_the_language_model_family(tiny_pipeline_dir, tmp_path):
    from conftest import tiny_prompts

    forget, retain = tmp_path / "forget.txt", tmp_path / "retain.txt"
    forget.write_text("\n".join(p for p in tiny_prompts() if "striped" in p))
    retain.write_text("\n".join(p for p in tiny_prompts() if "striped" not in p))
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'family = "t2i"\nmethod = "ESD-x"\nconcept = "striped"\nmodel = "{tiny_pipeline_dir}"\n'
                   f'forget_prompts = "{forget}"\nretain_prompts = "{retain}"\nevaluate = false\n'
                   f'output_dir = "{tmp_path / "runs"}"\nname = "esd"\n'
                   '[train]\nmax_steps = 1\nbatch_size = 1\n[t2i]\nimages_per_prompt = 1\nsample_steps = 2\n')
    modules = _run_and_list_modules(f"""
import sys
from obliviate.cli import app
sys.argv = ["obliviate", "run", {str(cfg)!r}, "--quiet"]
try:
    app()
except SystemExit as e:
    assert not e.code, e.code
""")
    assert (tmp_path / "runs" / "esd" / "changed.safetensors").is_file()
    assert not _loaded(modules, _foreign("t2i")), _loaded(modules, _foreign("t2i"))


@pytest.mark.slow  # a fresh interpreter that imports a family's whole path: 10-25 s on 2 cores; the static
# import check (test_no_family_file_imports_...) stays in the default suite
def test_a_language_model_unlearning_loads_nothing_of_the_text_to_image_family(tiny_lm_dir):
    modules = _run_and_list_modules(f"""
from obliviate.config import TrainConfig
from obliviate.data import QAItem
from obliviate.loops.lm import unlearn
from obliviate.models.causal_lm import load
model, tok = load({str(tiny_lm_dir)!r})
forget = [QAItem("Where was Ada born?", "Lisbon.", subject="Ada")]
retain = [QAItem("Where was Bo born?", "Oslo.", subject="Bo")]
result = unlearn(model, tok, forget, retain, "GradDiff", TrainConfig(max_steps=1, batch_size=1))
assert result.history
""")
    assert not _loaded(modules, _foreign("lm")), _loaded(modules, _foreign("lm"))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_family_file_imports_another_familys_loop_runner_adapter_or_methods():
    for family, prefixes in OWN.items():
        others = _foreign(family)
        files = []
        for p in prefixes:
            if not p.startswith("obliviate."):
                continue
            rel = Path(*p.split(".")[1:])
            files += sorted((SRC / rel).rglob("*.py")) if (SRC / rel).is_dir() else [SRC / rel.with_suffix(".py")]
        assert files, family
        for f in files:
            crossed = sorted(i for i in _imports(f) if any(i == o or i.startswith(o + ".") for o in others))
            assert not crossed, f"{f.relative_to(SRC)} imports {crossed}"


def test_every_family_fills_the_whole_contract():
    for family in FAMILIES.values():
        for part in ("adapter", "loop", "method_base", "runner", "export", "check", "demo"):
            assert family.load(part) is not None, (family.name, part)
        from obliviate.registry import ATTACKS, DEFAULT_ATTACKS
        if family.attack:  # an attack runner, and registered attacks of the family, each with its options
            assert family.load("attack") is not None and DEFAULT_ATTACKS[family.name]
            assert all(e.family == family.name and hasattr(e.load(), "Config") for e in ATTACKS.values()
                       if e.family == family.name)
        from obliviate.registry import METHODS
        assert METHODS[family.name] and all(e.family in (family.name, *family.reuses)
                                            for e in METHODS[family.name].values())


def test_api_names_stay_the_functions_whatever_was_imported_first():
    for mod in pkgutil.walk_packages(obliviate.__path__, "obliviate."):
        importlib.import_module(mod.name)
    from obliviate.evals.evaluate import evaluate_lm
    from obliviate.loops.lm import unlearn
    from obliviate.methods.common import make_method
    from obliviate.runners import run
    assert obliviate.unlearn is unlearn and obliviate.make_method is make_method
    assert obliviate.evaluate is evaluate_lm and obliviate.run is run
    for name in obliviate.__all__:
        assert not isinstance(getattr(obliviate, name), type(obliviate)), f"obliviate.{name} is a module"


def test_a_run_states_its_family_once_and_mixing_is_an_error_naming_the_key():
    assert build_config({"method": "NPO"}).family == "lm"  # the documented default
    t2i = build_config({"method": "UCE", "world": {"name": "canvas"}, "concept": "star"})  # the named world's family
    assert t2i.family == "t2i" and t2i.world.name == "canvas"
    explicit = build_config({"family": "t2i", "method": "RGD", "concept": "star"})
    assert explicit.method == "RGD" and explicit.family == "t2i" and explicit.world.name == "canvas"
    assert build_config({"method": "NPO", "world": {"name": "portraits"}}).family == "mllm"
    with pytest.raises(ObliviateError, match="concept is a text-to-image key"):
        build_config({"family": "lm", "method": "NPO", "concept": "star"})
    with pytest.raises(ObliviateError, match="forget_file is a language model key"):
        build_config({"family": "t2i", "method": "UCE", "concept": "star", "forget_file": "f.jsonl"})
    with pytest.raises(ObliviateError, match="lora is a language model / vision-language model key"):
        build_config({"family": "t2i", "method": "ESD-x", "concept": "star", "lora": {"r": 4}})
    with pytest.raises(ObliviateError, match="world.name = 'profiles' is a language model world"):
        build_config({"family": "t2i", "method": "UCE", "concept": "star", "world": {"name": "profiles"}})
    with pytest.raises(ObliviateError, match="needs `concept`"):
        build_config({"family": "t2i", "method": "UCE"})
    with pytest.raises(ObliviateError, match="unknown text-to-image method 'NPO'"):
        build_config({"family": "t2i", "method": "NPO", "concept": "star"})
    with pytest.raises(ObliviateError, match=r"^config: family: Input should be 'lm', 't2i' or 'mllm'$"):
        build_config({"family": "diffusion", "method": "UCE"})
    # what a run records reads back to the same config, with its own family's keys only
    for cfg in (t2i, build_config({"method": "NPO", "split": "forget05"}),
                build_config({"family": "mllm", "method": "NPO", "mllm": {"max_new_tokens": 4}})):
        dumped = cfg.dump()
        assert build_config(json.loads(json.dumps(dumped))) == cfg
        # an unset `harness` is left out, so configs recorded (and bench cells keyed) before it keep their keys
        assert set(dumped) == set(type(cfg).model_fields) - {"harness"}
        assert set(dumped["train"]) == set(type(cfg.train).model_fields)


@pytest.mark.parametrize("keys, family", [({"concept": "star"}, "t2i"), ({"concept": "star", "anchor": "dot"}, "t2i"),
                                          ({"mllmu_dir": "MLLMU-Bench"}, "mllm"),
                                          ({"mllm": {"max_new_tokens": 4}}, "mllm")])
def test_the_family_is_never_guessed_from_another_familys_key(keys, family):
    """A concept (or mllmu_dir) without `family` is a language-model run that refuses it, in one line that says
    which family has the key and how to state it."""
    from obliviate.families import FAMILIES

    with pytest.raises(ObliviateError) as e:
        build_config({"method": "GradDiff", **keys})
    message = str(e.value)
    key = next(iter(keys))
    assert message == (f"config: {key} is a {FAMILIES[family].title} key; this is a language model run "
                       f"(family = 'lm'); set family = '{family}' for a {FAMILIES[family].title} run")
    assert build_config({"method": "GradDiff" if family == "mllm" else "ESD-x", "family": family, **keys}).family \
        == family


def test_each_family_has_its_config_class_and_runconfig_returns_it():
    from obliviate.config import (LMRunConfig, LMTrainConfig, MLLMRunConfig, RunConfig, T2IRunConfig, TrainConfig,
                                  WorldConfig)

    lm = RunConfig(method="NPO", train=TrainConfig(lr=1e-3))  # a plain TrainConfig: the LM keys at their defaults
    assert type(lm) is LMRunConfig and type(lm.train) is LMTrainConfig and lm.train.lr == 1e-3
    assert lm.train.model_fields_set == {"lr"}
    t2i = RunConfig(family="t2i", method="UCE", concept="star", train=LMTrainConfig(lr=1e-3))
    assert type(t2i) is T2IRunConfig and type(t2i.train) is TrainConfig and t2i.train.lr == 1e-3
    mllm = RunConfig(method="GradDiff", world=WorldConfig(name="portraits"))
    assert type(mllm) is MLLMRunConfig and type(mllm.train) is LMTrainConfig
    assert all(isinstance(c, RunConfig) for c in (lm, t2i, mllm))
    assert RunConfig.model_validate({"family": "t2i", "method": "UCE", "concept": "star"}) == t2i.model_copy(
        update={"train": TrainConfig()})
    assert LMRunConfig(method="NPO") == lm.model_copy(update={"train": LMTrainConfig()})
    # a family's class takes its own keys only, and says which family has the others
    assert not {"concept", "mllmu_dir", "forget_file", "grad_accum_steps"} & set(T2IRunConfig.model_fields) - {
        "concept"}
    assert "forget_file" not in MLLMRunConfig.model_fields and "concept" not in LMRunConfig.model_fields
    with pytest.raises(ValidationError, match="concept is a text-to-image key"):
        LMRunConfig(method="NPO", concept="star")
    with pytest.raises(ValidationError, match="family"):
        LMRunConfig(family="t2i", method="UCE", concept="star")
    # copies, pickles and round trips keep the class
    import copy
    import pickle

    for cfg in (lm, t2i, mllm):
        assert type(copy.deepcopy(cfg)) is type(cfg) and pickle.loads(pickle.dumps(cfg)) == cfg
        assert type(build_config(cfg.dump())) is type(cfg)


def test_a_language_model_training_key_is_refused_for_text_to_image_at_validation(tmp_path):
    from typer.testing import CliRunner

    from conftest import one_line_error
    from obliviate.cli import app

    for key, value in (("grad_accum_steps", 2), ("group_by_length", True), ("forget_tokens", "answer+end"),
                       ("retain_tokens", "answer"), ("mixed_precision", "bf16"), ("gradient_checkpointing", True),
                       ("max_logit_tokens", 64), ("shard", "fsdp")):
        with pytest.raises(ObliviateError, match=rf"^config: train.{key} is a language-model key; this is a "
                                                 rf"text-to-image run \(family = 't2i'\)$"):
            build_config({"family": "t2i", "method": "ESD-x", "concept": "star", "train": {key: value}})
        # a language-model (or vision-language) run takes it
        assert getattr(build_config({"method": "NPO", "train": {key: value}}).train, key) == value
    cfg = tmp_path / "run.toml"
    cfg.write_text('family = "t2i"\nmethod = "ESD-x"\nconcept = "star"\n[train]\ngrad_accum_steps = 4\n')
    one_line_error(CliRunner().invoke(app, ["validate", str(cfg)]),
                   f"{cfg}: train.grad_accum_steps is a language-model key; this is a text-to-image run")
    one_line_error(CliRunner().invoke(app, ["validate", str(cfg.with_name("ok.toml")), "train.shard=fsdp"]),
                   "config file not found")
    cfg.write_text('family = "t2i"\nmethod = "ESD-x"\nconcept = "star"\n')
    one_line_error(CliRunner().invoke(app, ["validate", str(cfg), "train.shard=fsdp"]),
                   "train.shard is a language-model key; this is a text-to-image run")


def test_an_older_run_record_with_every_key_still_reads():
    """Runs recorded before one class per family held every training key (a text-to-image run: at values that never
    applied, such as an older default max_logit_tokens = null), and older ones every family's keys; such a
    config.json reads back as its family's config. A config the user writes may not mix them."""
    from obliviate.config import LMRunConfig, MLLMRunConfig, T2IRunConfig

    def every_key(*classes):
        out = {}
        for cls in classes:
            out.update(cls(method="GradDiff" if cls is not T2IRunConfig else "UCE",
                           **({"concept": "star"} if cls is T2IRunConfig else {})).model_dump())
        return out

    everything = every_key(T2IRunConfig, MLLMRunConfig, LMRunConfig)  # the language-model training keys last
    t2i = {**everything, "family": "t2i", "method": "UCE", "concept": "star", "world": {"name": "canvas"},
           "train": {**everything["train"], "max_logit_tokens": None}}
    assert "grad_accum_steps" in t2i["train"] and "mllmu_dir" in t2i and "forget_file" in t2i
    assert build_config(t2i, recorded=True) == build_config({"family": "t2i", "method": "UCE", "concept": "star"})
    lm = {**everything, "family": "lm", "concept": None, "world": {"name": "profiles"}}
    assert build_config(lm, recorded=True) == build_config({"method": "GradDiff"})
    with pytest.raises(ObliviateError, match="split is a language model / vision-language model key"):
        build_config(t2i)
    with pytest.raises(ObliviateError, match="train.grad_accum_steps is a language-model key"):
        build_config({"family": "t2i", "method": "UCE", "concept": "star", "train": {"grad_accum_steps": 1}})


def test_old_run_folders_config_json_still_loads(tmp_path):
    """config.json as runs recorded it before (copied from a run folder of each family) reads through
    runs.read_run_config as that family's config, with the same values."""
    from obliviate.runs import read_run_config

    records = json.loads((Path(__file__).parent / "data" / "old_run_configs.json").read_text())
    assert {r["family"] for r in records} == {"lm", "t2i", "mllm"}
    for i, record in enumerate(records):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(record))
        cfg = read_run_config(folder)
        assert cfg.family == record["family"]
        dumped = cfg.dump()
        for key, value in record.items():
            if key == "train":
                assert {k: v for k, v in value.items() if k in dumped["train"]} == {
                    k: v for k, v in dumped["train"].items() if k in value}
                assert set(value) - set(dumped["train"]) <= ({"grad_accum_steps", "group_by_length", "forget_tokens",
                                                               "retain_tokens", "mixed_precision",
                                                               "gradient_checkpointing", "max_logit_tokens", "shard"}
                                                              if cfg.family == "t2i" else set())
            else:
                assert dumped[key] == value, key


class _NeedsExtraInput(torch.nn.Module):
    """A model that, like a vision-language model, takes an input beyond input_ids and attention_mask."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, input_ids, attention_mask, extra):
        self.seen.append(extra.shape)
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        out.logits = out.logits + extra[:, None, None]
        return out


def test_the_language_model_loop_runs_through_the_adapter_it_is_given(tiny_lm):
    from types import SimpleNamespace

    from conftest import tiny_items
    from obliviate.config import TrainConfig
    from obliviate.loops.lm import unlearn
    from obliviate.models import causal_lm as lm

    model, tok = tiny_lm
    wrapped = _NeedsExtraInput(model)

    def collate(encoded, pad_id):  # what a multimodal adapter does with pixel_values
        batch = lm.collate(encoded, pad_id)
        batch["extra"] = torch.zeros(len(encoded))
        return batch

    adapter = SimpleNamespace(prepare_tokenizer=lm.prepare_tokenizer, encode_item=lm.encode_item, collate=collate,
                              to_device=lm.to_device, model_device=lm.model_device)
    items = tiny_items()
    for name in ("GradDiff", "NPO", "UNDIAL"):
        wrapped.seen.clear()
        result = unlearn(wrapped, tok, items[:2], items[2:], name, TrainConfig(max_steps=1, batch_size=2),
                         adapter=adapter)
        assert result.history and wrapped.seen, name  # the extra input reached every forward pass


@pytest.mark.slow  # a fresh interpreter that imports a family's whole path: 10-25 s on 2 cores; the static
# import check (test_no_family_file_imports_...) stays in the default suite
def test_vision_language_unlearning_and_evaluation_load_nothing_of_another_family_but_what_they_reuse(tmp_path):
    """The vision-language family runs the language-model loop and methods through its own adapter (its row's
    `reuses`), and nothing else of another family: unlearning and MLLMU-Bench's evaluation load no language-model
    adapter (`causal_lm`: the text scoring they share is `sequences.py`'s), runner or demo, nothing of diffusers."""
    modules = _run_and_list_modules(f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from vlm_models import tiny_llava
from obliviate.worlds.portraits import portraits_data
from obliviate.runners.mllm import evaluation_of, load_model
from obliviate.methods.common import make_method
from obliviate.config import build_config
from obliviate.evals.mllmu import compare_to_retrain
from obliviate.loops.lm import unlearn
from obliviate.models.vlm import VisionLanguageAdapter
from obliviate.registry import METHODS
import numpy as np
data = portraits_data(10, 2, 2, seed=0)
folder = tiny_llava({str(tmp_path / "llava")!r}, data)
config = build_config({{"family": "mllm", "method": "NPO", "model": folder, "mllmu_dir": "unused",
                        "mllm": {{"max_new_tokens": 2}}}})
model, processor = load_model(folder, config, "cpu")
picture = lambda image: np.zeros((32, 32, 3), dtype=np.uint8)
adapter = VisionLanguageAdapter(processor, picture)
forget = data.train[data.people[0].name][:4]
retain = data.train[data.people[1].name][:4]
from obliviate.config import TrainConfig
unlearn(model, processor.tokenizer, forget, retain, make_method("mllm", "NPO"), TrainConfig(max_steps=1, batch_size=2),
        adapter=adapter)
for entry in METHODS["mllm"].values():  # every method a vision-language run may name
    entry.load()
result = evaluation_of(model, processor, {{"forget": forget[:2], "holdout": retain[:2]}}, picture, config)
assert compare_to_retrain(result, result)["aggregate"]
""")
    assert not _loaded(modules, _foreign("mllm")), _loaded(modules, _foreign("mllm"))
    assert "obliviate.models.causal_lm" not in modules
    assert "obliviate.loops.lm" in modules and "obliviate.models.vlm" in modules and "obliviate.evals.mia" in modules


@pytest.mark.slow  # about 25 s on 2 cores (the run evaluates the unlearned and the original model)
def test_a_vision_language_run_from_the_cli_loads_no_language_model_adapter(tmp_path):
    """A whole `obliviate run` on a user's LLaVA with MLLMU-Bench's files (unlearning, evaluation of the run and of
    the original, the report) loads nothing of another family but the loop and methods it reuses."""
    from test_mllm_family import _profile, write_mllmu

    mllmu = write_mllmu(tmp_path / "mllmu", {"forget_10": [_profile(0)], "retain_90": [_profile(2), _profile(3)],
                                             "Retain_Set": [_profile(10)], "Test_Set": [_profile(0, test=True)]})
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'family = "mllm"\nmethod = "NPO"\nmodel = "{tmp_path / "llava"}"\nmllmu_dir = "{mllmu}"\n'
                   f'output_dir = "{tmp_path / "runs"}"\nname = "npo"\n[train]\nmax_steps = 1\nbatch_size = 2\n'
                   f'[mllm]\nmax_new_tokens = 2\n[world]\ncache_dir = "{tmp_path / "cache"}"\n')
    modules = _run_and_list_modules(f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from vlm_models import tiny_llava
from obliviate.worlds.portraits import portraits_data
tiny_llava({str(tmp_path / "llava")!r}, portraits_data(10, 2, 2, seed=0))
from obliviate.cli import app
sys.argv = ["obliviate", "run", {str(cfg)!r}, "--quiet"]
try:
    app()
except SystemExit as e:
    assert not e.code, e.code
""")
    assert json.loads((tmp_path / "runs" / "npo" / "metrics.json").read_text())["forget_classification_image"] is not None
    assert not _loaded(modules, _foreign("mllm")), _loaded(modules, _foreign("mllm"))
    assert "obliviate.models.causal_lm" not in modules


def test_the_cli_and_the_api_branch_on_no_family_or_world_name():
    """cli.py and api.py look families and worlds up (families.py, the worlds' table); no comparison in them names
    one."""
    names = {*FAMILIES, *(w for f in FAMILIES.values() for w in f.worlds)}
    for file in ("cli.py", "api.py"):
        for node in ast.walk(ast.parse((SRC / file).read_text())):
            if isinstance(node, (ast.Compare, ast.Match)):
                named = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in names}
                assert not named, f"{file}:{node.lineno} compares with {sorted(named)}"


def test_world_build_goes_through_the_worlds_table(monkeypatch):
    from typer.testing import CliRunner

    import obliviate.worlds
    from obliviate.cli import app

    built = []

    class Built:
        root = Path("/cache/world")

    monkeypatch.setattr(obliviate.worlds, "build_world",
                        lambda config, split: built.append((config.name, config.seed, split)) or Built())
    for name in ("canvas", "profiles"):
        r = CliRunner().invoke(app, ["world", "build", name, "--seed", "3", "--quiet"])
        assert r.exit_code == 0 and "world ready: /cache/world" in r.output, r.output
    assert built == [("canvas", 3, None), ("profiles", 3, None)]


def test_the_config_imports_no_world_recipe():
    """cache_root and the recipe-key checks live in obliviate.worlds; the config calls them and imports no world's
    training code (a recipe is imported only to check `world.model`'s keys)."""
    from obliviate.worlds import RECIPES, cache_root

    imported = {i for i in _imports(SRC / "config.py") if i.startswith("obliviate.worlds")}
    assert imported <= {"obliviate.worlds", "obliviate.worlds.cache_root", "obliviate.worlds.check_recipe_keys",
                        "obliviate.worlds.check_variant_settings"}
    assert set(RECIPES) == {w for f in FAMILIES.values() for w in f.worlds}
    assert cache_root("/x") == Path("/x")
    for world, key in (("profiles", "num_layers"), ("canvas", "unet_steps"), ("portraits", "vision_layers")):
        with pytest.raises(ObliviateError, match=rf"world.model: unknown recipe key\(s\) \['nope'\]; valid: .*{key}"):
            build_config({"method": "GradDiff" if world != "canvas" else "UCE", "world": {"name": world, "model": {
                "nope": 1}}, **({"concept": "star"} if world == "canvas" else {})})
        assert build_config({"method": "GradDiff" if world != "canvas" else "UCE", "world": {"name": world, "model": {
            key: 2}}, **({"concept": "star"} if world == "canvas" else {})}).world.model == {key: 2}
