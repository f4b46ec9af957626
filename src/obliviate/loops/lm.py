"""The language-model unlearning loop: short and visible. A method supplies the losses (and optionally how to combine
the forget and retain gradients); this loop owns batching, the optimiser, LoRA, the NaN guard and the history.

The loop talks to the model only through an adapter (default: `obliviate.models.causal_lm`): `prepare_tokenizer`,
`encode_item`, `collate`, `to_device` and `model_device`. The methods' forward passes hand the model every tensor
of the collated batch but the labels, so an adapter whose collate adds inputs (a vision-language model's
`pixel_values`) reuses this loop and every language-model method unchanged, as torchtune and TRL reuse their LM
recipes for vision models."""
from __future__ import annotations

import contextlib
import copy
import math
import random
import time
import warnings

import torch

from obliviate import progress, tracking
from obliviate.config import LMTrainConfig, LoraConfig, TrainConfig
from obliviate.data import QAItem, TextItem, check_disjoint
from obliviate.errors import ObliviateError
from obliviate.loops.step import (Checkpoints, StateGuard, UnlearnResult, evaluate_along, evaluation_steps,
                                  gradient_step, make_optimizer)
from obliviate.models.sequences import link_micro_batches

# Refusals for IdkPO when the user gives no file (TOFU ships its own idontknow.jsonl; pass it with idk_file).
DEFAULT_REFUSALS = ["I don't know.", "I'm not sure about that.", "I have no information on that.",
                    "That is beyond what I know.", "I cannot answer that.", "I have no idea."]


def _apply_lora(model, cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    return get_peft_model(model, PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                target_modules=cfg.target_modules, task_type="CAUSAL_LM"))


def _checkpointing(model, on: bool) -> None:
    """Activation (gradient) checkpointing on or off, by the name this transformers version gives it."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _batches(encoded: list, size: int, rng: random.Random, lengths: list[int] | None = None):
    """Endless shuffled passes over the encoded items. With `lengths` (group_by_length), each pass batches items of
    similar length only: the items fall into buckets whose longest item is at most 1.5x their shortest (a
    biography is never padded against a short answer), each bucket is shuffled and cut into batches, and the
    batches' order is shuffled."""
    if lengths is None:
        buckets = [list(range(len(encoded)))]
    else:
        buckets, by_length = [], sorted(range(len(encoded)), key=lambda j: lengths[j])
        for j in by_length:
            if not buckets or lengths[j] > 1.5 * lengths[buckets[-1][0]]:
                buckets.append([])
            buckets[-1].append(j)
    while True:
        batches = []
        for bucket in buckets:
            rng.shuffle(bucket)
            batches += [bucket[i:i + size] for i in range(0, len(bucket), size)]
        if len(buckets) > 1:
            rng.shuffle(batches)
        for batch in batches:
            yield [encoded[j] for j in batch]


def _narrowed(method, named: list) -> tuple[list, list]:
    """The trainable (name, parameter) pairs once `fit` has seen the data: a method may narrow its choice there (UOE
    trains the expert the forget set's routing points to); the parameters it drops are frozen again, so they get no
    gradient, no optimiser state and no update, and are not among the run's changed tensors."""
    kept = [(n, p) for n, p in named if method.trainable(n, p)]
    if not kept:
        raise ObliviateError(f"{method.name}: no trainable parameters selected")
    chosen = {id(p) for _, p in kept}
    for _, p in named:
        p.requires_grad_(id(p) in chosen)
    return kept, [p for _, p in kept]


