"""Process memory on the CPU. glibc's malloc serves an allocation from its heap, not from its own mapping, once it is
below a threshold that rises (up to 32 MB) every time a mapped block is freed; so after the first large tensors are
freed, the activations and logit slices of a training step (mostly a few MB each) come from the heap, and a heap
that has grown is not given back. On a SmolLM-135M-shaped model a step then held about 1 GB more than its live
tensors (benchmarks/README.md (p)). A fixed threshold keeps every block above it in its own mapping, returned to the
system when the tensor is freed."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)


def return_freed_memory(threshold: int = 128 * 1024) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes (its initial value, no longer raised by frees). Linux with
    glibc only; elsewhere, or when MALLOC_MMAP_THRESHOLD_ is set by the user, nothing is changed. Returns whether it
    was set."""
    import os

    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
