"""How a question is put to a language model and where its answer starts and ends: the tokenizer's chat template, a
named template (the tags of a model family, as OpenUnlearning keeps them per model), tags a user gives, or the raw
`Question: ... Answer:` format the built-in worlds train on.

Every format splits a question-answer pair into three token runs, each encoded on its own and concatenated:
prompt (everything up to where the assistant's reply starts), answer, and end (the end-of-turn tokens the format puts
after a reply). So the prompt's tokens are an exact prefix of prompt + answer + end by construction: training scores
exactly the tokens that generation produces after the same prompt, with no BPE merge across the boundary. For a chat
template the split is read off the template itself (rendered with and without the reply), and a template that does
not render the prompt as a prefix of the conversation is refused with one line. A template that takes each message's
content as a list of parts (`{"type": "text"}`, `{"type": "image"}`: vision-language processors' templates, LLaVA-1.5's
among them) is found by rendering a probe both ways, and is given parts, as `processor.apply_chat_template` gives them.

The end tokens are scored apart from the answer (`Encoded.n_end`): the likelihood of an answer counts them (TOFU and
OpenUnlearning do), the unlearning loop's forget term does not by default (`train.forget_tokens`), and the
memorisation metrics read the answer's tokens only."""
from __future__ import annotations

import weakref
from dataclasses import dataclass

from obliviate.errors import ObliviateError

QA_PROMPT = "Question: {question}\nAnswer:"

# Tags per model family (OpenUnlearning's model configs; each model card's chat format). A tokenizer that ships its
# own chat template does not need these: "auto" uses the template it carries.
NAMED_TAGS: dict[str, dict[str, str]] = {
    "llama2": {"system_start": "[INST] <<SYS>>\n", "system_end": "\n<</SYS>>\n\n", "user_start": "[INST] ",
               "user_end": " [/INST]", "assistant_start": " ", "assistant_end": " </s>"},
    "llama3": {"system_start": "<|start_header_id|>system<|end_header_id|>\n\n", "system_end": "<|eot_id|>",
               "user_start": "<|start_header_id|>user<|end_header_id|>\n\n", "user_end": "<|eot_id|>",
               "assistant_start": "<|start_header_id|>assistant<|end_header_id|>\n\n", "assistant_end": "<|eot_id|>"},
    "chatml": {"system_start": "<|im_start|>system\n", "system_end": "<|im_end|>\n",
               "user_start": "<|im_start|>user\n", "user_end": "<|im_end|>\n",
               "assistant_start": "<|im_start|>assistant\n", "assistant_end": "<|im_end|>"},
    "zephyr": {"system_start": "<|system|>\n", "system_end": "</s>\n", "user_start": "<|user|>\n",
               "user_end": "</s>\n", "assistant_start": "<|assistant|>\n", "assistant_end": "</s>"},
    "phi3": {"system_start": "<|system|>\n", "system_end": "<|end|>\n", "user_start": "<|user|>\n",
             "user_end": "<|end|>\n", "assistant_start": "<|assistant|>\n", "assistant_end": "<|end|>"},
}
TAG_KEYS = ("system_start", "system_end", "user_start", "user_end", "assistant_start", "assistant_end")
NAMES = ("auto", "chat", "qa", *NAMED_TAGS, "custom")
_SENTINEL = "\u2063obliviate-answer\u2063"  # an answer no template rewrites, to find where a reply sits


@dataclass(frozen=True)
class PromptFormat:
    """A resolved format. kind: "qa" (raw), "chat" (the tokenizer's own template) or "tags" (named or custom)."""
    kind: str
    name: str
    system_prompt: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    content_parts: bool = False  # chat: the template reads message content as a list of typed parts
    # earlier turns put before every question (a generation-time guard's in-context examples: guards/lm/icu.py):
    # `context(question)` gives (question, answer) pairs, each rendered as a finished turn of the same format
    context: object = None

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "system_prompt": self.system_prompt, "tags": dict(self.tags),
                **({"content_parts": True} if self.content_parts else {}),
                **({"context": self.context.describe()} if self.context is not None else {})}

    def turns(self, question: str) -> list[tuple[str, str]]:
        """The earlier (question, answer) turns this format puts before `question` (none without a context)."""
        return list(self.context(question)) if self.context is not None else []

    def asked(self, question: str) -> str:
        """The question as the user's message (a context may put an instruction before it)."""
        return self.context.ask(question) if self.context is not None else question


