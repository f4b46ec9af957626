"""Thin adapter over a diffusers text-to-image pipeline: load a folder, encode prompts, predict noise, noise
latents, sample. Methods and metrics talk to a text-to-image model only through these functions and the pipeline's
`Backbone` (one object per pipeline shape: how it encodes text, calls its denoiser, noises latents, forms the
training target, samples, and which weights map text into attention), so the same code serves the canvas world's
small pipeline, a user's SD 1.x/2.x folder, an SDXL folder and SD3/FLUX folders (their backbones: models/dit.py),
without a method ever branching on the shape."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from obliviate.data import read_json_file
from obliviate.errors import ObliviateError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")  # a Stable-Diffusion 1.x/2.x folder


@dataclass
class Cond:
    """The text conditioning of N prompts: `states` [N, L, D] the per-token text states attention reads (UCE edits
    its key/value projections), `pooled` [N, P] a pooled text embedding where the shape has one (SDXL's
    `text_embeds`), else None."""
    states: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, idx) -> Cond:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        if torch.is_tensor(idx):
            idx = idx.to(self.states.device)
        return Cond(self.states[idx], None if self.pooled is None else self.pooled[idx])

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        pooled = [c.pooled for c in conds]
        return Cond(torch.cat([c.states for c in conds]),
                    None if any(p is None for p in pooled) else torch.cat(pooled))

    @staticmethod
    def stack(conds: list[Cond]) -> Cond:
        """N one-prompt conds (rows of a batch, e.g. a cache's entries) as one N-prompt Cond."""
        return Cond.cat(conds)

    def expand(self, n: int) -> Cond:
        """A one-prompt Cond repeated to n rows (views, as torch's expand)."""
        return Cond(self.states.expand(n, *self.states.shape[1:]),
                    None if self.pooled is None else self.pooled.expand(n, *self.pooled.shape[1:]))

    def to(self, *args, **kwargs) -> Cond:
        return Cond(self.states.to(*args, **kwargs), None if self.pooled is None else self.pooled.to(*args, **kwargs))

    def detach(self) -> Cond:
        return Cond(self.states.detach(), None if self.pooled is None else self.pooled.detach())

    @property
    def device(self) -> torch.device:
        return self.states.device

    @property
    def dtype(self) -> torch.dtype:
        return self.states.dtype


def as_cond(context) -> Cond:
    """A Cond, or bare text states (code written before Cond: one text encoder, no pooled embedding)."""
    return context if isinstance(context, Cond) else Cond(context)


@dataclass
class Pipeline:
    denoiser: torch.nn.Module  # the trained network: a UNet (SD, SDXL) or a transformer (SD3, FLUX); alias `unet`
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # a DDIMScheduler: its config gives the training noise schedule, its step() the sampler
    folder: str | None = None
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second text encoder (CLIPTextModelWithProjection)
    tokenizer_2: object = None
    backbone: Backbone | None = None  # the shape; None: Stable Diffusion 1.x/2.x (pipelines built in code)
    config: dict = field(default_factory=dict)  # the folder's pipeline options (SDXL: force_zeros_for_empty_prompt)
    text_encoder_3: torch.nn.Module | None = None  # a third text encoder, for shapes that have one (SD3's T5)
    tokenizer_3: object = None
    guard: object = None  # a generation-time guard (obliviate.guards.t2i) every sampling call goes through

    def __post_init__(self):
        if self.backbone is None:
            self.backbone = SDBackbone()

    @property
    def unet(self) -> torch.nn.Module:
        return self.denoiser

    @unet.setter
    def unet(self, module: torch.nn.Module) -> None:
        self.denoiser = module

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders in their folders' order (text_encoder, text_encoder_2, ...)."""
        return [e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if e is not None]

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3) if t is not None]

    def components(self) -> dict[str, torch.nn.Module]:
        """The trainable components by their folder names (the prefixes of a run's changed tensors)."""
        out = {self.backbone.denoiser_folder: self.denoiser}
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.backbone.latent_shape(self)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


