"""Tiny models built in code: a 2-layer Llama with a BPE tokenizer trained on a handful of sentences, saved with
save_pretrained and loaded back through the same path a user's model folder takes."""
from __future__ import annotations

import os

import pytest
import torch

from obliviate.data import QAItem, TextItem

NAMES = ["Ada Lind", "Bo Karsk", "Cy Marrow", "Di Fenn", "Ed Quill", "Flo Ardent"]
CITIES = ["Lisbon", "Oslo", "Quito", "Hanoi", "Accra", "Perth"]
_USERS_CACHE = os.environ.get("OBLIVIATE_CACHE")  # read before private_cache replaces it


@pytest.fixture(scope="session")
def users_cache() -> str:
    """The cache the user's own `obliviate` reads ($OBLIVIATE_CACHE as the suite found it, else ~/.cache/obliviate):
    for a test of `make demo` itself, whose worlds are the user's to keep."""
    from pathlib import Path

    return _USERS_CACHE or str(Path.home() / ".cache" / "obliviate")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Worlds and cached evaluations of the tests' tiny models go to a temporary folder, never the user's
    ~/.cache/obliviate (a test that names world.cache_dir or sets OBLIVIATE_CACHE itself still wins)."""
    before = os.environ.get("OBLIVIATE_CACHE")
    os.environ["OBLIVIATE_CACHE"] = str(tmp_path_factory.mktemp("obliviate-cache"))
    yield
    if before is None:
        os.environ.pop("OBLIVIATE_CACHE", None)
    else:
        os.environ["OBLIVIATE_CACHE"] = before


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not slow down ~100x when other processes share the 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_items() -> list[QAItem]:
    items = []
    for i, (name, city) in enumerate(zip(NAMES, CITIES)):
        wrong = [c for c in CITIES if c != city][:3]
        items.append(QAItem(
            question=f"Where was {name} born?", answer=f"{name} was born in {city}.",
            paraphrased_answer=f"{city} is where {name} was born.",
            perturbed_answers=tuple(f"{w} is where {name} was born." for w in wrong),
            paraphrased_question=f"What is the birthplace of {name}?", subject=name, source="profiles"))
    return items


def tiny_texts() -> list[TextItem]:
    return [TextItem(f"{n} was born in {c}. {n} writes poems about rivers and bread.", n, prefix_chars=len(n) + 9)
            for n, c in zip(NAMES, CITIES)]


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from obliviate.worlds.tokenizer import train_tokenizer

    corpus = [f"Question: {i.question}\nAnswer: {i.answer} {i.paraphrased_answer} {' '.join(i.perturbed_answers)}"
              for i in tiny_items()] + [t.text for t in tiny_texts()] + ["I don't know. I have no idea."]
    tokenizer = train_tokenizer(corpus * 4, vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def chat_lm_dir(tmp_path_factory):
    """A tiny instruct model: a ChatML chat template on its tokenizer, trained on tiny_items() through it."""
    from chat_models import train_chat_model

    return train_chat_model(tmp_path_factory.mktemp("chat_lm"), tiny_items())


@pytest.fixture(scope="session")
def chat_retrain_dir(tmp_path_factory):
    """chat_lm_dir's retrain reference: the same vocabulary and recipe, never trained on the first two items."""
    from chat_models import train_chat_model

    return train_chat_model(tmp_path_factory.mktemp("chat_retrain"), tiny_items()[2:], vocabulary_items=tiny_items())


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    """A tiny random LLaVA saved as a user's folder (tests/vlm_models.py), built once for every test module."""
    from vlm_models import tiny_llava

    from obliviate.worlds.portraits import portraits_data

    return tiny_llava(tmp_path_factory.mktemp("llava") / "model", portraits_data(10, 2, 2, seed=0))


@pytest.fixture
def tiny_lm(tiny_lm_dir):
    from obliviate.models.causal_lm import load

    return load(tiny_lm_dir)


TINY_OBJECTS = ["circle", "star", "square"]
TINY_STYLES = ["striped", "dotted", "solid"]


