"""Scores for a text-to-image run on a user's own Stable-Diffusion-shaped pipeline, where there is no world classifier
and no real pictures: the erased pipeline's samples of the run's forget and retain prompts beside the original
pipeline's samples of the same prompts with the same seeds (the first `t2i.eval_prompts` of each set, seeds
0..`t2i.eval_seeds`-1, `t2i.eval_steps` DDIM steps).

- **grid**: original and erased, forget prompts then retain prompts, seed 0;
- **CLIP alignment** (`t2i.clip_model`, a local CLIP folder): the mean cosine of CLIP's image and prompt embeddings
  (`evals/canvas.py` alignment_scores, with the folder's own pixel normalisation), on forget and on retain prompts,
  for both pipelines: `alignment_forget`, `alignment_retain`, `original_alignment_*`;
- **KID** of the erased samples against the original's, in that CLIP's image-embedding space (torchmetrics, through
  `evals/canvas.py` fid_kid), subsets of min(`t2i.kid_subset_size`, n) images. FID is reported only when there are
  more images than embedding dimensions: below that its covariance estimate is singular and the number means nothing;
- **with a detector** (`t2i.detector`, `t2i.detector_label`: attacks/t2i/detectors.py): `ua` = share of the erased
  pipeline's forget samples where the detector no longer finds the concept (`original_ua`: the same for the original,
  UA's floor); `retain_agreement` = share of retain samples whose verdict is the original's verdict on the same prompt
  and seed (IRA/CRA-style: nothing else of the picture is judged). When the detector finds the concept in fewer than
  `t2i.detector_min_share` of the original's own forget samples, a note says the rates are meaningless.

Every score left out (no CLIP folder, no detector, too few images for FID) is named in one note line."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from obliviate.errors import ObliviateError

FORGET, RETAIN = "forget", "retain"


def check_clip_folder(folder: str | Path, key: str = "t2i.clip_model") -> Path:
    """A CLIP folder saved with save_pretrained (config.json of model_type "clip"): checked without reading weights."""
    from obliviate.data import read_json_file

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ObliviateError(f"{key}: {folder} has no config.json (a CLIP folder saved with save_pretrained)")
    config = read_json_file(folder / "config.json", "CLIP config")
    if not isinstance(config, dict) or config.get("model_type") != "clip":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise ObliviateError(f"{key}: {folder} is not a CLIP folder (config.json's model_type {kind!r}, not 'clip')")
    if not (folder / "preprocessor_config.json").is_file():
        raise ObliviateError(f"{key}: {folder} has no preprocessor_config.json (CLIP's image processor: the pixel "
                             "mean and std it was trained with)")
    return folder


class UserClip:
    """A user's CLIP folder: the model, its tokenizer and its image processor's normalisation."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        from obliviate.models import quiet_transformers, weights_error_message, weights_load_errors

        quiet_transformers()
        folder = check_clip_folder(folder)
        try:
            self.model = CLIPModel.from_pretrained(folder).to(device).eval().requires_grad_(False)
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            processor = AutoImageProcessor.from_pretrained(folder)
        except weights_load_errors() + (OSError, ValueError, KeyError) as e:
            raise ObliviateError(f"t2i.clip_model: cannot load {folder}: {weights_error_message(folder, e)}") from None
        # the folder's own normalisation; a processor without one has CLIPImageProcessor's defaults
        self.mean = getattr(processor, "image_mean", None) or (0.4815, 0.4578, 0.4082)
        self.std = getattr(processor, "image_std", None) or (0.2686, 0.2613, 0.2758)
        self.folder = folder

    def alignment(self, images: Tensor, texts: list[str]) -> Tensor:
        from obliviate.evals.canvas import alignment_scores

        return alignment_scores(self.model, self.tokenizer, images, texts, batch_size=64, pixel_mean=self.mean,
                                pixel_std=self.std)

    def features(self) -> nn.Module:
        return _ClipFeatures(self)


class _ClipFeatures(nn.Module):
    """CLIP's image embeddings with the `features` / `num_features` interface evals/canvas.py fid_kid reads."""

    def __init__(self, clip: UserClip):
        super().__init__()
        self.clip, self.mean, self.std = clip.model, clip.mean, clip.std
        self.num_features = int(clip.model.config.projection_dim)

    def features(self, images: Tensor) -> Tensor:
        from obliviate.evals.canvas import clip_image_embeddings

        return clip_image_embeddings(self.clip, images, self.mean, self.std)


class UserEvaluators:
    """What scores a user-pipeline run, loaded before the training so that a bad folder fails before it."""

    def __init__(self, t2i, concept: str, device: str = "cpu"):
        from obliviate.attacks.t2i.detectors import load_detector

        self.clip = UserClip(t2i.clip_model, device) if t2i.clip_model else None
        self.detector = None
        if t2i.detector:
            try:
                self.detector = load_detector(t2i.detector, t2i.detector_label, concept, device)
            except ObliviateError as e:
                raise ObliviateError(f"t2i.detector: {e}") from None


def eval_prompts(forget: list[str], retain: list[str], n_prompts: int, n_seeds: int):
    """(texts, seeds, sets): the first n_prompts of each set, each with seeds 0..n_seeds-1."""
    texts, seeds, sets = [], [], []
    for name, prompts in ((FORGET, forget), (RETAIN, retain)):
        for p in prompts[:n_prompts]:
            for s in range(n_seeds):
                texts.append(p)
                seeds.append(s)
                sets.append(name)
    return texts, seeds, sets