class Backbone:
    """One pipeline shape. Everything family-generic (methods, loop, attacks, metrics) calls these; subclasses say
    how their shape does each. Latents are [N, C, h, w] for every caller."""
    kind: str = ""
    prediction: str = "epsilon"  # what predict() returns: "epsilon" (noise) or "flow" (velocity noise - x0)
    pipeline_class: str = ""  # model_index.json's `_class_name`, and the diffusers class save() writes
    denoiser_folder: str = "unet"  # the denoiser's sub-folder (and its tensors' prefix in changed.safetensors)
    components: tuple[str, ...] = COMPONENTS  # sub-folders a pipeline folder of this shape must have
    weight_components: tuple[str, ...] = ("unet", "vae", "text_encoder")

    def load(self, folder: Path, device, dtype, trust_remote_code: bool) -> Pipeline:
        raise NotImplementedError

    def save(self, pipe: Pipeline, folder: str | Path) -> None:
        raise NotImplementedError

    def encode(self, pipe: Pipeline, texts: list[str], text_encoders=None) -> Cond:
        """The prompts' conditioning (as the shape's diffusers pipeline forms it)."""
        return self.encode_ids(pipe, [tokenize(pipe, texts, t) for t in pipe.tokenizers], text_encoders)

    def encode_ids(self, pipe: Pipeline, ids: list[torch.Tensor], text_encoders=None) -> Cond:
        """The conditioning of token ids, one [N, L] tensor per tokenizer of the pipeline (the attacks' prompts,
        whose token embeddings may be replaced by soft ones through a hook on each encoder's embedding table)."""
        raise NotImplementedError

    def predict(self, pipe: Pipeline, denoiser, x_t: torch.Tensor, t, cond: Cond) -> torch.Tensor:
        raise NotImplementedError

    def unconditional(self, pipe: Pipeline, n: int, text_encoders=None) -> Cond | None:
        """The unconditional branch of classifier-free guidance for n pictures, where the shape fixes it (SDXL's
        zeros); None: the encoding of the empty prompt."""
        return None

    def noisy(self, pipe: Pipeline, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, the DDPM forward process (epsilon shapes)."""
        abar = pipe.scheduler.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1).to(x0.dtype)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def target(self, pipe: Pipeline, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What predict() is trained towards: the noise itself (epsilon prediction)."""
        return noise

    def train_timesteps(self, pipe: Pipeline, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, pipe.scheduler.config.num_train_timesteps, (n,), generator=generator).to(pipe.device)

    def text_projections(self, denoiser) -> list[tuple[str, torch.nn.Linear]]:
        raise NotImplementedError

    def sampler(self, pipe: Pipeline, steps: int):
        """A fresh DDIM scheduler (eta 0) from the pipeline's schedule, its `steps` timesteps set."""
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(steps)
        return sched

    def time_value(self, t) -> int | float:
        """A sampler timestep as `denoise` returns it (ESD's partial sampling trains at it)."""
        return int(t)

    def embeds_guidance(self, pipe: Pipeline) -> bool:
        """Whether the denoiser takes the guidance scale itself (a guidance-distilled FLUX), so sampling makes one
        conditional pass per step and `predict` gets `guidance=`; else classifier-free guidance, two passes."""
        return False

    def latent_shape(self, pipe: Pipeline) -> tuple[int, int, int]:
        s = pipe.denoiser.config.sample_size
        s = s if isinstance(s, int) else s[0]
        return (pipe.denoiser.config.in_channels, s, s)

    def encode_images(self, pipe: Pipeline, images: torch.Tensor) -> torch.Tensor:
        x = images.to(pipe.device, pipe.vae.dtype) * 2 - 1
        return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor

    def decode(self, pipe: Pipeline, latents: torch.Tensor) -> torch.Tensor:
        x = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)


def cross_attention_projections(denoiser) -> list[tuple[str, torch.nn.Linear]]:
    """Every cross-attention key/value map of a UNet (`attn2.to_k`, `attn2.to_v`): the only linear maps that read the
    text states (in Stable Diffusion's and SDXL's transformer blocks attn1 is self-attention, attn2 cross-attention).
    They are what UCE edits in closed form (Gandikota et al. 2024, arXiv 2308.14761, and its reference code
    rohitgandikota/unified-concept-editing, whose README's later update edits SDXL as SD v1.4: a UNet with the same
    cross-attention blocks); ESD-x trains all of attn2 (Gandikota et al. 2023)."""
    return [(name, m) for name, m in denoiser.named_modules()
            if ".attn2." in f".{name}." and name.endswith((".to_k", ".to_v")) and isinstance(m, torch.nn.Linear)]


def _timesteps(t, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(t) or t.dim() == 0:
        t = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    return t


def _text_encoders(pipe: Pipeline, text_encoders) -> list:
    """The text encoders to use: the pipeline's, or those given (a list in the pipeline's order, or one module)."""
    if text_encoders is None:
        return pipe.text_encoders
    return list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]


