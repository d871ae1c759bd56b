"""Chunked CPU execution of the heavy layer passes: example ranges and a small thread pool.

On the CPU a Conv2d pass over a batch is split into chunks of examples whose patch block fits
in cache (``im2col`` → GEMM → ``col2im`` of one chunk run back to back while the data is hot).
The chunks are independent, so :func:`map_chunks` runs them on ``num_threads()`` Python threads
(the caller and pool workers taking chunks from one counter),
each calling a GIL-free numba kernel and a **single-threaded** BLAS GEMM. BLAS is limited to one
thread for the duration (threadpoolctl): OpenBLAS's own workers spin between calls, and mixing
them with a second pool of threads was measured 6× slower on a 2-core machine (docs/cnn.md).

**Two pools on the same cores.** OpenBLAS's idle workers busy-wait 2²⁸ cycles (≈ 0.1 s) after
each multi-threaded call before they sleep, and any such call (a Dense layer's GEMM, an optimizer's
dot product) leaves them spinning through the next chunked pass: on 2 cores the pool's two threads
then share the cores with a spinner, and a LeNet-5 gradient ran at one thread's speed (28 vs 19 ms,
docs/cnn.md). So when the pool runs, :func:`shorten_blas_spin` sets every loaded OpenBLAS to spin
at most 2^:data:`BLAS_SPIN_LOG2` cycles, ≈ 0.4 ms (OpenBLAS's ``OPENBLAS_THREAD_TIMEOUT``, which it
reads only at start-up; a value the user set in the environment is left alone).

Results never depend on the thread count: the chunks are fixed by the data size alone and
reductions over chunks (e.g. weight gradients) are summed in chunk order by the caller.
On CuPy arrays the batch is one chunk and everything runs on the calling thread.
"""
from __future__ import annotations

import ctypes
import itertools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy

from .. import backend

_lock = threading.Lock()
_local = threading.local()
_state: dict[str, Any] = {"threads": None, "pool": None, "controller": None, "blas_spin": None,
                         "modules": -1}

#: log₂ of the cycles an idle OpenBLAS worker busy-waits before it sleeps, set by
#: :func:`shorten_blas_spin` when the chunk pool first runs (OpenBLAS's default is 28, ≈ 0.1 s; 2²⁰
#: ≈ 0.4 ms keeps its workers hot across the short gaps between an MLP pass's GEMMs). ``None``:
#: leave OpenBLAS as it is. Measured per gradient (2 threads, float32, one process per value):
#: LeNet-5 at batch 128 21.1–22.6 ms at 16–20 against 31.8–35.3 ms at 28; the MNIST autoencoder's
#: gradient and H v (batch 1000) the same at 16–28 within the machine's noise (docs/cnn.md).
BLAS_SPIN_LOG2: int | None = 20

_SPIN_ENV = ("OPENBLAS_THREAD_TIMEOUT", "GOTO_THREAD_TIMEOUT")


def _blas_threads() -> int:
    from threadpoolctl import ThreadpoolController  # noqa: PLC0415 - only on first CPU use

    ctrl = ThreadpoolController()
    _state["controller"] = ctrl
    counts = [int(info["num_threads"]) for info in ctrl.info() if info.get("user_api") == "blas"]
    return max(1, min(counts)) if counts else 1


def shorten_blas_spin(log2_cycles: int | None = None) -> dict[str, int]:
    """Make every loaded OpenBLAS's idle workers busy-wait at most 2^``log2_cycles`` cycles
    (default :data:`BLAS_SPIN_LOG2`) before they sleep; returns {library path: its timeout}.

    OpenBLAS reads ``OPENBLAS_THREAD_TIMEOUT`` (4–30) only when it starts its threads, so the value
    is put in the environment for one call of its ``openblas_read_env`` and its workers are stopped
    (``blas_thread_shutdown_``, the routine it runs at ``fork``); the next multi-threaded call starts
    them again with the new timeout. Results are unchanged (only the waiting policy moves). Nothing
    is done where the user set ``OPENBLAS_THREAD_TIMEOUT``/``GOTO_THREAD_TIMEOUT``, for an OpenBLAS
    built on OpenMP or for another BLAS (MKL, BLIS); call it with no other thread inside BLAS."""
    from threadpoolctl import ThreadpoolController  # noqa: PLC0415 - only on first CPU use

    return _shorten_spin(ThreadpoolController().info(), log2_cycles)


