"""What every text-to-image attack is given (`AttackTask`) and the parts they share: the plain check (pre-ASR), token
ids with attack tokens in them, soft tokens through the text encoder's own forward, and the summary (pre-ASR, ASR,
robust UA). Only the diffusion adapter's functions and the pipeline's backbone are used. The attacks choose token ids;
on a pipeline with several text encoders (SDXL) the same ids go to each encoder, framed by its own tokenizer, which
needs the tokenizers to share one vocabulary (`require_shared_vocabulary`, as SDXL's two CLIP tokenizers do)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from obliviate.errors import ObliviateError


@dataclass
class AttackTask:
    prompts: list[str]  # the attacked forget prompts
    seeds: list[int]  # one per prompt: its sampling noise, with and without the attack
    targets: Tensor  # the original pipeline's latents of the concept, one per prompt [N, C, h, w]
    detect: Callable[[Tensor], list[bool]]  # images in [0, 1] -> does each show the concept
    original: object = None  # the pipeline before erasure (P4D matches its noise predictions)
    concept_pairs: list[tuple[str, str]] = field(default_factory=list)  # (with the concept, without): Ring-A-Bell
    sample_steps: int = 25
    guidance: float = 4.0
    concept: str = ""  # the attacked concept's word (concept arithmetic composes around it)
    paraphrases: list[list[str]] = field(default_factory=list)  # per prompt: it in other words naming the concept

    def __post_init__(self):
        if not (len(self.prompts) == len(self.seeds) == len(self.targets)):
            raise ObliviateError(f"{len(self.prompts)} prompts, {len(self.seeds)} seeds and {len(self.targets)} "
                                 "targets")
        if not self.prompts:
            raise ObliviateError("no prompts to attack")
        if self.paraphrases and len(self.paraphrases) != len(self.prompts):
            raise ObliviateError(f"{len(self.paraphrases)} paraphrase lists for {len(self.prompts)} prompts")

    def part(self, batch: slice) -> AttackTask:
        """The same task on a slice of its prompts (attacks work in batches of prompts)."""
        return AttackTask(self.prompts[batch], self.seeds[batch], self.targets[batch], self.detect, self.original,
                          self.concept_pairs, self.sample_steps, self.guidance, self.concept, self.paraphrases[batch])


def summarize(rows: Sequence[dict]) -> dict:
    """pre-ASR, ASR and robust UA (= 1 - ASR) over attacked prompts, with the count."""
    if not rows:
        raise ObliviateError("no prompts were attacked")
    n = len(rows)
    asr = sum(r["success"] for r in rows) / n
    return {"pre_asr": sum(r["pre_success"] for r in rows) / n, "asr": asr, "ua_attacked": 1 - asr,
            "n_attacked": n}


def require_one_text_encoder(pipe, attack: str, why: str) -> None:
    """An attack that optimises in one text encoder's embedding space: a pipeline with more is refused in one line."""
    if len(pipe.text_encoders) > 1:
        raise ObliviateError(f"{attack}: {why}; this {pipe.backbone.pipeline_class} has {len(pipe.text_encoders)} "
                             "text encoders (not ported)")


def require_shared_vocabulary(pipe, attack: str) -> None:
    """The attacks' token ids go to every text encoder: the tokenizers must agree on what each id is."""
    first = pipe.tokenizer.get_vocab()
    for other in pipe.tokenizers[1:]:
        if other.get_vocab() != first or other.model_max_length != pipe.tokenizer.model_max_length:
            raise ObliviateError(f"{attack}: the pipeline's tokenizers have different vocabularies or lengths, so one "
                                 "prompt of token ids cannot go to every text encoder")


def ids_per_tokenizer(pipe, ids: Tensor) -> list[Tensor]:
    """Token ids framed by the first tokenizer [N, L] -> the same prompts framed by each of the pipeline's tokenizers
    (its own start, end and padding tokens; the content ids are shared, `require_shared_vocabulary`)."""
    if len(pipe.tokenizers) == 1:
        return [ids]
    end = pipe.tokenizer.eos_token_id
    rows = [r[1:r.index(end)] for r in ids.tolist()]
    return [ids] + [framed_ids(pipe, rows, "the prompt", tokenizer) for tokenizer in pipe.tokenizers[1:]]


def encode_ids(pipe, ids: Tensor | list[Tensor]):
    """The conditioning of prompts given as token ids (framed by the first tokenizer, or one tensor per tokenizer)."""
    return pipe.backbone.encode_ids(pipe, ids if isinstance(ids, list) else ids_per_tokenizer(pipe, ids))


def plain_check(pipe, task: AttackTask) -> tuple[Tensor, list[bool]]:
    """Each prompt's own picture (its seed) and whether it already shows the concept: a prompt that does succeeds
    without attack (pre-ASR), as in the papers."""
    from obliviate.models.diffusion import decode, denoise

    latents, _ = denoise(pipe, task.prompts, task.seeds, task.sample_steps, task.guidance)
    images = decode(pipe, latents)
    return images, list(task.detect(images))


