"""The two-loop's fused host passes (qnref/host_kernels.py: dot, axpy_dot, scale_dot; the route in
``qnref.optim.operators._two_loop_passes``): the updates of q keep NumPy's bits, the dot products are
float64 sums checked against exact sums (math.fsum), H v on the fused route agrees with a float64
oracle (float32 more closely than the expression route), and nothing depends on the thread count."""
from __future__ import annotations

import math

import numpy as np
import pytest

from qnref import host_kernels
from qnref.nn import chunks, conv
from qnref.optim.operators import LBFGSOperator, _two_loop_passes

pytest.importorskip("numba")


@pytest.fixture
def every_size_fused(monkeypatch):
    """Kernels at every size and a split from 64 entries, so small vectors take the fused route in
    several ranges."""
    monkeypatch.setattr(host_kernels, "MIN_SIZE", 0)
    monkeypatch.setattr(host_kernels, "SPLIT_SIZE", 64)


def _pairs(rng, k, n, dtype):
    S = rng.standard_normal((k, n))
    Y = S + 0.5 * rng.standard_normal((k, n))  # sᵢᵀyᵢ > 0 (whp at these n)
    assert (np.einsum("ij,ij->i", S, Y) > 0).all()
    return S.astype(dtype), Y.astype(dtype)


def _exact_dot(a, b):
    """Σ aᵢbᵢ of the float64 values, correctly rounded (every float32/float64 product is exact in
    the sum fsum forms; float32 products are exact in float64)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if a.dtype == np.float32:
        return math.fsum(a64 * b64)
    # float64 products are not exact: split each into its rounded value and error (Dekker / FMA-free)
    p = a64 * b64
    return math.fsum(np.concatenate([p, _product_error(a64, b64, p)]))


def _product_error(a, b, p):
    """a·b − fl(a·b) exactly, by Veltkamp splitting (Dekker's TwoProduct)."""
    def split(x):
        c = 134217729.0 * x  # 2²⁷ + 1
        hi = c - (c - x)
        return hi, x - hi
    ah, al = split(a)
    bh, bl = split(b)
    return ((ah * bh - p) + ah * bl + al * bh) + al * bl


def test_split_ranges_cover_range_n_by_size_alone():
    s = host_kernels.SPLIT_SIZE
    for n, parts in ((0, 1), (1, 1), (s - 1, 1), (s, 2), (2 * s - 1, 2), (2 * s, 4), (4 * s - 1, 4), (4 * s, 8),
                     (100 * s + 3, 8)):
        r = host_kernels.split_ranges(n)
        assert len(r) == parts, n
        assert r[0][0] == 0 and r[-1][1] == n
        assert all(r[i][1] == r[i + 1][0] for i in range(len(r) - 1))
        assert max(e - a for a, e in r) - min(e - a for a, e in r) <= 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pass_kernels_update_bits_and_exact_sums(dtype, every_size_fused):
    """axpy_dot: q has the bits of ``q + c*y`` (also NaN/inf/subnormal entries), and the returned
    zᵀq is the float64 sum of the new q's products to within n·2⁻⁵³ Σ|zᵢqᵢ| of the exact sum;
    scale_dot: the bits of ``q * g``; dot: the same bound."""
    rng = np.random.default_rng(1)
    n = 5003
    q = (rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 6, n)).astype(dtype)
    y, z = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    c, g = dtype(-0.37), dtype(1.7)
    k = {nm: host_kernels.kernel(nm, n) for nm in ("dot", "axpy_dot", "scale_dot")}
    bound = lambda a, b: n * 2.0 ** -53 * float(np.abs(a.astype(np.float64) * b).sum())  # noqa: E731

    got = q.copy()
    t = k["axpy_dot"](got, c, y, z)
    np.testing.assert_array_equal(got, q + c * y)
    assert abs(t - _exact_dot(z, got)) <= bound(z, got)
    got2 = q.copy()
    t = k["scale_dot"](got2, g, z)
    np.testing.assert_array_equal(got2, q * g)
    assert abs(t - _exact_dot(z, got2)) <= bound(z, got2)
    assert abs(k["dot"](y, z) - _exact_dot(y, z)) <= bound(y, z)

    bad = q.copy()
    bad[:4] = [np.nan, np.inf, -np.inf, np.finfo(dtype).tiny / 8]
    want = bad + c * y
    k["axpy_dot"](bad, c, y, z)
    np.testing.assert_array_equal(bad, want)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-13), (np.float32, 2e-6)])
