"""Text-to-image evaluation for the canvas world (UnlearnCanvas definitions, in miniature).

UnlearnCanvas: Zhang et al. 2024, https://arxiv.org/abs/2402.11846. Alignment score: Ko et al. 2024, Boosting
Alignment for Post-Unlearning Text-to-Image Generative Models, https://arxiv.org/abs/2412.07808.

Images are float tensors [N, 3, H, W] in [0, 1], each generated from one prompt record (any object with `text`,
`object`, `style`, `colour` and `kind` in {"train", "paraphrase"}) and a seed. Every per-image value is kept as a row
(a JSON-ready dict, see `make_rows`), and every accuracy aggregate is a function of those rows alone
(`canvas_scores`, `attribute_accuracy`), so a saved run can be re-scored for another concept without regenerating.

Erasing `concept` of kind `kind` ("style" or "object"; the other kind is the cross domain):
    forget rows  F = {rows whose prompt's `kind` attribute == concept}
    retain rows  R = {rows whose prompt's `kind` attribute != concept}   (= the prompts not containing the concept)
    UA  = |{r in F : predicted[kind](r) != concept}| / |F|
    IRA = |{r in R : predicted[kind](r) == true[kind](r)}| / |R|
    CRA = |{r in R : predicted[other](r) == true[other](r)}| / |R|
UA, IRA and CRA are taken over prompts of kind "train" (the caption forms the model was trained on, as in
UnlearnCanvas); `ua_paraphrase` is UA over forget prompts of kind "paraphrase" (held-out wordings), reported apart
so that an erasure that only learnt the exact words shows up.

FID and KID are torchmetrics' estimators on the world classifier's penultimate features (no Inception weights
can be downloaded here); alignment is the cosine of CLIP image and prompt embeddings.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from obliviate.errors import ObliviateError

KINDS = ("object", "style")


class PromptRecord(Protocol):
    text: str
    object: str
    style: str
    colour: str
    kind: str  # "train" | "paraphrase"


# ---- classifier --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Eval mode (BatchNorm statistics, no dropout) without leaving the caller's module changed."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_images(images: Tensor, name: str = "images") -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ObliviateError(f"{name} must be a [N, 3, H, W] tensor, got shape {tuple(images.shape)}")
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        # The usual slip is passing a pipeline's [-1, 1] output; every metric here expects [0, 1].
        raise ObliviateError(f"{name} must be in [0, 1], got values in [{images.min():.3f}, {images.max():.3f}]")


@torch.no_grad()
def classify(classifier: nn.Module, images: Tensor, batch_size: int = 256) -> dict[str, list[str]]:
    """Predicted class names per image: {"object": [N names], "style": [N names]} (argmax of each head's logits)."""
    _check_images(images)
    device = _device(classifier)
    out: dict[str, list[str]] = {"object": [], "style": []}
    names = {"object": list(classifier.objects), "style": list(classifier.styles)}
    with _eval_mode(classifier):
        for i in range(0, len(images), batch_size):
            logits = classifier(images[i:i + batch_size].to(device, torch.float32))
            for k in KINDS:
                out[k] += [names[k][j] for j in logits[k].argmax(-1).tolist()]
    return out


# ---- per-item rows and accuracies --------------------------------------------------------------------------------


def make_rows(prompts: Sequence[PromptRecord], seeds: Sequence[int], predicted: Mapping[str, Sequence[str]],
              alignment: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """One JSON-ready row per image: text, seed, kind (train/paraphrase), true object/style/colour, predicted
    object/style, and alignment (None when not computed)."""
    n = len(prompts)
    if len(seeds) != n or len(predicted["object"]) != n or len(predicted["style"]) != n:
        raise ObliviateError(f"{n} prompts but {len(seeds)} seeds and {len(predicted['object'])} predictions")
    if alignment is not None and len(alignment) != n:
        raise ObliviateError(f"{n} prompts but {len(alignment)} alignment scores")
    return [{"text": p.text, "seed": int(s), "kind": p.kind, "object": p.object, "style": p.style,
             "colour": p.colour, "pred_object": predicted["object"][i], "pred_style": predicted["style"][i],
             "alignment": None if alignment is None else float(alignment[i])}
            for i, (p, s) in enumerate(zip(prompts, seeds))]


def _get(row, key: str):
    return row[key] if isinstance(row, Mapping) else getattr(row, key)


def _mean(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def canvas_scores(rows: Sequence[Mapping[str, Any]], concept: str, kind: str) -> dict[str, Any]:
    """UA, IRA, CRA for erasing `concept` of kind `kind` ("style" or "object"), from per-image rows (`make_rows`:
    keys kind, object, style, pred_object, pred_style). Formulas in the module docstring. Returns
    {"ua", "ira", "cra", "ua_paraphrase", "n_forget", "n_forget_paraphrase", "n_retain"}; a value is None when its
    set is empty (e.g. ua_paraphrase when no paraphrase prompts were generated)."""
    if kind not in KINDS:
        raise ObliviateError(f"concept kind must be one of {KINDS}, got {kind!r}")
    other = "object" if kind == "style" else "style"
    seen = {_get(r, kind) for r in rows}
    if concept not in seen:
        # A misspelt concept would otherwise give UA = None and IRA/CRA over everything, silently.
        raise ObliviateError(f"no prompt has {kind} {concept!r}; {kind}s present: {', '.join(sorted(seen))}")
    train = [r for r in rows if _get(r, "kind") != "paraphrase"]
    forget = [r for r in train if _get(r, kind) == concept]
    retain = [r for r in train if _get(r, kind) != concept]
    forget_para = [r for r in rows if _get(r, "kind") == "paraphrase" and _get(r, kind) == concept]
    return {
        "ua": _mean([_get(r, "pred_" + kind) != concept for r in forget]),
        "ira": _mean([_get(r, "pred_" + kind) == _get(r, kind) for r in retain]),
        "cra": _mean([_get(r, "pred_" + other) == _get(r, other) for r in retain]),
        "ua_paraphrase": _mean([_get(r, "pred_" + kind) != concept for r in forget_para]),
        "n_forget": len(forget), "n_forget_paraphrase": len(forget_para), "n_retain": len(retain),
    }


def attribute_accuracy(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Plain classifier accuracy per kind over all rows (both prompt kinds): {"object": ..., "style": ...}.
    On the original pipeline's samples this is the "base pipeline accuracy" that bounds IRA and CRA."""
    return {k: _mean([_get(r, "pred_" + k) == _get(r, k) for r in rows]) for k in KINDS}


# ---- FID and KID -------------------------------------------------------------------------------------------------


class ClassifierFeatures(nn.Module):
    """`classifier.features` shaped for torchmetrics' FID/KID `feature=` argument.

    What torchmetrics asks of a custom module (read from torchmetrics 1.9's fid.py and kid.py):
    - FID needs the feature size at construction. It reads an int `num_features` attribute; without one it runs a
      dummy 1x3x299x299 image through the module (uint8 in 0..255 unless normalize=True), which a 32x32 classifier
      would reject or, with adaptive pooling, silently accept. Hence `num_features` is set here.
    - With a custom module, `update(imgs)` passes the images through unchanged: `normalize=True` only turns off the
      uint8 conversion that is applied for the built-in Inception. So this module receives the float images in [0, 1]
      exactly as given, which is what the classifier expects.
    - FID accumulates sums in float64 but casts the result back to the features' dtype, and KID keeps the features
      as they are: returning float64 features keeps FID of a set against itself at ~0 rather than float32 noise.
    - The metric adopts this module as a submodule and never calls eval(); eval mode is enforced here per call.
    - `fid_kid` hands the same batch to FID and then to KID: the features of the last batch are kept, so each batch
      goes through the classifier once.
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.num_features = int(classifier.num_features)
        self._last: tuple[Tensor, Tensor] | None = None

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if self._last is not None and self._last[0] is images:
            return self._last[1]
        feats = self._features(images)
        self._last = (images, feats)
        return feats

    def _features(self, images: Tensor) -> Tensor:
        with _eval_mode(self.classifier):
            feats = self.classifier.features(images.to(_device(self.classifier), torch.float32))
        if feats.shape[-1] != self.num_features:
            raise ObliviateError(f"classifier.features gave {feats.shape[-1]} features, num_features says "
                                 f"{self.num_features}")
        return feats.double()


def fid_kid(classifier: nn.Module, images: Tensor, reference_images: Tensor, batch_size: int = 256,
            kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """FID and KID of `images` against `reference_images` (real images, or the original pipeline's samples), both in
    the classifier's penultimate feature space. Returns {"fid", "kid_mean", "kid_std"}.

    FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) over Gaussian fits of the two feature sets
    (torchmetrics FrechetInceptionDistance). KID = unbiased MMD^2 with the kernel k(x, y) = (x.y / D + 1)^3, averaged
    over `kid_subsets` random subsets of size min(kid_subset_size, n_images, n_reference) (torchmetrics
    KernelInceptionDistance); the subsets are drawn from a generator seeded with `seed`, so KID is reproducible and
    the caller's random state is left alone. When the subset size equals both set sizes every subset is the whole
    set, so kid_std is 0 and means nothing.

    Both are biased upwards at small n (FID strongly so: on a few hundred images it is dominated by the estimation
    error of the covariances), so compare values only at equal n and equal reference sets; KID is unbiased and is the
    better number for small sets.
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError as e:  # an optional dependency: only the image evaluation needs it
        raise ObliviateError("FID/KID need torchmetrics: pip install torchmetrics") from e
    _check_images(images)
    _check_images(reference_images, "reference_images")
    n, n_ref = len(images), len(reference_images)
    if min(n, n_ref) < 2:
        raise ObliviateError(f"FID/KID need at least 2 images in each set, got {n} and {n_ref}")
    features = ClassifierFeatures(classifier)
    device = _device(classifier)
    with warnings.catch_warnings():
        # KID warns on every construction that it keeps all features in memory; at these sizes that is intended.
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        fid = FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=True).to(device)
        kid = KernelInceptionDistance(feature=features, normalize=True, subsets=kid_subsets,
                                      subset_size=min(kid_subset_size, n, n_ref)).to(device)
    for batch_images, real in ((reference_images, True), (images, False)):
        for i in range(0, len(batch_images), batch_size):
            batch = batch_images[i:i + batch_size].to(device, torch.float32)
            fid.update(batch, real=real)
            kid.update(batch, real=real)
    fid_value = float(fid.compute())
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets with torch.randperm from the global generator
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": fid_value, "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


# ---- alignment ---------------------------------------------------------------------------------------------------


def _embeds(output) -> Tensor:
    # transformers 4.x returns the projected embeddings; 5.x returns a model output with them as pooler_output.
    return output if isinstance(output, Tensor) else output.pooler_output


@torch.no_grad()
def alignment_scores(clip_model, tokenizer, images: Tensor, texts: Sequence[str], batch_size: int = 256,
                     pixel_mean: float | Sequence[float] = 0.5, pixel_std: float | Sequence[float] = 0.5) -> Tensor:
    """Per-image alignment score [N]: cos(E_img(x_i), E_txt(p_i)) with E_img = CLIPModel.get_image_features on
    pixels (x - pixel_mean) / pixel_std and E_txt = get_text_features on the tokenized prompt (Ko et al. 2024's
    CLIP alignment score). The defaults are the canvas world's CLIP normalisation; a real OpenAI CLIP wants
    pixel_mean=(0.4815, 0.4578, 0.4082), pixel_std=(0.2686, 0.2613, 0.2758). Images whose size differs from the
    vision tower's `image_size` are resized (bicubic, antialiased) to it, as CLIP's image processor would.
    The mean of the returned tensor is the aggregate "alignment"."""
    _check_images(images)
    if len(texts) != len(images):
        raise ObliviateError(f"{len(images)} images but {len(texts)} texts")
    device = _device(clip_model)
    max_length = int(clip_model.config.text_config.max_position_embeddings)
    scores = []
    with _eval_mode(clip_model):
        for i in range(0, len(images), batch_size):
            tokens = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt").to(device)
            img = clip_image_embeddings(clip_model, images[i:i + batch_size], pixel_mean, pixel_std)
            txt = _embeds(clip_model.get_text_features(input_ids=tokens["input_ids"],
                                                       attention_mask=tokens["attention_mask"]))
            scores.append(nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


@torch.no_grad()
def clip_image_embeddings(clip_model, images: Tensor, pixel_mean: float | Sequence[float] = 0.5,
                          pixel_std: float | Sequence[float] = 0.5) -> Tensor:
    """CLIPModel.get_image_features of images [N, 3, H, W] in [0, 1]: resized (bicubic, antialiased) to the vision
    tower's `image_size` when their size differs, then normalised (x - pixel_mean) / pixel_std."""
    device = _device(clip_model)
    size = int(clip_model.config.vision_config.image_size)
    mean = torch.as_tensor(pixel_mean, dtype=torch.float32, device=device).reshape(-1, 1, 1)
    std = torch.as_tensor(pixel_std, dtype=torch.float32, device=device).reshape(-1, 1, 1)
    x = images.to(device, torch.float32)
    if x.shape[-2:] != (size, size):
        x = nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                                      align_corners=False).clamp(0, 1)
    return _embeds(clip_model.get_image_features(pixel_values=(x - mean) / std))


# ---- one entry point ---------------------------------------------------------------------------------------------


def evaluate_samples(classifier: nn.Module, clip_model, tokenizer, images: Tensor, prompts: Sequence[PromptRecord],
                     seeds: Sequence[int], concept: str | None = None, kind: str | None = None,
                     real_images: Tensor | None = None, original_images: Tensor | None = None,
                     batch_size: int = 256, **alignment_kwargs) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score a pipeline's samples: images[i] was generated from prompts[i] with seeds[i].

    Returns (aggregates, per_item rows). Aggregates: object_accuracy, style_accuracy (`attribute_accuracy`),
    alignment (mean cosine), n_images; with a concept, ua, ira, cra, ua_paraphrase and the counts
    (`canvas_scores`); with real_images, fid_real, kid_real, kid_real_std; with original_images (the original
    pipeline's samples), fid_original, kid_original, kid_original_std. FID/KID use all `images` against the whole
    reference set (UnlearnCanvas' generation-quality convention); pass a subset to restrict them.
    `concept=None` means no erasure (e.g. the original pipeline): no UA/IRA/CRA. `alignment_kwargs` go to
    `alignment_scores` (pixel_mean, pixel_std)."""
    _check_images(images)
    if len(prompts) != len(images) or len(seeds) != len(images):
        raise ObliviateError(f"{len(images)} images but {len(prompts)} prompts and {len(seeds)} seeds")
    if (concept is None) != (kind is None):
        raise ObliviateError("give both concept and kind (\"style\" or \"object\"), or neither")
    if concept is not None:
        if kind not in KINDS:
            raise ObliviateError(f"concept kind must be one of {KINDS}, got {kind!r}")
        classes = list(classifier.objects if kind == "object" else classifier.styles)
        if concept not in classes:
            # The classifier could never predict it, so UA would be 1 whatever the model does.
            raise ObliviateError(f"the classifier has no {kind} class {concept!r}; it knows {', '.join(classes)}")
    predicted = classify(classifier, images, batch_size)
    align = alignment_scores(clip_model, tokenizer, images, [p.text for p in prompts], batch_size, **alignment_kwargs)
    rows = make_rows(prompts, seeds, predicted, align.tolist())
    acc = attribute_accuracy(rows)
    aggregates: dict[str, Any] = {"object_accuracy": acc["object"], "style_accuracy": acc["style"],
                                  "alignment": float(align.mean()) if len(align) else math.nan,
                                  "n_images": len(rows)}
    if concept is not None:
        aggregates.update(canvas_scores(rows, concept, kind))
    for name, reference in (("real", real_images), ("original", original_images)):
        if reference is not None:
            d = fid_kid(classifier, images, reference, batch_size)
            aggregates.update({f"fid_{name}": d["fid"], f"kid_{name}": d["kid_mean"], f"kid_{name}_std": d["kid_std"]})
    return aggregates, rows


# ---- the canvas world's erasure evaluation: the unlearned pipeline next to the original and the retrain reference --

def eval_prompts(world, seeds: int) -> tuple[list, list[int]]:
    """Every canonical prompt and every held-out paraphrase, each with seeds 0..seeds-1."""
    prompts = world.prompts()
    return [p for p in prompts for _ in range(seeds)], [s for _ in prompts for s in range(seeds)]


def world_samples(world, name: str, folder, t2i) -> Tensor:
    """The evaluation samples of one of the world's own pipelines (original or retrain), cached in the world folder
    (uint8, by sampling settings) so every run and the demo reuse them."""
    from safetensors.torch import load_file, save_file

    from obliviate.models.diffusion import load_pipeline, sample

    key = f"{name}-s{t2i.eval_seeds}-n{t2i.sample_steps}-g{t2i.guidance:g}"
    path = world.root / "samples" / f"{key}.safetensors"
    if path.is_file():
        return load_file(str(path))["images"].float() / 255
    prompts, seeds = eval_prompts(world, t2i.eval_seeds)
    images = sample(load_pipeline(folder), [p.text for p in prompts], seeds, t2i.sample_steps, t2i.guidance)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"images": (images * 255).round().to(torch.uint8)}, str(tmp))
    tmp.replace(path)
    return (images * 255).round() / 255  # what a later run reads back from the cache


def grid_columns(prompts: list, seeds: list[int], concept: str, n: int) -> list[int]:
    """Indices of the grid's columns: about half forget prompts, half retain prompts, seed 0, varied objects,
    styles and colours (canonical wording)."""
    forget, retain, seen = [], [], set()
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        if s != 0 or p.kind != "train":
            continue
        bucket = forget if p.has(concept) else retain
        sig = (p.object, p.style, p.colour, p.has(concept))
        if sig in seen or any(prompts[j].colour == p.colour or (prompts[j].object == p.object and
                                                                  prompts[j].style == p.style) for j in bucket):
            continue
        seen.add(sig)
        bucket.append(i)
    k = (n + 1) // 2
    return forget[:k] + retain[:n - k]


def evaluate_erasure(world, pipe, concept: str, t2i, label: str = "unlearned") -> dict:
    """UA / IRA / CRA (and UA on held-out paraphrases), FID/KID against real pictures and against the original
    pipeline's samples, alignment: for the unlearned pipeline, the original and (when the world has it) the
    retrain-without-concept reference, on the same prompts and seeds. Returns aggregate, per_item, and a grid."""
    from obliviate.bench.grids import image_grid
    from obliviate.models.diffusion import sample
    from obliviate.worlds.canvas import concept_kind

    kind = concept_kind(concept)
    classifier = world.load_classifier()
    clip, tokenizer = world.load_clip()
    prompts, seeds = eval_prompts(world, t2i.eval_seeds)
    real, _ = world.render(seed_offset=1, per_triple=2)
    original = world_samples(world, "original", world.pipeline_dir, t2i)
    images = sample(pipe, [p.text for p in prompts], seeds, t2i.sample_steps, t2i.guidance)

    def score(imgs, with_original=True):
        return evaluate_samples(classifier, clip, tokenizer, imgs, prompts, seeds, concept, kind, real_images=real,
                                original_images=original if with_original else None)

    def reference_scores(name: str, imgs, with_original: bool) -> dict:
        """A world pipeline's scores depend only on the world, the concept and the sampling settings: cached."""
        from obliviate.runs import cached_json
        path = world.root / "scores" / f"{name}-{concept}-s{t2i.eval_seeds}-n{t2i.sample_steps}-g{t2i.guidance:g}.json"
        return cached_json(path, lambda: {k: v for k, v in score(imgs, with_original)[0].items() if k in _HEADLINE})

    aggregate, rows = score(images)
    base = reference_scores("original", original, with_original=False)
    aggregate.update({f"original_{k}": v for k, v in base.items()})
    grid_rows = [("original", original)]
    try:
        retrain_dir = world.retrain_dir(concept)
    except ObliviateError:
        retrain_dir = None
    if retrain_dir is not None:
        retrained = world_samples(world, f"retrain-{concept}", retrain_dir, t2i)
        ref = reference_scores(f"retrain-{concept}", retrained, with_original=True)
        aggregate.update({f"retrain_{k}": v for k, v in ref.items()})
        grid_rows.append((f"retrain -{concept}", retrained))
    for k in ("ira", "cra"):
        if base.get(k):
            aggregate[f"{k}_vs_original"] = aggregate[k] / base[k]
    grid_rows.append((label, images))
    cols = grid_columns(prompts, seeds, concept, t2i.grid_prompts)
    grid = image_grid([(name, imgs[cols]) for name, imgs in grid_rows], [prompts[i].text for i in cols])
    return {"aggregate": aggregate, "per_item": rows, "grid": grid, "images": images, "columns": cols,
            "grid_rows": grid_rows}


_HEADLINE = ("ua", "ua_paraphrase", "ira", "cra", "fid_real", "kid_real", "fid_original", "kid_original",
             "alignment", "object_accuracy", "style_accuracy")