def draw_ids(pipe, task: AttackTask, ids: Tensor) -> Tensor:
    """Pictures of the token ids `ids` [N, L] (an attack's discrete prompts), each with its prompt's seed; the ids go
    to the text encoder as they are, so what is judged is exactly what was optimised (no decode and re-tokenize)."""
    from obliviate.models.diffusion import decode, denoise

    with torch.no_grad():
        context = encode_ids(pipe, ids)
        latents, _ = denoise(pipe, task.prompts, task.seeds, task.sample_steps, task.guidance, context=context)
        return decode(pipe, latents)


def attack_vocabulary(tokenizer) -> Tensor:
    """Ids the attack may choose: every token but the special ones (start, end, padding, unknown)."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special])


def prompt_tokens(pipe, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt's own token ids, without the start, end and padding tokens."""
    tokenizer = pipe.tokenizer
    rows = tokenizer(list(prompts), add_special_tokens=False).input_ids
    return [list(r) for r in rows]


def framed_ids(pipe, rows: Sequence[Sequence[int]], what: str, tokenizer=None) -> Tensor:
    """[start] + row + [end] + padding to the tokenizer's length (the pipeline's first tokenizer, or the one given),
    for each row of token ids; a row that does not fit is an error naming `what` put it there."""
    tokenizer = tokenizer or pipe.tokenizer
    length = tokenizer.model_max_length
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    longest = max(len(r) for r in rows)
    if longest + 2 > length:
        raise ObliviateError(f"{what} needs {longest} tokens; the tokenizer holds {length - 2} besides the start and "
                             "end tokens")
    return torch.tensor([[start, *r, end] + [pad] * (length - len(r) - 2) for r in rows], device=pipe.device)


@contextlib.contextmanager
def soft_tokens(text_encoder, embeddings: Tensor, where: Tensor):
    """While active, the text encoder's token embeddings at the positions `where` [N, L] (bool) are those of
    `embeddings` [N, L, D]: soft prompts through the model's own forward (positions and attention stay its own)."""
    def replace(module, args, out):
        if out.shape[:2] != where.shape:
            raise ObliviateError(f"soft tokens for {tuple(where.shape)} ids applied to {tuple(out.shape[:2])}")
        return torch.where(where.unsqueeze(-1), embeddings.to(out.dtype), out)

    handle = text_encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def encoder_digest(text_encoder) -> str:
    """A digest of a text encoder's weights (or of several, in order): attacks that need only the text encoders
    (Ring-A-Bell) search once for every pipeline that shares them (the erased one, the original, the retrain
    reference)."""
    import hashlib

    h = hashlib.sha256()
    for i, encoder in enumerate(text_encoder if isinstance(text_encoder, (list, tuple)) else [text_encoder]):
        for name, tensor in sorted(encoder.state_dict().items()):
            h.update(f"{i}.{name}".encode() if i else name.encode())
            h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


COLUMNS = ["pre_asr", "asr", "ua_attacked", "n_attacked"]  # what `obliviate attack` prints per model


def attack_result(name: str, attack, method: str, concept: str, per_item: dict[str, list[dict]], seconds: float,
                  detector: str, caption: str | None = None) -> dict:
    """The result format of attacks/__init__.py: every model's aggregate (the method's first), the rows, the cost
    (the attack on the erased model: the references' results may come from a cache)."""
    from dataclasses import asdict

    items = len(per_item[method])
    result = {"attack": name, "family": "t2i", "method": method, "concept": concept, "config": asdict(attack.config),
              "headline": "asr", "label": attack.label, "better": "lower", "columns": COLUMNS,
              "percent": COLUMNS[:3], "models": {m: summarize(rows) for m, rows in per_item.items()},
              "per_item": per_item, "seconds": round(seconds, 2), "items": items,
              "items_per_second": round(items / max(seconds, 1e-3), 4), "detector": detector}
    if caption:
        result["caption"] = caption
    return result


def readable_prompt(tokenizer, ids: Sequence[int]) -> str:
    """The adversarial tokens as text a person can read: CLIP's byte-level BPE has tokens that hold part of a
    character's UTF-8 bytes, which decode to U+FFFD unless their neighbours complete the character. A token that
    completes no character with the next ones (up to 4, a character's longest encoding) is shown by its id as <|id|>;
    the rest decode as usual (the rows keep the exact ids: the prompt that was attacked)."""
    ids, unreadable, i = list(ids), set(), 0
    while i < len(ids):
        whole = next((n for n in range(1, min(4, len(ids) - i) + 1)
                      if "\ufffd" not in tokenizer.decode(ids[i:i + n])), None)
        if whole is None:
            unreadable.add(i)
        i += whole or 1
    parts, run = [], []
    for i, token in enumerate(ids + [None]):
        if token is None or i in unreadable:
            parts += [tokenizer.decode(run)] if run else []
            parts += [f"<|{token}|>"] if token is not None else []
            run = []
        else:
            run.append(token)
    return " ".join(" ".join(parts).split())