QA = PromptFormat("qa", "qa")


def resolve(tokenizer, name: str = "auto", system_prompt: str | None = None, tags: dict | None = None) -> PromptFormat:
    """The format a config asks for. "auto": the tokenizer's chat template when it has one, else the raw format;
    "chat": the tokenizer's chat template (an error when it has none); "qa": raw; a family name (llama2, llama3,
    chatml, zephyr, phi3) or "custom" with the six tags. Tags given next to a family name replace its tags."""
    tags = {k: v for k, v in (tags or {}).items() if v is not None}
    bad = set(tags) - set(TAG_KEYS)
    if bad:
        raise ObliviateError(f"template: unknown tag(s) {sorted(bad)}; valid: {', '.join(TAG_KEYS)}")
    if name not in NAMES:
        raise ObliviateError(f"template.name: unknown template {name!r}; valid: {', '.join(NAMES)}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if name == "auto":
        name = "chat" if has_chat else "qa"
    if name in ("chat", "qa") and tags:
        raise ObliviateError(f"template: tags are for a named or custom template, not {name!r}")
    if name == "chat":
        if not has_chat:
            raise ObliviateError("template.name = 'chat' but the tokenizer has no chat template; name one of "
                                 f"{', '.join(NAMED_TAGS)} or give custom tags")
        fmt = PromptFormat("chat", "chat", system_prompt, content_parts=_wants_content_parts(tokenizer))
    elif name == "qa":
        if system_prompt:
            raise ObliviateError("template: the raw 'qa' format has no system prompt")
        return QA
    else:
        base = dict(NAMED_TAGS.get(name, dict.fromkeys(TAG_KEYS, "")))
        if name == "custom" and not (tags.get("user_start") or tags.get("assistant_start")):
            raise ObliviateError("template.name = 'custom' needs at least user_start or assistant_start")
        base.update(tags)
        fmt = PromptFormat("tags", name, system_prompt, tuple(sorted(base.items())))
    # one render now, so a template that cannot serve fails before any work
    encode_pair(tokenizer, fmt, "What is 2 + 2?", "4.")
    return fmt


# The format travels with the tokenizer, so every metric, method and attack that is handed a tokenizer asks in the
# same format without a new argument on each of them.
_FORMATS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def use(tokenizer, fmt: PromptFormat) -> None:
    _FORMATS[tokenizer] = fmt


def of(tokenizer) -> PromptFormat:
    """The format set with `use`; otherwise "auto" (the chat template the tokenizer carries, or raw)."""
    fmt = _FORMATS.get(tokenizer)
    if fmt is None:
        fmt = resolve(tokenizer, "auto")
        _FORMATS[tokenizer] = fmt
    return fmt


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"] if text else []


def _render(tokenizer, messages: list[dict], **kwargs) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as e:  # jinja raises its own errors (a template that refuses a system role, ...)
        raise ObliviateError(f"the tokenizer's chat template cannot render a question: {str(e).splitlines()[0]}"
                             ) from None


def _wants_content_parts(tokenizer) -> bool:
    """Whether the chat template reads a message's content as a list of parts: a probe question given as a plain
    string is lost (LLaVA-1.5's renders "USER: ASSISTANT:") while given as a text part it is rendered. A template that
    renders the string keeps strings (a text-only template may print a list's repr, question included)."""
    probe = "\u2063obliviate-probe\u2063"
    plain = [{"role": "user", "content": probe}]
    parts = [{"role": "user", "content": [{"type": "text", "text": probe}]}]
    try:
        if probe in tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True):
            return False
    except Exception:  # a parts-only template may fail on a string: try parts
        pass
    return probe in _render(tokenizer, parts, add_generation_prompt=True)


