"""The numba kernels of qnref.nn._numba_fast (training-mode BatchNorm on 4-D inputs, max-pool forward
and scatter) against their xp twins (``qnref.nn.conv.KERNELS = "xp"``): identical max-pool winners
and values, BatchNorm within 1e-12 (float64) / 1e-5 (float32), caches that jvp/backward_rop accept,
finite-difference checks on both paths, and the loader honouring the kernel switch."""
import numpy as np
import pytest

import qnref.nn.conv as conv_mod
import qnref.nn.pool as pool_mod
from qnref.curvature.objective import Objective
from qnref.nn.activations import Tanh
from qnref.nn.base import Ctx
from qnref.nn.conv import Conv2d
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.nn.norm import BatchNorm
from qnref.nn.pool import MaxPool2d, fast_kernels, use_fast
from qnref.nn.reshape import Flatten
from helpers import check_layer_passes, rel_err

pytest.importorskip("numba")


def _with_kernels(mode, fn):
    old = conv_mod.KERNELS
    conv_mod.KERNELS = mode
    try:
        return fn()
    finally:
        conv_mod.KERNELS = old



def test_loader_honours_the_kernel_switch():
    x = np.zeros((2, 1, 2, 2))
    assert _with_kernels("xp", fast_kernels) is None
    assert not _with_kernels("xp", lambda: use_fast(x))
    mod = _with_kernels("numba", fast_kernels)
    assert mod is not None and mod.__name__ == "qnref.nn._numba_fast"
    assert _with_kernels("auto", lambda: use_fast(x))
    assert not _with_kernels("auto", lambda: use_fast(x.astype(np.int64)))  # only float32/float64
    mod.warmup()


# -- max pooling ----------------------------------------------------------------------------------------
MAXPOOL_CASES = [
    # (kernel, stride, padding, (C, H, W))
    (2, None, 0, (3, 8, 8)),
    (2, None, 0, (2, 7, 5)),  # odd sizes: last row/column dropped
    (3, 2, 1, (2, 9, 8)),  # overlapping windows with padding
    (3, 1, 1, (2, 6, 7)),  # stride 1: every interior pixel in 9 windows
    ((2, 3), (1, 2), (1, 1), (1, 5, 7)),
    ((3, 1), (2, 1), (1, 0), (2, 7, 4)),
    (3, 1, 0, (1, 3, 3)),  # kernel == input
    (2, 3, 0, (2, 7, 7)),  # stride > kernel: gaps
    (1, 1, 0, (2, 3, 4)),
]


def _maxpool_both(layer, x):
    y0, (g0, s0) = _with_kernels("auto", lambda: layer.forward([], x, Ctx()))
    y1, (g1, s1) = _with_kernels("xp", lambda: layer.forward([], x, Ctx()))
    return (y0, g0, s0), (y1, g1, s1)


@pytest.mark.parametrize("case", MAXPOOL_CASES)
@pytest.mark.parametrize("dt", [np.float64, np.float32])
@pytest.mark.parametrize("data", ["normal", "ties"])
def test_maxpool_forward_paths_identical(case, dt, data):
    k, s, p, shape = case
    layer = MaxPool2d(k, s, p)
    layer.build(shape)
    r = np.random.default_rng(shape[1] * 7 + shape[2])
    if data == "ties":  # few distinct values: most windows have tied maxima (also in negative windows)
        x = r.integers(-2, 1, (3,) + shape).astype(dt)
    else:
        x = r.standard_normal((3,) + shape).astype(dt)
    assert _with_kernels("auto", lambda: use_fast(x))
    (y0, g0, s0), (y1, g1, s1) = _maxpool_both(layer, x)
    assert y0.dtype == y1.dtype == dt and y0.shape == y1.shape == (3,) + layer.out_shape
    assert g0.dtype == g1.dtype and g0.shape == g1.shape and s0 == s1
    np.testing.assert_array_equal(g0, g1)
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(y0, x.reshape(-1)[g0])
    # backward: parallel per-plane scatter vs the xp scatter (same addition order per pixel)
    gy = r.standard_normal(y0.shape).astype(dt)
    gx0 = _with_kernels("auto", lambda: layer.backward([], (g0, s0), gy, None))
    gx1 = _with_kernels("xp", lambda: layer.backward([], (g1, s1), gy, None))
    assert gx0.dtype == gx1.dtype == dt and gx0.shape == x.shape
    np.testing.assert_array_equal(gx0, gx1)
    # backward_rop through the fast scatter as well
    gx, rgx = _with_kernels("auto", lambda: layer.backward_rop([], (g0, s0), None, gy, 2 * gy, None, None))
    np.testing.assert_array_equal(gx, gx1)
    np.testing.assert_array_equal(rgx, 2 * gx1)


