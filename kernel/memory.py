"""Training keeps the CPU memory it frees, so large tensors stop page-faulting at every step.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and
returns it with munmap on free: a CPU step whose gradients or activations are larger than that
(a 4096 x 4096 float32 gradient is 64 MiB) gets new pages from the OS at every step, and the OS
zeroes each one in a page fault. Measured (scripts/bench/checkpoint_stall.py's model, 6 x
Linear(4096, 4096), batch 8, 2 cores): ~98,000 page faults per step, a third of the step's CPU
time in the kernel, 230 ms per step; with freed memory kept, no faults and 160 ms. The same faults
make the step slow down whenever the OS has to find those pages again (on a VM whose host takes
freed guest memory back, 0.5-0.9 s steps next to a checkpoint being written).

While training runs, malloc keeps what training frees (no mmap for large blocks, no trimming of
the heap), as PyTorch's CUDA caching allocator does on the GPU. The process's resident memory
stays at its peak until training ends; then the defaults are back and free memory goes to the OS.
Only glibc has these knobs; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters and glibc's defaults (malloc.h, mallopt(3))
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
KEEP_TRIM_THRESHOLD = 2**31 - 1  # an int; a free top of the heap above 2 GiB is still given back


def _glibc() -> ctypes.CDLL | None:
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
        return ctypes.CDLL(None)
    except (ValueError, OSError, AttributeError):  # no such confstr name (not Linux), or no libc to load
        return None


_lock = threading.Lock()
_holders = 0  # trainings inside keep_freed_memory now (run_training may run in several threads)


@contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Inside: malloc keeps freed memory for the next allocation. Yields whether it could.

    glibc stops adapting its mmap threshold once mallopt is called; the threshold stays where it
    had grown to, which is what a long-running process has anyway. The defaults come back when the
    last training in the process leaves.
    """
    global _holders
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    with _lock:
        _holders += 1
        kept = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD))
    try:
        yield kept
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
