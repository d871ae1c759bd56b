"""The CPU fast paths of issue 21 give bit for bit the results of the NumPy code they replace
(``qnref.nn.conv.KERNELS = "xp"``), whatever the thread count, and the whole-network products
through them stay exact (float64 finite differences)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from qnref.curvature.objective import Objective  # noqa: E402
from qnref.nn import chunks, conv  # noqa: E402
from qnref.nn import activations  # noqa: E402
from qnref.nn.activations import ReLU, relu, relu_mask_mul  # noqa: E402
from qnref.nn.base import Ctx  # noqa: E402
from qnref.nn.zoo import build_model  # noqa: E402


@pytest.fixture
def xp_kernels():
    """Run a block with the NumPy/CuPy code paths (numba off), restoring the switch afterwards."""
    saved = conv.KERNELS

    def switch(mode):
        conv.KERNELS = mode

    yield switch
    conv.KERNELS = saved


def _special(shape, dtype, seed=0):
    """Random values with zeros of both signs, ±inf and NaN sprinkled in."""
    r = np.random.default_rng(seed)
    a = r.standard_normal(shape).astype(dtype)
    flat = a.reshape(-1)
    idx = r.choice(flat.size, 40, replace=False)
    flat[idx[:8]] = 0.0
    flat[idx[8:16]] = -0.0
    flat[idx[16:22]] = np.inf
    flat[idx[22:28]] = -np.inf
    flat[idx[28:34]] = np.nan
    return a


def _same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))  # signed zeros and NaNs too


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_product_is_the_float_mask_formula_bit_for_bit(dtype):
    shape = (3, 7, 40, 41)
    x, g = _special(shape, dtype, 1), _special(shape, dtype, 2)
    with np.errstate(invalid="ignore"):  # inf · 0 = NaN on both routes
        ref = (x > 0).astype(dtype) * g
        _same_bits(relu_mask_mul(x, g), ref)
        _same_bits(relu_mask_mul(x.transpose(0, 1, 3, 2), g.transpose(0, 1, 3, 2)), ref.transpose(0, 1, 3, 2))
        # mixed dtypes keep the float-mask route (result in the promoted dtype)
        other = np.float64 if dtype == np.float32 else np.float32
        mixed = relu_mask_mul(x, g.astype(other))
    assert mixed.dtype == np.result_type(dtype, other)


#: (2, 8, 64, 70): above MIN_SIZE, one range on the calling thread; (3, 16, 110, 111): above
#: SPLIT_SIZE, split over the pool (each shape's number of ranges is asserted in the test)
KERNEL_SHAPES = [(2, 8, 64, 70), (3, 16, 110, 111)]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_kernels_are_numpy_bit_for_bit(dtype, shape, threads):
    """The numba ReLU passes of conv activations: max(x, 0) and g·[x > 0] equal NumPy's
    ``maximum(x, 0)`` and the float-mask product in every bit (−0 → +0, NaN kept, inf·0 = NaN),
    for every thread count; the route is the kernel's (not NumPy's) for these shapes."""
    from qnref import host_kernels

    assert activations._fast_relu(np.empty(shape, dtype)) is not None
    assert len(host_kernels.split_ranges(int(np.prod(shape)))) == (1 if shape == KERNEL_SHAPES[0] else 2)
    x, g = _special(shape, dtype, 3), _special(shape, dtype, 4)
    flat = x.reshape(-1)
    flat[-3:] = [-0.0, np.nan, 1.0]  # the last range's edge
    before = chunks.num_threads()
    chunks.set_num_threads(threads)
    try:
        with np.errstate(invalid="ignore"):
            _same_bits(relu(x), np.maximum(x, 0))
            _same_bits(relu_mask_mul(x, g), (x > 0).astype(dtype) * g)
    finally:
        chunks.set_num_threads(before)


def test_relu_kernel_route_is_only_for_large_contiguous_images():
    """MLP activations (2-D), small or strided arrays and mixed dtypes keep NumPy's expressions, so
    an MLP never loads numba for its ReLUs."""
    big = np.zeros(KERNEL_SHAPES[0], np.float32)
    assert activations._fast_relu(big) is not None
    assert activations._fast_relu(big.reshape(big.shape[0], -1)) is None
    assert activations._fast_relu(np.zeros((2, 8, 8, 8), np.float32)) is None
    assert activations._fast_relu(big.transpose(0, 1, 3, 2)) is None
    assert activations._fast_relu(big, big.astype(np.float64)) is None
    assert activations._fast_relu(big.astype(np.float16)) is None


def test_relu_layer_passes_match_the_xp_path(xp_kernels):
    r = np.random.default_rng(5)
    shape = (8, 16, 32, 32)
    x, gy, dx, rgy = (r.standard_normal(shape).astype(np.float32) for _ in range(4))
    layer = ReLU()
    layer.build(shape[1:])

    def run():
        y, c = layer.forward([], x, Ctx(train=True))
        gx = layer.backward([], c, gy, None)
        jv, rc = layer.jvp([], c, dx, None)
        g2, rg = layer.backward_rop([], c, rc, gy, rgy, None, None)
        return y, gx, jv, g2, rg

    fast = run()
    xp_kernels("xp")
    slow = run()
    for a, b in zip(fast, slow):
        _same_bits(a, b)


def test_relu_r_op_keeps_nonfinite_propagation():
    """σ'' = 0, but an infinite R{x}·gy still makes R{gx} NaN as in the generic Activation code."""
    x = np.ones((4, 16, 32, 32))
    x[0, 0, 0, 0] = -1.0
    gy, rgy, rx = np.ones_like(x), np.ones_like(x), np.ones_like(x)
    rx[0, 0, 0, 0] = np.inf
    with np.errstate(invalid="ignore"):
        _, rg = ReLU().backward_rop([], (x, np.maximum(x, 0)), rx, gy, rgy, None, None)
    assert np.isnan(rg[0, 0, 0, 0]) and np.isfinite(rg.reshape(-1)[1:]).all()


def test_resnet_products_identical_with_and_without_kernels(xp_kernels):
    """Whole-network gradient, Hv and Jv of a small ResNet (BN, ReLU, residual adds) on the numba
    paths equal the NumPy paths to round-off of the reductions (BN's float64 channel sums)."""
    model = build_model("resnet-digits")
    r = np.random.default_rng(0)
    X, y = r.random((16, 1, 8, 8)), r.integers(0, 10, 16)
    theta = model.init(0, scheme="he")
    v = r.standard_normal(theta.size)
    obj = Objective(model, "softmax_ce", X, y)
    fast = (obj.grad(theta), obj.hvp(theta, v))
    xp_kernels("xp")
    slow = (obj.grad(theta), obj.hvp(theta, v))
    for a, b in zip(fast, slow):
        assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max()


def test_resnet_gradient_matches_finite_differences():
    """Float64 central differences of the training-mode loss along random directions."""
    model = build_model("resnet-digits")
    r = np.random.default_rng(1)
    X, y = r.random((8, 1, 8, 8)), r.integers(0, 10, 8)
    theta = model.init(1, scheme="he")
    obj = Objective(model, "softmax_ce", X, y)
    g = obj.grad(theta)
    for k in range(3):
        d = r.standard_normal(theta.size)
        d /= np.linalg.norm(d)  # unit direction: h·d stays far from the ReLU kinks' scale
        h = 1e-6
        fd = (obj.value(theta + h * d) - obj.value(theta - h * d)) / (2 * h)
        assert abs(fd - g @ d) <= 1e-7 * max(np.linalg.norm(g), abs(fd))


# -- Winograd F(2×2, 3×3) (opt-in: conv.ALGORITHM = "winograd") ----------------------------------------
def _direct_correlation(x, w4, b, ph, pw):
    """Oracle: y[n, o, r, c] = Σ_{c', i, j} w4[o, c', i, j] x_pad[n, c', r + i, c + j] + b[o] (plain
    NumPy, no im2col, no Winograd)."""
    n, c, h, w = x.shape
    xp_ = np.zeros((n, c, h + 2 * ph, w + 2 * pw))
    xp_[:, :, ph:ph + h, pw:pw + w] = x
    ho, wo = h + 2 * ph - 2, w + 2 * pw - 2
    y = np.zeros((n, w4.shape[0], ho, wo)) + b[None, :, None, None]
    for i in range(3):
        for j in range(3):
            y += np.einsum("oc,ncrs->nors", w4[:, :, i, j], xp_[:, :, i:i + ho, j:j + wo])
    return y


@pytest.fixture
def winograd():
    saved = conv.ALGORITHM
    conv.ALGORITHM = "winograd"
    yield
    conv.ALGORITHM = saved


@pytest.mark.parametrize("shape,pad", [((3, 4, 8, 8), (1, 1)), ((2, 3, 7, 9), (1, 1)), ((2, 5, 6, 5), (0, 0)),
                                       ((2, 2, 5, 6), (2, 2)), ((1, 3, 4, 7), (0, 2))])
def test_winograd_conv_matches_direct_correlation(shape, pad):
    r = np.random.default_rng(sum(shape))
    x = r.standard_normal(shape)
    w4 = r.standard_normal((6, shape[1], 3, 3))
    b = r.standard_normal(6)
    ref = _direct_correlation(x, w4, b, *pad)
    got = conv.winograd_conv(x, w4, b, *pad)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-12 * np.abs(ref).max()
    # float32: the usual few-ulp accuracy of a GEMM-based convolution
    got32 = conv.winograd_conv(x.astype(np.float32), w4.astype(np.float32), b.astype(np.float32), *pad)
    assert np.abs(got32 - ref).max() <= 1e-5 * np.abs(ref).max()


def test_winograd_catches_a_wrong_filter_orientation():
    """The oracle comparison fails for a flipped filter (the bug a transposed G would make)."""
    r = np.random.default_rng(9)
    x, w4, b = r.standard_normal((2, 3, 8, 8)), r.standard_normal((4, 3, 3, 3)), np.zeros(4)
    ref = _direct_correlation(x, w4, b, 1, 1)
    bad = conv.winograd_conv(x, np.ascontiguousarray(w4[:, :, ::-1, :]), b, 1, 1)
    assert np.abs(bad - ref).max() > 1e-3


@pytest.mark.parametrize("pad,hw", [(1, (8, 8)), (1, (7, 6)), (0, (9, 8)), (2, (6, 7))])
def test_winograd_layer_passes_match_im2col(winograd, pad, hw):
    """Conv2d forward, input gradient and weight gradient on the Winograd route = the im2col route
    to 1e-12 (float64), threads 1 and 2."""
    from qnref.nn.conv import Conv2d

    r = np.random.default_rng(pad)
    layer = Conv2d(5, 3, padding=pad)
    layer.build((4,) + hw)
    x = r.standard_normal((6, 4) + hw)
    W = r.standard_normal((5, 4 * 9 + 1))
    gy = r.standard_normal((6,) + layer.out_shape)
    res = {}
    for alg in ("winograd", "im2col"):
        conv.ALGORITHM = alg
        for t in (1, 2):
            chunks.set_num_threads(t)
            y, c = layer.forward([W], x, Ctx(train=True))
            gW = [np.empty_like(W)]
            gx = layer.backward([W], c, gy, gW)
            gx_only = layer.backward([W], c, gy, None)
            res[alg, t] = (y, gx, gW[0], gx_only)
    chunks.set_num_threads(2)
    for a, b in zip(res["winograd", 1], res["im2col", 1]):
        assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max()
    for a, b in zip(res["winograd", 1], res["winograd", 2]):
        np.testing.assert_array_equal(a, b)


def test_winograd_resnet_gradient_and_hvp_are_exact(winograd):
    """With the Winograd route the training-mode ResNet gradient matches float64 central differences,
    and gradient / Hv match the im2col route (jvp/backward_rop use im2col patches either way)."""
    model = build_model("resnet-digits")
    r = np.random.default_rng(2)
    X, y = r.random((8, 1, 8, 8)), r.integers(0, 10, 8)
    theta = model.init(2, scheme="he")
    v = r.standard_normal(theta.size)
    obj = Objective(model, "softmax_ce", X, y)
    g, hv = obj.grad(theta), obj.hvp(theta, v)
    for k in range(3):
        d = r.standard_normal(theta.size)
        d /= np.linalg.norm(d)  # unit direction: h·d stays far from the ReLU kinks' scale
        h = 1e-6
        fd = (obj.value(theta + h * d) - obj.value(theta - h * d)) / (2 * h)
        assert abs(fd - g @ d) <= 1e-7 * max(np.linalg.norm(g), abs(fd))
    conv.ALGORITHM = "im2col"
    g2, hv2 = obj.grad(theta), obj.hvp(theta, v)
    assert np.abs(g - g2).max() <= 1e-12 * np.abs(g2).max()
    assert np.abs(hv - hv2).max() <= 1e-12 * np.abs(hv2).max()


def test_unknown_algorithm_is_refused():
    from qnref.nn.conv import Conv2d

    layer = Conv2d(2, 3, padding=1)
    layer.build((1, 4, 4))
    saved = conv.ALGORITHM
    conv.ALGORITHM = "fft"
    try:
        with pytest.raises(ValueError, match="ALGORITHM must be 'im2col' or 'winograd', got 'fft'"):
            layer.forward([np.zeros((2, 10))], np.zeros((1, 1, 4, 4)), Ctx(train=True))
    finally:
        conv.ALGORITHM = saved
