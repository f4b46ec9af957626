"""What every family's loop shares: the optimiser and its warm-up schedule, one gradient step (restricted gradients,
masks, clipping), the guard that keeps the last sound state when the loss diverges, the loop's result and the
tensors a run saves."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from obliviate.config import TrainConfig


@dataclass
class UnlearnResult:
    model: torch.nn.Module  # the unlearned model (LoRA merged), or the erased UNet
    trainable_names: list[str]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str | None = None  # why the loop stopped early (non-finite loss), else None
    truncated: int = 0  # items longer than the model's context, cut to fit it


def evaluation_steps(train: TrainConfig, steps: int, start: int = 0) -> set[int]:
    """The optimiser steps after which the model is evaluated along the way (train.eval_every): 0 (before any
    change), every eval_every, and the last; none before `start` (a resumed loop) and none without eval_every."""
    if not train.eval_every:
        return set()
    return {s for s in (0, *range(train.eval_every, steps, train.eval_every), steps) if s >= start}


def evaluate_along(on_eval: Callable, step: int, epoch: float, model, modules: list) -> None:
    """`on_eval(step, epoch, model)` in evaluation mode, leaving the training exactly as it was: every module of
    `modules` back in its own train/eval mode, and the random state (torch's, CUDA's, Python's, NumPy's) as before,
    so the later batches, noise and dropout are those of a run without the evaluations."""
    import random

    import numpy as np

    modes = [(m, m.training) for module in modules for m in module.modules()]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for module in modules:
                module.eval()
            on_eval(step, epoch, model)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        for m, mode in modes:
            m.train(mode)


def make_optimizer(params: list, train: TrainConfig, steps: int):
    """The optimiser the config names and a linear warm-up over `train.warmup_fraction` of the steps."""
    opt = (torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay) if train.optimizer == "adamw"
           else torch.optim.SGD(params, lr=train.lr))
    warmup = int(steps * train.warmup_fraction)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    return opt, sched


class StateGuard:
    """The NaN guard. A step whose loss is finite proves the state it started from sound; the step itself may still
    wreck the weights (lr 1e9: huge but finite weights, a NaN loss one step later). So the guard keeps a copy of the
    last state whose loss was finite (taken before each step) and of the initial state, and when the loop must stop
    it puts back the last sound state (whose loss and gradient were finite), or the initial one if even that gives a
    non-finite loss on a probe batch. The state the last step produced is probed too.
    Off (no copies) for models too large to copy at every step."""

    def __init__(self, params: list, enabled: bool = True):
        self.params, self.enabled = params, enabled
        self.initial = self._copy() if enabled else None
        self.last_good: list | None = None
        self.last_good_step: int | None = None

    def _copy(self) -> list:
        return [p.detach().clone() for p in self.params]

    def _put(self, tensors: list) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, tensors):
                p.copy_(s)

    def mark_good(self, step: int) -> None:
        """The current state (before `step`'s update) gave a finite loss."""
        if self.enabled:
            self.last_good, self.last_good_step = self._copy(), step

    def check_final(self, probe: Callable[[], torch.Tensor]) -> str | None:
        """After the last step: no later loss proves the state it produced, so probe it (without touching the global
        random state, so what follows the loop draws the same numbers); if its loss is not finite, put back the last
        sound state and say why, else None."""
        if not self.enabled or self.last_good is None:
            return None
        with torch.random.fork_rng(devices=[]):
            if _finite(probe):
                return None
            return self.restore(f"non-finite loss after the last step ({self.last_good_step})", probe)

    def restore(self, why: str, probe: Callable[[], torch.Tensor] | None = None) -> str:
        """Put back the last sound state and say which one it is (the message ends the run's `stopped` field)."""
        if not self.enabled:
            return f"{why}; the state could not be restored (the model is too large to copy at every step)"
        if self.last_good is not None:
            self._put(self.last_good)
            if probe is None or _finite(probe):
                return f"{why}; kept the state before step {self.last_good_step}, whose loss was finite"
        self._put(self.initial)
        return f"{why}; kept the initial state (no later state gave a finite loss)"


def _finite(probe: Callable[[], torch.Tensor]) -> bool:
    """Whether the probe's loss is finite. Run with gradients on: some methods' losses take gradients inside (the
    inner attack of AdvUnlearn)."""
    try:
        return bool(torch.isfinite(probe().detach()).all())
    except RuntimeError:  # e.g. a sampling error from non-finite probabilities
        return False


def gradient_step(method, parts, params: list, opt, sched, train: TrainConfig, logs: dict, step: int,
                  guard: StateGuard, grad_mask: list | None = None) -> str | None:
    """One optimiser step from a method's loss parts, shared by every family's loop: the gradients (combined by the
    method when it says how, e.g. the restricted gradient), an optional 0/1 mask per parameter (SalUn), clipping.
    `parts` is the LossParts of the step's batch, or an iterable of those of its micro-batches (gradient
    accumulation), each backpropagated as it comes so that one micro-batch's graph is held at a time; their losses
    are means over the whole step (`sequences.step_total`), so the summed gradients are those of the step's mean.
    The restricted gradient accumulates the forget and the retain gradients apart and combines the sums. `logs`
    gets the loss and the method's logs, summed over the micro-batches and averaged over the processes (each is a
    share of a mean over the step's global batch), then the combination's logs.
    Returns why the loop must stop (a non-finite loss, gradient or update), else None; the loop then calls
    `guard.restore`."""
    from obliviate import distributed, sharding

    sharded = sharding.is_sharded(params[0])  # FSDP2 (train.shard): its reduce-scatter has averaged the gradients
    opt.zero_grad(set_to_none=True)
    surgery, g_f, g_r = None, None, None
    loss, sums = 0.0, {}
    for part in ([parts] if hasattr(parts, "total") else parts):
        if surgery is None:
            surgery = method.combine_gradients is not None and part.retain is not None
        if surgery:
            if sharded:  # autograd.grad cannot reach FSDP2's sharded parameters: two backward passes
                grads_f, grads_r = sharding.two_backward_gradients(part, params)
            else:
                grads_f = torch.autograd.grad(part.forget, params, retain_graph=True, allow_unused=True)
                grads_r = torch.autograd.grad(part.retain, params, allow_unused=True)
            g_f = _accumulated(g_f, grads_f, params)
            g_r = _accumulated(g_r, grads_r, params)
        else:
            part.total.backward()
        loss += float(part.total.detach())
        for key, value in getattr(part, "logs", {}).items():
            sums[key] = sums[key] + value if key in sums and _number(value) else value
    logs.update({"loss": loss, **sums})
    if distributed.active():  # every process logs, checks and stops on the global means
        keys = [k for k, v in logs.items() if k != "step" and _number(v)]
        values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=params[0].device)
        distributed.average([values])
        logs.update(zip(keys, values.tolist()))
    if surgery:
        if not sharded:  # the surgery's dot products and norms are taken on the global gradients
            distributed.average(g_f)
            distributed.average(g_r)
        combined, extra = method.combine_gradients(g_f, g_r)
        logs.update(extra)
        for p, g in zip(params, combined):
            p.grad = g
    else:
        if not sharded:
            distributed.average([p.grad for p in params])
    if grad_mask is not None:
        for p, m in zip(params, grad_mask):
            if p.grad is not None and m is not None:
                p.grad.mul_(m)
    if not math.isfinite(logs["loss"]):
        return f"non-finite loss at step {step}"
    if not (sharding.all_finite([p.grad for p in params]) if sharded
            else all(p.grad is None or torch.isfinite(p.grad).all() for p in params)):
        return f"non-finite gradient at step {step}"
    guard.mark_good(step)
    if train.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
    before = guard.last_good if guard.enabled else ([p.detach().clone() for p in params] if grad_mask else None)
    try:
        opt.step()
    except RuntimeError as e:  # a learning rate beyond the weights' float range: the update itself cannot be made
        if "overflow" not in str(e):
            raise
        return f"the optimiser step overflowed at step {step} ({str(e).splitlines()[0]})"
    sched.step()
    if grad_mask is not None:  # weight decay acts outside the gradient: keep masked-out entries exactly as they were
        with torch.no_grad():
            for p, s, m in zip(params, before, grad_mask):
                if m is not None:
                    p.copy_(torch.where(m.bool(), p, s))
    if guard.enabled and not (sharding.all_finite(params) if sharded else all(torch.isfinite(p).all() for p in params)):
        return f"parameters became non-finite at step {step}"
    return None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _accumulated(total: list | None, grads, params: list) -> list:
    """A running sum of per-parameter gradients (None: no gradient reached the parameter, counted as zero)."""
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    if total is None:
        return grads
    for t, g in zip(total, grads):
        t.add_(g)
    return total


