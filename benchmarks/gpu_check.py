"""GPU paths: every text-to-image method, the prompt attack and three language-model methods on CUDA, in float32
and bfloat16.

Usage (on a machine with a CUDA GPU): python benchmarks/gpu_check.py   [cpu: a dry run of the same script]
Builds a random Stable-Diffusion-shaped pipeline with the canvas recipe's sizes and a random 4-layer Llama in code,
saves them with save_pretrained, loads them back on `cuda` in each dtype through the same functions a user's folder
takes, runs each method for a few steps, and prints one JSON line per run: finite losses, whether the weights
changed, seconds and the peak CUDA memory. Exits non-zero if any run fails a check.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from obliviate import progress
from obliviate.config import TrainConfig

progress.set_enabled(False)
DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"
CUDA = DEVICE.startswith("cuda")
if CUDA and not torch.cuda.is_available():
    sys.exit("no CUDA device")
print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if CUDA else DEVICE}), flush=True)
failures = 0


def peak_mib():
    return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if CUDA else None


def reset_peak():
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def report(row: dict) -> None:
    global failures
    failures += not row["ok"]
    print(json.dumps(row), flush=True)


def t2i_checks(root: Path) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    from obliviate.loops.t2i import erase
    from obliviate.methods.common import make_method
    from obliviate.methods.t2i.base import EraseTask, RetainPrompt
    from obliviate.models.diffusion import Pipeline, load_pipeline, sample, save_pipeline
    from obliviate.registry import T2I_METHODS
    from obliviate.worlds import canvas_draw as cd
    from obliviate.worlds import canvas_train as ct
    from obliviate.worlds.tokenizer import train_clip_tokenizer

    prompts = [p.text for p in cd.canonical_prompts()]
    tokenizer = train_clip_tokenizer(prompts)
    ids = tokenizer.convert_tokens_to_ids
    recipe = ct.CanvasRecipe()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.text_hidden, intermediate_size=2 * recipe.text_hidden,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=ids("<|startoftext|>"), eos_token_id=ids("<|endoftext|>"), pad_token_id=ids("<|endoftext|>")))
    folder = root / "sd"
    save_pipeline(Pipeline(ct.make_unet(recipe, 8), ct.make_vae(recipe), text_encoder, tokenizer,
                           ct.make_scheduler()), folder)
    concept = "striped"
    task = EraseTask(concept, [p for p in prompts if concept in p][:16],
                     [RetainPrompt(p.text, p.style, p.object) for p in cd.canonical_prompts() if not p.has(concept)][:32],
                     anchor="solid", preserve=[s for s in cd.STYLES if s != concept])
    for dtype in (torch.float32, torch.bfloat16):
        for name in T2I_METHODS:
            pipe = load_pipeline(folder, DEVICE, dtype)
            before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
            reset_peak()
            t0 = time.time()
            try:
                result = erase(pipe, task, make_method("t2i", name), TrainConfig(max_steps=5, lr=1e-4, batch_size=8),
                               images_per_prompt=1, sample_steps=10)
                images = sample(pipe, prompts[:4], [0, 1, 2, 3], steps=5)
                changed = sum(not torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())
                losses = [h["loss"] for h in result.history if "loss" in h]
                ok = result.stopped is None and changed > 0 and all(map(lambda v: v == v, losses)) \
                    and bool(torch.isfinite(images).all())
                report({"family": "t2i", "method": name, "dtype": str(dtype), "ok": ok, "changed_tensors": changed,
                        "seconds": round(time.time() - t0, 2),
                        "peak_cuda_mib": peak_mib()})
            except Exception as e:  # report and go on: the point is the list of what breaks on a GPU
                report({"family": "t2i", "method": name, "dtype": str(dtype), "ok": False, "error": repr(e)[:300]})
        attack_check(folder, task, dtype)


def attack_check(folder: Path, task, dtype) -> None:
    """The adversarial prompt attack (a detector that never fires, so every prompt runs every step and check)."""
    from obliviate.attacks.t2i.unlearn_diff_atk import PromptAttackConfig, attack_prompts
    from obliviate.models.diffusion import initial_noise, load_pipeline

    pipe = load_pipeline(folder, DEVICE, dtype)
    prompts = task.forget_prompts[:8]
    reset_peak()
    t0 = time.time()
    try:
        rows, _ = attack_prompts(pipe, prompts, list(range(len(prompts))), initial_noise(pipe, [100 + i for i in range(len(prompts))]),
                              lambda images: [False] * len(images), PromptAttackConfig(iterations=10, check_every=5),
                              sample_steps=10)
        ok = len(rows) == len(prompts) and all(r["loss_before"] == r["loss_before"] and
                                               r["loss_after"] == r["loss_after"] for r in rows)
        report({"family": "t2i", "method": "UnlearnDiffAtk (attack)", "dtype": str(dtype), "ok": ok,
                "seconds": round(time.time() - t0, 2), "peak_cuda_mib": peak_mib()})
    except Exception as e:
        report({"family": "t2i", "method": "UnlearnDiffAtk (attack)", "dtype": str(dtype), "ok": False,
                "error": repr(e)[:300]})


def lm_checks(root: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from obliviate.data import QAItem
    from obliviate.evals.evaluate import evaluate_lm
    from obliviate.models import causal_lm as lm
    from obliviate.loops.lm import unlearn
    from obliviate.worlds.tokenizer import train_tokenizer

    items = [QAItem(question=f"Where does person {i} live?", answer=f"Person {i} lives in town {i % 7}.",
                    paraphrased_answer=f"Town {i % 7} is home to person {i}.",
                    perturbed_answers=(f"Town {(i + 1) % 7} is home to person {i}.",),
                    subject=f"p{i}", source="synthetic") for i in range(48)]
    tokenizer = train_tokenizer([f"{x.question} {x.answer} {x.paraphrased_answer}" for x in items] * 3, 400)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id))
    folder = root / "lm"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    forget, retain = items[:8], items[8:]
    for dtype in ("float32", "bfloat16"):
        for name in ("GradDiff", "NPO", "RGD"):
            model, tok = lm.load(folder, dtype, DEVICE)
            reset_peak()
            t0 = time.time()
            try:
                result = unlearn(model, tok, forget, retain, name, TrainConfig(max_steps=5, lr=1e-4, batch_size=8))
                scores = evaluate_lm(result.model, tok, {"forget": forget, "retain": retain}, None, None)
                agg = scores["aggregate"]
                ok = result.stopped is None and all(isinstance(v, (int, float)) and v == v for v in
                                                    (agg.get("forget_accuracy"), agg.get("retain_accuracy")))
                report({"family": "lm", "method": name, "dtype": dtype, "ok": ok,
                        "seconds": round(time.time() - t0, 2),
                        "peak_cuda_mib": peak_mib()})
            except Exception as e:
                report({"family": "lm", "method": name, "dtype": dtype, "ok": False, "error": repr(e)[:300]})


with tempfile.TemporaryDirectory() as tmp:
    t2i_checks(Path(tmp))
    lm_checks(Path(tmp))
sys.exit(1 if failures else 0)
