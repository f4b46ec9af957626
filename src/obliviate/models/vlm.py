"""The adapter of vision-language models (LLaVA-style: `AutoModelForImageTextToText` with its `AutoProcessor`). The
language-model loop and every language-model method run on it unchanged; only encoding and batching differ (as
torchtune and TRL reuse their LM recipes for vision models with another collate function).

An item has a question, an answer and an `image` id (None: asked as text alone); `pictures(id)` gives the RGB array.
The question is put in the tokenizer's prompt format (`prompt_format`), with the processor's image token first when
the item has a picture (as an image part where the chat template takes content parts, as LLaVA-1.5's processor
template does: the template then writes the token where the model expects it). That one token is expanded to as many
tokens as the vision tower gives features (what the processor does to a text), the picture becomes pixel values
beside the tokens, and the collated batch carries them, so every method's forward pass hands them to the model
(`sequences.model_inputs`). It shares the token sequences and batches of `sequences.py` with the causal-LM adapter,
not the adapter itself."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from obliviate.errors import ObliviateError
from obliviate.models import prompt_format
from obliviate.models import sequences as seq


# the module names that mark a parameter's part across LLaVA-style models (LLaVA, LLaVA-NeXT, Qwen2-VL, Idefics)
VISION_NAMES = ("vision_tower", "vision_model", "visual.", "image_encoder")
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "merger", "connector")
PARTS = ("language", "projector", "vision")


def part_of(parameter_name: str) -> str:
    """"vision", "projector" or "language" (everything else: the language model, its embeddings and head)."""
    if any(n in parameter_name for n in PROJECTOR_NAMES):
        return "projector"
    if any(n in parameter_name for n in VISION_NAMES):
        return "vision"
    return "language"


def train_only(model, parts) -> int:
    """Freeze every parameter outside `parts`; returns how many parameters stay trainable."""
    kept = 0
    for name, p in model.named_parameters():
        p.requires_grad_(part_of(name) in parts)
        kept += p.numel() if p.requires_grad else 0
    if not kept:
        raise ObliviateError(f"mllm.train_parts {list(parts)}: the model has no parameters in these parts")
    return kept


def lora_targets(model, targets, parts) -> list[str]:
    """The full names of the modules LoRA should wrap: those `targets` names (a list of module names, or
    "all-linear") within `parts`, so that LoRA trains only the chosen parts, as the frozen parameters do without it."""
    wanted = None if targets == "all-linear" else {targets} if isinstance(targets, str) else set(targets)
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and part_of(name + ".") in parts and not name.endswith("lm_head")
             and (wanted is None or name.rsplit(".", 1)[-1] in wanted)]
    if not names:
        raise ObliviateError(f"lora.target_modules {targets!r}: no such linear module in mllm.train_parts "
                             f"{list(parts)}")
    return names


@dataclass
class VisionEncoded(seq.Encoded):
    pixel_values: torch.Tensor | None = None  # [3, H, W], or None for a text-only item


def load_processor(path: str | Path, trust_remote_code: bool = False):
    """The folder's `AutoProcessor`, its tokenizer prepared for batches (no model is loaded)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ObliviateError(f"cannot load the processor from {path}: {str(e).splitlines()[0]}") from None
    seq.prepare_tokenizer(processor.tokenizer)
    return processor


def load(path: str | Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """(model, processor) from a folder that `AutoModelForImageTextToText` and `AutoProcessor` read."""
    from transformers import AutoModelForImageTextToText

    from obliviate.models import check_model_folder, weights_error_message, weights_load_errors

    path = check_model_folder(path)
    processor = load_processor(path, trust_remote_code)
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype),
                                                            trust_remote_code=trust_remote_code)
    except weights_load_errors() as e:
        raise ObliviateError(f"cannot load model from {path}: {weights_error_message(path, e)}") from None
    return model.to(device), processor