@pytest.mark.parametrize("k", [0, 1, 5])
def test_fused_two_loop_against_a_float64_oracle(dtype, rtol, k, every_size_fused):
    """H v on the fused route = the float64 two-loop of the same (rounded) data within rtol; in
    float32 it is at least as close as the expression route (BLAS ``sdot`` sums in float32)."""
    rng = np.random.default_rng(k)
    n = 4099
    S, Y = _pairs(rng, k, n, dtype)
    v = rng.standard_normal(n).astype(dtype)
    op = LBFGSOperator(S, Y)
    assert _two_loop_passes(S, v).fused
    got = op.solve(v)
    want = LBFGSOperator(S.astype(np.float64), Y.astype(np.float64)).solve(v.astype(np.float64))
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert got.dtype == dtype and err <= rtol
    if k:  # the dense oracle of the two-loop: the compact inverse form in float64
        want_c = LBFGSOperator(S.astype(np.float64), Y.astype(np.float64)).solve_compact(v.astype(np.float64))
        assert np.linalg.norm(got - want_c) / np.linalg.norm(want_c) <= rtol
    conv_kernels = conv.KERNELS
    try:
        conv.KERNELS = "xp"
        assert not _two_loop_passes(S, v).fused
        expr = LBFGSOperator(S, Y).solve(v)
    finally:
        conv.KERNELS = conv_kernels
    if dtype == np.float32 and k:
        assert err <= 1.5 * np.linalg.norm(expr - want) / np.linalg.norm(want) + 1e-7


def test_fused_two_loop_same_bits_for_every_thread_count(every_size_fused):
    """The ranges are fixed by n and summed in range order: 1, 2 and 3 threads give the same bits."""
    rng = np.random.default_rng(3)
    S, Y = _pairs(rng, 4, 1001, np.float32)
    v = rng.standard_normal(1001).astype(np.float32)
    before = chunks.num_threads()
    try:
        out = []
        for t in (1, 2, 3):
            chunks.set_num_threads(t)
            op = LBFGSOperator(S, Y)
            out.append((op.solve(v), op.gamma))
    finally:
        chunks.set_num_threads(before)
    for x, g in out[1:]:
        np.testing.assert_array_equal(x, out[0][0])
        assert g == out[0][1]


def test_routes_outside_the_fused_domain(every_size_fused):
    """2-D right-hand sides, mixed dtypes, non-contiguous buffers and the 'xp' switch run the
    expressions: the bits of a plain NumPy two-loop ([NW06] Alg. 7.4)."""
    rng = np.random.default_rng(4)
    S, Y = _pairs(rng, 3, 300, np.float64)
    v = rng.standard_normal(300)

    def plain(S, Y, v, gamma):
        q, alpha = v.copy(), [0.0] * len(S)
        for i in range(len(S) - 1, -1, -1):
            alpha[i] = (1.0 / (S[i] * Y[i]).sum()) * (S[i] @ q)
            q += -alpha[i] * (Y[i] if q.ndim == 1 else Y[i][:, None])
        q *= gamma
        for i in range(len(S)):
            beta = (1.0 / (S[i] * Y[i]).sum()) * (Y[i] @ q)
            q += (alpha[i] - beta) * (S[i] if q.ndim == 1 else S[i][:, None])
        return q

    V = rng.standard_normal((300, 2))
    assert not _two_loop_passes(S, V).fused
    np.testing.assert_array_equal(LBFGSOperator(S, Y, 0.7).solve(V), plain(S, Y, V, 0.7))
    assert not _two_loop_passes(S, v.astype(np.float32)).fused
    Sf = np.asfortranarray(S)
    assert not _two_loop_passes(Sf, v).fused
    # strided rows: BLAS's strided dots and NumPy's strided sums round differently, so values only
    np.testing.assert_allclose(LBFGSOperator(Sf, Y, 0.7).solve(v), plain(S, Y, v, 0.7), rtol=1e-12, atol=1e-14)
    kernels = conv.KERNELS
    try:
        conv.KERNELS = "xp"
        np.testing.assert_array_equal(LBFGSOperator(S, Y, 0.7).solve(v), plain(S, Y, v, 0.7))
    finally:
        conv.KERNELS = kernels
