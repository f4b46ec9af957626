"""DP2Unlearning (worlds/dp_train.py, worlds/profiles_dp2.py): stage 1 is real DP-SGD through Opacus with the ε its
accountant states; a deletion fine-tunes the stage-1 weights on the retained data only; a run records ε, δ and the
stages' costs; bad DP settings fail in one line naming the key; the plain world's cache key never moves."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error, tiny_items, tiny_profiles_config
from obliviate.errors import ObliviateError
from obliviate.worlds import world_of

pytest.importorskip("opacus")

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "vocab_size": 400,
              "epochs": 1}


def encoded_examples(tokenizer, n: int = 24):
    from obliviate.models import causal_lm as lm

    items = tiny_items()
    return [lm.encode_qa(tokenizer, items[i % len(items)].question, items[i % len(items)].answer) for i in range(n)]


def dp2_world(tmp_path, **dp2):
    from obliviate.config import WorldConfig

    return world_of(WorldConfig(n_people=10, n_holdout=2, general_facts=5, cache_dir=str(tmp_path),
                                                 model=TINY_MODEL, dp2=dp2 or {"epsilon": 8}))


# ---- stage 1: DP-SGD through Opacus ---------------------------------------------------------------------------------

@pytest.mark.parametrize("accountant,setting", [
    ("prv", {"noise_multiplier": 1.3}),
    pytest.param("rdp", {"epsilon": 6.0}, marks=pytest.mark.slow),  # Opacus's search for the noise: about 5 s
])
def test_the_dp_stage_trains_through_opacus_and_states_the_accountants_epsilon(tiny_lm, monkeypatch, accountant,
                                                                               setting):
    """Every step clips per sample and adds noise in Opacus's DPOptimizer; the ε reported is the one Opacus's
    accountant gives for the same noise, sample rate and steps (and a target ε is met)."""
    from opacus.accountants import PRVAccountant, RDPAccountant
    from opacus.optimizers import DPOptimizer

    from obliviate.worlds.dp_train import dp_recipe, train_dp
    from obliviate.worlds.train import LMRecipe

    model, tokenizer = tiny_lm
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = {"clip": 0, "noise": 0}
    for name, key in (("clip_and_accumulate", "clip"), ("add_noise", "noise")):
        original = getattr(DPOptimizer, name)

        def spy(self, *a, _original=original, _key=key, **k):
            calls[_key] += 1
            return _original(self, *a, **k)
        monkeypatch.setattr(DPOptimizer, name, spy)
    dp = dp_recipe({"delta": 1e-3, "accountant": accountant, **setting})
    recipe = LMRecipe(epochs=2, batch_size=6, lr=1e-3, seed=0)
    stats = train_dp(model, tokenizer, encoded_examples(tokenizer), recipe, dp)

    assert stats["steps"] == 2 * 4 and stats["sample_rate"] == pytest.approx(1 / 4)
    assert calls == {"clip": stats["steps"], "noise": stats["steps"]}
    direct = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    direct.history = [(stats["noise_multiplier"], stats["sample_rate"], stats["steps"])]
    assert stats["epsilon"] == pytest.approx(direct.get_epsilon(delta=1e-3), rel=1e-6)
    if "noise_multiplier" in setting:
        assert stats["noise_multiplier"] == 1.3
    else:  # the noise Opacus found reaches the target within its tolerance
        assert stats["epsilon"] == pytest.approx(6.0, abs=0.05) and stats["noise_multiplier"] > 0
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())  # an ordinary model again
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.filterwarnings("ignore:Full backward hook")  # the model's inputs are token ids
def test_opacus_per_sample_gradients_on_the_worlds_llama_are_exact(tiny_lm):
    """The world's model (Llama: tied embeddings, RMSNorm through functorch) gets true per-sample gradients from
    Opacus: their mean is the ordinary gradient of the batch's mean of per-example losses."""
    import copy

    from opacus import GradSampleModule

    from obliviate.models import sequences as seq

    model, tokenizer = tiny_lm
    batch = seq.collate(encoded_examples(tokenizer, 5), tokenizer.pad_token_id)
    plain = copy.deepcopy(model).train()
    wrapped = GradSampleModule(copy.deepcopy(model).train(), loss_reduction="mean")
    seq.answer_nll(plain, batch).mean().backward()
    seq.answer_nll(wrapped, batch).mean().backward()
    pairs = list(zip(wrapped._module.parameters(), plain.parameters()))
    assert pairs and all(p.grad_sample.shape[0] == 5 for p, _ in pairs)
    for p, q in pairs:
        torch.testing.assert_close(p.grad_sample.mean(0), q.grad, atol=1e-6, rtol=1e-4)