def _message(fmt: PromptFormat, role: str, text: str, image: bool = False) -> dict:
    if not fmt.content_parts:
        return {"role": role, "content": text}
    return {"role": role, "content": [{"type": "image"}] * image + [{"type": "text", "text": text}]}


def _chat_split(tokenizer, fmt: PromptFormat, question: str, image: bool = False) -> tuple[str, str, str]:
    """(prompt text, text between prompt and answer, end text) rendered by the tokenizer's chat template; `image`:
    the question has an image part before its text (templates with content parts only)."""
    earlier = [m for q, a in fmt.turns(question) for m in (_message(fmt, "user", q), _message(fmt, "assistant", a))]
    messages = ([_message(fmt, "system", fmt.system_prompt)] if fmt.system_prompt else []) + earlier + [
        _message(fmt, "user", fmt.asked(question), image)]
    prompt = _render(tokenizer, messages, add_generation_prompt=True)
    full = _render(tokenizer, messages + [_message(fmt, "assistant", _SENTINEL)])
    if question.strip() not in prompt:
        raise ObliviateError("the tokenizer's chat template drops the question (it renders "
                             f"{prompt[:60]!r}); name a template or give tags instead")
    if not full.startswith(prompt) or _SENTINEL not in full[len(prompt):]:
        raise ObliviateError("the tokenizer's chat template does not render the prompt as a prefix of prompt + "
                             "answer (a reasoning template that rewrites earlier turns?); name a template instead")
    rest = full[len(prompt):]
    between, _, end = rest.partition(_SENTINEL)
    return prompt, between, end


