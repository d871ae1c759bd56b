"""Chunked, threaded CPU passes (qnref.nn.chunks): same numbers for every thread count and chunk
size, BLAS thread count restored, nested calls safe, bad settings rejected, OpenBLAS's idle spin
shortened when the pool runs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import qnref.nn.conv as conv
from qnref.nn import chunks
from qnref.nn.base import Ctx
from qnref.nn.conv import Conv2d


@pytest.fixture
def restore():
    threads, chunk_bytes = chunks.num_threads(), conv.CHUNK_BYTES
    yield
    chunks.set_num_threads(threads)
    conv.CHUNK_BYTES = chunk_bytes


def _conv_pass(dtype, stride=1, padding=1):
    r = np.random.default_rng(3)
    layer = Conv2d(5, 3, stride=stride, padding=padding)
    layer.build((4, 9, 7))
    wb = r.standard_normal((5, 4 * 9 + 1)).astype(dtype)
    x = r.standard_normal((13, 4, 9, 7)).astype(dtype)
    y, cache = layer.forward([wb], x, Ctx())
    gy = r.standard_normal(y.shape).astype(dtype)
    gp = [np.zeros_like(wb)]
    gx = layer.backward([wb], cache, gy, gp)
    return y, gx, gp[0]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_threads_do_not_change_any_bit(restore, dtype, stride, padding):
    conv.CHUNK_BYTES = 1  # one example per chunk: 13 chunks
    chunks.set_num_threads(1)
    ref = _conv_pass(dtype, stride, padding)
    chunks.set_num_threads(3)
    out = _conv_pass(dtype, stride, padding)
    for a, b in zip(ref, out):
        np.testing.assert_array_equal(a, b)


def test_chunk_size_only_changes_rounding(restore):
    conv.CHUNK_BYTES = 1
    many = _conv_pass(np.float64)
    conv.CHUNK_BYTES = 1 << 30  # the whole batch in one chunk
    one = _conv_pass(np.float64)
    # BLAS may block a GEMM differently for another column count, and ∂/∂W̄ is summed per chunk
    for a, b in zip(many, one):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


def _numpy_blas_threads():
    # the BLAS numpy links (other BLAS libraries may be loaded by other tests' imports)
    numpy_libs = {i["filepath"] for i in chunks._state["controller"].info() if i["user_api"] == "blas"}
    return [i["num_threads"] for i in threadpool_info() if i["filepath"] in numpy_libs]


def test_blas_threads_restored_and_nested_calls_inline(restore):
    chunks.set_num_threads(2)
    chunks.map_chunks(lambda a, e: None, [(0, 1), (1, 2)])  # creates the BLAS controller
    before = _numpy_blas_threads()
    seen = []

    def inner(a, e):
        return a + e

    def outer(a, e):
        seen.append(_numpy_blas_threads())
        return sum(chunks.map_chunks(inner, [(a, e), (e, e + 1)]))  # nested: runs inline

    assert chunks.map_chunks(outer, [(0, 1), (1, 2), (2, 3)]) == [(0 + 1) + (1 + 2), (1 + 2) + (2 + 3), (2 + 3) + (3 + 4)]
    assert all(all(t == 1 for t in s) for s in seen)  # BLAS single-threaded inside the pool
    assert _numpy_blas_threads() == before


def test_worker_exceptions_propagate(restore):
    chunks.set_num_threads(2)

    def boom(a, e):
        if a == 1:
            raise ValueError("chunk 1 failed")
        return a

    with pytest.raises(ValueError, match="chunk 1 failed"):
        chunks.map_chunks(boom, [(0, 1), (1, 2)])


def test_caller_and_workers_share_the_chunks_results_in_order(restore):
    """The caller thread and the pool worker both take chunks (each chunk sleeps, releasing the GIL,
    for a varied time, so they finish out of order); every chunk runs exactly once and the results
    come back in chunk order; the caller is left outside the pool (a later call threads again)."""
    import threading
    import time

    chunks.set_num_threads(2)
    ran = []

    def work(a, e):
        time.sleep(0.001 * ((a * 7) % 5))
        ran.append((a, threading.get_ident()))
        return a * 10 + e

    todo = [(a, a + 1) for a in range(24)]
    for _ in range(2):
        ran.clear()
        assert chunks.map_chunks(work, todo) == [a * 10 + a + 1 for a in range(24)]
        assert sorted(a for a, _ in ran) == list(range(24))
        threads = {t for _, t in ran}
        assert threading.get_ident() in threads and len(threads) == 2


def test_a_failing_chunk_propagates_after_every_thread_is_done(restore):
    """An error in a chunk propagates only after the caller and the workers are done (no chunk
    still running when map_chunks returns)."""
    import time

    chunks.set_num_threads(2)
    live = []

    def work(a, e):
        live.append(a)
        time.sleep(0.002)
        live.remove(a)
        if a == 0:
            raise RuntimeError("chunk 0 failed")
        return a

    with pytest.raises(RuntimeError, match="chunk 0 failed"):
        chunks.map_chunks(work, [(a, a + 1) for a in range(8)])
    assert live == []


def test_example_chunks_cover_the_batch_exactly():
    x = np.zeros((10, 3))
    assert chunks.example_chunks(x, 8, 24) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert chunks.example_chunks(x, 8, 1) == [(i, i + 1) for i in range(10)]
    assert chunks.example_chunks(x, 8, 10**9) == [(0, 10)]


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_thread_count(bad):
    with pytest.raises(ValueError, match="positive integer"):
        chunks.set_num_threads(bad)


def test_split_ranges_partition():
    for n in (0, 1, 5, 16, 17):
        for parts in (1, 2, 3, 8):
            r = chunks.split_ranges(n, parts)
            assert len(r) == min(parts, n)
            assert [i for a, e in r for i in range(a, e)] == list(range(n))
            assert all(e > a for a, e in r)
            if r:
                sizes = [e - a for a, e in r]
                assert max(sizes) - min(sizes) <= 1


_SPIN_PROBE = r"""
import ctypes, json, os, sys, time
import numpy as np
from threadpoolctl import threadpool_info
from qnref.nn import chunks

