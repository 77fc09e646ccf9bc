"""The C allocator tuned for processes that exist to train (:func:`tune_malloc`; glibc only).
:mod:`ffl.engine` re-exports it."""
from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["tune_malloc"]


_MALLOC_TUNED = False


def tune_malloc() -> bool:
    """Keep large CPU buffers in the heap instead of fresh ``mmap``s (glibc only, process-wide).

    The engine allocates ~100 MB tensors every step (stacked gradients, gathered batches); glibc
    serves allocations above 32 MB with ``mmap`` and returns them on free, so every step pays page
    faults (measured as system time of a paper-size MLP-4 step, see README.md). Raising the
    mmap/trim thresholds lets freed buffers be reused. Freed memory then stays with the process
    (resident-set measurements see no new peaks), so only processes that exist to train call it:
    ``python -m ffl.bench`` and ``python -m ffl.zoo train``. Returns whether it was applied."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 31) == 1
    except (OSError, AttributeError):
        ok = False
    _MALLOC_TUNED = ok
    return ok
