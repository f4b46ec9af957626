"""The NaN guard (loops/step.py StateGuard) in both families' loops: a run whose loss diverges stops, says at which
step, and hands back the last sound state (finite weights, finite outputs), which is exactly the state before the
step it names; the guard's own branches (a non-finite update, a probe that fails on the last sound state)."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_items, tiny_task
from obliviate import progress
from obliviate.config import TrainConfig
from obliviate.loops.step import StateGuard, gradient_step, make_optimizer
from obliviate.models import causal_lm as adapter
from obliviate.models import sequences

KEPT = re.compile(r"at step (\d+); kept the state before step (\d+), whose loss was finite$")


@pytest.fixture(autouse=True)
def quiet():
    progress.set_enabled(False)
    yield
    progress.set_enabled(True)


def snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def same_state(module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, state[n]) for n, p in module.named_parameters())


def all_finite(module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


def lm_logits(model, tokenizer) -> torch.Tensor:
    batch = adapter.collate([adapter.encode_item(tokenizer, i) for i in tiny_items()], tokenizer.pad_token_id)
    with torch.no_grad():
        return sequences.forward_logits(model, batch)


def lm_unlearn(tiny_lm_dir, train: TrainConfig):
    from obliviate.loops.lm import unlearn
    model, tokenizer = adapter.load(tiny_lm_dir)
    initial = snapshot(model)
    items = tiny_items()
    result = unlearn(model, tokenizer, items[:2], items[2:], "GradDiff", train)
    return result, tokenizer, initial


# ---- the language-model loop ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer, lr, max_grad_norm, max_steps", [
    ("adamw", 1e9, 1.0, 5),  # Adam's first update moves every weight by ~lr: a NaN loss at step 1
    ("sgd", 1e9, 1.0, 5),  # clipped to norm 1, then times 1e9: a non-finite gradient at step 1
    ("sgd", 1e3, None, 30),  # diverges a step later: the kept state is not the initial one
])
def test_a_diverging_lm_run_stops_and_keeps_the_last_sound_state(tiny_lm_dir, optimizer, lr, max_grad_norm,
                                                                  max_steps):
    train = TrainConfig(lr=lr, optimizer=optimizer, max_steps=max_steps, batch_size=2, max_grad_norm=max_grad_norm)
    result, tokenizer, initial = lm_unlearn(tiny_lm_dir, train)
    assert result.stopped, "the loss never diverged: the test would prove nothing"
    match = KEPT.search(result.stopped)
    assert match, result.stopped
    failed, kept = int(match[1]), int(match[2])
    assert failed < max_steps and kept <= failed
    assert [h["step"] for h in result.history] == list(range(failed))  # steps after the failure were not taken
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert all_finite(result.model)
    assert torch.isfinite(lm_logits(result.model, tokenizer)).all()
    # the kept state is the state before step `kept`: what the same run reaches after `kept` steps
    if kept == 0:
        assert same_state(result.model, initial)
    else:
        again, _, _ = lm_unlearn(tiny_lm_dir, train.model_copy(update={"max_steps": kept}))
        assert not again.stopped and same_state(result.model, snapshot(again.model))
        assert not same_state(result.model, initial)
    if lr == 1e9:  # the first update already wrecked the weights: only the initial state is sound
        assert kept == 0 and same_state(result.model, initial)
    else:  # this case is here for the later state
        assert kept >= 1


def test_a_run_whose_last_step_diverges_is_stopped_too(tiny_lm_dir):
    result, tokenizer, initial = lm_unlearn(tiny_lm_dir, TrainConfig(lr=1e9, max_steps=1, batch_size=2))
    assert result.stopped, "the run completed; its model's logits are finite: " + str(
        bool(torch.isfinite(lm_logits(result.model, tokenizer)).all()))
    assert torch.isfinite(lm_logits(result.model, tokenizer)).all() and same_state(result.model, initial)


# ---- the text-to-image loop ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_diverging_t2i_erasure_stops_with_finite_unet_weights(tiny_pipe, optimizer):
    from obliviate.loops.t2i import erase
    from obliviate.models.diffusion import encode_prompts, predict_noise

    initial = snapshot(tiny_pipe.unet)
    result = erase(tiny_pipe, tiny_task(), "GradDiff", TrainConfig(lr=1e9, optimizer=optimizer, max_steps=5,
                                                                   batch_size=2),
                   images_per_prompt=1, sample_steps=2)
    assert result.stopped, "the loss never diverged: the test would prove nothing"
    match = KEPT.search(result.stopped)
    assert match and int(match[2]) == 0, result.stopped
    assert all_finite(result.model) and same_state(result.model, initial)
    with torch.no_grad():
        context = encode_prompts(tiny_pipe, ["a red star in striped style"])
        noise = predict_noise(result.model, torch.randn(1, *tiny_pipe.latent_shape), 500, context)
    assert torch.isfinite(noise).all()


# ---- the guard's own branches ----------------------------------------------------------------------------------------

def _toy_step(lr: float, scale: float):  # (layer, its weights before, guard, why the step says stop)
    """One gradient step of a linear layer, with the loss `scale * sum(weights)`."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    before = snapshot(layer)
    params = list(layer.parameters())
    train = TrainConfig(lr=lr, optimizer="sgd", max_grad_norm=None)
    opt, sched = make_optimizer(params, train, 1)
    guard = StateGuard(params)
    loss = scale * sum(p.sum() for p in params)
    parts = SimpleNamespace(total=loss, forget=loss, retain=None)
    why = gradient_step(SimpleNamespace(combine_gradients=None), parts, params, opt, sched, train,
                        {"loss": loss.item()}, 0, guard)
    return layer, before, guard, why


def test_an_update_to_non_finite_weights_stops_and_puts_back_the_state_before_it():
    layer, before, guard, why = _toy_step(lr=3e38, scale=10.0)  # a finite loss and gradient; the update overflows
    assert why == "parameters became non-finite at step 0" and not all_finite(layer)
    message = guard.restore(why, probe=lambda: layer(torch.ones(1, 3)))
    assert message.endswith("kept the state before step 0, whose loss was finite"), message
    assert same_state(layer, before)


def test_when_the_last_sound_state_fails_the_probe_the_initial_state_is_put_back():
    layer = torch.nn.Linear(3, 2)
    guard = StateGuard(list(layer.parameters()))
    initial = snapshot(layer)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    guard.mark_good(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    message = guard.restore("non-finite loss at step 4", probe=lambda: torch.tensor(float("nan")))
    assert message == "non-finite loss at step 4; kept the initial state (no later state gave a finite loss)"
    assert same_state(layer, initial)
    off = StateGuard(list(layer.parameters()), enabled=False)
    off.mark_good(0)
    assert "could not be restored" in off.restore("non-finite loss at step 1")


def test_a_learning_rate_beyond_the_float_range_stops_in_one_line(tiny_lm_dir):
    """lr 1e39 cannot even be turned into a float32 step: the run stops at step 0 with the initial weights."""
    result, tokenizer, initial = lm_unlearn(tiny_lm_dir, TrainConfig(lr=1e39, optimizer="sgd", max_grad_norm=None,
                                                                     max_steps=3, batch_size=2))
    assert result.stopped and "overflowed at step 0" in result.stopped
    params = dict(result.model.named_parameters())
    assert all(torch.equal(params[n], initial[n]) for n in initial)
