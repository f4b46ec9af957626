"""A tiny LLaVA built in code for tests: a CLIP vision tower on 32x32 pictures, a projector and a 2-layer Llama, with
a LlavaProcessor (CLIP image processor + a tokenizer trained on the portraits world's words, with an image token),
saved with save_pretrained as a user's LLaVA folder is; `chat_template`: the processor's (LLAVA_15_CHAT_TEMPLATE: a
LLaVA-1.5 folder as today's transformers saves it); `moe`: the language model a Mixtral (4 experts, 2 per token) of the
same size instead of the Llama."""
from __future__ import annotations

import torch

# The chat template llava-hf's LLaVA-1.5 processors ship (chat_template.json / chat_template.jinja, as
# save_pretrained writes it), verbatim as transformers' own processor tests carry it: message content is a list of
# parts, images rendered first; a plain-string content renders nothing.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def tiny_llava(path, data, chat_template: str | None = None, moe: bool = False):
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, MixtralConfig)

    from obliviate.worlds.tokenizer import train_tokenizer

    texts = [f"{i.question} {i.answer} {' '.join(i.options)}" for items in data.train.values() for i in items]
    tokenizer = train_tokenizer(texts, vocab_size=500)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, projection_dim=32)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if moe:
        text = MixtralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                             num_local_experts=4, num_experts_per_tok=2, **ids)
    else:
        text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, **ids)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                                      vision_feature_select_strategy="full", vision_feature_layer=-1))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, image_token="<image>",
                               vision_feature_select_strategy="full", num_additional_image_tokens=1,
                               chat_template=chat_template)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
