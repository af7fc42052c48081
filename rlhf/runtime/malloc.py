"""glibc malloc settings for a training process: how many heaps, and whether freed memory stays in it."""

from __future__ import annotations

import ctypes
import ctypes.util

# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
INT_MAX = 2**31 - 1


def mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt(param, value)``; False where it does not apply (not glibc) or refuses."""
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(param, value))


def limit_malloc_arenas(count: int) -> bool:
    """At most ``count`` glibc malloc arenas. glibc gives each new thread its own heap, which keeps
    freed memory: the two model threads of ``hardware.parallel_models`` added ~25 MB of peak RSS on
    the benchmark's tiny workload; one arena (the main heap, shared) saves another ~4 MB over two, at
    the same speed. Returns whether it applied (not on other C libraries)."""
    return mallopt(M_ARENA_MAX, count)


def keep_freed_memory() -> bool:
    """Large blocks come from the heap and freed memory stays there for the next step's tensors.

    By default glibc maps every block over ~32 MB (a Qwen2.5-vocabulary embedding's gradient, a chunk
    of logits) fresh from the OS and unmaps it on free, then trims the heap's free top: each step
    pays a page fault per 4 KiB it touches again. On the "qwen-vocab" benchmark in bf16 (1 thread)
    that was 8.5 against 5.0 s per iteration, with the same peak RSS. Returns whether both applied."""
    return mallopt(M_MMAP_THRESHOLD, INT_MAX) & mallopt(M_TRIM_THRESHOLD, INT_MAX)
