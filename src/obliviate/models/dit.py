"""Transformer (DiT) text-to-image pipelines: SD3-shaped (`StableDiffusion3Pipeline` folders) and FLUX-shaped
(`FluxPipeline` folders), as backbones of the protocol in T2I_CONTRACT.md section 1 (encode, predict, noisy, target,
train_timesteps, text_projections, sampler). Methods and metrics keep latents as [N, C, h, w]; FLUX's 2x2 packing
and its position ids happen inside `predict`.

Flow matching, as diffusers' pipelines and training examples do it (pipeline_stable_diffusion_3.py,
pipeline_flux.py; examples/dreambooth/train_dreambooth_lora_sd3.py and train_dreambooth_lora_flux.py):
- a timestep t lives on the scheduler's scale [0, num_train_timesteps]; its noise level is sigma = t / 1000
  (FlowMatchEulerDiscreteScheduler: timesteps = sigmas * num_train_timesteps);
- forward process x_t = (1 - sigma) x0 + sigma noise; the network predicts the velocity, trained towards
  noise - x0 (`prediction = "flow"`);
- SD3's transformer takes t itself, FLUX's takes t / 1000 (it multiplies by 1000 inside);
- training timesteps: SD3 draws u from the logit-normal density (mean 0, std 1: the SD3 paper, section 3.1, and the
  SD3 example's default `--weighting_scheme logit_normal`), FLUX uniformly (the FLUX example's default "none"); both
  pick `scheduler.timesteps[int(u * 1000)]` of the folder's training scheduler, so SD3's static `shift` applies to
  training as it does in the example, and FLUX's resolution shift does not (it is applied at sampling only);
- sampling: FlowMatchEulerDiscreteScheduler.set_timesteps as each pipeline calls it (FLUX: sigmas linspace(1, 1/n, n)
  and `mu = calculate_shift(image_seq_len)`; SD3: `mu` only where the scheduler config asks for dynamic shifting);
- guidance: SD3 and a FLUX model without a guidance embedding (`guidance_embeds=False`, e.g. FLUX.1-schnell and the
  tiny test models) use true classifier-free guidance, u + g (c - u), from two predictions (FluxPipeline's
  `true_cfg_scale` with the empty negative prompt). A guidance-distilled FLUX (`guidance_embeds=True`, FLUX.1-dev)
  gets g through its guidance embedding in one conditional pass, as FluxPipeline(guidance_scale=g) does; `predict`
  then feeds `embedded_guidance` (3.5, FluxPipeline's default) unless told another value.

What the text states are and which weights read them: see `text_projections` and `text_input_projections`.

Both backbones are `diffusion.Backbone`s and their folders load as `diffusion.Pipeline`s (`diffusion.BACKBONES`
names them by `_class_name`): runs, the loop, sampling (`diffusion.denoise`), export and the attacks go through the
same calls as for SD and SDXL. The denoiser's folder (and its tensors' prefix in a run's changed.safetensors) is
`transformer`."""
from __future__ import annotations

from pathlib import Path

import torch

from obliviate.errors import ObliviateError
from obliviate.models.diffusion import Backbone, Cond, Pipeline


# the transformers' linear maps whose input is the text conditioning, and the `Cond` field each reads
TEXT_INPUT_PROJECTIONS = {"context_embedder": "states", "time_text_embed.text_embedder.linear_1": "pooled"}