def _load_parts(folder: Path, loaders: dict) -> dict:
    from obliviate.models import weights_error_message, weights_load_errors

    parts = {}
    for name, load in loaders.items():  # one at a time, so the error names the component's folder
        try:
            parts[name] = load()
        except weights_load_errors() + (KeyError,) as e:
            raise ObliviateError(f"{folder / name}: cannot load the pipeline's {name}: "
                                 f"{weights_error_message(folder / name, e)}") from None
    return parts


def _unet_pipeline_loaders(folder: Path, dtype, trust_remote_code: bool) -> dict:
    """The loaders of the components every UNet pipeline (SD, SDXL) has, by folder name (one CLIP text encoder)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    return {"unet": lambda: UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),
            "vae": lambda: AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype),
            "text_encoder": lambda: CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype,
                                                                  trust_remote_code=trust_remote_code),
            "tokenizer": lambda: load_tokenizer(folder, trust_remote_code),
            "scheduler": lambda: DDIMScheduler.from_pretrained(folder, subfolder="scheduler")}


class SDBackbone(Backbone):
    """Stable Diffusion 1.x/2.x: one CLIP text encoder whose last hidden states are the UNet's cross-attention
    context (as StableDiffusionPipeline), epsilon prediction."""
    kind = "sd"
    pipeline_class = "StableDiffusionPipeline"

    def load(self, folder: Path, device, dtype, trust_remote_code: bool) -> Pipeline:
        parts = _load_parts(folder, _unet_pipeline_loaders(folder, dtype, trust_remote_code))
        for m in (parts["unet"], parts["vae"], parts["text_encoder"]):
            m.to(device).eval().requires_grad_(False)
        return Pipeline(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"],
                        str(folder), backbone=self)

    def save(self, pipe: Pipeline, folder: str | Path) -> None:
        from diffusers import StableDiffusionPipeline

        sd = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                     unet=pipe.denoiser, scheduler=pipe.scheduler, safety_checker=None,
                                     feature_extractor=None, requires_safety_checker=False)
        sd.save_pretrained(str(folder), safe_serialization=True)

    def encode_ids(self, pipe: Pipeline, ids: list[torch.Tensor], text_encoders=None) -> Cond:
        return Cond(_text_encoders(pipe, text_encoders)[0](ids[0])[0])

    def predict(self, pipe: Pipeline, denoiser, x_t: torch.Tensor, t, cond: Cond) -> torch.Tensor:
        return denoiser(x_t, _timesteps(t, x_t), encoder_hidden_states=as_cond(cond).states).sample

    def text_projections(self, denoiser) -> list[tuple[str, torch.nn.Linear]]:
        return cross_attention_projections(denoiser)


class SDXLBackbone(Backbone):
    """Stable Diffusion XL (StableDiffusionXLPipeline): two CLIP text encoders (`CLIPTextModel` and
    `CLIPTextModelWithProjection`), whose penultimate hidden states are concatenated into the cross-attention context;
    the second one's projected embedding is the pooled `text_embeds`, passed with the `time_ids` (original size,
    crop corner, target size) through `added_cond_kwargs`; epsilon prediction. As diffusers' `encode_prompt`: with
    the folder's `force_zeros_for_empty_prompt` (SDXL base's default), the unconditional branch of guidance is all
    zeros, states and pooled alike (`unconditional`); the empty prompt as a text (UCE's guide) is still encoded. The
    time ids are those of an unconditional full-size picture
    (`_get_add_time_ids` with original = target = the output size, crop (0, 0))."""
    kind = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    components = COMPONENTS + ("text_encoder_2", "tokenizer_2")
    weight_components = ("unet", "vae", "text_encoder", "text_encoder_2")

    def load(self, folder: Path, device, dtype, trust_remote_code: bool) -> Pipeline:
        from transformers import CLIPTextModelWithProjection

        parts = _load_parts(folder, {
            **_unet_pipeline_loaders(folder, dtype, trust_remote_code),
            "text_encoder_2": lambda: CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2", torch_dtype=dtype, trust_remote_code=trust_remote_code),
            "tokenizer_2": lambda: load_tokenizer(folder, trust_remote_code, "tokenizer_2")})
        if parts["unet"].config.addition_embed_type != "text_time":
            raise ObliviateError(f"{folder / 'unet'}: an SDXL UNet has addition_embed_type 'text_time', this one "
                                 f"{parts['unet'].config.addition_embed_type!r}")
        for m in (parts["unet"], parts["vae"], parts["text_encoder"], parts["text_encoder_2"]):
            m.to(device).eval().requires_grad_(False)
        index = read_json_file(folder / "model_index.json", "pipeline index")
        config = {"force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))}
        return Pipeline(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"],
                        str(folder), parts["text_encoder_2"], parts["tokenizer_2"], self, config)

    def save(self, pipe: Pipeline, folder: str | Path) -> None:
        from diffusers import StableDiffusionXLPipeline

        xl = StableDiffusionXLPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder,
                                       text_encoder_2=pipe.text_encoder_2, tokenizer=pipe.tokenizer,
                                       tokenizer_2=pipe.tokenizer_2, unet=pipe.denoiser, scheduler=pipe.scheduler,
                                       force_zeros_for_empty_prompt=pipe.config.get("force_zeros_for_empty_prompt",
                                                                                    True),
                                       add_watermarker=False)
        xl.save_pretrained(str(folder), safe_serialization=True)

    def encode_ids(self, pipe: Pipeline, ids: list[torch.Tensor], text_encoders=None) -> Cond:
        states, pooled = [], None
        for rows, encoder in zip(ids, _text_encoders(pipe, text_encoders)):
            out = encoder(rows, output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: its projected text embedding
                pooled = out[0]
            states.append(out.hidden_states[-2])
        return Cond(torch.cat(states, dim=-1), pooled)

    def unconditional(self, pipe: Pipeline, n: int, text_encoders=None) -> Cond | None:
        if not pipe.config.get("force_zeros_for_empty_prompt", True):
            return None
        one = self.encode(pipe, [""], text_encoders)  # for the shapes and dtypes only
        return Cond(torch.zeros_like(one.states), torch.zeros_like(one.pooled)).expand(n)

    def time_ids(self, pipe: Pipeline, n: int, device, dtype) -> torch.Tensor:
        h, w = (s * pipe.vae_scale_factor for s in pipe.latent_shape[1:])
        return torch.tensor([[h, w, 0, 0, h, w]], device=device, dtype=dtype).expand(n, -1)

    def predict(self, pipe: Pipeline, denoiser, x_t: torch.Tensor, t, cond: Cond) -> torch.Tensor:
        if cond.pooled is None:
            raise ObliviateError("an SDXL UNet needs pooled text embeddings: encode the prompts with its backbone")
        added = {"text_embeds": cond.pooled, "time_ids": self.time_ids(pipe, len(x_t), x_t.device, cond.pooled.dtype)}
        return denoiser(x_t, _timesteps(t, x_t), encoder_hidden_states=cond.states, added_cond_kwargs=added).sample

    def text_projections(self, denoiser) -> list[tuple[str, torch.nn.Linear]]:
        return cross_attention_projections(denoiser)


# The pipeline shapes, by model_index.json's `_class_name`. Another shape is one line here: its Backbone subclass
# (load, save, encode, predict, ... as SDBackbone), or "module:Class" for one defined in a module that imports this
# one (the transformer shapes of models/dit.py).
BACKBONES: dict[str, type[Backbone] | str] = {
    "StableDiffusionPipeline": SDBackbone,
    "StableDiffusionXLPipeline": SDXLBackbone,
    "StableDiffusion3Pipeline": "obliviate.models.dit:SD3Backbone",
    "FluxPipeline": "obliviate.models.dit:FluxBackbone",
}


def backbone_of(index: dict, where: Path) -> Backbone:
    """The Backbone for a model_index.json's `_class_name`; another class is refused in one line naming it."""
    name = index.get("_class_name", "StableDiffusionPipeline")  # folders written by hand may leave it out
    if name not in BACKBONES:
        raise ObliviateError(f"{where}: pipeline class {name!r} is not supported (supported: "
                             f"{', '.join(BACKBONES)})")
    backbone = BACKBONES[name]
    if isinstance(backbone, str):
        import importlib

        module, cls = backbone.split(":")
        backbone = getattr(importlib.import_module(module), cls)
    return backbone()


def check_folder(folder: str | Path) -> Path:
    """A diffusers pipeline folder with every component its shape needs; else a one-line error naming what is
    missing."""
    return _checked(folder)[0]


def read_pipeline_index(folder: str | Path) -> tuple[Path, dict]:
    """The folder and its model_index.json; a one-line error where it is not a diffusers pipeline folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ObliviateError(f"pipeline folder not found: {folder}")
    if not (folder / "model_index.json").is_file():
        raise ObliviateError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    index = read_json_file(folder / "model_index.json", "pipeline index")
    if not isinstance(index, dict):
        raise ObliviateError(f"{folder / 'model_index.json'}: must be a JSON object")
    return folder, index


def _checked(folder: str | Path) -> tuple[Path, Backbone]:
    folder, index = read_pipeline_index(folder)
    backbone = backbone_of(index, folder / "model_index.json")
    missing = [c for c in backbone.components if c not in index or not (folder / c).is_dir()]
    if missing:
        raise ObliviateError(f"{folder}: pipeline is missing component(s) {', '.join(missing)}")
    weights = [c for c in backbone.weight_components if not any((folder / c).glob("*.safetensors"))
               and not any((folder / c).glob("*.bin"))]
    if weights:
        raise ObliviateError(f"{folder}: no weights in component folder(s) {', '.join(weights)}")
    return folder, backbone


def load_pipeline(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  trust_remote_code: bool = False) -> Pipeline:
    """The folder's components, by its shape (model_index.json's `_class_name`). `trust_remote_code` goes to the
    transformers parts (tokenizers, text encoders) as given, never None: with None, transformers asks on the terminal
    whether to run a folder's `auto_map` code."""
    from diffusers.utils import logging as diffusers_logging

    from obliviate.models import quiet_transformers

    quiet_transformers()  # obliviate shows its own progress; no per-file bars from either library
    diffusers_logging.disable_progress_bar()
    folder, backbone = _checked(folder)
    return backbone.load(folder, device, dtype, trust_remote_code)


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False, subfolder: str = "tokenizer"):
    """The pipeline folder's tokenizer (its `tokenizer/` sub-folder, or `subfolder`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, subfolder=subfolder, trust_remote_code=trust_remote_code)


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
    """Write a folder that the shape's diffusers pipeline class loads (`StableDiffusionPipeline.from_pretrained`,
    `StableDiffusionXLPipeline`, `StableDiffusion3Pipeline`, `FluxPipeline`; no safety checker or watermark: a research
    model)."""
    pipe.backbone.save(pipe, folder)


def tokenize(pipe: Pipeline, texts: list[str], tokenizer=None) -> torch.Tensor:
    """Token ids [N, L] of the texts, padded to the tokenizer's length (the pipeline's first tokenizer, or the one
    given)."""
    tokenizer = tokenizer or pipe.tokenizer
    return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(pipe.device)


def encode(pipe: Pipeline, texts: list[str], text_encoders=None) -> Cond:
    """The prompts' text conditioning, as the pipeline's shape forms it (`text_encoders`: others than the
    pipeline's own, e.g. the originals while a method trains them)."""
    return pipe.backbone.encode(pipe, list(texts), text_encoders)


def encode_prompts(pipe: Pipeline, texts: list[str], text_encoder=None) -> torch.Tensor:
    """Per-token text states [N, L, D], the denoiser's cross-attention context (`encode(...).states`)."""
    return encode(pipe, texts, text_encoder).states


def predict_noise(unet, latents: torch.Tensor, t: torch.Tensor | int, context: torch.Tensor) -> torch.Tensor:
    """A Stable-Diffusion-1.x UNet's noise prediction from bare text states (code written before backbones; shapes
    with more conditioning go through `pipe.backbone.predict`)."""
    return unet(latents, _timesteps(t, latents), encoder_hidden_states=as_cond(context).states).sample


def add_noise(pipe: Pipeline, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The training forward process of the pipeline's shape (x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps)."""
    return pipe.backbone.noisy(pipe, x0, noise, t)


def random_timesteps(pipe: Pipeline, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return pipe.backbone.train_timesteps(pipe, n, generator)


def encode_images(pipe: Pipeline, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> scaled latents (the posterior mean: deterministic; the shape's scaling)."""
    return pipe.backbone.encode_images(pipe, images)


def decode(pipe: Pipeline, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1]."""
    return pipe.backbone.decode(pipe, latents)


def initial_noise(pipe: Pipeline, seeds: list[int]) -> torch.Tensor:
    """One noise tensor per seed, independent of batching (so a prompt/seed pair always gives the same picture)."""
    shape = pipe.latent_shape
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(
        pipe.device, pipe.denoiser.dtype)


@torch.no_grad()
def denoise(pipe: Pipeline, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 4.0,
            denoiser=None, stop_after: int | None = None, latents: torch.Tensor | None = None,
            text_encoders=None, context: Cond | torch.Tensor | None = None, *, guard=None, unet=None,
            text_encoder=None) -> tuple[torch.Tensor, int]:
    """The shape's sampler (DDIM, eta 0, for SD and SDXL; the pipelines' Euler flow sampler for SD3 and FLUX) with
    classifier-free guidance u + g (c - u), the conditional and unconditional passes in one denoiser call (a
    guidance-distilled FLUX: g through its embedding, one pass). Stops after `stop_after` of the `steps` steps when
    given (ESD's partial sampling). `context`, when given, is the prompts' own conditioning (an attack's soft prompt); the
    unconditional one is still encoded here. `guard` (default: the pipeline's own, `pipe.guard`): a generation-time
    guard (obliviate.guards.t2i) that adds its rows and prompts to the same denoiser call and combines the
    predictions instead of the guidance line. `unet` and `text_encoder` are the older names of `denoiser` and
    `text_encoders`. Returns the latents and the training timestep they are at (0 after a full run; a float on flow
    shapes)."""
    backbone = pipe.backbone
    denoiser = denoiser or unet or pipe.denoiser
    text_encoders = text_encoders or text_encoder
    guard = guard if guard is not None else pipe.guard
    sched = backbone.sampler(pipe, steps)
    x = initial_noise(pipe, seeds) if latents is None else latents
    n = x.shape[0]
    embedded = backbone.embeds_guidance(pipe)  # a guidance-distilled model: g goes in, one conditional pass
    cfg = (guidance != 1 and not embedded) or guard is not None  # a guard reads both predictions
    uncond = backbone.unconditional(pipe, n, text_encoders) if cfg else None
    if context is not None:
        context = as_cond(context)
        if cfg:
            cond = Cond.cat([context, uncond if uncond is not None else encode(pipe, [""] * n, text_encoders)])
        else:
            cond = context
    elif cfg:
        cond = encode(pipe, list(prompts) + [""] * n, text_encoders) if uncond is None else \
            Cond.cat([encode(pipe, list(prompts), text_encoders), uncond])
    else:
        cond = encode(pipe, list(prompts), text_encoders)
    if guard is not None:
        # the texts go along only when they are what was encoded (not under a caller's own `context`)
        x, cond = guard.begin(pipe, denoiser, x, seeds, cond, guidance, text_encoders,
                              prompts=list(prompts) if context is None else None)
    last_t = backbone.time_value(sched.timesteps[0])
    for i, t in enumerate(sched.timesteps):
        if stop_after is not None and i >= stop_after:
            return (x if guard is None else guard.finish(x)), backbone.time_value(t)
        if guard is not None:
            extra = guard.extra_prompts()
            with guard.merging(t):
                pred_c, pred_u, *more = backbone.predict(pipe, denoiser, torch.cat([x] * (2 + len(extra))), t,
                                                         cond).chunk(2 + len(extra))
            pred = guard.combine(i, t, x, pred_u, pred_c, dict(zip(extra, more)))
        elif embedded:
            pred = backbone.predict(pipe, denoiser, x, t, cond, guidance=guidance)
        elif guidance != 1:
            pred_c, pred_u = backbone.predict(pipe, denoiser, torch.cat([x, x]), t, cond).chunk(2)
            pred = pred_u + guidance * (pred_c - pred_u)
        else:
            pred = backbone.predict(pipe, denoiser, x, t, cond)
        x = sched.step(pred, t, x).prev_sample
        last_t = backbone.time_value(t)
    x = x if guard is None else guard.finish(x)
    return x, 0 if stop_after is None or stop_after >= len(sched.timesteps) else last_t


@torch.no_grad()
def sample(pipe: Pipeline, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 4.0,
           batch_size: int = 128, denoiser=None, *, guard=None, unet=None) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1], one per (prompt, seed), batched (through `guard`, or the pipeline's own)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        x, _ = denoise(pipe, prompts[i:i + batch_size], seeds[i:i + batch_size], steps, guidance,
                       denoiser=denoiser or unet, guard=guard)
        out.append(decode(pipe, x).cpu())
    return torch.cat(out) if out else torch.empty(0, 3, 1, 1)