def test_an_empty_poisson_draw_is_a_noise_only_step_and_a_build_repeats(tiny_lm):
    """At a tiny sample rate most draws are empty: the step still runs (noise only), the accountant counts it. The
    sampling and the noise come from the recipe's seed: the same settings give the same weights."""
    import copy

    from obliviate.worlds.dp_train import dp_recipe, train_dp
    from obliviate.worlds.train import LMRecipe

    model, tokenizer = tiny_lm
    twin = copy.deepcopy(model)
    examples = encoded_examples(tokenizer, 12)
    recipe, dp = LMRecipe(epochs=1, batch_size=1, lr=1e-3), dp_recipe({"noise_multiplier": 1.0, "delta": 1e-3})
    stats = train_dp(model, tokenizer, examples, recipe, dp)
    assert stats["steps"] == 12 and stats["empty_batches"] > 0
    train_dp(twin, tokenizer, examples, recipe, dp)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


# ---- the world variant ------------------------------------------------------------------------------------------------

def test_the_dp2_variant_has_its_own_key_and_shares_the_plain_worlds_references(tmp_path):
    from obliviate.config import WorldConfig
    from obliviate.worlds.profiles import ProfilesWorld
    from obliviate.worlds.profiles_dp2 import DP2ProfilesWorld

    plain = world_of(WorldConfig(n_people=10, cache_dir=str(tmp_path), model=TINY_MODEL))
    world = dp2_world(tmp_path)
    assert type(plain) is ProfilesWorld and isinstance(world, DP2ProfilesWorld)
    assert plain.key() == ProfilesWorld(WorldConfig(n_people=10, cache_dir=str(tmp_path), model=TINY_MODEL)).key()
    assert world.root.name.startswith("profiles-dp2-") and world.key() != dp2_world(tmp_path, epsilon=4).key()
    assert world.retrain_dir("forget10") == world.plain().retrain_dir("forget10")
    assert world.retrain_dir("val10", 2) == world.plain().root / "retrain-val10-seed2"
    assert world.dp_model_dir == world.root / "dp-base" and world.full_model_dir == world.root / "full"
    assert dp2_world(tmp_path, epochs=7.0).key() == dp2_world(tmp_path, epochs=7).key()
    from obliviate.config import RunConfig
    # a config without dp2 records no dp2: run folders and the bench's cell keys (hashes of the dump) stay as they were
    assert "dp2" not in RunConfig(method="NPO").dump()["world"]
    assert RunConfig(method="NPO", world={"dp2": {"epsilon": 4}}).dump()["world"]["dp2"] == {"epsilon": 4}
    stage1, finetune = dp2_world(tmp_path, epsilon=8, epochs=7, finetune_epochs=3, batch_size=5).recipes()
    assert (stage1.epochs, stage1.batch_size, finetune.epochs, finetune.batch_size) == (7, 5, 3, 64)