def test_maxpool_ties_go_to_first_element_and_padding_never_wins():
    layer = MaxPool2d(3, 2, 1)
    layer.build((1, 4, 4))
    x = np.full((1, 1, 4, 4), -5.0)  # every window is a tie of real values against the −∞ padding
    y, (gidx, _) = _with_kernels("auto", lambda: layer.forward([], x, Ctx()))
    np.testing.assert_array_equal(y, -5.0)
    # first real element (row-major) of each window: windows start at rows/cols −1, 1
    np.testing.assert_array_equal(gidx[0, 0], [[0, 1], [4, 5]])


def test_maxpool_nan_wins_like_argmax():
    layer = MaxPool2d(2)
    layer.build((1, 4, 4))
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    x[0, 0, 0, 1] = np.nan
    x[0, 0, 1, 0] = np.nan
    x[0, 0, 3, 2] = np.nan
    (y0, g0, _), (y1, g1, _) = _maxpool_both(layer, x)
    np.testing.assert_array_equal(g0, g1)
    np.testing.assert_array_equal(y0, y1)  # NaN == NaN for assert_array_equal
    assert g0[0, 0, 0, 0] == 1 and g0[0, 0, 1, 1] == 14


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 1, 0)])
def test_maxpool_infinities_match_xp(k, s, p):
    """Planes holding ±inf take the NaN-aware loop; ties between infinite values keep the first."""
    layer = MaxPool2d(k, s, p)
    layer.build((2, 7, 6))
    r = np.random.default_rng(k + s + p)
    x = r.standard_normal((3, 2, 7, 6))
    x[r.random(x.shape) < 0.15] = np.inf
    if p == 0:  # (with padding, a window of real −∞ only would tie with the −∞ padding in the xp path)
        x[r.random(x.shape) < 0.15] = -np.inf
    (y0, g0, _), (y1, g1, _) = _maxpool_both(layer, x)
    np.testing.assert_array_equal(g0, g1)
    np.testing.assert_array_equal(y0, y1)


def test_maxpool_scatter_falls_back_for_out_of_plane_indices():
    """A cache whose winner lies outside its plane (the xp path's −∞-padding tie) is scattered
    exactly like the xp path, not dropped."""
    layer = MaxPool2d(2)
    layer.build((2, 4, 4))
    x = np.random.default_rng(0).standard_normal((2, 2, 4, 4))
    y, (gidx, shape) = _with_kernels("auto", lambda: layer.forward([], x, Ctx()))
    gidx = gidx.copy()
    gidx[0, 1, 0, 0] = 3  # a position in plane 0
    gy = np.arange(1.0, 1.0 + y.size).reshape(y.shape)
    gx0 = _with_kernels("auto", lambda: layer.backward([], (gidx, shape), gy, None))
    gx1 = _with_kernels("xp", lambda: layer.backward([], (gidx, shape), gy, None))
    np.testing.assert_array_equal(gx0, gx1)
    assert gx0[0, 0, 0, 3] == gy[0, 1, 0, 0] + (gy[0, 0, 0, 1] if gidx[0, 0, 0, 1] == 3 else 0)


def test_maxpool_non_contiguous_input():
    layer = MaxPool2d(2)
    layer.build((3, 6, 6))
    x = np.random.default_rng(0).standard_normal((6, 6, 3, 4)).transpose(3, 2, 0, 1)  # (4, 3, 6, 6) view
    (y0, g0, _), (y1, g1, _) = _maxpool_both(layer, x)
    np.testing.assert_array_equal(g0, g1)
    np.testing.assert_array_equal(y0, y1)


# -- BatchNorm ------------------------------------------------------------------------------------------
def _bn_case(shape, n, dt, seed, offset=0.0):
    layer = BatchNorm()
    layer.build(shape)
    r = np.random.default_rng(seed)
    x = (offset + 2 * r.standard_normal((n,) + shape)).astype(dt)
    p = [(1 + 0.3 * r.standard_normal(shape[0])).astype(dt), (0.5 * r.standard_normal(shape[0])).astype(dt)]
    gy = r.standard_normal(x.shape).astype(dt)
    return layer, x, p, gy