def _shorten_spin(infos: list[dict[str, Any]], log2_cycles: int | None) -> dict[str, int]:
    """:func:`shorten_blas_spin` over the libraries ``infos`` (threadpoolctl's ``info()``)."""
    if log2_cycles is None:
        log2_cycles = BLAS_SPIN_LOG2
    if int(log2_cycles) != log2_cycles or not 4 <= log2_cycles <= 30:
        raise ValueError(f"log2_cycles must be an integer in [4, 30] (OpenBLAS's range), got {log2_cycles!r}")
    if any(name in os.environ for name in _SPIN_ENV):
        return {}
    done: dict[str, int] = {}
    for info in infos:
        # the pthreads server only: an OpenMP build's workers are OpenMP's (OMP_WAIT_POLICY governs)
        if info.get("internal_api") != "openblas" or info.get("threading_layer") != "pthreads":
            continue
        lib = ctypes.CDLL(info["filepath"])  # already loaded: the same handle, nothing new runs
        needed = ("openblas_read_env", "openblas_thread_timeout", "blas_thread_shutdown_")
        if not all(hasattr(lib, name) for name in needed):
            continue
        if lib.openblas_thread_timeout() != log2_cycles:  # else done before: its workers keep running
            os.environ[_SPIN_ENV[0]] = str(int(log2_cycles))
            try:
                lib.openblas_read_env()
            finally:
                del os.environ[_SPIN_ENV[0]]
            lib.blas_thread_shutdown_()
        done[info["filepath"]] = int(lib.openblas_thread_timeout())
    return done


def refresh_blas() -> None:
    """The BLAS controller (for the one-thread limit) and the spin policy, rebuilt whenever modules
    were imported since the last call: a BLAS loaded later (scipy's OpenBLAS, at the first Cholesky
    inverse of a Kronecker step) comes with new modules, and ``len(sys.modules)`` costs nothing
    where a scan of the loaded libraries costs 0.3 ms (about 60 pool runs per ResNet-20 gradient).
    The spin policy reads the controller's own scan.

    Called by every pool run and by the code that loads a second BLAS (SciPy's LAPACK routes of
    :mod:`qnref.curvature.kron`: the Cholesky inverse, ``sym_eigh``): two OpenBLAS libraries in one
    process (NumPy's and SciPy's) each keep a worker spinning after their calls, and on 2 cores one
    library's GEMMs then share a core with the other's spinner; a K-FAC, Shampoo or TNT step of a
    dense net, which never runs the pool, ran its inverses and mode products at half speed (issue 21:
    a TNT step on the MNIST autoencoder at T₁ = T₂ = 1, 580–650 → 460–520 ms; docs/shampoo_tnt.md)."""
    if _state["modules"] == len(sys.modules) and _state["controller"] is not None:
        return
    _blas_threads()
    if BLAS_SPIN_LOG2 is not None:
        _state["blas_spin"] = _shorten_spin(_state["controller"].info(), BLAS_SPIN_LOG2)
    _state["modules"] = len(sys.modules)


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


#: fewest entries of the first operand for :func:`rowwise` to split a pass over the pool: a round
#: trip costs ≈ 50 µs on the 2-vCPU Zen 4, so a float32 sigmoid breaks even at 2¹⁶ entries (0.27 ms
#: either way) and gains from there (2¹⁸: 1.18 → 0.80 ms, 2²⁰: 5.4 → 3.4 ms). Memory-bound passes
#: (ReLU, tanh, sums) gained nothing at any size and stay on one thread.
ROWWISE_MIN = 1 << 16


def rowwise(fn: Callable[..., Any], *arrays: Any) -> Any:
    """``fn(*arrays)`` for an expression whose row i (index i of the leading axis) depends only on
    row i of each operand — elementwise maps, per-example losses — computed over ranges of rows on
    the pool's threads: NumPy's ufuncs run on one thread, and a sigmoid of the MNIST autoencoder's
    (1000, 784) output took 4.5 ms on one and 2.4 ms on two. Each row is the same expression on the
    same values, so the result is bit for bit ``fn(*arrays)`` for every thread count.

    The direct call runs for CuPy arrays, operands below :data:`ROWWISE_MIN` entries, one thread,
    or operands of different lengths. The output's dtype and trailing shape come from ``fn`` on the
    first row (nothing is cast). NumPy's error handling (``errstate``) is per thread: the caller's is
    applied in every block, so warnings and raised errors are the direct call's."""
    first = arrays[0]
    n = int(first.shape[0]) if getattr(first, "ndim", 0) else 0
    if (getattr(first, "size", 0) < ROWWISE_MIN or n < 2 or backend.is_cupy_array(first) or num_threads() < 2
            or any(getattr(a, "ndim", 0) == 0 or a.shape[0] != n for a in arrays)):
        return fn(*arrays)
    err = numpy.geterr()  # the caller's floating-point error handling, which is per thread
    with numpy.errstate(all="ignore"):
        probe = fn(*(a[:1] for a in arrays))
    out = numpy.empty((n,) + tuple(probe.shape[1:]), dtype=probe.dtype)

    def block(a: int, e: int) -> None:
        with numpy.errstate(**err):
            out[a:e] = fn(*(x[a:e] for x in arrays))

    map_chunks(block, split_ranges(n, num_threads()))
    return out


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
    refresh_blas()
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
