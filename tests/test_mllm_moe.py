"""UOE and the routing record on a vision-language model whose language model is a mixture of experts: a tiny LLaVA
over a Mixtral (4 experts, 2 per token) saved with save_pretrained as a user's folder, run as `obliviate run` runs it
on MLLMU-Bench's files; only the chosen expert's slices and its router under model.language_model change, the routing
before and after (pictures' tokens routed with the text's) lands in the run folder and its metrics; a dense LLaVA
given UOE is refused in one line."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from obliviate.errors import ObliviateError


@pytest.fixture(scope="module")
def llava_moe_dir(tmp_path_factory):
    """tests/vlm_models.py's tiny LLaVA with a Mixtral language model (4 experts, 2 per token)."""
    from vlm_models import tiny_llava

    from obliviate.worlds.portraits import portraits_data

    return tiny_llava(tmp_path_factory.mktemp("llava_moe") / "model", portraits_data(10, 2, 2, seed=0), moe=True)


@pytest.fixture(scope="module")
def mllmu_dir(tmp_path_factory):
    from test_mllm_family import write_mllmu

    return write_mllmu(tmp_path_factory.mktemp("mllmu"))


def _files(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


def _config(model, mllmu, out, method="UOE", evaluate=False, **args):
    from obliviate.config import build_config

    return build_config({"family": "mllm", "method": method, "model": str(model), "method_args": args,
                         "mllmu_dir": str(mllmu), "split": "forget10", "evaluate": evaluate,
                         "train": {"max_steps": 2, "batch_size": 2, "lr": 5e-2},
                         "mllm": {"max_new_tokens": 2}, "world": {"cache_dir": str(out / "cache")},
                         "output_dir": str(out / "runs"), "name": "r"})


def test_llava_over_mixtral_has_its_sparse_blocks_and_uoe_anchors_in_the_bases_pass(llava_moe_dir, mllmu_dir):
    """The sparse blocks are found under model.language_model (top-k from the text config when the router does not
    say it); UOE's anchor is taken in the base's own forward pass of a forget batch with pictures (one pass of the
    vision tower, not a second one) and equals the anchor of the router logits recorded by hand."""
    from obliviate.benchmark_files import load_mllmu
    from obliviate.methods.lm.uoe import UOE, UOEConfig, anchor_loss
    from obliviate.models import moe, sequences, vlm

    model, processor = vlm.load(llava_moe_dir)
    layers = moe.moe_layers(model)
    assert [(l.name, l.num_experts, l.top_k) for l in layers] == [(f"model.language_model.layers.{i}.mlp", 4, 2)
                                                                 for i in (0, 1)]
    names = dict(model.named_parameters())
    assert all(n in names for l in layers for n in [l.router_weight_name] + [t for t, _ in l.expert_tensors()])
    del layers[0].router.top_k
    assert moe.moe_layers(model)[0].top_k == 2  # LlavaConfig has no num_experts_per_tok: its text_config has
    layers[0].router.top_k = 2

    data = load_mllmu(mllmu_dir, "forget10")
    adapter = vlm.VisionLanguageAdapter(processor, data.picture)
    tok = processor.tokenizer
    forget = adapter.collate([adapter.encode_item(tok, i) for i in data.forget], tok.pad_token_id)
    retain = adapter.collate([adapter.encode_item(tok, i) for i in data.retain[:2]], tok.pad_token_id)
    assert forget["pixel_values"].shape[0] == 2
    method = UOE(UOEConfig(layer=1, expert=3))
    method.setup(model, None)
    method.fit(model, [], iter([forget]), iter([retain]))
    passes = []
    handle = model.model.vision_tower.register_forward_hook(lambda *_: passes.append(1))
    try:
        parts = method.losses(model, None, forget, retain)
    finally:
        handle.remove()
    assert len(passes) == 1  # the base's (GradAscent) forward pass of the forget batch, the anchor recorded in it
    with torch.no_grad(), moe.recorded_router_logits([method.layers[1]]) as record:
        model(**sequences.model_inputs(forget))
    expected = float(anchor_loss(record[1][0], 3, forget))
    assert parts.logs["anchor_loss"] == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        ga = -float(sequences.mean_nll(model, forget))  # the base: GradAscent
    assert float(parts.forget.detach()) == pytest.approx(ga + expected, rel=1e-5)


@pytest.mark.slow  # 4-7 s: the default suite is at its 5 minutes
def test_uoe_runs_on_a_users_llava_over_mixtral(tmp_path, llava_moe_dir, mllmu_dir):
    """`obliviate run` of UOE (over GradDiff) on the LLaVA folder and MLLMU-Bench's files: the changed tensors are the
    chosen block's router and fused expert tensors under model.language_model, in which only the chosen expert's slice
    moved; routing.json (the pictures' tokens routed too) and routing.png are written; the base folder is untouched."""
    from safetensors.torch import load_file

    from obliviate.benchmark_files import load_mllmu
    from obliviate.models import vlm
    from obliviate.runners import run

    files = _files(llava_moe_dir)
    base = {k: v.clone() for k, v in vlm.load(llava_moe_dir)[0].state_dict().items()}
    out = run(_config(llava_moe_dir, mllmu_dir, tmp_path, base="GradDiff"))
    record = json.loads((out / "routing.json").read_text())
    chosen = record["unlearned_expert"]
    block = f"model.language_model.layers.{chosen['layer']}.mlp"
    assert chosen["name"] == block
    changed = load_file(out / "changed.safetensors")
    assert set(changed) == {f"{block}.gate.weight", f"{block}.experts.gate_up_proj", f"{block}.experts.down_proj"}
    assert not torch.equal(changed[f"{block}.gate.weight"], base[f"{block}.gate.weight"])
    others = [e for e in range(4) if e != chosen["expert"]]
    for name in (f"{block}.experts.gate_up_proj", f"{block}.experts.down_proj"):
        assert torch.equal(changed[name][others], base[name][others]), name  # every other expert bit for bit
        assert not torch.equal(changed[name][chosen["expert"]], base[name][chosen["expert"]]), name
    assert _files(llava_moe_dir) == files  # the user's folder untouched

    assert record["before"]["layers"] == record["after"]["layers"] == [f"model.language_model.layers.{i}.mlp"
                                                                       for i in (0, 1)]
    data = load_mllmu(mllmu_dir, "forget10")
    processor = vlm.load_processor(llava_moe_dir)
    adapter = vlm.VisionLanguageAdapter(processor, data.picture)
    encoded = [adapter.encode_item(processor.tokenizer, i) for i in data.forget]
    assert all(e.pixel_values is not None for e in encoded)
    # every token of the forget items as trained, the picture's image tokens among them
    assert record["before"]["sets"]["forget"]["tokens"] == sum(len(e.input_ids) for e in encoded)
    assert record["before"]["sets"]["forget"]["items"] == len(data.forget)
    assert set(record["shift"]) == {"forget", "retain"} and all(len(s) == 2 for s in record["shift"].values())
    assert (out / "routing.png").stat().st_size > 1000
    report = (out / "report.html").read_text()
    assert "each expert&#x27;s share of the tokens" in report or "each expert's share of the tokens" in report
    assert f"unlearned expert: {chosen['expert']} of sparse block {chosen['layer']}" in report


@pytest.mark.slow  # MLLMU-Bench's evaluation of the unlearned and the original model: ~10 s on 2 cores
def test_a_vision_language_moe_run_puts_the_routing_shift_in_its_metrics(tmp_path, llava_moe_dir, mllmu_dir):
    from obliviate.evals.routing import routing_metrics
    from obliviate.registry import undeclared
    from obliviate.runners import run

    out = run(_config(llava_moe_dir, mllmu_dir, tmp_path, method="GradDiff", evaluate=True))
    metrics = json.loads((out / "metrics.json").read_text())
    record = json.loads((out / "routing.json").read_text())
    assert "unlearned_expert" not in record  # GradDiff chooses no expert
    assert record["shift"]["forget"] != [0.0, 0.0]  # the whole language model trained: the routers moved
    for kind in ("forget", "retain"):
        assert metrics[f"{kind}_routing_shift"] == pytest.approx(sum(record["shift"][kind]) / 2, abs=1e-6)
    assert routing_metrics(record) == {k: metrics[k] for k in ("forget_routing_shift", "retain_routing_shift")}
    assert undeclared({k: metrics[k] for k in ("forget_routing_shift", "retain_routing_shift")}, "mllm") == []
    assert metrics["forget_classification_image"] is not None


def test_uoe_on_a_dense_llava_or_a_frozen_language_model_is_refused_in_one_line(tmp_path, llava_dir, llava_moe_dir,
                                                                               mllmu_dir):
    from obliviate.runners import run

    files = _files(llava_dir)
    with pytest.raises(ObliviateError) as e:
        run(_config(llava_dir, mllmu_dir, tmp_path))
    message = str(e.value)
    assert "UOE needs a mixture-of-experts model" in message and "\n" not in message
    assert "LlavaForConditionalGeneration's language model (llama) is dense" in message
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # nothing half-written
    assert _files(llava_dir) == files
    config = _config(llava_moe_dir, mllmu_dir, tmp_path)
    config.mllm.train_parts = ["vision"]  # the experts and routers frozen: refused before anything is loaded
    with pytest.raises(ObliviateError, match=r"^UOE trains one expert of the language model and its router: "
                                             r"mllm.train_parts \['vision'\] must include 'language'$"):
        run(config)
    assert not runs.exists() or not any(runs.iterdir())
