"""A user's concept detector for the text-to-image attacks (`obliviate attack RUN --detector FOLDER
--detector-label LABEL`): a Hugging Face folder, either

- a CLIP model (`CLIPModel` with its processor): zero-shot, the concept's prompt (`detector_label`, or
  "a picture of <concept>") against neutral prompts; an image shows the concept when its prompt scores highest, or
- an image classifier (`AutoModelForImageClassification` with its image processor): an image shows the concept when
  the top class is `detector_label`, one of the model's id2label names (default: the concept, when it is one).

A detector is called with images [N, 3, H, W] in [0, 1] and returns one bool per image; `key` names it for caches."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from obliviate.errors import ObliviateError

# what the concept's prompt competes with in the zero-shot choice: pictures that need not show anything in particular
NEUTRAL_PROMPTS = ("a picture", "a photo", "an image of something else", "a plain background")


class Detector:
    def __init__(self, judge, key: str, description: str):
        self.judge, self.key, self.description = judge, key, description

    def __call__(self, images: Tensor) -> list[bool]:
        with torch.no_grad():
            return [bool(x) for x in self.judge(images)]


def detector_kind(folder: str | Path, label: str | None, concept: str) -> str:
    """"clip" or "classifier": what `load_detector` would load, checked from config.json alone (no weights are read),
    with the classifier's label; anything else is one line. `obliviate validate` and `run` check a run's detector
    with it before any training."""
    from obliviate.data import read_json_file

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ObliviateError(f"detector folder {folder}: no config.json (a CLIP or image-classifier folder saved "
                             "with save_pretrained)")
    config = read_json_file(folder / "config.json", "detector config")
    if not isinstance(config, dict):
        raise ObliviateError(f"{folder / 'config.json'}: must be a JSON object")
    if not (folder / "preprocessor_config.json").is_file():  # both kinds judge through their own processor
        raise ObliviateError(f"detector folder {folder}: no preprocessor_config.json (its image processor, saved "
                             "with save_pretrained)")
    if config.get("model_type") == "clip":
        return "clip"
    if not any(str(a).endswith("ForImageClassification") for a in config.get("architectures") or []):
        raise ObliviateError(f"detector folder {folder}: neither a CLIP model nor an image classifier (config.json's "
                             f"model_type {config.get('model_type')!r}, architectures {config.get('architectures')})")
    names = {str(n) for n in (config.get("id2label") or {}).values()}
    wanted = label if label is not None else concept
    if wanted not in names:
        valid = ", ".join(sorted(names))
        if label is None:
            raise ObliviateError(f"detector folder {folder}: the concept {concept!r} is not one of its labels; pass "
                                 f"detector_label, one of: {valid}")
        raise ObliviateError(f"detector folder {folder}: detector_label {label!r} is not one of its labels: {valid}")
    return "classifier"


def load_detector(folder: str | Path, label: str | None, concept: str, device: str = "cpu") -> Detector:
    """A CLIP folder or an image-classifier folder; anything else, or a label the classifier lacks, is one line."""
    from obliviate.models import quiet_transformers

    quiet_transformers()
    folder = Path(folder)
    if detector_kind(folder, label, concept) == "clip":
        return _clip_detector(folder, label or f"a picture of {concept}", device)
    return _classifier_detector(folder, label, concept, device)


def _load(folder: Path, what: str, load):
    from obliviate.models import weights_error_message, weights_load_errors

    try:
        return load()
    except weights_load_errors() + (OSError, ValueError, KeyError) as e:
        raise ObliviateError(f"detector folder {folder}: cannot load its {what}: "
                             f"{weights_error_message(folder, e)}") from None


def _pixels(processor, images: Tensor) -> Tensor:
    """The processor's own resizing and normalisation, on images already in [0, 1]."""
    arrays = [x.permute(1, 2, 0).float().cpu().numpy() for x in images]
    return processor(images=arrays, do_rescale=False, return_tensors="pt")["pixel_values"]


def _clip_detector(folder: Path, prompt: str, device: str) -> Detector:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = _load(folder, "CLIP model", lambda: CLIPModel.from_pretrained(folder, trust_remote_code=False))
    model = model.to(device).eval()
    processor = _load(folder, "image processor (preprocessor_config.json)",
                      lambda: AutoImageProcessor.from_pretrained(folder, trust_remote_code=False))
    tokenizer = _load(folder, "tokenizer", lambda: AutoTokenizer.from_pretrained(folder, trust_remote_code=False))
    texts = [prompt, *NEUTRAL_PROMPTS]
    tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)

    def judge(images: Tensor) -> list[bool]:
        found = []
        for i in range(0, len(images), 64):
            pixels = _pixels(processor, images[i:i + 64]).to(device)
            found += (model(**tokens, pixel_values=pixels).logits_per_image.argmax(-1) == 0).tolist()
        return found

    return Detector(judge, f"clip:{folder.resolve()}:{prompt}",
                    f"CLIP zero-shot ({folder.name}): {prompt!r} against {len(NEUTRAL_PROMPTS)} neutral prompts")


def _classifier_detector(folder: Path, label: str | None, concept: str, device: str) -> Detector:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = _load(folder, "image classifier", lambda: AutoModelForImageClassification.from_pretrained(
                      folder, trust_remote_code=False))
    model = model.to(device).eval()
    processor = _load(folder, "image processor (preprocessor_config.json)",
                      lambda: AutoImageProcessor.from_pretrained(folder, trust_remote_code=False))
    names = {int(i): str(n) for i, n in model.config.id2label.items()}
    wanted = label if label is not None else concept  # one of the names: detector_kind checked it
    ids = [i for i, n in names.items() if n == wanted]

    def judge(images: Tensor) -> list[bool]:
        found = []
        for i in range(0, len(images), 64):
            logits = model(pixel_values=_pixels(processor, images[i:i + 64]).to(device)).logits
            found += [int(j) in ids for j in logits.argmax(-1).tolist()]
        return found

    return Detector(judge, f"classifier:{folder.resolve()}:{wanted}",
                    f"image classifier ({folder.name}): top class {wanted!r}")