def test_the_deletion_starts_from_the_dp_base_and_never_sees_forget_data(tmp_path, monkeypatch):
    """A deletion request loads stage 1's weights (not the served model's) and fine-tunes on the training sequences
    of everyone outside the forget split; the record states ε, δ and the costs against retraining."""
    from obliviate.models import causal_lm as lm
    from obliviate.worlds import train as train_module
    from obliviate.worlds.train import LMRecipe, new_model

    world = dp2_world(tmp_path, epsilon=8, finetune_epochs=1)
    tokenizer = world._tokenizer()
    for folder, seed in ((world.dp_model_dir, 1), (world.full_model_dir, 2)):  # two different models
        new_model(LMRecipe(**{**TINY_MODEL, "seed": seed}), tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    world.write_record({"dp-base": {"epsilon": 7.9, "delta": 1e-5, "seconds": 30.0, "noise_multiplier": 0.9,
                                    "max_grad_norm": 1.0, "accountant": "prv", "sample_rate": 0.1, "steps": 50},
                        "full": {"seconds": 10.0}, "retrain-forget10": {"seconds": 20.0}})
    monkeypatch.setattr(type(world), "build", lambda self, *a, **k: None)
    seen = {}

    def spy(model, tok, examples, recipe, **k):
        seen["start"] = {n: t.clone() for n, t in model.state_dict().items()}
        seen["examples"], seen["recipe"] = examples, recipe
        return {"steps": 1, "final_loss": 1.0, "seconds": 5.0}
    monkeypatch.setattr(train_module, "train", spy)
    out = world.unlearn("forget10", seed=3, log=lambda *a: None)

    dp_base, _ = lm.load(world.dp_model_dir)
    full, _ = lm.load(world.full_model_dir)
    assert all(torch.equal(seen["start"][n], t) for n, t in dp_base.state_dict().items())
    assert not all(torch.equal(seen["start"][n], t) for n, t in full.state_dict().items())
    forget, retain = world.data().split_people("forget10")
    assert forget and seen["recipe"].epochs == 1 and seen["recipe"].seed == 3
    seqs = {tuple(e.input_ids) for e in seen["examples"]}
    forget_seqs = {tuple(e.input_ids) for e in world.training_examples(tokenizer)} - {
        tuple(e.input_ids) for e in world.training_examples(tokenizer, exclude={p.name for p in forget})}
    assert forget_seqs and not seqs & forget_seqs
    assert seqs == {tuple(e.input_ids) for e in world.training_examples(tokenizer, {p.name for p in forget})}
    names = [p.name.split()[0] for p in forget]
    assert not any(n in tokenizer.decode(e.input_ids) for e in seen["examples"] for n in names)

    record = out["record"]
    assert (record["epsilon"], record["delta"], record["noise_multiplier"]) == (7.9, 1e-5, 0.9)
    assert record["cost"] == {"stage1_seconds": 30.0, "stage2_seconds": 10.0, "deletion_seconds": 5.0,
                              "retrain_seconds": 20.0, "deletion_vs_retrain": 0.25}
    assert record["person"]["sequences"] == 11 and record["person"]["epsilon"] == pytest.approx(11 * 7.9)
    assert record["person"]["vacuous"] is True  # 11 e^(10 * 7.9) 1e-5 > 1: said, not hidden


# ---- settings and runs --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dp2,needle", [
    ({"epsilon": 0}, "world.dp2.epsilon must be a number > 0"),
    ({"epsilon": -1.0}, "world.dp2.epsilon must be a number > 0"),
    ({"max_grad_norm": 0}, "world.dp2.max_grad_norm must be a number > 0"),
    ({"noise_multiplier": -0.5}, "world.dp2.noise_multiplier must be a number > 0"),
    ({"delta": 1.5}, "world.dp2.delta must be in (0, 1)"),
    ({"epsilon": 1, "noise_multiplier": 1}, "give epsilon or noise_multiplier, not both"),
    ({"epochs": 2.5}, "world.dp2.epochs must be a whole number > 0"),
    ({"accountant": "gdpx"}, "world.dp2.accountant"),
    ({"clip": 1}, "world.dp2: unknown key(s) ['clip']"),
    ({"delta": 0.01}, "world.dp2.delta = 0.01 must be below 1/N = 0.0087 (N = 115 training sequences)"),
])
def test_bad_dp_settings_fail_in_one_line_naming_the_key(tmp_path, dp2, needle):
    from obliviate.cli import app

    cfg = tiny_profiles_config(tmp_path)
    text = cfg.read_text().replace("method: GradDiff", "method: DP2Unlearning")
    cfg.write_text(text.replace("  cache_dir:", f"  dp2: {json.dumps(dp2)}\n  cache_dir:"))
    one_line_error(CliRunner().invoke(app, ["validate", str(cfg)]), needle)
    assert not (tmp_path / "cache").exists()


