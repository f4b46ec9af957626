"""Token sequences and their batches, shared by the families whose models write text (the causal-LM adapter and the
vision-language adapter): an encoded item with its scored labels and end tokens, right-padded batches, devices, and
the scoring of a batch's answer tokens (log-probs, NLLs) that every method and metric of these families uses."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

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
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE on prompt and padding).

    An empty list (under data parallel, the share of a batch smaller than the processes) gives one row of padding
    that scores no token, with `item_mask` 0: it adds nothing to any sum or count (`items`, `scored_tokens`), while
    its process still runs every forward and backward pass and every collective with the others (a model cannot run
    on zero rows)."""
    if not encoded:
        return {"input_ids": torch.full((1, 1), pad_id, dtype=torch.long),
                "attention_mask": torch.ones((1, 1), dtype=torch.long),
                "labels": torch.full((1, 1), IGNORE, dtype=torch.long), "item_mask": torch.zeros(1)}
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


# entries of a collated batch that are not inputs of the model: the targets, which rows the pictures belong to, and
# which rows are items (0: the padding row of an empty share, or a row a method dropped)
BOOKKEEPING = ("labels", "image_rows", "item_mask")


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


# ---- counts: every loss is a mean over the optimiser step's global batch ----------------------------------------------
# Under data parallel each process holds a share of the global batch, and under gradient accumulation a step is made
# of several micro-batches whose gradients are summed. A loss term that is a mean divides its share's sum by the
# count over the whole step (`step_total`): the micro-batches of the step (`link_micro_batches`) and the processes
# (`distributed.global_count`). The summed and averaged gradients are then those of the mean over the step's global
# batch, whatever the split: 3 items as 2 + 1, a share with no items, 2 micro-batches of 2 items or one of 4.

def items(batch: dict) -> torch.Tensor:
    """1.0 per row that is an item, 0.0 per padding row of an empty share or row a method dropped (`keep_rows`)."""
    mask = batch.get("item_mask")
    if mask is None:
        return torch.ones(batch["input_ids"].shape[0], device=batch["input_ids"].device)
    return mask.to(batch["input_ids"].device, torch.float32)


def scored_tokens(batch: dict) -> torch.Tensor:
    """The tokens a likelihood loss scores: labels other than IGNORE, shifted (the first token is never predicted)."""
    return (batch["labels"][:, 1:] != IGNORE).sum()


def link_micro_batches(batches: list[dict]) -> None:
    """Tell each micro-batch of an optimiser step (and its nested batches: refusals, companions) which batches make up
    the step, so that `step_total` counts them all. The same dict may stand several times (a whole retain set used
    at every micro-batch: its count is then that many times its own, as its gradient is summed that many times)."""
    for b in batches:
        b["micro_batches"] = batches
    for key, value in batches[0].items():
        if isinstance(value, dict) and "input_ids" in value:
            link_micro_batches([b[key] for b in batches])


def step_total(batch: dict, measure) -> torch.Tensor:
    """`measure(b)` (a count) summed over the micro-batches of the step `batch` belongs to and, inside the unlearning
    loop under data parallel, over the processes, divided by their number (`distributed.global_count`); at least 1.
    A share's sum divided by this, summed over the micro-batches and averaged over the processes, is the mean over
    the step's global batch. A step with nothing to count gives 1 (its sums are 0)."""
    from obliviate.distributed import global_count

    total = sum(measure(b) for b in (batch.get("micro_batches") or [batch]))
    total = global_count(torch.as_tensor(total, dtype=torch.float32))
    return torch.where(total > 0, total, torch.ones_like(total))


