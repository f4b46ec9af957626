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

import obliviate
from obliviate.config import build_config
from obliviate.errors import ObliviateError
from obliviate.families import FAMILIES

SRC = Path(obliviate.__file__).parent
LM_ONLY = ("obliviate.models.causal_lm", "obliviate.loops.lm", "obliviate.runners.lm", "obliviate.runners.lm_checks",
           "obliviate.methods.lm", "obliviate.demo.lm", "obliviate.runners.lm_attack", "obliviate.attacks.lm")
T2I_ONLY = ("obliviate.models.diffusion", "obliviate.loops.t2i", "obliviate.runners.t2i", "obliviate.runners.t2i_checks",
            "obliviate.methods.t2i", "obliviate.demo.t2i", "obliviate.runners.t2i_attack", "obliviate.attacks.t2i",
            "diffusers")
MLLM_ONLY = ("obliviate.models.vlm", "obliviate.runners.mllm", "obliviate.runners.mllm_checks", "obliviate.methods.mllm",
             "obliviate.demo.mllm", "obliviate.evals.mllmu")
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


def test_a_text_to_image_run_from_the_cli_loads_nothing_of_the_language_model_family(tiny_pipeline_dir, tmp_path):
    from conftest import tiny_prompts

    forget, retain = tmp_path / "forget.txt", tmp_path / "retain.txt"
    forget.write_text("\n".join(p for p in tiny_prompts() if "striped" in p))
    retain.write_text("\n".join(p for p in tiny_prompts() if "striped" not in p))
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'method = "ESD-x"\nconcept = "striped"\nmodel = "{tiny_pipeline_dir}"\n'
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
    assert build_config({"method": "NPO"}).family == "lm"
    assert build_config({"method": "UCE", "concept": "star"}).family == "t2i"
    t2i = build_config({"method": "UCE", "concept": "star"})
    assert t2i.world.name == "canvas"
    explicit = build_config({"family": "t2i", "method": "RGD", "concept": "star"})
    assert explicit.method == "RGD" and explicit.family == "t2i"
    with pytest.raises(ObliviateError, match="concept is a text-to-image key"):
        build_config({"family": "lm", "method": "NPO", "concept": "star"})
    with pytest.raises(ObliviateError, match="forget_file is a language model key"):
        build_config({"method": "UCE", "concept": "star", "forget_file": "f.jsonl"})
    with pytest.raises(ObliviateError, match="lora is a language model key"):
        build_config({"method": "ESD-x", "concept": "star", "lora": {"r": 4}})
    with pytest.raises(ObliviateError, match="world.name = 'profiles' is a language model world"):
        build_config({"method": "UCE", "concept": "star", "world": {"name": "profiles"}})
    with pytest.raises(ObliviateError, match="needs `concept`"):
        build_config({"family": "t2i", "method": "UCE"})
    with pytest.raises(ObliviateError, match="unknown text-to-image method 'NPO'"):
        build_config({"family": "t2i", "method": "NPO", "concept": "star"})
    # what a run records reads back to the same config, without the other family's keys
    for cfg in (t2i, build_config({"method": "NPO", "split": "forget05"})):
        dumped = cfg.dump()
        assert build_config(json.loads(json.dumps(dumped))) == cfg
        own = set(FAMILIES[cfg.family].fields)
        for other in FAMILIES.values():  # no key of another family, but those this one shares
            if other.name != cfg.family:
                assert not (set(other.fields) - own) & set(dumped), other.name


def test_an_older_run_record_with_every_key_at_its_default_still_reads():
    full = build_config({"method": "UCE", "concept": "star"}).model_dump()  # how runs were recorded before
    assert build_config(full).family == "t2i"


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