def unlearn(model, tokenizer, forget: list[QAItem | TextItem], retain: list[QAItem | TextItem], method,
            train: LMTrainConfig | TrainConfig | None = None, lora: LoraConfig | None = None, reference=None,
            refusals: list[str] | None = None, adapter=None, checkpoints: Checkpoints | None = None,
            on_eval=None) -> UnlearnResult:
    """Unlearn `forget` from `model` (changed in place) while keeping `retain`: question-answer items (answer tokens
    count) and/or texts (every token counts). `method` is a Method instance or a registered name. `reference` is the
    frozen original, needed only by methods that declare it; by default a copy of `model` is taken before any step
    (and only for those methods). `adapter` encodes and batches the items (default: the causal-LM adapter).
    `checkpoints` saves the loop's state every few steps and resumes from the last one. `on_eval(step, epoch, model)`
    evaluates the model along the way (train.eval_every: before the first step, every eval_every steps, after the
    last), in evaluation mode and without changing the training (`step.evaluate_along`). A plain TrainConfig takes
    the language-model keys (LMTrainConfig's) at their defaults.
    On return every parameter is trainable again (as it was given), so the result can be unlearned again."""
    from obliviate import distributed

    if adapter is None:
        from obliviate.models import causal_lm as adapter
    distributed.setup()
    train = LMTrainConfig.of(train)
    if train.eval_every and distributed.active():  # every process refuses: none is left waiting for the others
        raise ObliviateError(f"train.eval_every: evaluation along the way runs in one process, not in "
                             f"{distributed.world_size()} (torchrun / accelerate launch); run without it")
    if isinstance(method, str):
        from obliviate.methods.common import make_method
        method = make_method("lm", method)
    from obliviate.guards import is_guard
    if is_guard(method):  # a guard changes how the model generates, not its weights
        raise ObliviateError(f"{method.name} is a generation-time guard: it trains nothing; `obliviate run` records "
                             f"it and evaluation applies it (docs/lm_guards.md)")
    check_disjoint(forget, retain)
    adapter.prepare_tokenizer(tokenizer)
    rng = random.Random(train.seed)
    torch.manual_seed(train.seed)
    sharded = train.shard == "fsdp"
    if sharded:
        from obliviate import sharding

        sharding.check(train, lora)
    # sharded: the processes' device (the model may wait on the CPU, each process keeping only its shard)
    device = sharding.device() if sharded else adapter.model_device(model)

    if method.needs_reference and reference is None:
        reference = copy.deepcopy(model)
    if reference is not None:
        reference.eval().requires_grad_(False)
    if not method.needs_reference:
        reference = None  # never hand a reference to a method that did not ask for one
    if sharded:
        plain = sharding.skeleton(model)  # filled with the gathered tensors after the loop
        sharding.shard(model, device)
        if reference is not None:
            sharding.shard(reference, device)
    if train.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ObliviateError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
        _checkpointing(model, True)
    if lora is not None:
        model = _apply_lora(model, lora)
    method.setup(model, reference)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and method.trainable(n, p)]
    trainable_ids = {id(p) for _, p in named}
    was_trainable = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable_ids)
    if not named:
        raise ObliviateError(f"{method.name}: no trainable parameters selected")
    params = [p for _, p in named]
    refusals = refusals or DEFAULT_REFUSALS

    pad = tokenizer.pad_token_id
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 512
    cut: set[int] = set()

    def encode(item, answer=None, tokens="answer+end"):
        """The item's tokens, cut to the model's context; the cut items are counted (a silent cut would hide that
        the end of an answer was never unlearned). tokens="answer": the format's end tokens are not scored."""
        e = adapter.encode_item(tokenizer, item, answer, max_length=None)
        if len(e.input_ids) > limit:
            cut.add(id(item))
            e = e.cut(limit)
        return e.answer_only() if tokens == "answer" else e

    forget_enc = [(encode(i, tokens=train.forget_tokens), encode(i, rng.choice(refusals))) for i in forget]
    # a method may pair each forget item with another item (SafeEraser's decoupled prompt): forget["companion"]
    companions = method.companions(forget, retain, rng)
    companion_enc = [encode(c) for c in companions] if companions is not None else None
    if companion_enc is not None:
        forget_enc = [(a, (b, c)) for (a, b), c in zip(forget_enc, companion_enc)]
    pool = method.retain_pool(retain, rng)
    retain_enc = [encode(i, tokens=train.retain_tokens) for i in pool]
    if cut:
        warnings.warn(f"{len(cut)} forget/retain item(s) are longer than the model's context ({limit} tokens) and "
                      "were cut to fit it", stacklevel=2)
    full_retain = (adapter.to_device(adapter.collate(distributed.shard(retain_enc), pad), device)
                   if method.full_retain_batch else None)

    def batches(encoded):  # lazy: only a method that reads the data before its first step draws them
        for i in range(0, len(encoded), train.batch_size):
            yield adapter.to_device(adapter.collate(encoded[i:i + train.batch_size], pad), device)
    method.fit(model, named, batches([a for a, _ in forget_enc]), batches(retain_enc))
    grad_mask = method.gradient_mask()  # WAGLE's: the entries outside it never change
    accumulation = train.grad_accum_steps  # micro-batches per optimiser step; `steps` counts optimiser steps
    named, params = _narrowed(method, named)  # the mask, if any, is per parameter trained from here on
    steps = train.max_steps or max(1, math.ceil(train.epochs * len(forget) / (train.batch_size * accumulation)))
    opt, sched = make_optimizer(params, train, steps)
    forget_lengths = [len(a.input_ids) for a, _ in forget_enc] if train.group_by_length else None
    retain_lengths = [len(e.input_ids) for e in retain_enc] if train.group_by_length else None
    forget_iter = _batches(forget_enc, train.batch_size, rng, forget_lengths)
    retain_iter = _batches(retain_enc, train.batch_size, rng, retain_lengths)
    checkpoints = checkpoints or Checkpoints(None, None, "")
    start, history, _ = checkpoints.resume(params, opt, sched)

    def epochs_before(step: int) -> float:  # the epochs of forget data gone through when a step begins
        return step * train.batch_size * accumulation / len(forget)
    for done in history:  # a method's state that follows from the logs (PDU's dual variable) is replayed
        method.after_step(done, epochs_before(done["step"]))
    for _ in range(start * accumulation):  # replay the batch order of the steps already taken
        next(forget_iter)
        if full_retain is None:
            next(retain_iter)
    # copies for the NaN guard only when they are cheap
    guard = StateGuard(params, enabled=sum(p.numel() for p in params) <= 100_000_000)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=train.mixed_precision == "bf16")
    stopped, t0 = None, time.time()
    budget = getattr(adapter, "logit_budget", None)
    # sharded, the output head lives in FSDP's root unit, which only the whole model's forward gathers: no slicing
    budget = budget(train.max_logit_tokens) if budget is not None and not sharded else contextlib.nullcontext()
    evaluated = evaluation_steps(train, steps, start) if on_eval is not None else set()

    def evaluate(done: int) -> None:  # after `done` optimiser steps
        if done in evaluated:
            evaluate_along(on_eval, done, done * train.batch_size * accumulation / len(forget), model, [model])

    def micro_batches() -> list[tuple[dict, dict]]:
        """The (forget, retain) batches of one optimiser step, this process's share of each global batch, linked so
        that every loss is a mean over the whole step (`link_micro_batches`)."""
        forgets, retains = [], []
        for _ in range(accumulation):
            pairs = distributed.shard(next(forget_iter))  # every process draws the global batch, takes its share
            f = adapter.collate([a for a, _ in pairs], pad)
            if companion_enc is None:
                f["idk"] = adapter.collate([b for _, b in pairs], pad)
            else:
                f["idk"] = adapter.collate([b for _, (b, _) in pairs], pad)
                f["companion"] = adapter.collate([c for _, (_, c) in pairs], pad)
            forgets.append(adapter.to_device(f, device))
            retains.append(full_retain if full_retain is not None else adapter.to_device(
                adapter.collate(distributed.shard(next(retain_iter)), pad), device))
        link_micro_batches(forgets)
        link_micro_batches(retains)
        with autocast:  # a method may drop forget rows before the step's counts (RGD)
            forgets = [method.select_forget(model, f) for f in forgets]
        link_micro_batches(forgets)
        return list(zip(forgets, retains))

    def losses(batches):
        for f, r in batches:
            with autocast:  # left before the backward pass
                parts = method.losses(model, reference, f, r)
            yield parts
    with progress.bar(f"unlearn {method.name}", steps) as advance, distributed.unlearning_loop(), budget:
        advance(start)
        evaluate(start)
        for step in range(start, steps):
            batches = micro_batches()
            f, r = batches[0]  # the guard's probe
            logs = {"step": step}  # the loss and the method's logs: global means over the step (gradient_step)
            stopped = gradient_step(method, losses(batches), params, opt, sched, train, logs, step, guard,
                                    grad_mask=grad_mask)
            if stopped:
                stopped = guard.restore(stopped, probe=lambda: method.losses(model, reference, f, r).total)
                break
            method.after_step(logs, epochs_before(step))
            history.append(logs)
            tracking.log(logs)  # train.report_to
            checkpoints.save(step, params, opt, sched, history)
            advance(loss=logs["loss"])
            evaluate(step + 1)
        if not stopped and history:  # the last update has no later loss to prove it: probe it
            stopped = guard.check_final(lambda: method.losses(model, reference, f, r).total)
    for p in params:  # the last step's gradients would stay alive through evaluation and saving: one more model
        p.grad = None
    if sharded:  # every process gathers the full tensors into an ordinary model (evaluation, the changed tensors)
        opt.state.clear()
        model = sharding.gather(model, plain, device)
        was_trainable = {id(p): p.requires_grad for p in model.parameters()}  # the skeleton kept the given flags
    model.eval()
    if train.gradient_checkpointing:
        _checkpointing(model, False)
    names = [n for n, _ in named]
    if lora is not None:
        model = model.merge_and_unload()
        names = sorted({n.replace("base_model.model.", "").replace(".lora_A.default", "").replace(
            ".lora_B.default", "") for n in names})
        was_trainable = {id(p): True for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(was_trainable.get(id(p), True))
    return UnlearnResult(model=model, trainable_names=names, history=history, seconds=time.time() - t0,
                         stopped=stopped, truncated=len(cut))
