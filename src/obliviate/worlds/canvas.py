"""The canvas world: pictures of objects in styles and colours (UnlearnCanvas in miniature), and the recipe that
trains a small but complete Stable-Diffusion-shaped pipeline on them, a classifier for the metrics, a CLIP for the
alignment score, and retrain-without-concept references. Deterministic from the seed; cached by recipe hash.

Retrain references. The world's build makes those of `retrain_concepts` (striped and star) from a denoiser trunk
that never saw them. Every other reference is built on demand (`ensure_retrain`), outside the cache key: the
validation concepts' (`VALIDATION_CONCEPTS`, where settings are chosen) and any concept's with another training seed
(the noise floor). The build's trunk saw the validation concepts' pictures, so an on-demand reference never starts
from it: it repeats the recipe of the denoiser for itself, a fresh UNet and text encoder (initialised as the build's:
the text tower of the world's CLIP) trained as a trunk on every picture except the retrain concepts' and its own
concept's, then a branch on every picture except its concept's, with the build's step counts and schedule; the seed
only changes the random streams (initialisation, batches, noise). It shares the world's autoencoder, CLIP and
classifier, which every reference of the build shares too."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from obliviate.errors import ObliviateError
from obliviate.worlds import canvas_draw as cd
from obliviate.worlds.base import World
from obliviate.worlds.canvas_train import CanvasClassifier, CanvasRecipe

DEFAULT_RETRAIN = ("striped", "star")  # one style and one object with retrain references


def concept_kind(concept: str) -> str:
    if concept in cd.STYLES:
        return "style"
    if concept in cd.OBJECTS:
        return "object"
    raise ObliviateError(f"the canvas world has no concept '{concept}'; styles: {', '.join(cd.STYLES)}; "
                         f"objects: {', '.join(cd.OBJECTS)}")


class CanvasWorld(World):
    kind = "canvas"
    # where settings are chosen (never on striped / star, which the tables report): a style and an object
    VALIDATION_CONCEPTS = {"style": "dotted", "object": "heart"}

    def __init__(self, recipe: CanvasRecipe | None = None, cache_dir: str | None = None,
                 retrain_concepts: tuple[str, ...] = DEFAULT_RETRAIN):
        for c in retrain_concepts:
            concept_kind(c)
        self.recipe = recipe or CanvasRecipe()
        self.cache_dir = cache_dir
        self.retrain_concepts = tuple(retrain_concepts)

    @classmethod
    def from_config(cls, world_cfg) -> "CanvasWorld":
        recipe = CanvasRecipe(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in world_cfg.model.items()})
        return cls(dataclasses.replace(recipe, seed=world_cfg.seed), world_cfg.cache_dir)

    # ---- where things live ---------------------------------------------------------------------------------------
    def key_data(self) -> dict:
        return {"recipe": self.recipe.key(), "objects": cd.OBJECTS, "styles": cd.STYLES, "colours": cd.COLOURS,
                "templates": cd.TEMPLATES, "retrain": self.retrain_concepts, "version": 3}

    @property
    def pipeline_dir(self) -> Path:
        return self.root / "pipeline"

    @property
    def full_model_dir(self) -> Path:
        return self.pipeline_dir

    def check_target(self, concept: str) -> None:
        concept_kind(concept)

    def retrain_dir(self, concept: str, seed: int = 0) -> Path:
        """The folder of a built reference (`ensure_retrain` builds the others)."""
        path = super().retrain_dir(concept, seed)
        if not path.is_dir():
            built = sorted(p.name.removeprefix("retrain-") for p in self.root.glob("retrain-*") if p.is_dir())
            raise ObliviateError(f"the canvas world has no retrain reference for '{concept}'"
                                 f"{f' with seed {seed}' if seed else ''} (built: {', '.join(built) or 'none'}; "
                                 f"`ensure_retrain` builds it)")
        return path

    def ensure_retrain(self, concept: str, seed: int = 0, log=print) -> Path:
        """Build the world if needed and the reference without `concept` trained with seed `seed` if missing (the
        module's docstring says how); return its folder. Seed 0 of striped and star is the build's own."""
        folder = self.root / self.retrain_name(concept, seed)
        self.check_target(concept)
        self.build(log=log)
        self._ensure_model(folder, folder.name, lambda out: self._train_reference(concept, seed, out, log), log)
        return folder

    @property
    def classifier_dir(self) -> Path:
        return self.root / "classifier"

    @property
    def clip_dir(self) -> Path:
        return self.root / "clip"

    def is_built(self) -> bool:
        return (self.root / "build.json").is_file()

    # ---- data ----------------------------------------------------------------------------------------------------
    def triples(self) -> list[tuple[str, str, str]]:
        return [(c, o, s) for c in cd.COLOURS_LIST for o in cd.OBJECTS for s in cd.STYLES]

    def render(self, seed_offset: int = 0, per_triple: int | None = None, exclude: str | None = None):
        """Pictures [N, 3, H, W], their triple index, and the triples; `seed_offset` 1 gives a held-out real set."""
        per_triple = per_triple or self.recipe.images_per_triple
        rng = np.random.default_rng([self.recipe.seed, seed_offset])
        images, ids = [], []
        for k, (c, o, s) in enumerate(self.triples()):
            if exclude in (o, s):
                continue
            for _ in range(per_triple):
                images.append(cd.draw(o, s, c, rng, self.recipe.image_size))
                ids.append(k)
        return torch.from_numpy(np.stack(images)), torch.tensor(ids)

    def prompts(self) -> list[cd.CanvasPrompt]:
        """Evaluation prompts: every canonical triple prompt, plus the held-out paraphrases."""
        return cd.canonical_prompts() + cd.paraphrase_prompts()

    def forget_prompts(self, concept: str) -> list[str]:
        """The captions an erasure method is given for a concept (training forms only: paraphrases stay held out)."""
        concept_kind(concept)
        return [p.text for p in cd.canonical_prompts() if p.has(concept)]

    def retain_prompts(self, concept: str) -> list[cd.CanvasPrompt]:
        concept_kind(concept)
        return [p for p in cd.canonical_prompts() if not p.has(concept)]

    def anchor(self, concept: str) -> str:
        """The concept an erasure maps to (Concept Ablation's anchor, UCE's guide): the plain style or the next
        object. Used in prompts like the concept's own."""
        return "solid" if concept_kind(concept) == "style" and concept != "solid" else \
            "gradient" if concept == "solid" else cd.OBJECTS[(cd.OBJECTS.index(concept) + 1) % len(cd.OBJECTS)]

    def _train_reference(self, concept: str, seed: int, out: Path, log) -> dict:
        """A retrain reference without `concept`, built apart from the world (module docstring)."""
        import zlib

        from transformers import CLIPModel, CLIPTextModel

        from obliviate.models.diffusion import Pipeline, encode_images, load_pipeline, save_pipeline
        from obliviate.runs import atomic_dir
        from obliviate.worlds import canvas_train as ct

        r = self.recipe
        # the random streams of this reference alone: the recipe's seed, the reference's seed and its concept
        streams = np.random.SeedSequence([r.seed, seed, zlib.crc32(concept.encode())]).generate_state(3).tolist()
        base = load_pipeline(self.pipeline_dir)
        images, ids = self.render()
        triples = self.triples()
        captions_of = [cd.training_captions(*t) for t in triples]
        with torch.no_grad():
            latents = torch.cat([encode_images(base, images[i:i + 256]) for i in range(0, len(images), 256)])
        clip = CLIPModel.from_pretrained(self.clip_dir, trust_remote_code=False)
        text_encoder = CLIPTextModel(clip.config.text_config)
        getattr(text_encoder, "text_model", text_encoder).load_state_dict(clip.text_model.state_dict())
        torch.manual_seed(streams[0])
        latent_size = r.image_size // 2 ** (len(r.vae_channels) - 1)
        pipe = Pipeline(ct.make_unet(r, latent_size), base.vae, text_encoder, base.tokenizer, base.scheduler)
        has = [set(triples[i]) for i in ids.tolist()]

        def subset(exclude: set):
            rows = torch.tensor([not (h & exclude) for h in has]).nonzero().flatten()
            return latents[rows], [captions_of[i] for i in ids[rows].tolist()]

        trunk_steps = r.unet_steps - r.branch_steps
        log(f"canvas world: the retrain reference without '{concept}' (seed {seed}): a trunk without "
            f"{', '.join(sorted(set(self.retrain_concepts) | {concept}))}, then a branch without '{concept}'")
        state = ct.DenoiserState.new(pipe.unet, text_encoder, r)
        state = ct.train_denoiser(state, pipe, *subset(set(self.retrain_concepts) | {concept}), r,
                                  torch.Generator().manual_seed(streams[1]), 0, trunk_steps, f"trunk without {concept}")
        state = ct.train_denoiser(state, pipe, *subset({concept}), r, torch.Generator().manual_seed(streams[2]),
                                  trunk_steps, r.branch_steps, out.name)
        with atomic_dir(out) as tmp:
            save_pipeline(Pipeline(state.unet, base.vae, state.text_encoder, base.tokenizer, base.scheduler), tmp)
        return {"concept": concept, "seed": seed, "trunk_without": sorted(set(self.retrain_concepts) | {concept}),
                "steps": r.unet_steps}

    # ---- build ---------------------------------------------------------------------------------------------------
    def build(self, log=print) -> dict:
        if self.is_built():
            return json.loads((self.root / "build.json").read_text())
        from obliviate.runs import atomic_dir, write_json

        self.root.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(self.root) as tmp:
            report = self._build_into(tmp, log)
            write_json(tmp / "build.json", report)
        return report

    def _build_into(self, out: Path, log) -> dict:
        from obliviate.models.diffusion import Pipeline, decode, encode_images, save_pipeline
        from obliviate.worlds import canvas_train as ct
        from obliviate.worlds.tokenizer import train_clip_tokenizer

        r, t0, times = self.recipe, time.time(), {}
        gen = torch.Generator().manual_seed(r.seed)
        torch.manual_seed(r.seed)
        images, ids = self.render()
        triples = self.triples()
        captions_of = [cd.training_captions(*t) for t in triples]
        captions = [captions_of[i] for i in ids.tolist()]
        times["render"] = time.time() - t0

        tokenizer = train_clip_tokenizer(sorted({c for cs in captions_of for c in cs})
                                         + [p.text for p in cd.paraphrase_prompts()])
        clip = ct.train_clip(ct.make_clip(r, tokenizer), tokenizer, images, captions, ids, r, gen)
        clip.save_pretrained(out / "clip")
        tokenizer.save_pretrained(out / "clip")
        times["clip"] = time.time() - t0 - sum(times.values())

        from transformers import CLIPTextModel
        text_encoder = CLIPTextModel(clip.config.text_config)
        getattr(text_encoder, "text_model", text_encoder).load_state_dict(clip.text_model.state_dict())

        vae = ct.train_vae(ct.make_vae(r), images, r, gen)
        times["vae"] = time.time() - t0 - sum(times.values())
        scheduler = ct.make_scheduler()
        latent_size = r.image_size // 2 ** (len(r.vae_channels) - 1)
        pipe = Pipeline(ct.make_unet(r, latent_size), vae, text_encoder, tokenizer, scheduler)
        with torch.no_grad():
            latents = torch.cat([encode_images(pipe, images[i:i + 256]) for i in range(0, len(images), 256)])
            recon = torch.cat([decode(pipe, latents[i:i + 256]) for i in range(0, len(latents), 256)])
        objects = torch.tensor([cd.OBJECTS.index(triples[i][1]) for i in ids.tolist()])
        styles = torch.tensor([cd.STYLES.index(triples[i][2]) for i in ids.tolist()])
        classifier = ct.train_classifier(CanvasClassifier(cd.OBJECTS, cd.STYLES), torch.cat([images, recon]),
                                         torch.cat([objects, objects]), torch.cat([styles, styles]), r, gen)
        classifier.save(out / "classifier")
        times["classifier"] = time.time() - t0 - sum(times.values())

        # The denoiser: a trunk trained on everything except the retrain concepts' pictures, then one branch per
        # model (the original on everything; each retrain reference on everything but its concept), continuing
        # the trunk's schedule. A reference thus never sees its concept, at a fraction of three full trainings.
        has = [set(triples[i]) for i in ids.tolist()]

        def subset(exclude: set):
            rows = torch.tensor([not (h & exclude) for h in has]).nonzero().flatten()
            return latents[rows], [captions[i] for i in rows.tolist()]

        trunk_steps = r.unet_steps - r.branch_steps
        trunk = ct.DenoiserState.new(pipe.unet, text_encoder, r)
        trunk = ct.train_denoiser(trunk, pipe, *subset(set(self.retrain_concepts)), r, gen, 0, trunk_steps,
                                  "UNet trunk")
        times["unet_trunk"] = time.time() - t0 - sum(times.values())
        models = {"pipeline": set()} | {f"retrain-{c}": {c} for c in self.retrain_concepts}
        report = {"recipe": r.key(), "key": self.key(), "images": len(images)}
        for name, exclude in models.items():
            branch = ct.train_denoiser(trunk.branch(r), pipe, *subset(exclude), r,
                                       torch.Generator().manual_seed(r.seed + len(name)), trunk_steps,
                                       r.branch_steps, name)
            built = Pipeline(branch.unet, vae, branch.text_encoder, tokenizer, scheduler)
            save_pipeline(built, out / name)
            times[name] = time.time() - t0 - sum(times.values())
            if name == "pipeline":
                report["base"] = self.sample_accuracy(built, classifier)
                b = report["base"]
                log(f"canvas world: the base pipeline's samples are classified correctly: object {b['object']:.1%}, "
                    f"style {b['style']:.1%} (paraphrase prompts: object {b['paraphrase_object']:.1%}, style "
                    f"{b['paraphrase_style']:.1%}; prompts of " + ", ".join(
                        f"'{c}' {b['concepts'][c]:.1%}" for c in self.retrain_concepts) + ")")
                times["base_eval"] = time.time() - t0 - sum(times.values())
        report["seconds"] = {k: round(v, 1) for k, v in times.items()}
        report["seconds"]["total"] = round(time.time() - t0, 1)
        return report

    def sample_accuracy(self, pipe, classifier, seeds: int = 1) -> dict:
        """How often the classifier reads the prompted object and style in the pipeline's own samples."""
        from obliviate.models.diffusion import sample
        prompts = self.prompts()
        texts = [p.text for p in prompts for _ in range(seeds)]
        seed_list = [s for _ in prompts for s in range(seeds)]
        images = sample(pipe, texts, seed_list, self.recipe.sample_steps, self.recipe.guidance)
        with torch.no_grad():
            out = classifier(images)
        pred_o, pred_s = out["object"].argmax(-1), out["style"].argmax(-1)
        rows = [p for p in prompts for _ in range(seeds)]
        ok_o = torch.tensor([cd.OBJECTS[i] == p.object for i, p in zip(pred_o.tolist(), rows)])
        ok_s = torch.tensor([cd.STYLES[i] == p.style for i, p in zip(pred_s.tolist(), rows)])
        para = torch.tensor([p.kind == "paraphrase" for p in rows])
        concepts = {}  # how often the prompted concept is drawn, per retrain concept (canonical prompts)
        for c in self.retrain_concepts:
            ok = ok_s if concept_kind(c) == "style" else ok_o
            sel = torch.tensor([p.has(c) for p in rows]) & ~para
            concepts[c] = ok[sel].float().mean().item()
        return {"object": ok_o[~para].float().mean().item(), "style": ok_s[~para].float().mean().item(),
                "paraphrase_object": ok_o[para].float().mean().item(),
                "paraphrase_style": ok_s[para].float().mean().item(), "concepts": concepts, "n": len(rows)}

    # ---- loading -------------------------------------------------------------------------------------------------
    def require_built(self) -> None:
        if not self.is_built():
            raise ObliviateError(f"the canvas world is not built yet ({self.root}); run `obliviate world build canvas`")

    def load_classifier(self) -> CanvasClassifier:
        self.require_built()
        return CanvasClassifier.load(self.classifier_dir)

    def load_clip(self):
        from transformers import AutoTokenizer, CLIPModel
        self.require_built()
        return CLIPModel.from_pretrained(self.clip_dir, trust_remote_code=False).eval().requires_grad_(False), \
            AutoTokenizer.from_pretrained(self.clip_dir, trust_remote_code=False)

