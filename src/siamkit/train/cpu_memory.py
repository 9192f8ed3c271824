"""Keep freed CPU memory in the process for reuse (`--cpu-allocator cached`, the default on CPU).

PyTorch allocates CPU tensors with the C library's malloc. glibc serves every request above its
mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on free, so each training step asks
the kernel again for the memory of its large activations (a 112x112 ResNet18 step of 96 images has
77 MB tensors): about 72,000 page faults, each page zeroed by the kernel, and 0.37 s of system time
per step on this project's CPU (benchmarks/results/cpu_allocator_cpu.md). With mmap off and trimming
made rare, freed blocks stay in malloc's heap and the next step reuses them, much as PyTorch's CUDA
caching allocator does on GPU.
`benchmarks/cpu_allocator.py` measures both settings side by side (step time, system time, peak memory).

Process-wide and not undone, so only `siamkit train` on CPU calls it; `--cpu-allocator system`
leaves malloc alone. Large requests from threads other than the main one still fall back to mmap,
so nothing fails for want of it.
"""
from __future__ import annotations

import ctypes
import platform

# mallopt(3) parameter numbers from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# Return the heap's free top to the kernel only when it exceeds this (the largest int mallopt takes).
TRIM_THRESHOLD_BYTES = 2**31 - 1


def keep_freed_memory() -> bool:
    """Turn off glibc malloc's mmap for large blocks and its trimming; False where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
