"""Process-level settings for CPU training throughput.

glibc's malloc hands freed memory back to the kernel (``munmap`` of large chunks, ``trim`` of the heap top), so a
training step that frees its activations and gradients and allocates them again next step page-faults every page
back in, zero-filled by the kernel. On this project's 2-core VM the demo pretraining step spent about a third of its
time there (4,600 page faults per step; 130 -> 92 ms per step when freed memory is kept, `benchmarks/
bench_train_step.py`). PyTorch's CPU performance guides recommend preloading jemalloc or tcmalloc for the same
reason; :func:`keep_freed_memory` gets the effect with glibc alone, at run time.

The cost: the process keeps its peak heap mapped (resident memory does not shrink after a peak), which is what a
long training process wants anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_memory"]

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest allowed mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): chunks below it come from the heap.
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
#: Heap top kept before glibc trims it (an int for mallopt).
_TRIM_THRESHOLD = 2**31 - 1

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of returning it to the kernel (process-wide).

    Sets ``M_MMAP_THRESHOLD`` to 32 MiB (allocations below it are served from the heap and reused; the default
    threshold starts at 128 KiB) and ``M_TRIM_THRESHOLD`` to 2 GiB (the heap top is not trimmed). Returns True when
    applied (now or by an earlier call), False where the C library is not glibc (the call is then a no-op; preload
    jemalloc or tcmalloc there instead). Allocations of 32 MiB and more still come from mmap each time.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok
    _applied = ok
    return ok
