"""Thin adapter over a diffusers Stable-Diffusion-shaped pipeline: load a folder, encode prompts, predict noise,
noise latents, sample. Methods and metrics talk to a text-to-image model only through these functions, so the
same code serves the canvas world's small pipeline and a user's SD 1.x/2.x folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from obliviate.data import read_json_file
from obliviate.errors import ObliviateError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class Pipeline:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # a DDIMScheduler: its config gives the training noise schedule, its step() the sampler
    folder: str | None = None
    guard: object = None  # a generation-time guard (obliviate.guards.t2i) every sampling call goes through

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.unet.config.sample_size
        s = s if isinstance(s, int) else s[0]
        return (self.unet.config.in_channels, s, s)


def check_folder(folder: str | Path) -> Path:
    """A diffusers pipeline folder with every component we need; else a one-line error naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ObliviateError(f"pipeline folder not found: {folder}")
    if not (folder / "model_index.json").is_file():
        raise ObliviateError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    index = read_json_file(folder / "model_index.json", "pipeline index")
    if not isinstance(index, dict):
        raise ObliviateError(f"{folder / 'model_index.json'}: must be a JSON object")
    missing = [c for c in COMPONENTS if c not in index or not (folder / c).is_dir()]
    if missing:
        raise ObliviateError(f"{folder}: pipeline is missing component(s) {', '.join(missing)}")
    weights = [c for c in ("unet", "vae", "text_encoder") if not any((folder / c).glob("*.safetensors"))
               and not any((folder / c).glob("*.bin"))]
    if weights:
        raise ObliviateError(f"{folder}: no weights in component folder(s) {', '.join(weights)}")
    return folder


def load_pipeline(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  trust_remote_code: bool = False) -> Pipeline:
    """The folder's components. `trust_remote_code` goes to the transformers parts (tokenizer, text encoder) as
    given, never None: with None, transformers asks on the terminal whether to run a folder's `auto_map` code."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffusers.utils import logging as diffusers_logging

    from obliviate.models import quiet_transformers, weights_error_message, weights_load_errors

    quiet_transformers()  # obliviate shows its own progress; no per-file bars from either library
    diffusers_logging.disable_progress_bar()
    folder = check_folder(folder)
    loaders = {"unet": lambda: UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),
               "vae": lambda: AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype),
               "text_encoder": lambda: CLIPTextModel.from_pretrained(folder, subfolder="text_encoder",
                                                                     torch_dtype=dtype,
                                                                     trust_remote_code=trust_remote_code),
               "tokenizer": lambda: load_tokenizer(folder, trust_remote_code),
               "scheduler": lambda: DDIMScheduler.from_pretrained(folder, subfolder="scheduler")}
    parts = {}
    for name, load in loaders.items():  # one at a time, so the error names the component's folder
        try:
            parts[name] = load()
        except weights_load_errors() + (KeyError,) as e:
            raise ObliviateError(f"{folder / name}: cannot load the pipeline's {name}: "
                                 f"{weights_error_message(folder / name, e)}") from None
    unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
    tokenizer, scheduler = parts["tokenizer"], parts["scheduler"]
    for m in (unet, vae, text_encoder):
        m.to(device).eval().requires_grad_(False)
    return Pipeline(unet, vae, text_encoder, tokenizer, scheduler, str(folder))


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False):
    """The pipeline folder's tokenizer (its `tokenizer/` sub-folder)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, subfolder="tokenizer", trust_remote_code=trust_remote_code)


def check_concept_known(tokenizer, concept: str) -> None:
    """Refuse a concept the text encoder's tokenizer cannot spell: nothing but special tokens, or its <unk>."""
    ids = tokenizer(concept).input_ids
    content = [i for i in ids if i not in set(tokenizer.all_special_ids)]
    # CLIP's unknown token is its end token, so only a tokenizer with a distinct <unk> can report unknown words
    distinct_unk = tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in (
        tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)
    if not content or (distinct_unk and tokenizer.unk_token_id in ids):
        raise ObliviateError(f"the tokenizer does not know the concept '{concept}'")


def save_pipeline(pipe: Pipeline, folder: str | Path) -> None:
    """Write a folder that `StableDiffusionPipeline.from_pretrained` loads (no safety checker: a research model)."""
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                 unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    sd.save_pretrained(str(folder), safe_serialization=True)