def _bn_run(mode, layer, x, p, gy, need_gx=True):
    def run():
        y, cache = layer.forward(p, x, Ctx(train=True))
        gp = [np.zeros_like(p[0]), np.zeros_like(p[1])]
        gx = layer.backward(p, cache, gy, gp, need_gx=need_gx)
        gp_none = layer.backward(p, cache, gy, None, need_gx=need_gx)
        if need_gx:
            np.testing.assert_array_equal(gp_none, gx)
        else:
            assert gx is None and gp_none is None
        return y, cache, gx, gp

    return _with_kernels(mode, run)


BN_SHAPES = [((3, 4, 5), 6), ((16, 8, 8), 4), ((2, 1, 1), 7), ((5, 3, 7), 2), ((1, 33, 17), 3)]


@pytest.mark.parametrize("shape,n", BN_SHAPES)
@pytest.mark.parametrize("dt,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_batchnorm_paths_agree(shape, n, dt, tol, offset):
    layer, x, p, gy = _bn_case(shape, n, dt, seed=n + shape[0], offset=offset)
    assert _with_kernels("auto", lambda: layer._fast(x, p))
    y0, c0, gx0, gp0 = _bn_run("auto", layer, x, p, gy)
    y1, c1, gx1, gp1 = _bn_run("xp", layer, x, p, gy)
    assert set(c0) == set(c1) and c0["m"] == c1["m"] and c0["train"]
    for key in ("xhat", "inv", "mean", "var"):
        assert c0[key].shape == c1[key].shape and c0[key].dtype == c1[key].dtype == dt, key
    assert y0.dtype == gx0.dtype == dt and y0.shape == gx0.shape == x.shape
    assert rel_err(y0, y1) <= tol
    assert rel_err(c0["xhat"], c1["xhat"]) <= tol
    assert rel_err(c0["inv"], c1["inv"]) <= tol
    assert rel_err(c0["var"], c1["var"]) <= tol
    assert rel_err(c0["mean"], c1["mean"]) <= tol * max(1.0, offset)
    assert rel_err(gx0, gx1) <= tol
    for a, b in zip(gp0, gp1):
        assert a.dtype == dt and rel_err(a, b) <= tol
    # parameter gradients only (need_gx=False) go through the sums kernel
    _, _, none, gp2 = _bn_run("auto", layer, x, p, gy, need_gx=False)
    assert none is None
    for a, b in zip(gp2, gp0):
        np.testing.assert_allclose(a, b, rtol=1e-15 if dt == np.float64 else 1e-7, atol=0)
    # the fast cache drives the (xp) jvp and backward_rop exactly like the xp cache
    r = np.random.default_rng(1)
    dx = r.standard_normal(x.shape).astype(dt)
    dp = [r.standard_normal(shape[0]).astype(dt), r.standard_normal(shape[0]).astype(dt)]
    outs = []
    for cache, mode in ((c0, "auto"), (c1, "xp")):
        def passes(cache=cache):
            dy, rc = layer.jvp(p, cache, dx, dp)
            rgp = [np.zeros_like(p[0]), np.zeros_like(p[1])]
            gx, rgx = layer.backward_rop(p, cache, rc, gy, 2 * gy + 1, dp, rgp)
            return dy, gx, rgx, rgp[0], rgp[1]

        outs.append(_with_kernels(mode, passes))
    for a, b in zip(*outs):
        assert rel_err(a, b) <= 10 * tol


def test_batchnorm_float32_statistics_at_least_as_accurate():
    """float64 accumulation: the float32 fast path's μ, σ² are no worse than NumPy's float32 sums."""
    layer, x, p, gy = _bn_case((4, 16, 16), 64, np.float32, seed=3, offset=100.0)
    _, c0, _, _ = _bn_run("auto", layer, x, p, gy)
    _, c1, _, _ = _bn_run("xp", layer, x, p, gy)
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=(0, 2, 3))
    var = x64.var(axis=(0, 2, 3))
    for key, ref in (("mean", mu), ("var", var)):
        e_fast = np.abs(c0[key].reshape(-1) - ref) / np.abs(ref)
        e_xp = np.abs(c1[key].reshape(-1) - ref) / np.abs(ref)
        assert e_fast.max() <= 2 ** -24 * 1.01  # correctly rounded to float32
        assert e_fast.max() <= e_xp.max() + 1e-12, key