class VisionLanguageAdapter:
    """The loop's adapter contract (`loops/lm.py`) for a processor and a picture source."""

    def __init__(self, processor, pictures: Callable[[str], np.ndarray]):
        from PIL import Image

        self.processor, self.pictures = processor, pictures
        tokenizer = processor.tokenizer
        self.image_token = processor.image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        blank = Image.new("RGB", (8, 8))
        probe = processor(text=[self.image_token], images=[blank], return_tensors="pt")["input_ids"][0]
        self.n_image_tokens = int((probe == self.image_token_id).sum())  # what the processor expands one into

    prepare_tokenizer = staticmethod(seq.prepare_tokenizer)
    to_device = staticmethod(seq.to_device)
    model_device = staticmethod(seq.model_device)

    def pixel_values(self, image_id: str) -> torch.Tensor:
        from PIL import Image

        array = self.pictures(image_id)
        return self.processor.image_processor(images=[Image.fromarray(array)], return_tensors="pt")["pixel_values"][0]

    def prompt_ids(self, tokenizer, text: str, with_image: bool) -> list[int]:
        """The prompt ids of a question in the prompt format, with the image token once (not yet expanded) when the
        question has a picture."""
        fmt = prompt_format.of(tokenizer)
        if with_image and not fmt.content_parts:  # a template with content parts writes the token for an image part
            text = f"{self.image_token}\n{text}"
        ids = prompt_format.encode_pair(tokenizer, fmt, text, None, image=with_image)[0]
        if with_image and ids.count(self.image_token_id) != 1:
            raise ObliviateError(f"the prompt format put {ids.count(self.image_token_id)} image tokens in "
                                 f"{tokenizer.decode(ids)!r}; expected one")
        return ids

    def prompt(self, tokenizer, item, question: str | None = None) -> tuple[list[int], torch.Tensor | None]:
        """(prompt ids with the image token expanded, pixel values or None) asking `question` (default: the item's)
        about the item's picture, in the prompt format."""
        with_image = getattr(item, "image", None) is not None
        ids = self.prompt_ids(tokenizer, item.question if question is None else question, with_image)
        if not with_image:
            return ids, None
        at = ids.index(self.image_token_id)
        return ids[:at] + [self.image_token_id] * self.n_image_tokens + ids[at + 1:], self.pixel_values(item.image)

    def format_record(self, tokenizer) -> dict:
        """The resolved prompt format and one question with a picture and its answer as the model reads them (the
        image token once), as a run records them; rendering it is the check `validate` runs."""
        fmt = prompt_format.of(tokenizer)
        _, answer, end = prompt_format.encode_pair(tokenizer, fmt, "?", "{answer}")
        return {**fmt.describe(), "example": tokenizer.decode(self.prompt_ids(tokenizer, "{question}", True) + answer
                                                              + end)}

    def encode_item(self, tokenizer, item, answer: str | None = None, max_length: int | None = 512) -> VisionEncoded:
        """The item in the prompt format, the image token (if any) expanded, answer and end tokens scored."""
        prompt, pixels = self.prompt(tokenizer, item)
        _, ans, end = prompt_format.encode_pair(tokenizer, prompt_format.of(tokenizer), "?",
                                                item.answer if answer is None else answer)
        encoded = VisionEncoded(prompt + ans + end, [seq.IGNORE] * len(prompt) + ans + end, len(end), pixels)
        if max_length is not None and len(encoded.input_ids) > max_length and pixels is not None:
            raise ObliviateError(f"an item of {len(encoded.input_ids)} tokens does not fit {max_length} with its "
                                 "image tokens whole")
        return encoded.cut(max_length)

    @torch.no_grad()
    def generate(self, model, tokenizer, items: list, questions: list[str] | None = None, max_new_tokens: int = 32,
                 batch_size: int = 16) -> list[str]:
        """Batched greedy answers (left-padded, the pictures beside), each item asked its question or the one given,
        each cut where the model stops (`prompt_format.stop_ids`: its generation config's end ids, EOS, the format's
        end of turn)."""
        device, pad = seq.model_device(model), tokenizer.pad_token_id
        fmt = prompt_format.of(tokenizer)
        stops = prompt_format.stop_ids(tokenizer, fmt, prompt_format.declared_ids(
            getattr(getattr(model, "generation_config", None), "eos_token_id", None)))
        text = prompt_format.stop_text(tokenizer, fmt)
        by_text = {"stop_strings": [text], "tokenizer": tokenizer} if text else {}
        out: list[str] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            asked = [self.prompt(tokenizer, it, None if questions is None else questions[start + k])
                     for k, it in enumerate(chunk)]
            input_ids, mask = seq.left_padded([ids for ids, _ in asked], pad)
            width = input_ids.shape[1]
            extra = {}
            pixels = [p for _, p in asked if p is not None]
            if pixels:
                extra["pixel_values"] = torch.stack(pixels).to(device)
            gen = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=stops, **extra,
                                 **by_text)
            out += [prompt_format.reply(tokenizer, row, stops, text)[0] for row in gen[:, width:].tolist()]
        return out

    def collate(self, encoded: list[VisionEncoded], pad_id: int) -> dict[str, torch.Tensor]:
        """sequences.collate's batch, plus the pixel values of the items with pictures, in order (the model puts the
        i-th picture's features where the i-th run of image tokens stands), and which rows they belong to
        (`image_rows`: bookkeeping for `sequences.select_rows`, not a model input)."""
        batch = seq.collate(encoded, pad_id)
        rows = [i for i, e in enumerate(encoded) if getattr(e, "pixel_values", None) is not None]
        batch["image_rows"] = torch.tensor(rows, dtype=torch.long)
        if rows:
            batch["pixel_values"] = torch.stack([encoded[i].pixel_values for i in rows])
        return batch