def item_mean(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """The mean of per-item values ([B]) over the items of the step's global batch (padding and dropped rows count
    neither in the sum nor in the count)."""
    return (values * items(batch)).sum() / step_total(batch, lambda b: items(b).sum())


def token_mean(total: torch.Tensor, batch: dict, measure=scored_tokens) -> torch.Tensor:
    """A sum over this share's scored tokens divided by the number of such tokens in the step's global batch."""
    return total / step_total(batch, measure)


def keep_rows(batch: dict, keep: torch.Tensor) -> dict:
    """The batch with the rows where `keep` ([B] bool) is False dropped from every sum and count: their labels become
    IGNORE and their `item_mask` 0 (nested batches alike). The rows stay, so the shapes and every process's passes
    stay the same."""
    keep = keep.to(batch["input_ids"].device).bool()
    out = {k: (keep_rows(v, keep) if isinstance(v, dict) and "input_ids" in v else v) for k, v in batch.items()
           if k != "micro_batches"}
    out["labels"] = batch["labels"].masked_fill(~keep[:, None], IGNORE)
    out["item_mask"] = items(batch) * keep
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


# ---- scoring: the log-probs of a batch's scored tokens, its NLLs ------------------------------------------------------
def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align logits at position t with the label at t+1. Returns (logits [B,T-1,V], targets [B,T-1], mask)."""
    logits = logits[:, :-1, :]
    targets = labels[:, 1:]
    mask = targets != IGNORE
    return logits, targets.clamp(min=0), mask


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label_t) per scored token ([B,T-1], zero where unscored) and the scored-token mask."""
    logits, targets, mask = shifted(logits, labels)
    lp = -F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return lp * mask, mask


def forward_logits(model, batch: dict) -> torch.Tensor:
    return model(**model_inputs(batch)).logits


_logit_budget: int | None = None  # tokens of logits a training forward pass may hold (train.max_logit_tokens)


@contextmanager
def logit_budget(max_tokens: int | None):
    """Within it, `sequence_logprob` holds the logits of at most `max_tokens` tokens at a time (the unlearning loop
    sets it from train.max_logit_tokens)."""
    global _logit_budget
    previous, _logit_budget = _logit_budget, max_tokens
    try:
        yield
    finally:
        _logit_budget = previous


def head_splits(model, batch: dict) -> bool:
    """Whether the logits can be made from the decoder's hidden states a slice at a time: a plain linear head (no
    final soft-capping or logit scale after it) and only token inputs."""
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return False
    return (hasattr(model, "get_decoder") and model.get_output_embeddings() is not None
            and set(model_inputs(batch)) <= {"input_ids", "attention_mask"})


def decoder_hidden(model, batch: dict) -> torch.Tensor:
    """The decoder's last hidden states ([B, T, H]): what the output head turns into logits. No key-value cache is
    kept (nothing is generated from it)."""
    return model.get_decoder()(**model_inputs(batch), use_cache=False).last_hidden_state


def sequence_logprob(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of answer-token log-probs per sequence, and the number of answer tokens.

    Under a logit budget (`logit_budget`) a batch with more tokens than the budget runs the decoder once and the
    output head on a few sequences at a time, each slice under activation checkpointing: its logits are made again
    in the backward pass instead of being kept, so training holds one slice's logits, not the batch's."""
    budget = _logit_budget
    n, width = batch["input_ids"].shape
    if budget is None or n * width <= budget or not head_splits(model, batch):
        lp, mask = token_logprobs(forward_logits(model, batch), batch["labels"])
        return lp.sum(-1), mask.sum(-1)
    from torch.utils.checkpoint import checkpoint

    hidden = decoder_hidden(model, batch)
    head = model.get_output_embeddings()

    def slice_logprob(h, labels):
        return token_logprobs(head(h), labels)[0].sum(-1)

    step = max(1, budget // width)
    labels = batch["labels"]
    sums = [checkpoint(slice_logprob, hidden[i:i + step], labels[i:i + step], use_reentrant=False)
            for i in range(0, n, step)]
    return torch.cat(sums), (labels[:, 1:] != IGNORE).sum(-1)


def answer_nll(model, batch: dict) -> torch.Tensor:
    """Mean answer-token NLL per sequence ([B])."""
    total, count = sequence_logprob(model, batch)
    return -total / count.clamp(min=1)


def mean_nll(model, batch: dict) -> torch.Tensor:
    """Mean NLL over all answer tokens of the batch (the usual LM loss, prompt and padding excluded); in the
    unlearning loop, over the answer tokens of the step's global batch (`sequences.step_total`: every process's
    share, every micro-batch of gradient accumulation)."""
    total, _ = sequence_logprob(model, batch)
    return token_mean(-total.sum(), batch)
