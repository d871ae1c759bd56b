"""Chunked, threaded CPU passes (qnref.nn.chunks): same numbers for every thread count and chunk
size, BLAS thread count restored, nested calls safe, bad settings rejected."""
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
