"""Token sequences and their batches, shared by the families whose models write text (the causal-LM adapter and the
vision-language adapter): an encoded item with its scored labels and end tokens, right-padded batches, devices."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

IGNORE = -100


def prepare_tokenizer(tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt
    n_end: int = 0  # the last n_end scored tokens are the format's end-of-turn / EOS tokens, not the answer

    def answer_only(self) -> "Encoded":
        """The same tokens with the end tokens unscored (the forget term's default, and the memorisation metrics).
        Other fields (an adapter's pixel values) are kept."""
        if not self.n_end:
            return self
        return replace(self, labels=self.labels[:-self.n_end] + [IGNORE] * self.n_end, n_end=0)

    def cut(self, length: int | None) -> "Encoded":
        """The first `length` tokens (end tokens cut off are no longer counted as end tokens)."""
        if length is None or len(self.input_ids) <= length:
            return self
        gone = len(self.input_ids) - length
        return replace(self, input_ids=self.input_ids[:length], labels=self.labels[:length],
                       n_end=max(0, self.n_end - gone))


def collate(encoded: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE on prompt and padding)."""
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# entries of a collated batch that are not inputs of the model: the targets, and which rows the pictures belong to
BOOKKEEPING = ("labels", "image_rows")


def model_inputs(batch: dict) -> dict:
    """Every tensor of a collated batch the model takes: all but the bookkeeping (and nested batches such as the
    refusal answers), so an adapter whose collate adds inputs (pixel_values) reaches the model through the same
    methods."""
    return {k: v for k, v in batch.items() if k not in BOOKKEEPING and isinstance(v, torch.Tensor)}


def select_rows(batch: dict, rows: torch.Tensor) -> dict:
    """The batch of the given rows (indices or a boolean mask), nested batches too. Pictures (`pixel_values`, one per
    row that has one, listed by `image_rows`) follow their rows."""
    rows = rows.nonzero().flatten() if rows.dtype == torch.bool else rows
    out = {k: (select_rows(v, rows) if isinstance(v, dict) else v[rows] if isinstance(v, torch.Tensor) else v)
           for k, v in batch.items() if k not in ("pixel_values", "image_rows")}
    if "image_rows" in batch:
        position = {r: j for j, r in enumerate(rows.tolist())}
        kept = sorted((position[r], k) for k, r in enumerate(batch["image_rows"].tolist()) if r in position)
        out["image_rows"] = torch.tensor([j for j, _ in kept], dtype=torch.long, device=batch["image_rows"].device)
        if kept:
            out["pixel_values"] = batch["pixel_values"][[k for _, k in kept]]
    return out


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of prompts padded on the left, as batched generation wants them."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else to_device(v, device) if isinstance(v, dict) else v)
            for k, v in batch.items()}


def model_device(model) -> torch.device:
    return next(model.parameters()).device
