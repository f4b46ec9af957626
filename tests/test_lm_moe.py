"""Mixture-of-experts language models: a tiny Mixtral folder saved and loaded as a user's would be, the existing methods
through the loop on it, UOE (the affinity score, the anchor loss, only the chosen expert and its router trained, a
dense model refused), the routing statistics, and the profiles world's MoE variant."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_items, tiny_texts
from obliviate.errors import ObliviateError
from obliviate.models import causal_lm as lm
from obliviate.models import moe
from obliviate.models import sequences


def _batch(tok, items, answer=None):
    return lm.collate([lm.encode_qa(tok, i.question, answer if answer is not None else i.answer) for i in items],
                      tok.pad_token_id)


def _batches(tok):
    items = tiny_items()
    forget = _batch(tok, items[:3])
    forget["idk"] = _batch(tok, items[:3], "I don't know.")
    return forget, _batch(tok, items[3:])


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory):
    """A 2-layer Mixtral (4 experts, 2 per token) with conftest's tokenizer recipe, saved with save_pretrained."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from obliviate.worlds.tokenizer import train_tokenizer

    corpus = [f"Question: {i.question}\nAnswer: {i.answer} {i.paraphrased_answer}" for i in tiny_items()]
    tokenizer = train_tokenizer((corpus + [t.text for t in tiny_texts()] + ["I don't know."]) * 4, vocab_size=300)
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                           num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny_moe")
    MixtralForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained_moe(tiny_moe_dir):
    """The tiny Mixtral fitted on the six answers, so that there is something to forget."""
    model, tok = lm.load(tiny_moe_dir)
    data = _batch(tok, tiny_items())
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        sequences.mean_nll(model, data).backward()
        opt.step()
    return model.eval(), tok


def _uoe(**config):
    from obliviate.methods.lm.uoe import UOE, UOEConfig

    return UOE(UOEConfig(**config))


# ---- the adapter ------------------------------------------------------------------------------------------------------

def test_tiny_moe_folder_saves_loads_and_is_recognised(tiny_moe_dir):
    from transformers import OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    model, tok = lm.load(tiny_moe_dir)
    assert type(model).__name__ == "MixtralForCausalLM"
    layers = moe.moe_layers(model)
    assert [(l.name, l.num_experts, l.top_k) for l in layers] == [("model.layers.0.mlp", 4, 2),
                                                                 ("model.layers.1.mlp", 4, 2)]
    assert [n for n, _ in layers[1].expert_tensors()] == ["model.layers.1.mlp.experts.gate_up_proj",
                                                         "model.layers.1.mlp.experts.down_proj"]
    assert lm.generate(model, tok, [lm.question_prompt(tok, tiny_items()[0].question)], max_new_tokens=3)
    # the other transformers MoE classes are built the same way (a shared expert is no routed expert)
    from transformers import AutoModelForCausalLM
    small = dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                 num_experts=3, num_experts_per_tok=2, eos_token_id=1, bos_token_id=0, pad_token_id=0)
    for config in (OlmoeConfig(intermediate_size=8, **small),
                   Qwen2MoeConfig(moe_intermediate_size=8, shared_expert_intermediate_size=8, **small),
                   Qwen3MoeConfig(moe_intermediate_size=8, head_dim=8, **small)):
        found = moe.moe_layers(AutoModelForCausalLM.from_config(config))
        assert [(l.num_experts, l.top_k, len(l.expert_tensors())) for l in found] == [(3, 2, 2)], config


def test_existing_methods_run_through_the_loop_on_an_moe_folder(trained_moe):
    """GradDiff and NPO through the unlearning loop: finite losses, forget NLL up. The router's load-balancing loss
    never enters: a method's loss is the same whether the model computes it (output_router_logits) or not."""
    from obliviate.config import LMTrainConfig
    from obliviate.loops.lm import unlearn
    from obliviate.methods.common import make_method

    base, tok = trained_moe
    forget, retain = _batches(tok)
    items = tiny_items()
    for name in ("GradDiff", "NPO"):
        model = copy.deepcopy(base)
        with torch.no_grad():
            nll_before = float(sequences.mean_nll(model, forget))
        result = unlearn(model, tok, items[:3], items[3:], name,
                         LMTrainConfig(max_steps=3, lr=1e-2, batch_size=3))
        assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
        with torch.no_grad():
            assert float(sequences.mean_nll(result.model, forget)) > nll_before, name
    method = make_method("lm", "GradDiff")
    model = copy.deepcopy(base)
    plain = method.losses(model, None, forget, retain).total
    model.config.output_router_logits = True
    assert torch.equal(method.losses(model, None, forget, retain).total, plain)


