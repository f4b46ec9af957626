"""Where bench cells run. This is the serial version of the agreed interface (BENCH_CONTRACT.md); local worker
processes and Ray come with the "exec" part of issue 18."""
from __future__ import annotations

from collections.abc import Callable, Iterator


def execute(tasks: list, run_one: Callable, workers: int = 1, ray_address: str | None = None, use_ray: bool = False,
            threads: int | None = None) -> Iterator:
    """Yield run_one(task) for every task, one after the other, in this process (`threads`: torch's thread count
    while they run)."""
    if threads is not None:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        for task in tasks:
            yield run_one(task)
    finally:
        if threads is not None:
            torch.set_num_threads(before)
