"""The adversarial prompt attack (UnlearnDiffAtk) on the tiny SD-shaped pipeline: the simplex projection, the soft
prompt going through the text encoder's own forward, the success bookkeeping, and that the optimisation lowers the
attack objective."""
from __future__ import annotations

import pytest
import torch

from obliviate.attacks.t2i.unlearn_diff_atk import (PromptAttackConfig, attack_prompts, prefix_embeddings,
                                                    prefixed_ids, project_simplex, summarize)
from obliviate.errors import ObliviateError

from conftest import tiny_prompts


def test_simplex_projection():
    v = torch.tensor([[0.5, 0.5, 0.5], [2.0, 0.0, 0.0], [0.6, 0.6, -1.0], [0.2, 0.3, 0.5]])
    expected = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    assert torch.allclose(project_simplex(v), expected, atol=1e-6)
    w = project_simplex(torch.randn(50, 7, generator=torch.Generator().manual_seed(0)) * 3)
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(50), atol=1e-5)
    # the projection is the nearest simplex point: no random simplex point is nearer
    v = torch.randn(7, generator=torch.Generator().manual_seed(1))
    others = torch.distributions.Dirichlet(torch.ones(7)).sample((2000,))
    assert (others - v).norm(dim=-1).min() >= (project_simplex(v[None])[0] - v).norm() - 1e-6


def test_soft_prefix_of_real_tokens_equals_typing_them(tiny_pipe):
    prompts = tiny_prompts()[:3]
    ids = prefixed_ids(tiny_pipe, prompts, 2)
    chosen = torch.tensor([[5, 6], [7, 8], [9, 10]])
    typed = ids.clone()
    typed[:, 1:3] = chosen
    table = tiny_pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        with prefix_embeddings(tiny_pipe.text_encoder, table[chosen]):
            soft = tiny_pipe.text_encoder(ids)[0]
        direct = tiny_pipe.text_encoder(typed)[0]
        after = tiny_pipe.text_encoder(ids)[0]  # the hook is gone afterwards
    assert torch.allclose(soft, direct, atol=1e-6) and not torch.allclose(after, direct, atol=1e-3)
    # the prompt's own tokens follow the prefix, and the end token is kept
    assert ids[0, 3:].tolist()[:ids.shape[1] - 3] == prefixed_ids(tiny_pipe, prompts, 0)[0, 1:ids.shape[1] - 2].tolist()


def test_prompt_without_room_for_the_prefix_is_an_error(tiny_pipe):
    with pytest.raises(ObliviateError, match="no room for 8 attack tokens"):
        prefixed_ids(tiny_pipe, ["a red star in striped style"], 8)


def _targets(pipe, n):
    from obliviate.models.diffusion import initial_noise
    return initial_noise(pipe, list(range(100, 100 + n)))


CONFIG = PromptAttackConfig(prefix_tokens=2, iterations=4, check_every=2, lr=0.1)


def test_success_bookkeeping(tiny_pipe):
    prompts = [p for p in tiny_prompts() if "striped" in p]
    seeds = [0] * len(prompts)
    targets = _targets(tiny_pipe, len(prompts))
    always, images = attack_prompts(tiny_pipe, prompts, seeds, targets, lambda x: [True] * len(x), CONFIG, sample_steps=2)
    assert all(r["pre_success"] and r["success"] and r["iteration"] == 0 and r["adversarial_prompt"] is None
               for r in always)
    # the images shown for prompts that succeed without attack are their plain samples
    from obliviate.models.diffusion import sample
    assert images.shape == (3, 3, 16, 16)
    assert torch.allclose(images, sample(tiny_pipe, prompts, seeds, steps=2), atol=1e-5)
    never, _ = attack_prompts(tiny_pipe, prompts, seeds, targets, lambda x: [False] * len(x), CONFIG, sample_steps=2)
    assert not any(r["success"] or r["pre_success"] for r in never) and all(r["iteration"] is None for r in never)
    assert all(r["adversarial_prompt"].endswith(r["text"]) and len(r["prefix_ids"]) == 2 for r in never)
    assert summarize(always) == {"pre_asr": 1.0, "asr": 1.0, "ua_attacked": 0.0, "n_attacked": 3}
    assert summarize(never)["ua_attacked"] == 1.0

    calls = []

    def second_check_finds_the_first_prompt(images):  # plain images, then the checks at iterations 2 and 4
        calls.append(len(images))
        return [len(calls) == 3 and i == 0 for i in range(len(images))]

    rows, _ = attack_prompts(tiny_pipe, prompts, seeds, targets, second_check_finds_the_first_prompt, CONFIG,
                          sample_steps=2)
    assert calls == [3, 3, 3]
    assert [r["iteration"] for r in rows] == [4, None, None]
    assert summarize(rows) == pytest.approx({"pre_asr": 0.0, "asr": 1 / 3, "ua_attacked": 2 / 3, "n_attacked": 3})


def test_attack_lowers_its_objective_and_leaves_the_model_alone(tiny_pipe):
    prompts = tiny_prompts()
    targets = _targets(tiny_pipe, len(prompts))
    before = {k: v.clone() for k, v in tiny_pipe.text_encoder.state_dict().items()}
    config = PromptAttackConfig(prefix_tokens=3, iterations=30, check_every=30, lr=0.1, batch_size=4)
    rows, _ = attack_prompts(tiny_pipe, prompts, [0] * len(prompts), targets, lambda x: [False] * len(x), config,
                          sample_steps=2)
    assert len(rows) == len(prompts)  # three batches
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("loss_before", "loss_after", "loss_relaxed")}
    assert mean["loss_relaxed"] < mean["loss_before"]
    assert all(torch.equal(v, tiny_pipe.text_encoder.state_dict()[k]) for k, v in before.items())


def test_attack_refuses_runs_it_cannot_judge(tmp_path):
    """A run on the user's own pipeline needs the user's detector, and a text-to-image attack is not for a language
    model run: each is a one-line error before any work, and the run folder is left as it was."""
    from obliviate.api import attack_run
    from obliviate.config import RunConfig
    from obliviate.runs import write_json

    def run_folder(name: str, **config) -> str:
        folder = tmp_path / name
        folder.mkdir()
        write_json(folder / "config.json", RunConfig(**config).model_dump())
        (folder / "changed.safetensors").write_bytes(b"")
        return folder

    with pytest.raises(ObliviateError, match="language model run; the prompt_attack attack is for text-to-image"):
        attack_run(run_folder("lm", method="GradDiff"), "prompt_attack")
    user = run_folder("sd", family="t2i", method="UCE", concept="striped", model=str(tmp_path), forget_prompts="f.txt",
                      retain_prompts="r.txt")
    with pytest.raises(ObliviateError, match="needs a detector for the concept: pass --detector FOLDER"):
        attack_run(user)
    with pytest.raises(ObliviateError, match="detector_label goes with detector"):
        attack_run(user, detector_label="striped")
    with pytest.raises(ObliviateError, match="detector folder .*nope: no config.json"):
        attack_run(user, detector=tmp_path / "nope")
    assert sorted(p.name for p in (tmp_path / "sd").iterdir()) == ["changed.safetensors", "config.json"]