a = np.random.default_rng(0).standard_normal((600, 600))

def cpu_while_asleep():
    a @ a  # a multi-threaded GEMM wakes OpenBLAS's workers
    t0 = time.process_time()
    time.sleep(0.1)
    return time.process_time() - t0  # spinning workers burn CPU while this thread sleeps

libs = [ctypes.CDLL(i["filepath"]) for i in threadpool_info() if i.get("internal_api") == "openblas"]
before = cpu_while_asleep()
chunks.set_num_threads(2)
chunks.map_chunks(lambda a, e: a, [(0, 1), (1, 2)])  # the pool runs: OpenBLAS's spin is shortened
after = cpu_while_asleep()
timeouts = [lib.openblas_thread_timeout() for lib in libs]
state = dict(chunks._state["blas_spin"])
import scipy.linalg  # a second OpenBLAS, loaded after the pool's first run
chunks.map_chunks(lambda a, e: a, [(0, 1), (1, 2)])
later = [ctypes.CDLL(i["filepath"]).openblas_thread_timeout() for i in threadpool_info() if i.get("internal_api") == "openblas"]
print(json.dumps({"before": before, "after": after, "env": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
                  "timeouts": timeouts, "state": state, "later": later, "later_state": chunks._state["blas_spin"]}))
"""


def _spin_probe(**env):
    full = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "GOTO_THREAD_TIMEOUT")}
    full.update(OPENBLAS_NUM_THREADS="2", QNREF_NUM_THREADS="2", **env)
    out = subprocess.run([sys.executable, "-c", _SPIN_PROBE], env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _need_openblas():
    if not any(i.get("internal_api") == "openblas" for i in threadpool_info()):
        pytest.fail("the spin policy is specific to OpenBLAS, which NumPy is expected to use here")


def test_pool_shortens_openblas_spin_and_leaves_the_environment_alone():
    _need_openblas()
    r = _spin_probe()
    # OpenBLAS's default: an idle worker busy-waits ≈ 0.1 s after a call (most of a 0.1 s sleep)
    assert r["before"] > 0.05, r
    # after the pool's first run every OpenBLAS waits 2²⁰ cycles (≈ 0.4 ms), then sleeps
    assert r["timeouts"] and all(t == chunks.BLAS_SPIN_LOG2 for t in r["timeouts"]), r
    assert sorted(r["state"].values()) == r["timeouts"] and r["after"] < 0.03, r
    assert r["env"] is None  # put in the environment for OpenBLAS's re-read only
    # a BLAS loaded after the first run (scipy's own OpenBLAS) is set at the next pool run
    assert len(r["later"]) >= len(r["timeouts"]) and all(t == chunks.BLAS_SPIN_LOG2 for t in r["later"]), r
    assert len(r["later_state"]) == len(r["later"]), r


_LAPACK_SPIN_PROBE = r"""
import ctypes, json, sys
import numpy as np
from threadpoolctl import threadpool_info
from qnref.curvature import kron
from qnref.nn import chunks

a = np.random.default_rng(0).standard_normal((400, 200))
M = a.T @ a                                 # a dense net's factor: order 200 ≥ CHOLESKY_MIN_DIM
getattr(kron, sys.argv[1])(M)               # loads SciPy's OpenBLAS; the chunk pool never runs
print(json.dumps({"pool": chunks._state["pool"] is not None, "scipy": "scipy.linalg" in sys.modules,
                  "timeouts": [ctypes.CDLL(i["filepath"]).openblas_thread_timeout()
                               for i in threadpool_info() if i.get("internal_api") == "openblas"]}))