def test_a_dp2unlearning_run_needs_the_dp2_world_and_takes_no_method_args(tmp_path, tiny_lm_dir):
    from obliviate.cli import app
    from obliviate.methods.common import make_method

    cfg = tiny_profiles_config(tmp_path)
    base = cfg.read_text().replace("method: GradDiff", "method: DP2Unlearning")
    cfg.write_text(base)
    one_line_error(CliRunner().invoke(app, ["validate", str(cfg)]), "needs the profiles world's DP2 variant")
    cfg.write_text(base.replace("  cache_dir:", "  dp2: {epsilon: 8}\n  cache_dir:") + "method_args: {lr: 1}\n")
    one_line_error(CliRunner().invoke(app, ["validate", str(cfg)]), "unknown key(s) ['lr'] for DP2Unlearning")
    cfg.write_text(base.replace("  cache_dir:", "  dp2: {epsilon: 8}\n  cache_dir:"))
    assert CliRunner().invoke(app, ["validate", str(cfg)]).exit_code == 0
    cfg.write_text(f"method: DP2Unlearning\nmodel: {tiny_lm_dir}\nforget_file: a.jsonl\nretain_file: b.jsonl\n")
    one_line_error(CliRunner().invoke(app, ["validate", str(cfg)]), "cannot run on your own model")
    with pytest.raises(ObliviateError, match="is a world recipe, not a method"):
        make_method("lm", "dp2unlearning")
    listing = CliRunner().invoke(app, ["ls", "methods"]).output
    assert "DP2Unlearning (world recipe)" in listing


def test_a_missing_opacus_is_one_line_naming_the_extra(monkeypatch):
    from obliviate.worlds.dp_train import accountant_epsilon

    monkeypatch.setitem(sys.modules, "opacus", None)
    with pytest.raises(ObliviateError, match=r"^opacus is not installed: pip install 'obliviate\[dp\]'$"):
        accountant_epsilon("rdp", 1.0, 0.1, 10, 1e-5)


@pytest.mark.slow
def test_a_dp2unlearning_run_on_the_tiny_world_records_epsilon_and_costs(tmp_path):
    """The whole path on the tiny world: stage 1 through Opacus, stage 2, the plain retrain reference, the deletion
    run scored against it; metrics.json states ε, δ and each stage's seconds (about a minute on a busy machine)."""
    from obliviate.config import load_config
    from obliviate.runners.lm import run
    from obliviate.worlds.dp_train import accountant_epsilon

    cfg = tiny_profiles_config(tmp_path)
    text = cfg.read_text().replace("method: GradDiff", "method: DP2Unlearning")
    cfg.write_text(text.replace("  cache_dir:", "  dp2: {epsilon: 8, batch_size: 16, epochs: 2}\n  cache_dir:"))
    out = run(load_config(cfg), log=lambda *a: None)
    metrics = json.loads((out / "metrics.json").read_text())
    dp2 = metrics["dp2"]
    assert dp2["epsilon"] == pytest.approx(accountant_epsilon("prv", dp2["noise_multiplier"], dp2["sample_rate"],
                                                              dp2["dp_steps"], dp2["delta"]), rel=1e-6)
    assert dp2["epsilon"] <= 8.05 and dp2["delta"] == 1e-5
    assert all(dp2["cost"][k] > 0 for k in ("stage1_seconds", "stage2_seconds", "deletion_seconds",
                                             "retrain_seconds"))
    assert metrics["unlearn_seconds"] == dp2["cost"]["deletion_seconds"]
    assert 0 <= metrics["forget_quality"] <= 1 and "retrain" in metrics and "original" in metrics
    build = json.loads((tmp_path / "cache" / dp2["dp_base"].split("/")[-2] / "build.json").read_text())
    assert "dp-base" in build["accuracy-forget10"]
