"""Sharded language-model unlearning (`train.shard = "fsdp"` under `torchrun --nproc_per_node N`): PyTorch's FSDP2
(`torch.distributed.fsdp.fully_shard`) splits every parameter, its gradient and its AdamW state across the processes,
so a model whose weights, gradients and optimiser state do not fit one device trains across several. Each process
still takes its share of every global batch (data parallel, `distributed.shard`); FSDP2 gathers a decoder layer's
weights for its forward and backward pass and reduce-scatters its gradients, averaged over the processes like the
data-parallel path's `distributed.average`.

The model is wrapped as accelerate's FSDP plugin wraps it by default: one FSDP unit per decoder layer (the classes
the model names in `_no_split_modules`), then the root (embeddings, final norm and head: tied embeddings stay one
parameter). The reference model of the methods that need one is sharded the same way. torch's `fully_shard` is
called directly rather than through `Accelerator.prepare`, which would own the optimiser, the loop and its gradient
reduction; the loop keeps its own (the restricted gradient needs the forget and retain gradients apart).

RG/RGD stay exact: each gradient is a DTensor holding this process's shard, so the loop takes the forget and the
retain gradient in two backward passes, and the surgery's dot products and norms sum the local shards and then over
the processes (`local_dot`). After the loop every process gathers the full tensors (`gather`) into an ordinary,
unsharded model: evaluation runs on it as for data parallel, and the first process saves the changed tensors."""
from __future__ import annotations

import copy

import torch

from obliviate.errors import ObliviateError


def is_sharded(tensor) -> bool:
    """Whether a parameter or gradient is an FSDP2 shard (a DTensor)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def check(train, lora=None) -> None:
    """What `train.shard` cannot go with, checked before any model is loaded (also by `obliviate validate`)."""
    if train.shard == "no":
        return
    if lora is not None:
        raise ObliviateError('train.shard = "fsdp" with [lora] is not supported: LoRA\'s few trainable weights fit '
                             'one device (drop [lora] to shard the full model, or drop train.shard)')
    if train.checkpoint_every:
        raise ObliviateError('train.shard = "fsdp" with train.checkpoint_every is not supported yet')
    if train.eval_every:
        raise ObliviateError('train.shard = "fsdp" with train.eval_every is not supported: evaluation along the way '
                             'runs in one process')


def _layer_classes(model) -> set[str]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ObliviateError(f'train.shard = "fsdp": {type(model).__name__} names no decoder layer class '
                             "(_no_split_modules), so it cannot be split into FSDP units")
    return names


def device() -> torch.device:
    """This process's device (cuda:LOCAL_RANK, or the CPU with gloo); refused in one process."""
    from obliviate import distributed

    if not distributed.active():
        raise ObliviateError('train.shard = "fsdp" needs several processes: launch with `torchrun --nproc_per_node N '
                             '-m obliviate.cli run ...` (or accelerate launch)')
    return distributed.setup().device


def shard(model, device: torch.device) -> None:
    """Wrap `model` with FSDP2 in place over every process (one unit per decoder layer, then the root); its
    parameters become this process's shards on `device`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from obliviate import distributed

    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    layers = _layer_classes(model)
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def skeleton(model):
    """An empty copy of `model`'s structure on the meta device (no memory), taken before sharding: `gather` fills it
    with the full tensors after the loop."""
    # a deepcopy whose parameters and buffers are made on the meta device: nothing of the weights is copied
    memo = {id(t): torch.empty_like(t, device="meta") for t in list(model.parameters()) + list(model.buffers())}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(memo[id(p)], requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def gather(sharded, plain, device: torch.device):
    """The full tensors of the sharded model, on every process, put into `plain` (its meta skeleton); returns the
    unsharded model on `device`. Every process calls it (each tensor is an all-gather)."""
    state = {}
    for name, tensor in sharded.state_dict().items():
        state[name] = (tensor.full_tensor() if is_sharded(tensor) else tensor).detach().to(device)
    plain.load_state_dict(state, strict=False, assign=True)
    # buffers outside the state dict (rotary inv_freq) are not sharded: take them from the sharded model
    buffers = dict(sharded.named_buffers())
    for name, buffer in list(plain.named_buffers()):
        if buffer.is_meta and name in buffers:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner)._buffers[leaf] = buffers[name].detach().to(device)
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    left = [n for n, t in list(plain.named_parameters()) + list(plain.named_buffers()) if t.is_meta]
    if left:
        raise ObliviateError(f"sharded training: tensors {left[:3]} could not be gathered back")
    return plain.eval()


def local_dot(a: list, b: list, device) -> torch.Tensor:
    """sum_i <a_i, b_i> in float64 over sharded gradients: each process sums its local shards, then the sums are
    added over the processes (every process gets the global value)."""
    import torch.distributed as dist

    total = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in zip(a, b):
        if x is not None and y is not None:
            total = total + (x.to_local().double() * y.to_local().double()).sum().to(device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_finite(tensors: list) -> bool:
    """Whether every entry of every (sharded) tensor is finite on every process; the same answer everywhere, so all
    processes stop together."""
    import torch.distributed as dist

    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    bad = torch.zeros((), dtype=torch.float32, device=device)
    for t in tensors:
        if t is not None:
            local = t.to_local() if is_sharded(t) else t
            if local.numel() and not torch.isfinite(local).all():
                bad.fill_(1.0)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad)


def two_backward_gradients(parts, params: list) -> tuple[list, list]:
    """The forget and the retain gradient (sharded, averaged over the processes by FSDP2) of a restricted-gradient
    step. `torch.autograd.grad` cannot reach FSDP2's sharded parameters (the forward runs on gathered copies), so the
    gradients are taken by two backward passes, each reduce-scattered into `.grad`."""
    parts.forget.backward(retain_graph=True)
    g_f = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    for p in params:
        p.grad = None
    parts.retain.backward()
    g_r = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    for p in params:
        p.grad = None
    return g_f, g_r