"""


@pytest.mark.parametrize("route", ["spd_inverse", "sym_eigh"])
def test_scipy_lapack_routes_shorten_every_openblas_spin(route):
    """A dense net's Kronecker step loads SciPy's OpenBLAS next to NumPy's and never runs the chunk
    pool: the LAPACK routes apply the spin policy themselves (two spinning libraries on 2 cores made
    such a step 1.5× slower, issue 21)."""
    _need_openblas()
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "GOTO_THREAD_TIMEOUT")}
    out = subprocess.run([sys.executable, "-c", _LAPACK_SPIN_PROBE, route], env={**env, "OPENBLAS_NUM_THREADS": "2"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["scipy"] and not r["pool"], r
    assert len(r["timeouts"]) >= 2 and all(t == chunks.BLAS_SPIN_LOG2 for t in r["timeouts"]), r


def test_a_spin_timeout_set_by_the_user_is_kept():
    _need_openblas()
    r = _spin_probe(OPENBLAS_THREAD_TIMEOUT="18")
    assert r["state"] == {} and all(t == 18 for t in r["timeouts"] + r["later"]), r
    assert r["env"] == "18"


@pytest.mark.parametrize("bad", [3, 31, 2.5, "16"])
def test_bad_spin_setting(bad):
    with pytest.raises(ValueError, match=r"log2_cycles must be an integer in \[4, 30\]"):
        chunks.shorten_blas_spin(bad)


# -- rowwise: per-row NumPy expressions split over the pool --------------------------------------
def _special_rows(shape, seed):
    r = np.random.default_rng(seed)
    z = r.standard_normal(shape) * 30            # exp under- and overflow at the tails
    flat = z.reshape(-1)
    flat[r.choice(flat.size, 12, replace=False)] = [np.nan, np.inf, -np.inf, -0.0, 0.0, 88.8, -88.8, 710, -710,
                                                    1e-300, -1e-300, 5e-324]
    return z


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rowwise_losses_and_activations_are_the_direct_expressions_bit_for_bit(restore, dtype, threads):
    """sigmoid, softplus and the sigmoid cross-entropy's per-example loss, gradient and Hessian
    product on a (1000, 784) output split over rows equal the one-thread expressions in every bit
    (NaN, ±inf, signed zeros, exp's over- and underflow), for every thread count and both dtypes."""
    from qnref.nn.activations import sigmoid, sigmoid_expr, softplus, softplus_expr
    from qnref.nn.losses import SigmoidCrossEntropy

    chunks.set_num_threads(threads)
    z = _special_rows((1000, 784), 1).astype(dtype)
    y = np.random.default_rng(2).random(z.shape).astype(dtype)
    v = np.random.default_rng(3).standard_normal(z.shape).astype(dtype)
    loss = SigmoidCrossEntropy()
    with np.errstate(all="ignore"):
        p = sigmoid_expr(np, z)
        cases = [(sigmoid(np, z), p), (softplus(np, z), softplus_expr(np, z)),
                 (loss.per_example(z, y), (softplus_expr(np, z) - y * z).sum(axis=1)),
                 (loss.dz(z, y), p - y), (loss.hvp(z, y, v), p * (1 - p) * v),
                 (loss.dz(z, y.astype(np.float64)), p - y.astype(np.float64))]  # mixed dtypes: promoted, not cast
    for got, ref in cases:
        assert got.dtype == ref.dtype and got.shape == ref.shape
        np.testing.assert_array_equal(got.view(np.uint8), ref.view(np.uint8))


def test_rowwise_splits_only_large_host_arrays_of_one_length(restore, monkeypatch):
    """The pool runs for ≥ ROWWISE_MIN entries and more than one thread; small arrays, one thread
    and operands whose lengths differ call the expression once, directly."""
    calls = []

    def fn(a, b):
        calls.append(a.shape[0])
        return a + b

    chunks.set_num_threads(2)
    big = np.ones((512, 256))
    assert np.array_equal(chunks.rowwise(fn, big, big), 2 * big) and sorted(calls) == [1, 256, 256]  # probe row + 2 ranges
    for args in [(np.ones((8, 8)), np.ones((8, 8))), (big, np.ones(256))]:
        calls.clear()
        chunks.rowwise(fn, *args)
        assert calls == [args[0].shape[0]]
    chunks.set_num_threads(1)
    calls.clear()
    chunks.rowwise(fn, big, big)
    assert calls == [512]


def test_rowwise_applies_the_callers_errstate_in_every_thread(restore):
    """NumPy's error handling is per thread: an invalid operation in a worker's rows warns, raises or
    stays silent as the caller asked."""
    from qnref.nn.losses import SigmoidCrossEntropy

    chunks.set_num_threads(2)
    z, y = np.zeros((1000, 784)), np.zeros((1000, 784))
    z[900, 5] = np.inf                             # in the second range: inf − inf
    loss = SigmoidCrossEntropy()
    with np.errstate(invalid="raise"), pytest.raises(FloatingPointError):
        loss.per_example(z, y)
    with np.errstate(invalid="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert np.isnan(loss.per_example(z, y)[900])
    with np.errstate(invalid="warn"), pytest.warns(RuntimeWarning):
        loss.per_example(z, y)