def tokenize(pipe: Pipeline, texts: list[str]) -> torch.Tensor:
    return pipe.tokenizer(list(texts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(pipe.device)


def encode_prompts(pipe: Pipeline, texts: list[str], text_encoder=None) -> torch.Tensor:
    """Per-token text embeddings [N, L, D], the UNet's cross-attention context (as StableDiffusionPipeline)."""
    encoder = text_encoder or pipe.text_encoder
    return encoder(tokenize(pipe, texts))[0]


def predict_noise(unet, latents: torch.Tensor, t: torch.Tensor | int, context: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(t) or t.dim() == 0:
        t = torch.full((latents.shape[0],), int(t), device=latents.device, dtype=torch.long)
    return unet(latents, t, encoder_hidden_states=context).sample


def add_noise(pipe: Pipeline, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, the training forward process."""
    abar = pipe.scheduler.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1).to(x0.dtype)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def random_timesteps(pipe: Pipeline, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(0, pipe.scheduler.config.num_train_timesteps, (n,), generator=generator).to(pipe.device)


def encode_images(pipe: Pipeline, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> scaled latents (the posterior mean: deterministic)."""
    x = images.to(pipe.device, pipe.vae.dtype) * 2 - 1
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


def decode(pipe: Pipeline, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1]."""
    x = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (x.float() / 2 + 0.5).clamp(0, 1)


def initial_noise(pipe: Pipeline, seeds: list[int]) -> torch.Tensor:
    """One noise tensor per seed, independent of batching (so a prompt/seed pair always gives the same picture)."""
    shape = pipe.latent_shape
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(
        pipe.device, pipe.unet.dtype)


@torch.no_grad()
def denoise(pipe: Pipeline, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 4.0,
            unet=None, stop_after: int | None = None, latents: torch.Tensor | None = None,
            text_encoder=None, context: torch.Tensor | None = None, guard=None) -> tuple[torch.Tensor, int]:
    """DDIM (eta 0) with classifier-free guidance, the conditional and unconditional passes in one UNet call.
    Stops after `stop_after` of the `steps` steps when given (ESD's partial sampling). `context`, when given, is
    the prompts' own text embeddings (an attack's soft prompt); the unconditional ones are still encoded here.
    `guard` (default: the pipeline's own, `pipe.guard`): a generation-time guard that adds its rows and prompts to
    the same UNet call and combines the predictions instead of CFG (obliviate.guards.t2i).
    Returns the latents and the training timestep they are at (0 after a full run)."""
    unet = unet or pipe.unet
    guard = guard if guard is not None else pipe.guard
    sched = _fresh_scheduler(pipe, steps)
    x = initial_noise(pipe, seeds) if latents is None else latents
    n = x.shape[0]
    cfg = guidance != 1 or guard is not None  # a guard reads both predictions
    if context is not None:
        context = torch.cat([context, encode_prompts(pipe, [""] * n, text_encoder)]) if cfg else context
    elif cfg:
        context = encode_prompts(pipe, list(prompts) + [""] * n, text_encoder)
    else:
        context = encode_prompts(pipe, list(prompts), text_encoder)
    if guard is not None:
        x, context = guard.begin(pipe, unet, x, seeds, context, guidance, text_encoder)
    last_t = int(sched.timesteps[0])
    for i, t in enumerate(sched.timesteps):
        if stop_after is not None and i >= stop_after:
            return (x if guard is None else guard.finish(x)), int(t)
        if guard is not None:
            extra = guard.extra_prompts()
            with guard.merging(t):
                eps_c, eps_u, *more = predict_noise(unet, torch.cat([x] * (2 + len(extra))), t, context).chunk(
                    2 + len(extra))
            eps = guard.combine(i, t, x, eps_u, eps_c, dict(zip(extra, more)))
        elif guidance != 1:
            eps_c, eps_u = predict_noise(unet, torch.cat([x, x]), t, context).chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        else:
            eps = predict_noise(unet, x, t, context)
        x = sched.step(eps, t, x).prev_sample
        last_t = int(t)
    x = x if guard is None else guard.finish(x)
    return x, 0 if stop_after is None or stop_after >= len(sched.timesteps) else last_t


def _fresh_scheduler(pipe: Pipeline, steps: int):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    return sched


@torch.no_grad()
def sample(pipe: Pipeline, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 4.0,
           batch_size: int = 128, unet=None, guard=None) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1], one per (prompt, seed), batched (through `guard`, or the pipeline's own)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        x, _ = denoise(pipe, prompts[i:i + batch_size], seeds[i:i + batch_size], steps, guidance, unet=unet,
                       guard=guard)
        out.append(decode(pipe, x).cpu())
    return torch.cat(out) if out else torch.empty(0, 3, 1, 1)
