"""Shared set-up for the benchmarks: thread pinning, timing policies, models and data on the CPU
(or GPU).

Thread counts are pinned per benchmark process, before NumPy, numba or torch load: this module is
imported by ``benchmarks/__init__.py``, which asv imports before any benchmark module. Inside an
asv run (``ASV=true``, or the runner's ``asv_runner`` imported: ``--python=same``) the thread
variables are *overwritten* with ``THREADS`` (2, or ``QNREF_BENCH_THREADS``), so a shell's
``OPENBLAS_NUM_THREADS`` cannot leak into the record;
imported by the tests, only the three BLAS/OpenMP variables are defaulted (the test process keeps
its own setting). Libraries that asv's runner loaded before this module (NumPy's OpenBLAS) have
read the shell's variables already, so inside asv their pools are reset to ``THREADS`` as well
(threadpoolctl).
``track_blas_threads`` records the count a benchmark process really ran with.
"""
import os
import sys

THREADS = int(os.environ.get("QNREF_BENCH_THREADS", "2"))
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "QNREF_NUM_THREADS")
# asv sets ASV=true in the environments it builds, not for ``--python=same`` (its ExistingEnvironment
# runs the runner without its variables); the runner has imported asv_runner in either case
IN_ASV = os.environ.get("ASV") == "true" or "asv_runner" in sys.modules

for _var in THREAD_VARS if IN_ASV else THREAD_VARS[:3]:
    if IN_ASV:
        os.environ[_var] = str(THREADS)
    else:
        os.environ.setdefault(_var, str(THREADS))
if IN_ASV:  # a library asv's runner loaded before this module read the shell's variables: reset it too
    from threadpoolctl import threadpool_limits

    threadpool_limits(THREADS)

import time

import numpy as np

from qnref import backend
from qnref.curvature.objective import Objective
from qnref.nn.activations import Sigmoid, Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential

# -- timing policies (asv attributes; docs/benchmarks.md "Statistics") -------------------------
# asv_runner re-runs setup() before every timed call of a benchmark that has one, so each call
# sees freshly set-up state and ``number`` is 1 (one call per sample). Every ``time_`` benchmark
# inherits one of these two policies; its setup() also makes one untimed warm-up call per process
# (:func:`warm_once`: numba compilation, allocator, caches), so that even a ``--quick`` sample is warm.


class FastTiming:
    """Calls of ≲ 20 ms: 1 s of warm-up calls, then 10–40 samples per round (stop after 10 s once
    10 are taken), 2 rounds (interleaved with the other benchmarks) → 20–80 samples."""

    warmup_time = 1.0
    number = 1
    repeat = (10, 40, 10.0)
    min_run_count = 10
    rounds = 2


class SlowTiming:
    """Calls of ≳ 50 ms: the warm-up is the :func:`warm_once` call in setup (no timed warm-up
    loop), then 5–10 samples per round (stop after 30 s once 5 are taken), 2 rounds → 10–20 samples."""

    warmup_time = 0.0
    number = 1
    repeat = (5, 10, 30.0)
    min_run_count = 5
    rounds = 2


_warmed = set()


def warm_once(key, fn):
    """Call ``fn`` once per process for ``key`` (the untimed warm-up of a ``time_`` benchmark)."""
    if key not in _warmed:
        sync(fn())
        _warmed.add(key)


def blas_threads():
    """Threads of each loaded BLAS/OpenMP library in this process (threadpoolctl)."""
    from threadpoolctl import threadpool_info

    return {i["internal_api"]: i["num_threads"] for i in threadpool_info()}


AUTOENCODER_SIZES = (1000, 500, 250, 30, 250, 500, 1000)


def autoencoder(d=784, sizes=AUTOENCODER_SIZES, act=Tanh):
    """The thesis's MNIST autoencoder 784-1000-500-250-30-250-500-1000-784 (Hinton & Salakhutdinov)."""
    layers = []
    for s in sizes:
        layers += [Dense(s), act()]
    layers.append(Dense(d))
    return Sequential(layers, input_shape=(d,), name="autoencoder")


def autoencoder_objective(batch=1000, dtype="float32", device="cpu", d=784, sizes=AUTOENCODER_SIZES, seed=0):
    model = autoencoder(d, sizes)
    r = np.random.default_rng(seed)
    X = r.random((batch, d)).astype(dtype)
    Xd = backend.to_device(X, device)
    obj = Objective(model, "sigmoid_ce", Xd, Xd)
    theta = model.init(seed, device=device, dtype=dtype)
    return obj, theta


def sync(x):
    """Block until device work is done (no-op on NumPy)."""
    if backend.is_cupy_array(x):
        import cupy

        cupy.cuda.Stream.null.synchronize()
    return x


def best_time(fn, repeat=5):
    """Best wall time of ``repeat`` calls after one untimed warm-up call (for ratios measured side
    by side in one process: the ``track_`` ratio benchmarks' own statistics, the same with or
    without ``--quick``)."""
    sync(fn())
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        sync(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def wall_time(fn):
    """Wall time of one call of ``fn`` (device work included)."""
    t0 = time.perf_counter()
    sync(fn())
    return time.perf_counter() - t0


#: seconds of sleep before a :func:`settled_time` block (both thread pools idle again)
SETTLE_S = 0.5


def settled_time(fn, calls=1, settle=SETTLE_S):
    """Seconds per call of ``calls`` consecutive calls of ``fn`` after ``settle`` seconds of sleep and
    one untimed call: the timing of one side of a ratio against **another runtime** (torch).

    OpenBLAS's pthreads (qnref) and torch's OpenMP threads busy-wait after each parallel region, so
    on 2 cores the side timed right after the other shares its cores with the other's spinning
    threads: single alternating calls read qnref/torch 0.59-1.44 on one workload by wait policy
    (docs/benchmarks.md, "Caveat: the two thread pools spin"). After the sleep the other pool has
    gone idle, and the untimed call wakes this side's own pool before the clock starts."""
    time.sleep(settle)
    sync(fn())
    t0 = time.perf_counter()
    for _ in range(calls):
        sync(fn())
    return (time.perf_counter() - t0) / calls


def interleaved_ratio(time_num, time_den, rounds=7):
    """Median over ``rounds`` interleaved rounds of ``time_num() / time_den()``, after one untimed
    call of each. ``time_num``/``time_den`` return the seconds of one measurement (so a caller
    can keep untimed set-up, e.g. a state copy, out of it). The policy of the ``track_`` ratios
    measured side by side (docs/benchmarks.md "Statistics"): a load spike on the shared machine
    hits both sides of one round, or one round of ``rounds``, and the median ignores it."""
    import statistics

    time_num()
    time_den()
    return statistics.median(time_num() / time_den() for _ in range(rounds))


def devices():
    return ["cpu", "gpu"] if backend.gpu_available() else ["cpu"]
