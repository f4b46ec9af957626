"""Tiny instruct models for tests: a BPE tokenizer trained in code that carries a real chat template (ChatML as Qwen
and SmolLM ship it, Llama-2-chat's `[INST]` format, Llama-3-Instruct's headers), and a 2-layer Llama trained on the
test facts through that template, saved with save_pretrained as a user's instruct checkpoint is."""
from __future__ import annotations

import torch

# The templates as the models' tokenizer_config.json ship them (whitespace kept; only the Jinja is here).
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
          "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ "
          "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
          "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# A chat format whose turn tags are ordinary added tokens (not special, not EOS): the model ends its turn with
# <|turn_end|>, which only its generation_config.json names as an end id, as several released chat models ship.
ADDED_TURNS = ("{% for message in messages %}{{'<|turn_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|turn_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|turn_start|>assistant\n' }}"
               "{% endif %}")

TEMPLATES = {"chatml": CHATML, "llama2": LLAMA2, "llama3": LLAMA3, "added_turns": ADDED_TURNS}
_SPECIAL = {"chatml": ["<|im_start|>", "<|im_end|>"], "llama2": [],
            "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            "added_turns": []}
_ADDED = {"added_turns": ["<|turn_start|>", "<|turn_end|>"]}  # tokenizer.add_tokens: ordinary, not special


def chat_tokenizer(kind: str, corpus: list[str]):
    """A tokenizer trained on `corpus` with `kind`'s special tokens and chat template (the end of turn is EOS for
    ChatML, as in Qwen2.5-Instruct; Llama-3 keeps <|end_of_text|>-style EOS apart from <|eot_id|>)."""
    from obliviate.worlds.tokenizer import train_tokenizer

    tok = train_tokenizer(corpus * 4, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": _SPECIAL[kind]})
    tok.add_tokens(_ADDED.get(kind, []))
    if kind == "chatml":
        tok.eos_token = "<|im_end|>"
    if kind == "llama3":
        tok.bos_token = "<|begin_of_text|>"
    tok.chat_template = TEMPLATES[kind]
    return tok


def train_chat_model(path, items, kind: str = "chatml", steps_epochs: int = 150, vocabulary_items=None):
    """A 2-layer Llama that knows `items` through the tokenizer's chat template, saved to `path`. The tokenizer is
    trained on `vocabulary_items` (default: `items`), so a retrain model can share the original's vocabulary."""
    from obliviate.models import causal_lm as lm
    from obliviate.worlds.train import LMRecipe, new_model, train

    corpus = [f"{i.question} {i.answer} {i.paraphrased_answer} {' '.join(i.perturbed_answers)}"
              for i in (vocabulary_items or items)]
    tok = chat_tokenizer(kind, corpus)
    lm.prepare_tokenizer(tok)
    recipe = LMRecipe(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, epochs=steps_epochs,
                      batch_size=len(items), lr=3e-3)
    model = new_model(recipe, tok)
    torch.manual_seed(0)
    train(model, tok, [lm.encode_qa(tok, i.question, i.answer) for i in items], recipe)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if kind == "added_turns":  # the end of turn is named in generation_config.json only (config.json keeps </s>)
        from transformers import GenerationConfig

        GenerationConfig(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                         eos_token_id=[tok.convert_tokens_to_ids("<|turn_end|>")]).save_pretrained(path)
    return path
