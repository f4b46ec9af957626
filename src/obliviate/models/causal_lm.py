"""The adapter every language-model metric and method talks through: load a Hugging Face causal-LM folder, encode
question-answer pairs so that only answer tokens are scored, batched greedy generation. Scoring a batch (token
log-probs, NLLs) is family-neutral and lives in `sequences.py`."""
from __future__ import annotations

from pathlib import Path

import torch

from obliviate.errors import ObliviateError
from obliviate.models import prompt_format, quiet_transformers, weights_error_message, weights_load_errors  # noqa: F401
# the token sequences and batches every text-generating family shares, re-exported as the adapter contract names them
# (the loop's `adapter.logit_budget` included: the budget serves the causal-LM adapter's batches)
from obliviate.models.sequences import (IGNORE, Encoded, collate, left_padded, logit_budget,  # noqa: F401
                                        model_device, model_inputs, prepare_tokenizer, to_device)

PROMPT_TEMPLATE = prompt_format.QA_PROMPT  # the raw format of the built-in worlds


def load(path: str | Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """Load (model, tokenizer) from a transformers folder; the folder on disk is never written to."""
    from transformers import AutoModelForCausalLM

    from obliviate.models import check_model_folder

    quiet_transformers()
    path = check_model_folder(path)  # config.json parsed here first: transformers' own error for it gives no line
    tokenizer = load_tokenizer(path, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=None)
    except weights_load_errors() as e:
        raise ObliviateError(f"cannot load model from {path}: {weights_error_message(path, e)}") from None
    # the end ids the model declares (generation_config.json's eos_token_id: a chat model's end-of-turn token is
    # often named only there) stop generation wherever the tokenizer goes
    prompt_format.declare_stops(tokenizer, getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    return model.to(device), tokenizer


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """A model folder's tokenizer; a torn or missing one is one ObliviateError naming the folder and its files."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # the `tokenizers` library raises a bare Exception on a torn tokenizer.json
        if isinstance(e, ObliviateError):
            raise
        files = ", ".join(sorted(p.name for p in path.glob("*token*"))) or "no tokenizer files"
        raise ObliviateError(f"cannot load the tokenizer from {path} ({files}): {str(e).splitlines()[0]}") from None
    prepare_tokenizer(tokenizer)
    return tokenizer


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """A raw text prompt (a text's prefix for VerbMem), with the tokenizer's special tokens."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def question_prompt(tokenizer, question: str) -> list[int]:
    """The tokens that ask `question` in the tokenizer's prompt format (`prompt_format.use`), up to where the reply
    starts: what generation continues, and an exact prefix of `encode_qa`'s ids."""
    return prompt_format.encode_pair(tokenizer, prompt_format.of(tokenizer), question, None)[0]


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Answer tokens followed by the format's end tokens (raw format: a leading space, then EOS)."""
    _, ans, end = prompt_format.encode_pair(tokenizer, prompt_format.of(tokenizer), "?", answer)
    return ans + end


def stop_ids(tokenizer, model=None) -> list[int]:
    """The ids that end a reply (`prompt_format.stop_ids`), with those `model`'s generation config declares."""
    config = getattr(model, "generation_config", None)
    return prompt_format.stop_ids(tokenizer, prompt_format.of(tokenizer), prompt_format.declared_ids(
        getattr(config, "eos_token_id", None)))


def _joined(prompt: list[int], answer: list[int], end: list[int], max_length: int | None) -> Encoded:
    return Encoded(prompt + answer + end, [IGNORE] * len(prompt) + answer + end, len(end)).cut(max_length)


def encode_qa(tokenizer, question: str, answer: str, max_length: int | None = 512) -> Encoded:
    """Prompt, answer and end tokens of a pair in the tokenizer's format, each encoded on its own and joined, so the
    prompt is an exact prefix of prompt + answer (no BPE merge across the boundary) and generation starts exactly
    where training's first answer token was."""
    return _joined(*prompt_format.encode_pair(tokenizer, prompt_format.of(tokenizer), question, answer), max_length)


def encode_text(tokenizer, text: str, max_length: int | None = 512) -> Encoded:
    """A free text where every token after the first is scored (biographies, membership texts)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_length]
    bos = 1 if tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id else 0
    return Encoded(ids, [IGNORE] * bos + ids[bos:])


def encode_item(tokenizer, item, answer: str | None = None, max_length: int | None = 512) -> Encoded:
    """A question-answer item (answer tokens scored) or a text (every token scored, ended by EOS). `answer` replaces
    the item's answer, or for a text the part after its prefix (the refusal of preference methods)."""
    from obliviate.data import TextItem

    if isinstance(item, TextItem):
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if answer is None:
            e = encode_text(tokenizer, item.text, None)
            return Encoded(e.input_ids + eos, e.labels + eos, len(eos)).cut(max_length)
        prompt = encode_prompt(tokenizer, item.text[:item.prefix_chars])
        return _joined(prompt, tokenizer(" " + answer, add_special_tokens=False)["input_ids"], eos, max_length)
    return encode_qa(tokenizer, item.question, item.answer if answer is None else answer, max_length)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 48, batch_size: int = 64,
             on_batch=None, at_limit: list | None = None, temperature: float | None = None) -> list[str]:
    """Batched greedy decoding from token-id prompts (left-padded); returns the decoded continuations, each cut at
    the first id that ends a reply (`stop_ids`: the model's declared end ids, EOS, the format's end of turn).
    on_batch(n) is called after each batch of n prompts (a progress bar); `at_limit`, when given, is extended with
    one flag per prompt: True when its answer ran to max_new_tokens without ending. With `temperature`, sampling
    instead of greedy decoding (the model's generation config for the rest; torch's random state)."""
    device = model_device(model)
    pad = tokenizer.pad_token_id
    stops = stop_ids(tokenizer, model)
    text = prompt_format.stop_text(tokenizer, prompt_format.of(tokenizer))
    by_text = {"stop_strings": [text], "tokenizer": tokenizer} if text else {}
    sampling = {"do_sample": True, "temperature": temperature} if temperature else {"do_sample": False}
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids, mask = left_padded(chunk, pad)
        width = ids.shape[1]
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=stops, **by_text, **sampling)
        for row in gen[:, width:].tolist():
            answer, ended = prompt_format.reply(tokenizer, row, stops, text)
            out.append(answer)
            if at_limit is not None:
                at_limit.append(not ended)
        if on_batch is not None:
            on_batch(len(chunk))
    return out