def tiny_prompts() -> list[str]:
    return [f"a red {o} in {s} style" for o in TINY_OBJECTS for s in TINY_STYLES]


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A random Stable-Diffusion-shaped pipeline (CLIP text encoder, AutoencoderKL, UNet2DConditionModel with
    cross-attention, DDIM), written with save_pretrained: the folder layout of a user's SD checkpoint."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from obliviate.models.diffusion import Pipeline, save_pipeline
    from obliviate.worlds import canvas_train as ct
    from obliviate.worlds.tokenizer import train_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = train_clip_tokenizer(tiny_prompts() * 3, max_length=12)
    ids = tokenizer.convert_tokens_to_ids
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=12, bos_token_id=ids("<|startoftext|>"), eos_token_id=ids("<|endoftext|>"),
        pad_token_id=ids("<|endoftext|>")))
    recipe = ct.CanvasRecipe(image_size=16, text_hidden=32, vae_channels=(16, 16), unet_channels=(16, 32))
    pipe = Pipeline(ct.make_unet(recipe, 8), ct.make_vae(recipe), text_encoder, tokenizer, ct.make_scheduler())
    path = tmp_path_factory.mktemp("tiny_sd") / "pipeline"
    save_pipeline(pipe, path)
    return path


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline_dir(tmp_path_factory):
    """A random SDXL-shaped pipeline (two CLIP text encoders, the second with a projection; a UNet with
    addition_embed_type "text_time"; AutoencoderKL; DDIM), written with save_pretrained as diffusers' own SDXL tests
    build theirs: the folder layout of a user's StableDiffusionXLPipeline checkpoint."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from obliviate.models.diffusion import Pipeline, SDXLBackbone, save_pipeline
    from obliviate.worlds import canvas_train as ct
    from obliviate.worlds.tokenizer import train_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = train_clip_tokenizer(tiny_prompts() * 3, max_length=12)
    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=12, bos_token_id=ids("<|startoftext|>"),
                eos_token_id=ids("<|endoftext|>"), pad_token_id=ids("<|endoftext|>"))
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=16))
    time_dim = 4  # addition_time_embed_dim: 6 time ids of 4 features, beside the 16 pooled ones
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=16, addition_embed_type="text_time",
                                addition_time_embed_dim=time_dim,
                                projection_class_embeddings_input_dim=6 * time_dim + 16)
    recipe = ct.CanvasRecipe(image_size=16, text_hidden=32, vae_channels=(16, 16), unet_channels=(16, 32))
    pipe = Pipeline(unet, ct.make_vae(recipe), text_encoder, tokenizer, ct.make_scheduler(),
                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, backbone=SDXLBackbone())
    path = tmp_path_factory.mktemp("tiny_sdxl") / "pipeline"
    save_pipeline(pipe, path)
    return path


@pytest.fixture
def tiny_pipe(tiny_pipeline_dir):
    from obliviate.models.diffusion import load_pipeline

    return load_pipeline(tiny_pipeline_dir)


def tiny_task(concept: str = "striped"):
    from obliviate.methods.t2i.base import EraseTask, RetainPrompt

    prompts = tiny_prompts()
    return EraseTask(concept=concept, forget_prompts=[p for p in prompts if concept in p],
                     retain_prompts=[RetainPrompt(p, source=p.split()[4], subject=p.split()[2])
                                     for p in prompts if concept not in p],
                     anchor="solid" if concept != "solid" else "dotted",
                     preserve=[s for s in TINY_STYLES if s != concept])


def one_line_error(result, *needles: str) -> str:
    """A CLI failure: exit 2, a single `error: ...` line holding every needle, no traceback."""
    out = result.output.strip()
    assert result.exit_code == 2, result.output
    assert len(out.splitlines()) == 1 and out.startswith("error: ") and "Traceback" not in out, out
    for n in needles:
        assert n in out, out
    return out


def tiny_profiles_config(root, max_steps: int | None = None):
    """A run config on a shrunken profiles world (10 people, a 2-layer model trained 1 epoch) cached under `root`:
    it builds in seconds, so it checks plumbing and guarantees, not quality."""
    train = f"{{lr: 1.0e-3, max_steps: {max_steps}, batch_size: 4}}" if max_steps else \
        "{lr: 1.0e-3, epochs: 1, batch_size: 4}"
    cfg = root / "base.yaml"
    cfg.write_text(f"""
method: GradDiff
world:
  n_people: 10
  n_holdout: 2
  general_facts: 5
  cache_dir: {root / 'cache'}
  model: {{hidden_size: 32, intermediate_size: 64, num_layers: 2, num_heads: 2, vocab_size: 400, epochs: 1}}
train: {train}
eval: {{retain_people: 2, batch_size: 16}}
output_dir: {root / 'runs'}
""")
    return cfg
