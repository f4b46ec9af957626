"""Few-shot unlearning (methods/t2i/few_shot.py): which text-encoder weights each parameter group trains, the loss
re-typed by hand on one batch (the negated denoising loss through the text encoder being trained, the UNet frozen),
and a run from a folder of the user's pictures."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_task
from obliviate.config import TrainConfig
from obliviate.errors import ObliviateError
from obliviate.loops.t2i import erase
from obliviate.methods.common import make_method
from obliviate.methods.t2i import few_shot as FS
from obliviate.methods.t2i.base import EraseContext


def _picked(group: str, encoder) -> tuple[set[str], set[str]]:
    method = make_method("t2i", "FewShotUnlearning", {"parameter_group": group})
    method.attach_text_encoder(encoder)
    return {n for n, p in encoder.named_parameters() if method.text_encoder_trainable(n, p)}, \
        {n for n, _ in encoder.named_parameters()}


def test_parameter_groups_pick_the_references_weights():
    from transformers import CLIPTextConfig, CLIPTextModel

    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=3,
                                           num_attention_heads=2, max_position_embeddings=8, bos_token_id=0,
                                           eos_token_id=1, pad_token_id=1))
    # the reference's train.py: every fc1/fc2 and the last layer's self-attention
    picked, every = _picked("mlp-final-attn", encoder)
    mlp = {n for n in every if ".mlp.fc" in n}
    attn = {n for n in every if ".self_attn." in n}
    assert len(mlp) == 3 * 4 and len(attn) == 3 * 8
    assert picked == mlp | {n for n in attn if ".layers.2." in n}
    assert _picked("mlp", encoder)[0] == mlp and _picked("attn", encoder)[0] == attn
    assert _picked("mlp-attn", encoder)[0] == mlp | attn
    assert _picked("all", encoder)[0] == every  # embeddings and the final norm too
    with pytest.raises(ObliviateError, match="parameter_group"):
        make_method("t2i", "FewShotUnlearning", {"parameter_group": "final"})


def test_loss_is_the_negated_denoising_loss_through_the_trained_encoder(tiny_pipe):
    pipe, task = tiny_pipe, tiny_task()
    method = make_method("t2i", "FewShotUnlearning")
    gen = torch.Generator().manual_seed(4)
    ctx = EraseContext(pipe, None, task, gen)
    texts = task.forget_prompts[:2]
    latents = torch.randn(2, *pipe.latent_shape, generator=torch.Generator().manual_seed(9))
    pipe.text_encoder.requires_grad_(True)  # as the loop sets it
    state = gen.get_state()
    parts = method.losses(ctx, pipe.unet, {"texts": texts, "latents": latents}, {})

    gen.set_state(state)  # re-typed: t, then eps, from the same generator; DDPM's forward process; diffusers' calls
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (2,), generator=gen)
    eps = torch.randn(latents.shape, generator=gen)
    abar = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * eps
    ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        pred = pipe.unet(x_t, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
    assert torch.allclose(parts.forget.detach(), -((pred - eps) ** 2).mean(), rtol=1e-5)
    assert parts.logs["forget_mse"] > 0
    parts.forget.backward()  # the gradient reaches the text encoder being trained
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.text_encoder.parameters())


def test_a_run_from_a_folder_of_pictures(tiny_pipe, tmp_path):
    from PIL import Image

    from obliviate.models.diffusion import encode_images

    folder = tmp_path / "pictures"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate((16, 24)):  # resized to the pipeline's 16 x 16
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    (folder / "notes.txt").write_text("not a picture")
    latents = FS.load_pictures(tiny_pipe, str(folder))
    assert latents.shape == (2, *tiny_pipe.latent_shape)
    first = torch.from_numpy(np.array(Image.open(folder / "p0.png").convert("RGB"))).permute(2, 0, 1)[None] / 255
    with torch.no_grad():
        assert torch.allclose(latents[:1], encode_images(tiny_pipe, first.float()), atol=1e-5)

    unet_before = {n: p.clone() for n, p in tiny_pipe.unet.named_parameters()}
    method = make_method("t2i", "FewShotUnlearning", {"images": str(folder)})
    assert not method.needs_images  # the loop draws no pictures of its own
    result = erase(tiny_pipe, tiny_task(), method, TrainConfig(max_steps=2, lr=1e-3, batch_size=2),
                   images_per_prompt=1, sample_steps=2)
    assert result.stopped is None and result.text_encoder is tiny_pipe.text_encoder and not result.trainable_names
    assert result.text_encoder_names and all(".mlp.fc" in n or ".self_attn." in n for n in result.text_encoder_names)
    assert all(torch.equal(p, unet_before[n]) for n, p in tiny_pipe.unet.named_parameters())

    with pytest.raises(ObliviateError, match="images = .* is not a folder with .png/.jpg/.jpeg pictures"):
        erase(tiny_pipe, tiny_task(), make_method("t2i", "FewShotUnlearning", {"images": str(tmp_path / "none")}),
              TrainConfig(max_steps=1), images_per_prompt=1, sample_steps=2)


def test_one_step_agrees_with_the_reference_update(tiny_pipe, monkeypatch):
    """One loop step against the reference's train.py step re-typed (github.com/fmp453/few-shot-erasing): its
    "mlp-final-attn" weights picked by module name, tokenized prompts through the text encoder, the scheduler's
    add_noise, loss = -mse(unet(x_t, t, E(c)), eps), one Adam step. Adam with the loop's epsilon and no weight decay
    (the differences the docstring names; on a first step Adam's betas cancel); the same batch and draws (the loop
    draws t before eps, the reference eps before t)."""
    import copy

    pipe = tiny_pipe
    reference = copy.deepcopy(pipe.text_encoder)
    method = make_method("t2i", "FewShotUnlearning")
    seen: dict = {}
    losses = method.losses

    def recording(ctx, unet, forget, retain):  # the first step's batch and generator state
        if not seen:
            seen.update(texts=list(forget["texts"]), latents=forget["latents"].clone(),
                        state=ctx.generator.get_state())
        return losses(ctx, unet, forget, retain)

    method.losses = recording
    from obliviate.loops import t2i as loop
    drawn, draw = [], loop.draw_latents
    monkeypatch.setattr(loop, "draw_latents",
                        lambda ctx, texts, seed: drawn.append(len(texts)) or draw(ctx, texts, seed))
    erase(pipe, tiny_task(), method, TrainConfig(max_steps=1, lr=1e-3, batch_size=2, max_grad_norm=None),
          images_per_prompt=1, sample_steps=2)

    assert drawn == [len(tiny_task().forget_prompts), 1]  # the forget prompts' pictures; one retain picture, unused
    last = reference.config.num_hidden_layers - 1
    reference.requires_grad_(False)
    for name, module in reference.named_modules():  # freeze_and_unfreeze_text_encoder(method="mlp-final-attn")
        if "mlp.fc" in name or f"layers.{last}.self_attn." in name:
            module.requires_grad_(True)
    trained = [p for p in reference.parameters() if p.requires_grad]
    initial = {n: p.detach().clone() for n, p in reference.named_parameters()}
    optimizer = torch.optim.Adam(trained, lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    gen = torch.Generator()
    gen.set_state(seen["state"])
    latents = seen["latents"]
    timesteps = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
    ids = pipe.tokenizer(seen["texts"], padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    pred = pipe.unet(noisy, timesteps, reference(ids)[0]).sample
    loss = -torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="mean")
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    ours = dict(pipe.text_encoder.named_parameters())
    for name, p in reference.named_parameters():
        assert torch.allclose(ours[name], p, atol=1e-6, rtol=0), name
        assert torch.equal(p, initial[name]) != p.requires_grad, name  # exactly the trained weights moved
