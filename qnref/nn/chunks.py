"""Chunked CPU execution of the heavy layer passes: example ranges and a small thread pool.

On the CPU a Conv2d pass over a batch is split into chunks of examples whose patch block fits
in cache (``im2col`` → GEMM → ``col2im`` of one chunk run back to back while the data is hot).
The chunks are independent, so :func:`map_chunks` runs them on ``num_threads()`` Python threads
(the caller and pool workers taking chunks from one counter),
each calling a GIL-free numba kernel and a **single-threaded** BLAS GEMM. BLAS is limited to one
thread for the duration (threadpoolctl): OpenBLAS's own workers spin between calls, and mixing
them with a second pool of threads was measured 6× slower on a 2-core machine (docs/cnn.md).

Results never depend on the thread count: the chunks are fixed by the data size alone and
reductions over chunks (e.g. weight gradients) are summed in chunk order by the caller.
On CuPy arrays the batch is one chunk and everything runs on the calling thread.
"""
from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from .. import backend

_lock = threading.Lock()
_local = threading.local()
_state: dict[str, Any] = {"threads": None, "pool": None, "controller": None}


def _blas_threads() -> int:
    from threadpoolctl import ThreadpoolController  # noqa: PLC0415 - only on first CPU use

    ctrl = ThreadpoolController()
    _state["controller"] = ctrl
    counts = [int(info["num_threads"]) for info in ctrl.info() if info.get("user_api") == "blas"]
    return max(1, min(counts)) if counts else 1


def num_threads() -> int:
    """Threads used for chunked CPU passes: ``QNREF_NUM_THREADS`` if set, else :func:`set_num_threads`,
    else BLAS's thread count at first use (so ``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS`` govern)."""
    if _state["threads"] is None:
        env = os.environ.get("QNREF_NUM_THREADS")
        if env is not None:
            set_num_threads(int(env))
        else:
            _state["threads"] = _blas_threads()
    return _state["threads"]


def set_num_threads(n: int) -> None:
    """Use ``n`` ≥ 1 threads for chunked CPU passes (1: everything on the calling thread)."""
    if int(n) != n or n < 1:
        raise ValueError(f"number of threads must be a positive integer, got {n!r}")
    with _lock:
        if _state["pool"] is not None:
            _state["pool"].shutdown(wait=True)
            _state["pool"] = None
        _state["threads"] = int(n)


def example_chunks(x: Any, bytes_per_example: int, target_bytes: int) -> list[tuple[int, int]]:
    """Example ranges [a, e) of the batch ``x`` with about ``target_bytes`` of work buffer each
    (the whole batch on the GPU, where one large kernel is best)."""
    n = x.shape[0]
    if backend.is_cupy_array(x):
        return [(0, n)]
    nb = max(1, min(n, target_bytes // max(1, bytes_per_example)))
    return [(a, min(n, a + nb)) for a in range(0, n, nb)]


def split_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """``range(n)`` as at most ``parts`` contiguous, non-empty ranges of near-equal length."""
    parts = max(1, min(parts, n))
    return [(n * i // parts, n * (i + 1) // parts) for i in range(parts)] if n else []


def map_chunks(fn: Callable[[int, int], Any], chunks: list[tuple[int, int]]) -> list[Any]:
    """``[fn(a, e) for (a, e) in chunks]``, in order, on the pool when there is more than one
    chunk and more than one thread (nested calls from a worker run inline).

    The calling thread and ``num_threads() − 1`` pool workers each take the next chunk index from
    one shared counter until none is left (``next`` on an ``itertools.count`` is atomic under the
    GIL), so a call costs one pool task per extra thread, not one per chunk: with a task per chunk
    the executor's futures and wake-ups were 7 % of a ResNet-20 gradient at 2 threads (issue 21).
    Which thread runs a chunk does not change its result, and results come back in chunk order."""
    if len(chunks) < 2 or getattr(_local, "inside", False) or num_threads() < 2:
        return [fn(a, e) for a, e in chunks]
    with _lock:
        if _state["pool"] is None:
            _state["pool"] = ThreadPoolExecutor(max_workers=_state["threads"], thread_name_prefix="qnref")
        pool = _state["pool"]
    if _state["controller"] is None:
        _blas_threads()
    out: list[Any] = [None] * len(chunks)
    indices = itertools.count()

    def worker() -> None:
        _local.inside = True
        try:
            for i in indices:
                if i >= len(chunks):
                    return
                out[i] = fn(*chunks[i])
        finally:
            _local.inside = False

    with _state["controller"].limit(limits=1, user_api="blas"):
        helpers = [pool.submit(worker) for _ in range(min(num_threads(), len(chunks)) - 1)]
        try:
            worker()
        finally:
            for h in helpers:  # wait for every helper (and re-raise its error) before returning
                h.result()
    return out