def changed_tensors(model, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors the method was allowed to change (for LoRA: the merged target weights), by state-dict name."""
    state = model.state_dict()
    return {n: state[n].detach().cpu().contiguous() for n in names if n in state}


class Checkpoints:
    """Every `every` steps, the loop's state goes to `folder` (outside the run's temporary folder, so it survives a
    kill): the trainable tensors, the optimiser and scheduler, the torch RNG and the history, with a key of the run's
    settings. `resume()` gives that state back to a loop started again with the same settings; the loop replays its
    batch order up to the step (no compute), so the resumed run ends where an uninterrupted one would. Written
    atomically; loaded with torch.load(weights_only=True)."""

    def __init__(self, folder: str | None, every: int | None, key: str):
        from pathlib import Path

        self.folder = Path(folder) if folder and every else None
        self.every, self.key = every, key

    @classmethod
    def for_run(cls, config, resume: bool = False) -> "Checkpoints":
        """The checkpoints of a run (`train.checkpoint_every`): `OUTPUT_DIR/.NAME.checkpoint/`, keyed by the config."""
        import hashlib
        import json
        from pathlib import Path

        from obliviate.errors import ObliviateError

        every = config.train.checkpoint_every
        if not every:
            if resume:
                raise ObliviateError("--resume needs train.checkpoint_every: without it a run saves no checkpoints")
            return cls(None, None, "")
        if not config.name:
            raise ObliviateError("train.checkpoint_every needs `name`, so that `--resume` finds the run again")
        folder = Path(config.output_dir) / f".{config.name}.checkpoint"
        if folder.exists() and not resume:
            raise ObliviateError(f"{folder} holds the checkpoint of an interrupted run: pass --resume to continue "
                                 "it, or remove the folder")
        key = hashlib.sha256(json.dumps(config.dump(), sort_keys=True, default=str).encode()).hexdigest()
        return cls(str(folder), every, key)

    @property
    def path(self):
        return self.folder / "state.pt"

    def save(self, step: int, params: list, opt, sched, history: list, extra: dict | None = None) -> None:
        """After `step` (0-based) when it is a checkpoint step."""
        if self.folder is None or (step + 1) % self.every:
            return
        import io

        from obliviate.runs import atomic_write

        state = {"key": self.key, "next_step": step + 1, "params": [p.detach().cpu() for p in params],
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                 "history": history, **(extra or {})}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, buffer.getvalue())

    def resume(self, params: list, opt, sched) -> tuple[int, list, dict]:
        """(the step to start from, the history so far, the saved state); (0, [], {}) without a checkpoint."""
        from obliviate.errors import ObliviateError

        if self.folder is None or not self.path.is_file():
            return 0, [], {}
        try:
            state = torch.load(self.path, weights_only=True)
        except Exception as e:  # a torn or foreign file: say which, never unpickle more than tensors
            raise ObliviateError(f"{self.path}: not a readable checkpoint ({str(e).splitlines()[0]})") from None
        if state.get("key") != self.key:
            raise ObliviateError(f"{self.path} is the checkpoint of a run with other settings; remove it or run "
                                 "without --resume")
        with torch.no_grad():
            for p, saved in zip(params, state["params"]):
                p.copy_(saved.to(p.device, p.dtype))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        return state["next_step"], list(state["history"]), state

    def done(self) -> None:
        """The run finished: its checkpoint is no longer needed."""
        import shutil

        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