class _FlowBackbone(Backbone):
    """What SD3 and FLUX share: the flow-matching forward process, target, training timesteps, VAE scaling, the
    sampler and loading/saving. Subclasses say how text is encoded and how the transformer is called."""
    kind = ""
    prediction = "flow"
    pipeline_class = ""
    denoiser_folder = "transformer"
    components: tuple[str, ...] = ()
    timestep_density = "none"  # diffusers.training_utils.compute_density_for_timestep_sampling's weighting_scheme

    def __init__(self, max_sequence_length: int):
        self.max_sequence_length = max_sequence_length  # T5 tokens, the pipeline's default

    @property
    def weight_components(self) -> tuple[str, ...]:
        return tuple(c for c in self.components if c in ("transformer", "vae") or c.startswith("text_encoder"))

    def load(self, folder: Path, device, dtype, trust_remote_code: bool) -> Pipeline:
        return _load(self, folder, device, dtype, trust_remote_code)

    def save(self, pipe, folder: str | Path) -> None:
        save_dit_pipeline(pipe, folder)

    # ---- the training forward process ----------------------------------------------------------------------------
    @staticmethod
    def _sigma(pipe, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=like.device, dtype=torch.float32).reshape(-1)
        sigma = t / pipe.scheduler.config.num_train_timesteps
        return sigma.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def noisy(self, pipe, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma noise (FlowMatchEulerDiscreteScheduler.scale_noise)."""
        sigma = self._sigma(pipe, t, x0)
        return (1 - sigma) * x0 + sigma * noise

    def target(self, pipe, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """The velocity d x_t / d sigma = noise - x0, what the transformer is trained towards."""
        return noise - x0

    def train_timesteps(self, pipe, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n training timesteps (floats on the scheduler's scale), drawn as the diffusers examples draw them."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.training_utils import compute_density_for_timestep_sampling

        train = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # untouched training timesteps
        u = compute_density_for_timestep_sampling(self.timestep_density, n, logit_mean=0.0, logit_std=1.0,
                                                  mode_scale=1.29, generator=generator)
        idx = (u * train.config.num_train_timesteps).long().clamp(max=len(train.timesteps) - 1)
        return train.timesteps[idx].to(pipe.device)

    # ---- latents and images --------------------------------------------------------------------------------------
    def encode_images(self, pipe, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the transformer's latents (posterior mean, then (z - shift) * scale as in training)."""
        x = images.to(pipe.device, pipe.vae.dtype) * 2 - 1
        z = pipe.vae.encode(x).latent_dist.mean
        return (z - (pipe.vae.config.shift_factor or 0.0)) * pipe.vae.config.scaling_factor

    def decode(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (z / scale + shift, as the pipelines decode)."""
        z = latents / pipe.vae.config.scaling_factor + (pipe.vae.config.shift_factor or 0.0)
        x = pipe.vae.decode(z.to(pipe.vae.dtype)).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    # ---- sampling (`diffusion.denoise` runs the loop) ---------------------------------------------------------------
    def _set_timesteps(self, pipe, sched, steps: int) -> None:
        raise NotImplementedError

    def sampler(self, pipe, steps: int):
        """A fresh FlowMatchEulerDiscreteScheduler from the folder's config with the pipeline's timesteps set."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self._set_timesteps(pipe, sched, steps)
        return sched

    def time_value(self, t) -> float:
        return float(t)  # flow timesteps are floats on the scheduler's scale

    # ---- which weights read the text -------------------------------------------------------------------------------
    def text_projections(self, denoiser) -> list[tuple[str, torch.nn.Linear]]:
        """The joint-attention blocks' context-stream key/value maps, `attn.add_k_proj` / `attn.add_v_proj`: the
        weights that turn text tokens into the keys and values every image token attends to, the analogue of SD's
        `attn2.to_k` / `attn2.to_v` for gradient methods (ESD-x-style training, restricted fine-tuning). FLUX's
        single-stream blocks have no text-only projections (one `to_k`/`to_v` over the concatenated text and image
        tokens) and are not listed. EraseAnything (Gao et al. 2025, github.com/tomguluson92/EraseAnything,
        train_flux_lora.py) trains LoRA on the double-stream blocks' `attn.add_k_proj` and `attn.add_q_proj`,
        i.e. the same blocks' context-stream maps; obliviate keeps key and value as UCE/ESD-x do on SD.

        These maps read the context stream after `context_embedder`, the block's AdaLN modulation (which depends
        on the timestep and the pooled text) and, from the second block on, the previous blocks' joint attention
        over the image: not `Cond.states`. A closed-form edit that needs the maps' inputs uses
        `text_input_projections` instead."""
        return [(f"{name}.{proj}", getattr(module, proj)) for name, module in denoiser.named_modules()
                for proj in ("add_k_proj", "add_v_proj")
                if isinstance(getattr(module, proj, None), torch.nn.Linear)]

    def text_input_projections(self, denoiser) -> list[tuple[str, torch.nn.Linear, str]]:
        """The linear maps whose input is the text conditioning itself, with the `Cond` field each reads:
        `context_embedder` (input `Cond.states`: every token state, output: the context stream every joint block
        reads) and `time_text_embed.text_embedder.linear_1` (input `Cond.pooled`: the pooled CLIP embedding that
        modulates every block through AdaLN). These are what UCE's closed form edits on these shapes: the UCE
        authors' FLUX port (github.com/rohitgandikota/unified-concept-editing, trainscripts/uce_flux_edit.py)
        edits exactly `context_embedder` and `text_embedder.linear_1`, with the T5 state of the prompt's last
        content token and the pooled CLIP vector as c_i, and v* = W c_guide ("replace"). SD3's transformer has
        modules of the same names and roles, so obliviate applies the same rule to it (our analogy, not an
        author's release). For the first joint block, editing `context_embedder` is the exact analogue of UCE's
        key/value edit: add_k/add_v see the edited tokens after a per-token-identical modulation.
        `content_positions` says where each prompt's words sit in `Cond.states`."""
        modules = dict(denoiser.named_modules())
        return [(name, modules[name], field) for name, field in TEXT_INPUT_PROJECTIONS.items()]

    def content_positions(self, pipe, texts: list[str]) -> list[list[int]]:
        """Per text, the positions in `Cond.states` that hold its content tokens (no start, end or padding
        token), in order: what a closed-form method picks its c_i from (UCE-FLUX takes the last T5 one)."""
        out = [[] for _ in texts]
        offset = 0
        for tokenizer, length in self._state_segments(pipe):
            ids = self._ids(tokenizer, texts, length, "cpu")
            special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
            for i, row in enumerate(ids):
                out[i] += [offset + j for j in torch.nonzero(~torch.isin(row, special)).flatten().tolist()]
            offset += length
        return out

    def _state_segments(self, pipe) -> list[tuple[object, int]]:
        """(tokenizer, length) of each run of positions in `Cond.states`, in order."""
        raise NotImplementedError

    # ---- to fill in per shape --------------------------------------------------------------------------------------
    def latent_shape(self, pipe) -> tuple[int, int, int]:
        raise NotImplementedError

    def token_ids(self, pipe, texts: list[str]) -> list[torch.Tensor]:
        """Token ids [N, L] per tokenizer, each padded to the length the diffusers pipeline gives it."""
        raise NotImplementedError

    def encode(self, pipe, texts: list[str], text_encoders=None) -> Cond:
        return self.encode_ids(pipe, self.token_ids(pipe, list(texts)), text_encoders)

    def predict(self, pipe, denoiser, x_t: torch.Tensor, t, cond: Cond, guidance: float | None = None):
        raise NotImplementedError

    # ---- helpers -------------------------------------------------------------------------------------------------
    @staticmethod
    def _encoders(pipe, text_encoders) -> tuple:
        """The pipeline's text encoders, with replacements: one module replaces the first (CLIP) encoder, as
        SD's `text_encoder=` does; a sequence replaces position by position (None keeps the pipeline's)."""
        if text_encoders is None:
            return tuple(pipe.text_encoders)
        if isinstance(text_encoders, torch.nn.Module):
            text_encoders = [text_encoders]
        given = list(text_encoders) + [None] * (len(pipe.text_encoders) - len(text_encoders))
        return tuple(g if g is not None else own for g, own in zip(given, pipe.text_encoders))

    @staticmethod
    def _ids(tokenizer, texts: list[str], max_length: int, device) -> torch.Tensor:
        return tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)

    @staticmethod
    def _t(t, n: int, device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device, dtype=torch.float32).reshape(-1)
        return t.expand(n) if t.numel() == 1 else t


class SD3Backbone(_FlowBackbone):
    """`StableDiffusion3Pipeline` folders: SD3Transformer2DModel (joint attention), AutoencoderKL (16 latent channels,
    shift_factor and scaling_factor), CLIP-L and CLIP-G (CLIPTextModelWithProjection) and T5, FlowMatchEuler.

    `Cond.states` [N, 77 + T, D_t5]: the two CLIPs' penultimate hidden states concatenated on features and
    zero-padded to T5's width, followed by T5's last hidden states (T = max_sequence_length, 256 by default), exactly
    StableDiffusion3Pipeline.encode_prompt's prompt_embeds (what `context_embedder` reads). `Cond.pooled` [N, 2048
    for SD3]: the two CLIPs' projected text embeddings concatenated (`pooled_projections`)."""
    kind = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    components = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                  "text_encoder_3", "tokenizer_3", "scheduler")
    timestep_density = "logit_normal"

    def __init__(self, max_sequence_length: int = 256):
        super().__init__(max_sequence_length)

    def latent_shape(self, pipe) -> tuple[int, int, int]:
        s = pipe.denoiser.config.sample_size
        return (pipe.denoiser.config.in_channels, s, s)

    def token_ids(self, pipe, texts: list[str]) -> list[torch.Tensor]:
        tok_l, tok_g, tok_t5 = pipe.tokenizers
        # the pipeline pads both CLIPs to its first tokenizer's length (tokenizer_max_length)
        return [self._ids(tok_l, texts, tok_l.model_max_length, pipe.device),
                self._ids(tok_g, texts, tok_l.model_max_length, pipe.device),
                self._ids(tok_t5, texts, self.max_sequence_length, pipe.device)]

    def encode_ids(self, pipe, ids: list[torch.Tensor], text_encoders=None) -> Cond:
        clip_l, clip_g, t5 = self._encoders(pipe, text_encoders)
        states, pooled = [], []
        for encoder, rows in ((clip_l, ids[0]), (clip_g, ids[1])):
            out = encoder(rows, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out[0])
        t5_states = t5(ids[2])[0]
        clip = torch.cat(states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
        return Cond(torch.cat([clip, t5_states.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1))

    def _state_segments(self, pipe) -> list[tuple[object, int]]:
        clip, t5 = pipe.tokenizers[0], pipe.tokenizers[2]
        return [(clip, clip.model_max_length), (t5, self.max_sequence_length)]

    def predict(self, pipe, denoiser, x_t: torch.Tensor, t, cond: Cond, guidance: float | None = None):
        """The transformer's velocity for x_t [N, C, h, w] at timesteps t (scheduler scale: SD3 takes t itself)."""
        return denoiser(hidden_states=x_t, timestep=self._t(t, x_t.shape[0], x_t.device),
                        encoder_hidden_states=cond.states, pooled_projections=cond.pooled, return_dict=False)[0]

    def _set_timesteps(self, pipe, sched, steps: int) -> None:
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", False):  # as StableDiffusion3Pipeline: mu from the token count
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            _, h, w = self.latent_shape(pipe)
            p = pipe.denoiser.config.patch_size
            kwargs["mu"] = calculate_shift((h // p) * (w // p), sched.config.get("base_image_seq_len", 256),
                                           sched.config.get("max_image_seq_len", 4096),
                                           sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.16))
        sched.set_timesteps(steps, device=pipe.device, **kwargs)


class FluxBackbone(_FlowBackbone):
    """`FluxPipeline` folders: FluxTransformer2DModel (double- then single-stream blocks, rotary position ids),
    AutoencoderKL (16 channels, shift and scale), CLIPTextModel (pooled only) and T5, FlowMatchEuler with FLUX's
    resolution-dependent shift.

    `Cond.states` [N, T, D_t5]: T5's last hidden states (T = max_sequence_length, 512 by default: FluxPipeline's
    prompt_embeds). `Cond.pooled` [N, 768 for FLUX]: CLIP-L's pooler output (pooled_prompt_embeds). Latents stay
    [N, C, h, w] (h, w even); `predict` packs them into 2x2 patches [N, h/2 * w/2, 4C] with their img_ids, and the
    text ids (all zero) from the states' length, then unpacks the velocity."""
    kind = "flux"
    pipeline_class = "FluxPipeline"
    components = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
    timestep_density = "none"  # uniform

    def __init__(self, max_sequence_length: int = 512, embedded_guidance: float = 3.5):
        super().__init__(max_sequence_length)
        self.embedded_guidance = embedded_guidance  # fed to a guidance-distilled model's embedding in predict()

    def latent_shape(self, pipe) -> tuple[int, int, int]:
        vae = pipe.vae.config
        scale = 2 ** (len(vae.block_out_channels) - 1)
        s = 2 * (int(vae.sample_size) // (scale * 2))  # FluxPipeline.prepare_latents at the VAE's native size
        return (pipe.denoiser.config.in_channels // 4, s, s)

    def token_ids(self, pipe, texts: list[str]) -> list[torch.Tensor]:
        tok_clip, tok_t5 = pipe.tokenizers
        return [self._ids(tok_clip, texts, tok_clip.model_max_length, pipe.device),
                self._ids(tok_t5, texts, self.max_sequence_length, pipe.device)]

    def encode_ids(self, pipe, ids: list[torch.Tensor], text_encoders=None) -> Cond:
        clip, t5 = self._encoders(pipe, text_encoders)
        pooled = clip(ids[0]).pooler_output
        states = t5(ids[1])[0]
        return Cond(states, pooled.to(states.dtype))

    def _state_segments(self, pipe) -> list[tuple[object, int]]:
        return [(pipe.tokenizers[1], self.max_sequence_length)]

    @staticmethod
    def pack(x: torch.Tensor) -> torch.Tensor:
        """[N, C, h, w] -> [N, h/2 * w/2, 4C] (FluxPipeline._pack_latents)."""
        n, c, h, w = x.shape
        return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[N, h/2 * w/2, 4C] -> [N, C, h, w] (FluxPipeline._unpack_latents)."""
        n, _, c4 = x.shape
        return x.view(n, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c4 // 4, h, w)

    @staticmethod
    def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
        """[h/2 * w/2, 3] rotary position ids of the packed patches (FluxPipeline._prepare_latent_image_ids)."""
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] += torch.arange(h // 2)[:, None]
        ids[..., 2] += torch.arange(w // 2)[None, :]
        return ids.reshape(-1, 3).to(device=device, dtype=dtype)

    def predict(self, pipe, denoiser, x_t: torch.Tensor, t, cond: Cond, guidance: float | None = None):
        """The transformer's velocity for x_t [N, C, h, w] at timesteps t (scheduler scale; FLUX takes t / 1000).
        A guidance-distilled model gets `guidance` (default `embedded_guidance`) through its embedding."""
        n, _, h, w = x_t.shape
        if h % 2 or w % 2:
            raise ObliviateError(f"FLUX latents must have even height and width, got {h}x{w}")
        g = None
        if denoiser.config.guidance_embeds:
            g = torch.full((n,), float(self.embedded_guidance if guidance is None else guidance),
                           device=x_t.device, dtype=torch.float32)
        out = denoiser(hidden_states=self.pack(x_t), timestep=self._t(t, n, x_t.device).to(x_t.dtype) / 1000,
                       guidance=g, pooled_projections=cond.pooled, encoder_hidden_states=cond.states,
                       txt_ids=torch.zeros(cond.states.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
                       img_ids=self.image_ids(h, w, x_t.device, x_t.dtype), return_dict=False)[0]
        return self.unpack(out, h, w)

    def embeds_guidance(self, pipe) -> bool:
        return bool(pipe.denoiser.config.guidance_embeds)

    def _set_timesteps(self, pipe, sched, steps: int) -> None:
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        _, h, w = self.latent_shape(pipe)
        sigmas = None if sched.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift((h // 2) * (w // 2), sched.config.get("base_image_seq_len", 256),
                             sched.config.get("max_image_seq_len", 4096), sched.config.get("base_shift", 0.5),
                             sched.config.get("max_shift", 1.15))
        if sigmas is None:
            sched.set_timesteps(steps, device=pipe.device, mu=mu)
        else:
            sched.set_timesteps(sigmas=sigmas, device=pipe.device, mu=mu)


BACKBONES = {"StableDiffusion3Pipeline": SD3Backbone, "FluxPipeline": FluxBackbone}


# ---- folders ------------------------------------------------------------------------------------------------------
def _loaders(backbone: _FlowBackbone, folder: Path, dtype, trust_remote_code: bool) -> dict:
    """One loader per component folder (tokenizers included), so a failure names its folder."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    sd3 = isinstance(backbone, SD3Backbone)
    te = dict(torch_dtype=dtype, trust_remote_code=trust_remote_code)
    loaders = {
        "transformer": lambda: (SD3Transformer2DModel if sd3 else FluxTransformer2DModel).from_pretrained(
            folder, subfolder="transformer", torch_dtype=dtype),
        "vae": lambda: AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype),
        "text_encoder": lambda: (CLIPTextModelWithProjection if sd3 else CLIPTextModel).from_pretrained(
            folder, subfolder="text_encoder", **te),
        "text_encoder_2": lambda: (CLIPTextModelWithProjection if sd3 else T5EncoderModel).from_pretrained(
            folder, subfolder="text_encoder_2", **te),
        "text_encoder_3": lambda: T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_3", **te),
        "scheduler": lambda: FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")}
    for c in backbone.components:
        if c.startswith("tokenizer"):
            loaders[c] = (lambda c=c: AutoTokenizer.from_pretrained(folder, subfolder=c,
                                                                    trust_remote_code=trust_remote_code))
    return {c: loaders[c] for c in backbone.components}


def _load(backbone: _FlowBackbone, folder: Path, device, dtype, trust_remote_code: bool) -> Pipeline:
    from obliviate.models.diffusion import _load_parts

    parts = _load_parts(folder, _loaders(backbone, folder, dtype, trust_remote_code))
    for name, m in parts.items():
        if name == "transformer" or name == "vae" or name.startswith("text_encoder"):
            m.to(device).eval().requires_grad_(False)
    return Pipeline(parts["transformer"], parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"],
                    str(folder), parts["text_encoder_2"], parts["tokenizer_2"], backbone,
                    text_encoder_3=parts.get("text_encoder_3"), tokenizer_3=parts.get("tokenizer_3"))


def dit_pipeline(denoiser, vae, text_encoders, tokenizers, scheduler, backbone: _FlowBackbone,
                 folder: str | None = None) -> Pipeline:
    """A `diffusion.Pipeline` of SD3/FLUX components built in code, text encoders and tokenizers in the folder's
    order (SD3: CLIP-L, CLIP-G, T5; FLUX: CLIP-L, T5)."""
    encoders, tokenizers = list(text_encoders) + [None] * 2, list(tokenizers) + [None] * 2
    return Pipeline(denoiser, vae, encoders[0], tokenizers[0], scheduler, folder, encoders[1], tokenizers[1], backbone,
                    text_encoder_3=encoders[2], tokenizer_3=tokenizers[2])


def load_dit_pipeline(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                      trust_remote_code: bool = False, max_sequence_length: int | None = None) -> Pipeline:
    """An SD3- or FLUX-shaped folder, loaded (`diffusion.load_pipeline` with a DiT check first, and the T5 length).
    `max_sequence_length` (T5 tokens; default the pipeline's, 256 for SD3 and 512 for FLUX) matters: these
    transformers attend to the padding tokens too, so diffusers reproduces obliviate's images only when called with
    the same `max_sequence_length`."""
    from obliviate.models.diffusion import load_pipeline, read_pipeline_index

    folder, index = read_pipeline_index(folder)
    name = str(index.get("_class_name", ""))
    if name not in BACKBONES:
        raise ObliviateError(f"{folder / 'model_index.json'}: pipeline class '{name}' is not a DiT pipeline "
                             f"obliviate reads ({', '.join(BACKBONES)})")
    pipe = load_pipeline(folder, device, dtype, trust_remote_code)
    if max_sequence_length is not None:
        pipe.backbone.max_sequence_length = max_sequence_length
    return pipe


def diffusers_pipeline(pipe: Pipeline):
    """The diffusers pipeline object of the same components (StableDiffusion3Pipeline or FluxPipeline)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if pipe.backbone.kind == "sd3":
        return StableDiffusion3Pipeline(transformer=pipe.denoiser, scheduler=pipe.scheduler, vae=pipe.vae,
                                        text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                        text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
                                        text_encoder_3=pipe.text_encoder_3, tokenizer_3=pipe.tokenizer_3)
    return FluxPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder,
                        tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
                        transformer=pipe.denoiser)


def save_dit_pipeline(pipe: Pipeline, folder: str | Path) -> None:
    """Write a folder (safetensors) that StableDiffusion3Pipeline / FluxPipeline.from_pretrained loads."""
    diffusers_pipeline(pipe).save_pretrained(str(folder), safe_serialization=True)
