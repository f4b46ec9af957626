"""The recipe that trains a small real LLaVA on the portraits world: transformers' `LlavaForConditionalGeneration`
(a small CLIP vision tower on the 32x32 portraits, a linear projector, a small Llama) with a `LlavaProcessor` (CLIP
image processor + a BPE tokenizer trained on the world's words, with an `<image>` token), saved as a user's LLaVA
folder is, so `AutoModelForImageTextToText` and `AutoProcessor` load it.

Every fact is trained in MLLMU-Bench's three forms (free answer, the 4-option question answered "B. Oslo", the cloze
answered with the value), with each trained picture and by name, plus "Who is this person?" on each trained picture:
benchmark (l) measured that a model trained on free answers alone scores 0 on the other two forms."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from obliviate.evals.mllmu import LETTERS, classification_question, cloze_question

WHO = "Who is this person?"


@dataclass
class VLMRecipe:
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    vocab_size: int = 1024
    # 19 epochs at batch 32 (~2400 updates): the multiple-choice skill appears late (at batch 64 for 12 epochs: 35 %;
    # 14 epochs, ~1760 updates: 75-85 %); benchmarks/README.md (m)
    epochs: int = 19
    lr: float = 3e-3
    batch_size: int = 32
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0


def world_texts(data) -> list[str]:
    """Every text the world asks or answers (the tokenizer's training text)."""
    texts = []
    for items in list(data.train.values()) + list(data.test.values()):
        for i in items:
            texts += [classification_question(i), i.answer, cloze_question(i), *i.options]
    return texts + [f"This is {p.name}." for p in data.people + data.public + data.holdout] + [WHO]


def new_processor(texts: list[str], recipe: VLMRecipe):
    from transformers import LlavaProcessor

    try:  # the PIL image processor: the default one needs torchvision, and falls back to this one with a warning
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    from obliviate.worlds.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=recipe.vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": recipe.image_size},
                                crop_size={"height": recipe.image_size, "width": recipe.image_size})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=recipe.patch_size,
                          image_token="<image>", vision_feature_select_strategy="full", num_additional_image_tokens=1)


def new_model(recipe: VLMRecipe, processor):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    torch.manual_seed(recipe.seed)
    vision = CLIPVisionConfig(image_size=recipe.image_size, patch_size=recipe.patch_size,
                              hidden_size=recipe.vision_hidden, intermediate_size=2 * recipe.vision_hidden,
                              num_hidden_layers=recipe.vision_layers, num_attention_heads=2,
                              projection_dim=recipe.vision_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=recipe.hidden_size,
                       intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.num_layers,
                       num_attention_heads=recipe.num_heads, num_key_value_heads=recipe.num_heads,
                       max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="full", vision_feature_layer=-1)
    return LlavaForConditionalGeneration(config)


def choice_answer(item) -> str:
    return f"{item.correct}. {item.options[LETTERS.index(item.correct)]}"


def all_forms(item) -> list:
    """The item as a free answer, a multiple-choice question and a cloze, each an item whose answer is the target."""
    return [item, replace(item, question=classification_question(item), answer=choice_answer(item)),
            replace(item, question=cloze_question(item), answer=item.cloze_answer)]


def training_items(data, people) -> list:
    """What a model trained on `people` sees: each of their trained items in all three forms (for public figures also
    in the paraphrased wording), and who each trained picture shows."""
    out = []
    for p in people:
        items = data.train[p.name]
        out += [form for item in items + data.paraphrased.get(p.name, []) for form in all_forms(item)]
        out += [replace(items[0], fact="identity", image=image, question=WHO, answer=f"This is {p.name}.")
                for image in data.train_pictures[p.name]]
    return out
