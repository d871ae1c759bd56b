"""Keep freed activation buffers in the process (glibc ``malloc`` tuning for CPU training).

A forward+backward pass of a CNN allocates and frees the same few-megabyte arrays (activations,
patch blocks, gradients) on every call. With glibc's default, dynamic thresholds part of that
memory goes back to the kernel after each ``free`` (``munmap`` or a heap trim) and comes back as
fresh zero pages, one page fault per 4 KiB. Measured on ResNet-20 (batch 128, float32, 2 cores):
35 000 minor page faults and 0.15–0.18 s of kernel time per gradient, 0.57–0.61 s in all; with
the thresholds fixed as below, 0 faults and 0.46–0.50 s (docs/benchmarks.md).

:func:`tune_malloc` fixes both thresholds once per process, the first time a model runs on NumPy:

- ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's maximum): blocks up to that size come from the heap;
- ``M_TRIM_THRESHOLD`` = 1 GiB: free memory at the top of the heap is kept for reuse.

Setting only one of the two turns off glibc's adaptation of the other and was measured 1.6–2.2×
*slower*, so both are set together or not at all. The price is that up to 1 GiB of freed memory
stays mapped (peak RSS does not change). ``QNREF_MALLOC_TUNING=0`` leaves ``malloc`` alone; on a
C library without ``mallopt`` (macOS, musl) this is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

#: glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30


def _mallopt():
    """glibc's ``mallopt`` or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


@functools.cache  # once per process (two racing first calls set the same values twice: harmless)
def tune_malloc() -> bool:
    """Apply the thresholds above once per process; True when they are in force."""
    if os.environ.get("QNREF_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    fn = _mallopt()
    # mallopt returns 1 on success; the trim threshold is only set when the first call took
    return fn is not None and fn(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and fn(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