# ---- UOE --------------------------------------------------------------------------------------------------------------

def _router_probs_by_hand(model, batch):
    """Each MoE layer's router softmax on the real tokens, from transformers' own output_router_logits."""
    with torch.no_grad():
        out = model(**sequences.model_inputs(batch), output_router_logits=True)
    real = batch["attention_mask"].reshape(-1).bool()
    return [torch.softmax(logits.float(), -1)[real] for logits in out.router_logits]


def test_affinity_score_and_choice_by_hand(trained_moe):
    from obliviate.methods.lm.uoe import affinity_scores, choose_expert

    model, tok = trained_moe
    forget, _ = _batches(tok)
    halves = [{k: v[:2] for k, v in forget.items() if k != "idk"}, {k: v[2:] for k, v in forget.items() if k != "idk"}]
    probs = [torch.cat(p) for p in zip(*(_router_probs_by_hand(model, b) for b in halves))]
    by_hand = torch.stack([p.mean(0) for p in probs])  # [layers, experts]: mean gating score over the forget tokens
    counts = moe.routing_counts(model, halves)
    scores = affinity_scores(counts["probability"], counts["tokens"])
    torch.testing.assert_close(scores.float(), by_hand, rtol=1e-5, atol=1e-6)
    assert float(counts["tokens"]) == float(forget["attention_mask"].sum())
    table = torch.tensor([[0.30, 0.20, 0.25, 0.25], [0.10, 0.45, 0.40, 0.05]])
    assert choose_expert(table) == (1, 1)
    assert choose_expert(table, layer=0) == (0, 0)
    assert choose_expert(table, expert=3) == (1, 3)
    method = _uoe()
    method.setup(model, None)
    method.fit(model, [], iter(halves), iter([]))
    assert method.choice == choose_expert(by_hand)


def test_anchor_loss_by_hand():
    from obliviate.methods.lm.uoe import anchor_loss

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0], [0.0, 0.0, 3.0]])
    batch = {"input_ids": torch.zeros(2, 2, dtype=torch.long), "attention_mask": torch.tensor([[1, 1], [1, 0]])}
    p = torch.softmax(logits, -1)
    target = torch.tensor([0.0, 1.0, 0.0])
    per_token = ((target - p) ** 2).mean(-1)
    expected = per_token[:3].mean()  # the padding token (row 1, position 1) is left out
    assert float(anchor_loss(logits, 1, batch)) == pytest.approx(float(expected), rel=1e-6)
    # the reference's torch.nn.functional.mse_loss(one_hot, softmax) on the same real tokens
    ref = torch.nn.functional.mse_loss(target.expand(3, 3), p[:3])
    assert float(anchor_loss(logits, 1, batch)) == pytest.approx(float(ref), rel=1e-6)


def test_uoe_anchor_comes_from_the_bases_forward_pass_and_reaches_the_router(trained_moe):
    model, tok = trained_moe
    model = copy.deepcopy(model)
    forget, retain = _batches(tok)
    method = _uoe(layer=1, expert=2, anchor_weight=0.5)
    method.setup(model, None)
    method.fit(model, [], iter([forget]), iter([retain]))
    assert method.choice == (1, 2)
    from obliviate.methods.lm.base import Method
    chosen = method.chosen()  # the run's record (routing.json's unlearned_expert); other methods choose nothing
    assert (chosen["layer"], chosen["expert"], chosen["name"]) == (1, 2, "model.layers.1.mlp") and Method().chosen() is None
    assert len(chosen["affinity"]) == 2 and all(sum(row) == pytest.approx(1, abs=1e-4) for row in chosen["affinity"])
    from obliviate.methods.lm.uoe import anchor_loss

    full = torch.zeros(forget["input_ids"].numel(), 4)  # router log-probs on the real tokens, padding left at 0
    full[forget["attention_mask"].reshape(-1).bool()] = torch.log(_router_probs_by_hand(model, forget)[1])
    expected = float(anchor_loss(full, 2, forget))
    parts = method.losses(model, None, forget, retain)
    assert parts.logs["anchor_loss"] == pytest.approx(expected, rel=1e-5)
    ga = float(-sequences.mean_nll(model, forget).detach())  # the base: GradAscent
    assert float(parts.forget.detach()) == pytest.approx(ga + 0.5 * expected, rel=1e-5)
    router = dict(model.named_parameters())["model.layers.1.mlp.gate.weight"]
    (grad,) = torch.autograd.grad(parts.forget, [router])
    assert grad.abs().sum() > 0
    # a base whose forward pass is not recognised (here: the embedding hook never sees it) gets one more pass
    fallback = _uoe(layer=1, expert=2, anchor_weight=0.5)
    fallback.setup(model, None)
    fallback.fit(model, [], iter([forget]), iter([retain]))
    model.get_input_embeddings = lambda: torch.nn.Identity()
    assert fallback.losses(model, None, forget, retain).logs["anchor_loss"] == pytest.approx(expected, rel=1e-5)


