"""Data parallel unlearning across processes (`torchrun --nproc_per_node N` or `accelerate launch`): every process
holds the whole model, takes its share of each global batch, and the gradients are averaged over the processes
before the step, so every process takes the same step. accelerate's PartialState sets up the process group (NCCL on
GPUs, gloo on CPUs).

The gradients are averaged explicitly (not by DDP's backward hooks) because the restricted gradient needs the forget
and the retain gradient apart: each is averaged over every process first, then the dot products and norms of the
surgery are taken on the global gradients, so RG/RGD give the same update as one process with the whole batch.
Every loss is a mean over the global batch: a term divides its share's sum by the global count of tokens or sequences
(`global_count`, through `models.sequences.step_total`, which also counts every micro-batch of gradient accumulation),
so any split is exact: 3 items as 2 + 1, or a tail that leaves a process no item (its share is one padding row that
counts nothing, so it still takes part in every forward and backward pass and every collective). Evaluation shards the
same way (`evaluate_lm(..., sharded=True)`) and gathers the per-item values. Not done: sharded parameters (FSDP,
ZeRO-3)."""
from __future__ import annotations

import contextlib
import os

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    return world_size() > 1


_state = None


def setup():
    """The process group of a multi-process launch (None for one process); idempotent."""
    global _state
    if not active():
        return None
    if _state is None:
        from accelerate import PartialState

        _state = PartialState(cpu=not torch.cuda.is_available())
    return _state


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def shard(items: list) -> list:
    """This process's share of a global batch: items rank, rank + N, ... (every process builds the same global batch
    from the same seed)."""
    return items[rank()::world_size()] if active() else items


def average(tensors: list[torch.Tensor | None]) -> None:
    """Average tensors over the processes, in place (None entries, unused parameters, are skipped on every process
    alike, since every process has the same parameters)."""
    if not active():
        return
    import torch.distributed as dist

    for t in tensors:
        if t is not None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(world_size())


_in_loop = False


@contextlib.contextmanager
def unlearning_loop():
    """Marks the loop's steps, where every process computes the same losses together; outside it (evaluation on the
    first process alone) a count is local, so no process waits for the others."""
    global _in_loop
    _in_loop = True
    try:
        yield
    finally:
        _in_loop = False


def global_count(count: torch.Tensor) -> torch.Tensor:
    """Inside the unlearning loop, the sum of a count over the processes divided by their number: dividing a
    process's sum by this and averaging the gradients gives the gradient of the global mean."""
    if not (active() and _in_loop):
        return count
    import torch.distributed as dist

    total = count.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / world_size()


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def finish() -> None:
    """Wait for every process, then close the process group (a process that exits while another still uses the
    group aborts gloo)."""
    global _state
    if active() and _state is not None:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        _state = None
