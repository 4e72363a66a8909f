"""``train.reuse_cpu_memory``: large CPU tensors served from the process heap, which keeps what
one step frees for the next, instead of a fresh mapping per tensor (glibc's C library only).

glibc's ``malloc`` gives every block over its mmap threshold (which it raises as it goes, to at
most 32 MiB on 64-bit) a fresh ``mmap`` and unmaps it on ``free``. A training step allocates
and frees the same large tensors every step (activations, their gradients, the optimizer's
temporaries; [32, 96, 55, 55] float32 is 37 MB), so every step page-faults each of them in
again, a 4 KiB page at a time, and the kernel zeroes every page. ``mallopt(M_MMAP_MAX, 0)``
serves them from the heap and a high ``M_TRIM_THRESHOLD`` keeps the heap's freed top for the
next step: measured 11-14 % off a CPU training step of both the paper's network and
torchvision's ``alexnet()`` (docs/benchmarks.md). The cost: the process keeps its peak memory
until it exits instead of returning freed blocks to the system. Results are unchanged (the
same numbers, bit for bit: only where memory comes from changes). glibc still maps memory
itself where the heap cannot grow.
"""

from __future__ import annotations

import ctypes
import sys

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of freed heap top


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # musl and others: their malloc has no such switch
    return libc


def available() -> bool:
    """Whether this process's C library is glibc, whose allocator has the switch."""
    return _glibc() is not None


def reuse_freed_memory() -> bool:
    """Serve large allocations from the heap and keep freed memory for reuse, for the rest of
    this process (worker processes forked after it inherit it). True where it took effect;
    False, changing nothing, where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_MMAP_MAX, 0))