def encode_pair(tokenizer, fmt: PromptFormat, question: str, answer: str | None, image: bool = False
                ) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, answer ids, end ids) of a question and answer in a format; `answer=None` gives the prompt only.
    `image`: an image part goes before the question (a chat format with content parts; the template writes the
    model's image token where it belongs); other formats ignore it, their caller puts the token in the text."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt.kind == "qa":
        earlier = "".join(QA_PROMPT.format(question=q) + " " + a + "\n\n" for q, a in fmt.turns(question))
        prompt = _ids(tokenizer, earlier + QA_PROMPT.format(question=fmt.asked(question)), special=True)
        lead, end = " ", eos
    elif fmt.kind == "chat":
        prompt_text, lead, end_text = _chat_split(tokenizer, fmt, question, image)
        # a tokenizer's template writes BOS itself, as apply_chat_template(tokenize=True); a processor's (content
        # parts) gets the tokenizer's special tokens unless it wrote BOS, as processor.apply_chat_template does
        bos = tokenizer.bos_token
        special = fmt.content_parts and not (bos and prompt_text.startswith(bos))
        prompt = _ids(tokenizer, prompt_text, special=special)
        end = _ids(tokenizer, end_text.rstrip()) or eos  # the newline before a next turn is not part of this one
    else:
        tags = dict(fmt.tags)
        system = (tags["system_start"] + fmt.system_prompt + tags["system_end"]) if fmt.system_prompt else ""
        earlier = "".join(tags["user_start"] + q + tags["user_end"] + tags["assistant_start"] + a +
                          tags["assistant_end"] for q, a in fmt.turns(question))
        prompt = _ids(tokenizer, system + earlier + tags["user_start"] + fmt.asked(question) + tags["user_end"] +
                      tags["assistant_start"], special=True)
        lead, end = "", _ids(tokenizer, tags["assistant_end"].rstrip()) or eos
    if answer is None:
        return prompt, [], []
    return prompt, _ids(tokenizer, lead + answer), end


# The end ids a model declares beside its tokenizer (its generation_config's eos_token_id), per tokenizer, as `use`
# keeps the format: the loader records them, so whatever is handed the tokenizer stops where the model stops.
_DECLARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def declared_ids(eos_token_id) -> list[int]:
    """A generation config's eos_token_id (None, an int or a list) as a list."""
    if eos_token_id is None:
        return []
    return [int(t) for t in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]


def declare_stops(tokenizer, eos_token_id) -> None:
    """Record the end ids the model declares (`model.generation_config.eos_token_id`) for its tokenizer."""
    _DECLARED[tokenizer] = declared_ids(eos_token_id)


def _end_split(tokenizer, fmt: PromptFormat) -> tuple[list[int], str | None]:
    """(the end-of-turn tokens that stop a reply, the end text when no single token marks it). The format's end
    tokens are marked by the special and added tokens among them (<|im_end|>, <|eot_id|>, an ordinary added
    <end_of_turn>; not the space Llama-2 writes before </s>); an end made of plain text only ("\n### End") is
    matched as text."""
    end = encode_pair(tokenizer, fmt, "?", "x")[2]
    marked = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    tokens = [t for t in end if t in marked]
    text = None if tokens or not end else tokenizer.decode(end).strip() or None
    return tokens, text


def stop_ids(tokenizer, fmt: PromptFormat, declared=()) -> list[int]:
    """Every id that ends a reply in generation: the model's declared end ids (`declared`, and those recorded by
    `declare_stops`: generation_config.eos_token_id, an int or a list), the tokenizer's EOS, and the format's
    end-of-turn tokens."""
    ids: list[int] = []
    for t in [*declared_ids(list(declared)), *_DECLARED.get(tokenizer, ()), tokenizer.eos_token_id,
              *_end_split(tokenizer, fmt)[0]]:
        if t is not None and int(t) not in ids:
            ids.append(int(t))
    return ids


def stop_text(tokenizer, fmt: PromptFormat) -> str | None:
    """The format's end-of-turn text when no token marks it (matched as a stop string), else None."""
    return _end_split(tokenizer, fmt)[1]


def stops_record(tokenizer, fmt: PromptFormat) -> dict:
    """The stop ids and their text, as the run records them (a reader sees where generation stops)."""
    ids = stop_ids(tokenizer, fmt)
    record = {"stop_ids": ids, "stop_tokens": [tokenizer.decode([t]) for t in ids]}
    if (text := stop_text(tokenizer, fmt)) is not None:
        record["stop_text"] = text
    return record


def reply(tokenizer, generated: list[int], stops, text: str | None = None) -> tuple[str, bool]:
    """(the decoded reply, whether it ended): the generated ids up to the first stop id (or the stop text), decoded
    without special tokens. A stop token that is not special (an added <end_of_turn>) is not part of the reply."""
    stops = set(stops)
    end = next((i for i, t in enumerate(generated) if t in stops), None)
    decoded = tokenizer.decode(generated if end is None else generated[:end], skip_special_tokens=True)
    if text and text in decoded:
        decoded, end = decoded[:decoded.index(text)], len(generated)
    return decoded.strip(), end is not None


def example(tokenizer, fmt: PromptFormat) -> str:
    """One rendered question and answer, as the run records it (so a reader sees the exact format)."""
    p, a, e = encode_pair(tokenizer, fmt, "{question}", "{answer}")
    return tokenizer.decode(p + a + e)


def _literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def as_chat_template(tokenizer, fmt: PromptFormat) -> str | None:
    """A Jinja chat template that renders a tags format exactly as `encode_pair` tokenises it (BOS where the tokenizer
    adds it), so an exported model asks in the run's format through `apply_chat_template`; None for the other kinds
    (a chat format is the tokenizer's own template already; the raw format is not a chat)."""
    if fmt.kind != "tags":
        return None
    t = {k: _literal(v) for k, v in dict(fmt.tags).items()}
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    bos = "{{ bos_token }}" if tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id else ""
    return (bos + "{% for m in messages %}"
            f"{{% if m['role'] == 'system' %}}{{{{ {t['system_start']} + m['content'] + {t['system_end']} }}}}"
            f"{{% elif m['role'] == 'user' %}}{{{{ {t['user_start']} + m['content'] + {t['user_end']} }}}}"
            f"{{% elif m['role'] == 'assistant' %}}{{{{ {t['assistant_start']} + m['content'] + "
            f"{t['assistant_end']} }}}}{{% endif %}}{{% endfor %}}"
            f"{{% if add_generation_prompt %}}{{{{ {t['assistant_start']} }}}}{{% endif %}}")