def test_batchnorm_fallbacks_stay_on_xp():
    layer, x, p, gy = _bn_case((2, 3, 3), 4, np.float32, seed=0)
    assert not layer._fast(x, [v.astype(np.float64) for v in p])  # mixed dtypes
    assert not layer._fast(x.astype(np.float16), p)
    dense = BatchNorm()
    dense.build((3,))
    assert not dense._fast(np.zeros((4, 3)), [np.ones(3), np.zeros(3)])
    # eval mode (running statistics) is unchanged by the kernel switch
    y0 = _with_kernels("auto", lambda: layer.forward(p, x, Ctx(train=False))[0])
    y1 = _with_kernels("xp", lambda: layer.forward(p, x, Ctx(train=False))[0])
    np.testing.assert_array_equal(y0, y1)


@pytest.mark.parametrize("shape,n", [((2, 3, 2), 4), ((3, 2, 3), 2)])
def test_batchnorm_training_passes_fd_both_paths(shape, n, kernels):
    check_layer_passes(BatchNorm(), shape, n=n, seed=n + len(shape), scale=2.0)


def test_objective_bn_maxpool_net_paths_agree():
    """grad and hvp of a small conv/BN/max-pool net in training mode: numba kernels vs xp."""
    model = Sequential(
        [Conv2d(4, 3, padding=1), BatchNorm(), Tanh(), MaxPool2d(3, 2, 1), Conv2d(3, 3), BatchNorm(), Tanh(), Flatten(), Dense(3)],
        input_shape=(2, 7, 7),
    )
    r = np.random.default_rng(0)
    X, y = r.standard_normal((5, 2, 7, 7)), r.integers(0, 3, 5)
    theta = model.init(1, scheme="gaussian", std=0.5)
    v = r.standard_normal(theta.size)
    obj = Objective(model, "softmax_ce", X, y, train=True)
    g0, h0 = _with_kernels("auto", lambda: (obj.grad(theta), obj.hvp(theta, v)))
    g1, h1 = _with_kernels("xp", lambda: (obj.grad(theta), obj.hvp(theta, v)))
    assert rel_err(g0, g1) <= 1e-12
    assert rel_err(h0, h1) <= 1e-11


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_thread_count_does_not_change_any_bit(dt):
    """BatchNorm and max-pool split channels / planes among the chunk pool's threads: every
    output element is computed by one call, whatever the split."""
    from qnref.nn import chunks

    r = np.random.default_rng(5)
    x = r.standard_normal((6, 5, 7, 9)).astype(dt)
    bn, mp = BatchNorm(), MaxPool2d(3, stride=2, padding=1)
    bn.build(x.shape[1:])
    mp.build(x.shape[1:])
    p = [r.standard_normal(5).astype(dt), r.standard_normal(5).astype(dt)]
    before = chunks.num_threads()

    def passes():
        y, cache = bn.forward(p, x, Ctx(train=True))
        gp = [np.zeros(5, dt), np.zeros(5, dt)]
        gx = bn.backward(p, cache, y, gp)
        z, pc = mp.forward([], x, Ctx())
        return [y, gx, *gp, z, pc[0], mp.backward([], pc, z, None)]

    try:
        chunks.set_num_threads(1)
        ref = passes()
        chunks.set_num_threads(3)
        for a, b in zip(ref, passes()):
            np.testing.assert_array_equal(a, b)
    finally:
        chunks.set_num_threads(before)


def test_thread_count_from_environment():
    import os
    import subprocess
    import sys

    code = "from qnref.nn import chunks; print(chunks.num_threads())"
    env = dict(os.environ, QNREF_NUM_THREADS="3")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "3"


def test_package_import_does_not_load_fast_kernels():
    import subprocess
    import sys

    code = "import sys, qnref, qnref.nn.pool, qnref.nn.norm, qnref.nn.zoo; print('qnref.nn._numba_fast' in sys.modules, 'numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
    assert pool_mod.fast_kernels() is None or pool_mod.fast_kernels().__name__ == "qnref.nn._numba_fast"
