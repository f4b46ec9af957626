"""RECE on the tiny SD-shaped pipeline: the adversarial embedding is the minimiser of the paper's objective, one run
agrees with a re-typing of the reference code's update, the embedding UCE leaves behind (one that still gives the
concept's keys and values) is erased, preserved texts stay close, and the CLI runs it and refuses bad settings."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error, tiny_prompts, tiny_task
from obliviate.config import TrainConfig
from obliviate.errors import ObliviateError
from obliviate.loops.t2i import erase
from obliviate.methods.common import make_method

FAST = dict(images_per_prompt=1, sample_steps=2)


def _projections(unet) -> dict[str, torch.Tensor]:
    """Every cross-attention key/value projection, in float64 (the weights RECE edits)."""
    return {n: p.detach().double().clone() for n, p in unet.named_parameters()
            if ".attn2.to_k.weight" in n or ".attn2.to_v.weight" in n}


def _edit(pipe, args: dict) -> tuple[dict, dict, dict]:
    """(original projections, edited projections, the edit's logs) of RECE with `args` on `pipe`."""
    before = _projections(pipe.unet)
    result = erase(pipe, tiny_task(), make_method("t2i", "RECE", args), TrainConfig(), **FAST)
    return before, _projections(pipe.unet), result.history[0]


def _states(pipe, texts: list[str]) -> torch.Tensor:
    from obliviate.models.diffusion import encode_prompts
    with torch.no_grad():
        return encode_prompts(pipe, texts).double()


def _derive(original: dict, edited: dict, concept: torch.Tensor, reg: float) -> torch.Tensor:
    """The reference's `close_form_emb_regzero`, re-typed on the weights themselves: (reg I + sum W'^T W')^-1
    (sum W'^T W) applied to every position of the concept's states."""
    D = concept.shape[-1]
    mat1 = reg * torch.eye(D, dtype=torch.float64) + sum(edited[n].T @ edited[n] for n in edited)
    mat2 = sum(edited[n].T @ original[n] for n in edited)
    return concept @ (torch.linalg.inv(mat1) @ mat2).T


def _values_distance(a_weights: dict, a: torch.Tensor, b_weights: dict, b: torch.Tensor) -> float:
    """sqrt(sum over projections and positions of ||W_a a - W_b b||^2)."""
    return float(sum(((a @ a_weights[n].T - b @ b_weights[n].T) ** 2).sum() for n in a_weights).sqrt())


# ---- the closed forms -----------------------------------------------------------------------------------------------

def test_adversarial_embedding_is_the_minimiser(tiny_pipe):
    """c* minimises sum_l ||W_l M x - W_l c||^2 + reg ||x||^2 (W_l M: the projections after UCE): the gradient, by
    autograd on the projections themselves, vanishes there and not at the concept's own states."""
    from obliviate.methods.t2i.base import EraseContext
    from obliviate.methods.t2i.rece import RECE, RECEConfig, adversarial_embedding

    method = RECE(RECEConfig(regular_scale=0.3))
    ctx = EraseContext(tiny_pipe, None, tiny_task(), torch.Generator().manual_seed(0))
    M, _ = method.edit_matrix(ctx)  # the UCE edit RECE starts from
    original = _projections(tiny_pipe.unet)
    gram = sum(W.T @ W for W in original.values())
    concept = _states(tiny_pipe, ["striped"])[0]
    adv = adversarial_embedding(gram, M, concept, 0.3)

    def objective(x):
        return sum(((x @ (W @ M).T - concept @ W.T) ** 2).sum() for W in original.values()) + 0.3 * (x ** 2).sum()

    def grad(x):
        x = x.clone().requires_grad_(True)
        objective(x).backward()
        return x.grad

    assert float(grad(adv).norm()) < 1e-9 * float(grad(concept).norm()), (grad(adv).norm(), grad(concept).norm())
    assert objective(adv) < objective(concept) and objective(adv) < objective(adv * 1.01)
    # the same c* from the edited weights as UCE stores them (float32), as the reference derives it
    UCE = make_method("t2i", "RECE", {"epochs": 0})
    erase(tiny_pipe, tiny_task(), UCE, TrainConfig(), **FAST)
    stored = _derive(original, _projections(tiny_pipe.unet), concept, 0.3)
    assert torch.allclose(stored, adv, rtol=1e-4, atol=1e-5 * float(adv.abs().max()))


def test_one_run_agrees_with_the_reference_update(tiny_pipeline_dir):
    """Two rounds after UCE, re-typed from the reference code (close_form_emb_regzero, then edit_model_adversarial
    with train_artists.py's retain list [''] + the preserve concepts and the guide as `guided_concepts`), layer by
    layer on float32 weights as it does, against obliviate's single float64 product."""
    from obliviate.models.diffusion import load_pipeline

    args = {"epochs": 2, "regular_scale": 0.05, "adv_lam": 0.2, "adv_erase_scale": 1.5, "adv_preserve_scale": 0.3}
    _, rece, logs = _edit(load_pipeline(tiny_pipeline_dir), args)
    assert logs["epochs"] == 2

    pipe = load_pipeline(tiny_pipeline_dir)
    original = _projections(pipe.unet)
    erase(pipe, tiny_task(), make_method("t2i", "UCE"), TrainConfig(), **FAST)  # the reference's UCE checkpoint
    weights = {n: W.float() for n, W in _projections(pipe.unet).items()}
    _, no_rounds, _ = _edit(load_pipeline(tiny_pipeline_dir), {"epochs": 0})
    assert all(torch.equal(no_rounds[n], weights[n].double()) for n in weights)  # epochs = 0 is UCE, bit for bit
    concept, guide = _states(pipe, ["striped"])[0], _states(pipe, ["solid"])[0]
    retain = _states(pipe, ["", "dotted", "solid"])
    for _ in range(2):
        edited = {n: W.double() for n, W in weights.items()}
        adv = _derive(original, edited, concept, args["regular_scale"])
        for n, W in edited.items():
            mat1 = args["adv_lam"] * W + args["adv_erase_scale"] * sum(
                torch.outer(W @ g, a) for a, g in zip(adv, guide))
            mat2 = args["adv_lam"] * torch.eye(W.shape[1], dtype=torch.float64) + args["adv_erase_scale"] * sum(
                torch.outer(a, a) for a in adv)
            for text in retain:
                mat1 = mat1 + args["adv_preserve_scale"] * sum(torch.outer(W @ p, p) for p in text)
                mat2 = mat2 + args["adv_preserve_scale"] * sum(torch.outer(p, p) for p in text)
            weights[n] = (mat1 @ torch.linalg.inv(mat2)).float()
    for n in rece:
        scale = float(rece[n].abs().max())
        assert torch.allclose(weights[n].double(), rece[n], rtol=1e-4, atol=1e-5 * scale), n
        assert not torch.allclose(rece[n], original[n], atol=1e-2 * scale)


# ---- what the rounds do ---------------------------------------------------------------------------------------------

def test_rece_erases_the_embedding_uce_leaves(tiny_pipeline_dir):
    """After UCE an embedding exists (derived in closed form) whose keys/values are near the concept's original ones:
    the concept is still reachable. One RECE round moves that embedding's keys/values to the guide's, and the best
    such embedding against RECE reproduces the concept worse than the one against UCE, more so with more rounds."""
    from obliviate.models.diffusion import load_pipeline

    reg = 0.01  # a weak regulariser: the embedding left by UCE reproduces the concept closely
    original, uce, _ = _edit(load_pipeline(tiny_pipeline_dir), {"epochs": 0})
    _, once, logs_once = _edit(load_pipeline(tiny_pipeline_dir), {"epochs": 1, "regular_scale": reg})
    _, thrice, logs = _edit(load_pipeline(tiny_pipeline_dir), {"epochs": 3, "regular_scale": reg})
    pipe = load_pipeline(tiny_pipeline_dir)
    concept, guide = _states(pipe, ["striped"])[0], _states(pipe, ["solid"])[0]
    size = _values_distance(original, concept, original, 0 * concept)

    def leak(weights, x):  # distance of x's keys/values under `weights` to the concept's under the original
        return _values_distance(weights, x, original, concept) / size

    def to_guide(weights, x):  # distance of x's keys/values to the guide's, both under `weights`
        return _values_distance(weights, x, weights, guide) / size

    adv_uce = _derive(original, uce, concept, reg)
    assert leak(uce, concept) > 0.2  # UCE did move the concept itself (about 0.25) ...
    assert leak(uce, adv_uce) < 0.35 * leak(uce, concept)  # ... but another embedding still gives its keys/values
    assert logs["epoch1_adv_leak"] == pytest.approx(leak(uce, adv_uce), rel=1e-4)
    assert to_guide(uce, adv_uce) > 0.25
    assert to_guide(once, adv_uce) < 0.35 * to_guide(uce, adv_uce)  # one round sends that embedding to the guide
    assert leak(once, adv_uce) > 3 * leak(uce, adv_uce)
    # no embedding recovers the concept as well as against UCE (about 0.07 -> 0.15 -> 0.2)
    best_once, best_thrice = (leak(w, _derive(original, w, concept, reg)) for w in (once, thrice))
    assert best_once > 2 * leak(uce, adv_uce) and best_thrice > 1.1 * best_once
    assert logs_once["epoch1_adv_leak_after"] == pytest.approx(leak(once, adv_uce), rel=1e-4)
    for epoch in (1, 2, 3):
        assert logs[f"epoch{epoch}_adv_leak_after"] > 1.3 * logs[f"epoch{epoch}_adv_leak"]


def test_preserved_texts_stay_close(tiny_pipeline_dir):
    """The preserved texts (the empty prompt and the other styles) move far less than the concept, and the preserve
    term is what keeps them: without it the round moves them three times as much. The tiny random text encoder gives
    every text nearly the same states after its first token (cosine > 0.95), so erasing one moves the others; later
    rounds move them further (the logged drift grows)."""
    from obliviate.models.diffusion import load_pipeline

    original, rece, logs = _edit(load_pipeline(tiny_pipeline_dir), {"epochs": 1})
    _, loose, _ = _edit(load_pipeline(tiny_pipeline_dir), {"epochs": 1, "adv_preserve_scale": 0.0})
    pipe = load_pipeline(tiny_pipeline_dir)

    def moved(weights, text):
        x = _states(pipe, [text])[0]
        return _values_distance(weights, x, original, x) / _values_distance(original, x, original, 0 * x)

    concept = moved(rece, "striped")
    assert concept > 0.3
    for text in ("", "dotted", "solid"):
        assert moved(rece, text) < 0.3 * concept, text  # about 0.09 against 0.36
        assert moved(rece, text) < 0.4 * moved(loose, text), text  # about 0.3 without the preserve term
    assert logs["epoch1_preserve_drift"] > logs["uce_preserve_drift"] > 0
    _, _, longer = _edit(load_pipeline(tiny_pipeline_dir), {"epochs": 3})
    assert longer["epoch3_preserve_drift"] > longer["epoch1_preserve_drift"] == pytest.approx(
        logs["epoch1_preserve_drift"])


def test_preserved_retain_prompts_keep_their_predictions(tiny_pipe):
    """With the retain prompts preserved (UCE's option, used by the rounds too), three rounds move the forget prompts'
    noise prediction several times more than the retain prompts' (about 0.67 against 0.17; preserving only the bare
    words, the tiny encoder's near-identical contexts let both move alike, about 1.5)."""
    from obliviate.models.diffusion import add_noise, encode_prompts, initial_noise, predict_noise

    task = tiny_task()
    forget, retain = task.forget_prompts, [r.text for r in task.retain_prompts][:3]
    x = add_noise(tiny_pipe, initial_noise(tiny_pipe, [100, 101, 102]), initial_noise(tiny_pipe, [200, 201, 202]),
                  torch.full((3,), 500))

    @torch.no_grad()
    def eps(texts):
        return predict_noise(tiny_pipe.unet, x, 500, encode_prompts(tiny_pipe, texts))

    before = eps(forget), eps(retain)
    erase(tiny_pipe, task, make_method("t2i", "RECE", {"preserve_retain_prompts": True}), TrainConfig(), **FAST)
    moved_forget, moved_retain = float((eps(forget) - before[0]).norm()), float((eps(retain) - before[1]).norm())
    assert moved_forget > 2.5 * moved_retain, (moved_forget, moved_retain)


# ---- runs and settings ----------------------------------------------------------------------------------------------

def _config(tmp_path, pipeline, method_args: str) -> str:
    tmp_path.mkdir(exist_ok=True)
    forget, retain = tmp_path / "forget.txt", tmp_path / "retain.txt"
    forget.write_text("\n".join(p for p in tiny_prompts() if "striped" in p) + "\n")
    retain.write_text("\n".join(p for p in tiny_prompts() if "striped" not in p) + "\n")
    path = tmp_path / "run.toml"
    path.write_text(f'family = "t2i"\nmethod = "RECE"\nconcept = "striped"\nmodel = "{pipeline}"\n'
                    f'forget_prompts = "{forget}"\nretain_prompts = "{retain}"\noutput_dir = "{tmp_path / "runs"}"\n'
                    f'name = "r"\nmethod_args = {method_args}\n[t2i]\nimages_per_prompt = 1\nsample_steps = 2\n')
    return str(path)


def test_cli_run_and_bad_settings(tmp_path, tiny_pipeline_dir):
    from safetensors.torch import load_file

    from obliviate.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["run", _config(tmp_path, tiny_pipeline_dir, "{epochs = 2}"), "--quiet"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "r"
    assert json.loads((run / "metrics.json").read_text())["status"] == "completed"
    changed = load_file(str(run / "changed.safetensors"))
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)
    (history,) = json.loads((run / "history.json").read_text())
    assert history["epochs"] == 2 and "epoch2_adv_leak_after" in history and "epoch3_adv_leak" not in history

    for args, needle in (("{epochs = -1}", "RECE: epochs"), ("{regular_scale = 0}", "RECE: regular_scale"),
                         ("{lam = 0}", "RECE: lam"), ("{epoch = 2}", "unknown key")):
        one_line_error(runner.invoke(app, ["run", _config(tmp_path / args[1:5], tiny_pipeline_dir, args),
                                           "--quiet"]), needle)


@pytest.mark.parametrize("args, key", [
    ({"epochs": 1.5}, "epochs"), ({"epochs": "3"}, "epochs"), ({"epochs": True}, "epochs"),
    ({"regular_scale": -0.1}, "regular_scale"), ({"adv_lam": 0}, "adv_lam"),
    ({"adv_erase_scale": -1}, "adv_erase_scale"), ({"adv_preserve_scale": float("nan")}, "adv_preserve_scale"),
    ({"with_to_k": "no"}, "with_to_k"),
])
def test_bad_config_names_the_key(args, key):
    with pytest.raises(ObliviateError, match=f"RECE: {key}"):
        make_method("t2i", "RECE", args)


def test_defaults_and_what_it_edits():
    rece = make_method("t2i", "RECE")
    c = rece.config
    assert (c.epochs, c.regular_scale, c.adv_lam, c.adv_erase_scale, c.adv_preserve_scale) == (3, 0.1, 0.1, 1.0, 0.1)
    assert (c.lam, c.erase_scale, c.preserve_scale) == (0.5, 1.0, None)  # the UCE stage: UCE's defaults
    assert rece.closed_form and not rece.needs_images and not rece.needs_frozen
    assert rece.trainable("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", None)
    assert not rece.trainable("mid_block.attentions.0.transformer_blocks.0.attn1.to_v.weight", None)