def _grid(original: Tensor, images: Tensor, texts, seeds, sets, label: str, columns: int):
    """Original above erased: about half forget prompts, half retain prompts, seed 0; big pictures are shrunk to
    128 pixels so a Stable Diffusion grid stays readable."""
    from obliviate.bench.grids import image_grid

    first = {name: [i for i, (s, n) in enumerate(zip(seeds, sets)) if s == 0 and n == name]
             for name in (FORGET, RETAIN)}
    k = min((columns + 1) // 2, len(first[FORGET]))
    cols = first[FORGET][:k] + first[RETAIN][:columns - k]

    def shown(x: Tensor) -> Tensor:
        x = x[cols]
        if x.shape[-1] > 128:
            x = nn.functional.interpolate(x, size=(128, 128), mode="bilinear", antialias=True).clamp(0, 1)
        return x

    scale = max(1, 96 // min(128, images.shape[-1]))
    return image_grid([("original", shown(original)), (label, shown(images))],
                      [f"{sets[i]}: {texts[i]}" for i in cols], scale=scale)


def _mean(values, mask) -> float:
    picked = [float(v) for v, m in zip(values, mask) if m]
    return sum(picked) / len(picked)


def evaluate_user_pipeline(pipe, original, forget: list[str], retain: list[str], concept: str, t2i,
                           evaluators: UserEvaluators, label: str = "unlearned", log=print) -> dict:
    """The erased pipeline `pipe` beside the `original` one (module docstring). Returns {"aggregate", "per_item",
    "grid", "notes"}."""
    from obliviate.models.diffusion import sample

    texts, seeds, sets = eval_prompts(forget, retain, t2i.eval_prompts, t2i.eval_seeds)
    steps = t2i.eval_steps or t2i.sample_steps
    log(f"sampling {len(texts)} images from the original pipeline and from {label} ({steps} steps)")
    before = sample(original, texts, seeds, steps, t2i.guidance)
    after = sample(pipe, texts, seeds, steps, t2i.guidance)
    is_forget = [s == FORGET for s in sets]
    is_retain = [s == RETAIN for s in sets]
    rows = [{"text": t, "seed": s, "set": n} for t, s, n in zip(texts, seeds, sets)]
    aggregate: dict = {"n_images": len(texts), "eval_prompts_forget": min(len(forget), t2i.eval_prompts),
                       "eval_prompts_retain": min(len(retain), t2i.eval_prompts), "eval_seeds": t2i.eval_seeds}
    notes: list[str] = []

    clip = evaluators.clip
    if clip is None:
        notes.append("no t2i.clip_model (a local CLIP folder): CLIP alignment and KID skipped")
    else:
        for who, images in (("", after), ("original_", before)):
            scores = clip.alignment(images, texts).tolist()
            aggregate[f"{who}alignment_forget"] = _mean(scores, is_forget)
            aggregate[f"{who}alignment_retain"] = _mean(scores, is_retain)
            for row, score in zip(rows, scores):
                row[f"{who or 'erased_'}alignment"] = score
        aggregate.update(_kid(clip, after, before, t2i.kid_subset_size, notes))

    detector = evaluators.detector
    if detector is None:
        notes.append("no t2i.detector (a CLIP or image-classifier folder): UA and retain agreement skipped")
    else:
        found, found_before = detector(after), detector(before)
        for row, a, b in zip(rows, found, found_before):
            row["erased_detected"], row["original_detected"] = a, b
        aggregate["ua"] = _mean([not f for f in found], is_forget)
        aggregate["original_ua"] = _mean([not f for f in found_before], is_forget)
        aggregate["retain_agreement"] = _mean([a == b for a, b in zip(found, found_before)], is_retain)
        aggregate["detector"] = detector.description
        share = 1 - aggregate["original_ua"]
        note = original_detection_note(share, t2i.detector_min_share, concept, "forget-prompt samples")
        if note:
            notes.append(note + ": UA and retain agreement are meaningless")
    grid = _grid(before, after, texts, seeds, sets, label, t2i.grid_prompts)
    return {"aggregate": aggregate, "per_item": rows, "grid": grid, "notes": notes}


def original_detection_note(share: float, min_share: float, concept: str, what: str) -> str | None:
    """The line that says a detector does not find the concept in the original's own pictures (then every rate it
    gives says nothing about the erasure), or None when it finds it often enough."""
    if share >= min_share:
        return None
    return (f"the detector finds {concept!r} in only {share:.0%} of the original pipeline's own {what} (below "
            f"t2i.detector_min_share = {min_share:.0%})")


def _kid(clip: UserClip, images: Tensor, reference: Tensor, subset_size: int, notes: list[str]) -> dict:
    from obliviate.evals.canvas import fid_kid

    features = clip.features()
    n = len(images)
    if n < 2:
        notes.append("KID skipped: it needs at least 2 images per pipeline")
        return {}
    size = min(subset_size, n)
    scores = fid_kid(features, images, reference, batch_size=64, kid_subsets=100, kid_subset_size=size)
    out = {"kid_original": scores["kid_mean"], "kid_original_std": scores["kid_std"], "kid_subset_size": size}
    if n > features.num_features:
        out["fid_original"] = scores["fid"]
    else:
        notes.append(f"FID left out: {n} images per pipeline are too few for a {features.num_features}-dimensional "
                     f"covariance; KID (unbiased at any n) is given, subsets of {size}"
                     + (" (one subset: the whole set, so no spread)" if size == n else ""))
    return out