def test_uoe_changes_only_the_chosen_expert_and_its_router(trained_moe):
    """Through the loop with AdamW's weight decay: the router of the chosen layer and the slice of the chosen expert
    change; every other tensor and every other expert's slice stays bit for bit."""
    from obliviate.config import LMTrainConfig
    from obliviate.loops.lm import unlearn

    base, tok = trained_moe
    model = copy.deepcopy(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    items = tiny_items()
    forget, _ = _batches(tok)
    with torch.no_grad():
        nll_before = float(sequences.mean_nll(model, forget))
    method = _uoe(base="GradDiff")
    result = unlearn(model, tok, items[:3], items[3:], method,
                     LMTrainConfig(max_steps=4, lr=5e-2, batch_size=3, weight_decay=0.1))
    layer, expert = method.choice
    prefix = f"model.layers.{layer}.mlp"
    trained = {f"{prefix}.gate.weight", f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"}
    assert set(result.trainable_names) == trained
    after = dict(result.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed == trained, changed
    for name in trained - {f"{prefix}.gate.weight"}:
        others = [e for e in range(4) if e != expert]
        assert torch.equal(before[name][others], after[name].detach()[others])
        assert not torch.equal(before[name][expert], after[name].detach()[expert])
    assert all(p.requires_grad for p in result.model.parameters())  # given back trainable
    assert all(torch.isfinite(torch.tensor(h["anchor_loss"])) for h in result.history)
    with torch.no_grad():
        assert float(sequences.mean_nll(result.model, forget)) > nll_before


def test_uoe_refuses_a_dense_model_lora_and_bad_settings_in_one_line(tiny_lm):
    from obliviate.config import LMTrainConfig, LoraConfig
    from obliviate.loops.lm import unlearn

    model, tok = tiny_lm
    items = tiny_items()
    with pytest.raises(ObliviateError) as e:
        unlearn(model, tok, items[:2], items[2:], "UOE", LMTrainConfig(max_steps=1))
    assert "UOE needs a mixture-of-experts model" in str(e.value) and "LlamaForCausalLM is dense" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ObliviateError, match="anchor_weight"):
        _uoe(anchor_weight=-1)
    with pytest.raises(ObliviateError, match="base='UOE' is not valid"):
        _uoe(base="UOE")
    with pytest.raises(ObliviateError, match="layer must be an integer"):
        _uoe(layer="first")
    pytest.importorskip("peft")
    with pytest.raises(ObliviateError, match="without \\[lora\\]"):
        unlearn(model, tok, items[:2], items[2:], "UOE", LMTrainConfig(max_steps=1),
                lora=LoraConfig(target_modules=["q_proj"]))


def test_uoe_layer_out_of_range_names_the_blocks(trained_moe):
    model, _ = trained_moe
    with pytest.raises(ObliviateError, match=r"layer=5 is out of range: the model has 2 sparse blocks"):
        _uoe(layer=5).setup(model, None)


# ---- routing statistics -----------------------------------------------------------------------------------------------

def test_routing_statistics_by_hand(trained_moe, tiny_lm, tmp_path):
    from obliviate.evals.routing import routing_metrics, routing_record, routing_shares, write_routing

    model, tok = trained_moe
    items = tiny_items()
    shares = routing_shares(model, tok, {"forget": items[:2], "retain": items[2:]}, batch_size=4)
    batch = lm.collate([lm.encode_item(tok, i) for i in items[:2]], tok.pad_token_id)
    for layer, probs in enumerate(_router_probs_by_hand(model, batch)):
        chosen = probs.topk(2, dim=-1).indices.reshape(-1)
        by_hand = torch.bincount(chosen, minlength=4).float() / chosen.numel()
        torch.testing.assert_close(torch.tensor(shares["sets"]["forget"]["share"][layer]), by_hand, atol=1e-6,
                                   rtol=0)
        torch.testing.assert_close(torch.tensor(shares["sets"]["forget"]["probability"][layer]), probs.mean(0),
                                   atol=1e-5, rtol=0)
    assert shares["sets"]["forget"]["tokens"] == int(batch["attention_mask"].sum())
    moved = copy.deepcopy(shares)
    moved["sets"]["forget"]["share"][0] = [1.0, 0.0, 0.0, 0.0]
    record = routing_record(shares, moved, {"layer": 0, "expert": 0, "name": "model.layers.0.mlp"})
    expected = 0.5 * sum(abs(a - b) for a, b in zip([1.0, 0, 0, 0], shares["sets"]["forget"]["share"][0]))
    assert record["shift"]["forget"][0] == pytest.approx(expected, abs=1e-6)
    assert record["shift"]["retain"] == [0.0, 0.0]
    assert routing_metrics(record) == {"forget_routing_shift": pytest.approx(expected / 2, abs=1e-6),
                                       "retain_routing_shift": 0.0}  # the mean over the 2 sparse blocks
    notes = write_routing(tmp_path, record)
    assert (tmp_path / "routing.json").is_file() and (tmp_path / "routing.png").stat().st_size > 1000
    assert any("unlearned expert: 0 of sparse block 0" in n for n in notes)
    assert routing_shares(*tiny_lm, {"forget": items[:1]}) is None  # a dense model has no routing



# ---- the profiles world's MoE variant ---------------------------------------------------------------------------------

TINY_WORLD = dict(n_people=10, n_holdout=2, general_facts=5,
                  model=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, vocab_size=400,
                             epochs=1))


def test_moe_world_has_its_own_key_and_the_dense_keys_never_change(tmp_path):
    """The dense worlds' cache keys are frozen (their builds take hours); `arch = "moe"` is a key of its own, and a
    dense config dumps as it did before `arch` existed (run records and bench cell keys unchanged)."""
    from obliviate.config import WorldConfig, build_config
    from obliviate.worlds.profiles import ProfilesWorld
    from obliviate.worlds.train import MoERecipe, recipe_of

    assert ProfilesWorld(WorldConfig()).key() == "369f9322551e"
    assert ProfilesWorld(WorldConfig(**TINY_WORLD)).key() == "1e0e40d9ca91"
    moe_world = ProfilesWorld(WorldConfig(arch="moe", **TINY_WORLD))
    assert moe_world.key() != "1e0e40d9ca91" and moe_world.recipe()["arch"] == "moe"
    assert moe_world.recipe()["model"]["num_experts"] == 4 and isinstance(recipe_of(moe_world.config), MoERecipe)
    assert "arch" not in build_config({"method": "NPO"}).dump()["world"]
    assert build_config({"method": "UOE", "world": {"arch": "moe"}}).dump()["world"]["arch"] == "moe"
    with pytest.raises(ObliviateError, match="world.arch = 'moe' is not a variant of the canvas world"):
        build_config({"method": "ESD", "world": {"name": "canvas", "arch": "moe"}})
    with pytest.raises(ObliviateError, match=r"unknown recipe key\(s\) \['num_expert'\]"):
        build_config({"method": "UOE", "world": {"arch": "moe", "model": {"num_expert": 8}}})
    with pytest.raises(ObliviateError, match="num_experts"):  # a dense world's recipe has no experts
        build_config({"method": "NPO", "world": {"model": {"num_experts": 8}}})


@pytest.mark.slow
def test_tiny_moe_world_builds_and_uoe_runs_with_the_routing_figure(tmp_path):
    """The shrunken MoE world (its full and retrain models: Mixtral folders), then `obliviate run` of UOE and of
    GradDiff on it: each run folder holds routing.json and routing.png, UOE's names the expert it unlearned and
    changed only that expert's slice and its router."""
    import json

    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from conftest import tiny_profiles_config
    from obliviate.cli import app
    from obliviate.config import load_config
    from obliviate.worlds.profiles import ProfilesWorld

    cfg = tiny_profiles_config(tmp_path, max_steps=3)
    cfg.write_text(cfg.read_text().replace("  n_people: 10\n", "  n_people: 10\n  arch: moe\n")
                   .replace("intermediate_size: 64", "intermediate_size: 16"))
    runner = CliRunner()
    for method in ("UOE", "GradDiff"):
        r = runner.invoke(app, ["run", str(cfg), "--quiet", f"method={method}", f"name={method.lower()}"])
        assert r.exit_code == 0, r.output
    world = ProfilesWorld(load_config(cfg).world)
    assert world.root.name.startswith("profiles-") and world.root.name != "profiles-1e0e40d9ca91"
    for folder in (world.full_model_dir, world.retrain_dir("forget10")):
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["MixtralForCausalLM"] and config["output_router_logits"] is False
    for name in ("uoe", "graddiff"):
        run = tmp_path / "runs" / name
        record = json.loads((run / "routing.json").read_text())
        assert set(record["before"]["sets"]) == {"forget", "retain"} and len(record["shift"]["forget"]) == 2
        assert (run / "routing.png").stat().st_size > 1000 and "routing" in (run / "report.html").read_text()
        metrics = json.loads((run / "metrics.json").read_text())  # the declared metrics: the shifts' means
        for kind in ("forget", "retain"):
            assert metrics[f"{kind}_routing_shift"] == pytest.approx(sum(record["shift"][kind]) / 2, abs=1e-6)
    unlearned = json.loads((tmp_path / "runs" / "uoe" / "routing.json").read_text())["unlearned_expert"]
    prefix = f"model.layers.{unlearned['layer']}.mlp"
    changed = load_file(str(tmp_path / "runs" / "uoe" / "changed.safetensors"))
    assert set(changed) == {f"{prefix}.gate.weight", f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"}
    assert "unlearned_expert" not in json.loads((tmp_path / "runs" / "graddiff" / "routing.json").read_text())


def test_world_build_refuses_an_unknown_arch_in_one_line():
    from typer.testing import CliRunner

    from conftest import one_line_error
    from obliviate.cli import app

    one_line_error(CliRunner().invoke(app, ["world", "build", "canvas", "--arch", "moe"]), "--arch 'moe'")
    one_line_error(CliRunner().invoke(app, ["world", "build", "profiles", "--arch", "sparse"]), "--arch 'sparse'")


def test_uoe_on_a_qwen3_moe_whose_experts_come_before_the_router(tiny_moe_dir):
    """Qwen3-MoE lists a block's expert tensors before its router: the mask follows the model's order."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from obliviate.config import LMTrainConfig
    from obliviate.loops.lm import unlearn

    tok = lm.load_tokenizer(tiny_moe_dir)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, num_experts=3, num_experts_per_tok=2,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))
    names = [n for n, _ in model.named_parameters() if ".layers.0.mlp." in n]
    assert names.index("model.layers.0.mlp.gate.weight") > names.index("model.layers.0.mlp.experts.down_proj")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = _uoe(layer=0, expert=1)
    items = tiny_items()
    unlearn(model, tok, items[:2], items[2:], method, LMTrainConfig(max_steps=2, lr=5e-2, batch_size=2))
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed == {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj",
                       "model.layers.0.mlp.experts.down_proj"}
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        assert torch.equal(before[name][[0, 2]], after[name].detach()[[0, 2]])


@pytest.mark.parametrize("base", ["NPO", "RMU", "IdkPO"])
def test_uoe_over_other_bases(trained_moe, base):
    """UOE wraps any base: the base's reference model and setup (RMU's direction) are kept, the anchor is taken in
    its forward pass of the forget batch, and only the chosen tensors train."""
    from obliviate.config import LMTrainConfig
    from obliviate.loops.lm import unlearn

    model, tok = trained_moe
    model = copy.deepcopy(model)
    method = _uoe(base=base)
    assert method.needs_reference == method.base.needs_reference
    items = tiny_items()
    result = unlearn(model, tok, items[:3], items[3:], method, LMTrainConfig(max_steps=2, lr=1e-2, batch_size=3))
    assert len(result.trainable_names) == 3 and all(h["anchor_loss"] >= 0 for h in result.history)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
