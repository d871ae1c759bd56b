"""Pooling: forward/backward against direct loops, every pass against float64 finite differences,
numba vs NumPy scatter paths, argmax routing of the max-pool R-ops, errors."""
import numpy as np
import pytest

import qnref.nn.conv as conv_mod
from qnref.curvature.objective import Objective
from qnref.nn.activations import Tanh
from qnref.nn.base import Ctx
from qnref.nn.conv import Conv2d
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.nn.pool import AvgPool2d, GlobalAvgPool, MaxPool2d
from helpers import check_layer_passes
from test_conv import check_products



def pool_loop(x, k, s, p, op):
    """Direct loops: max (padding −∞) or mean (zero padding counted), plus the argmax positions."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    fill = -np.inf if op == "max" else 0.0
    xp_ = np.full((n, c, h + 2 * ph, w + 2 * pw), fill)
    xp_[:, :, ph : ph + h, pw : pw + w] = x
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    y = np.zeros((n, c, ho, wo))
    gx_unit = np.zeros_like(xp_)  # backward of gy = 1
    for i in range(n):
        for j in range(c):
            for r in range(ho):
                for q in range(wo):
                    win = xp_[i, j, r * sh : r * sh + kh, q * sw : q * sw + kw]
                    if op == "max":
                        y[i, j, r, q] = win.max()
                        a, b = np.unravel_index(np.argmax(win), win.shape)
                        gx_unit[i, j, r * sh + a, q * sw + b] += 1
                    else:
                        y[i, j, r, q] = win.mean()
                        gx_unit[i, j, r * sh : r * sh + kh, q * sw : q * sw + kw] += 1 / (kh * kw)
    return y, gx_unit[:, :, ph : ph + h, pw : pw + w]


POOL_CASES = [
    # (kernel, stride, padding, (C, H, W))
    (2, None, 0, (2, 6, 5)),  # odd width: last column dropped
    (3, 2, 1, (2, 7, 6)),  # overlapping windows with padding
    ((2, 3), (1, 2), (1, 1), (1, 5, 7)),
    (3, 1, 0, (1, 3, 3)),  # kernel == input
    (2, 3, 0, (2, 7, 7)),  # stride > kernel: gaps
]


@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("cls,op", [(MaxPool2d, "max"), (AvgPool2d, "mean")])
def test_pool_matches_loop(case, cls, op, kernels):
    k, s, p, shape = case
    layer = cls(k, s, p)
    layer.build(shape)
    x = np.random.default_rng(len(shape) + shape[1]).standard_normal((3,) + shape)
    y, cache = layer.forward([], x, Ctx())
    ref, gx_unit = pool_loop(x, layer.kernel_size, layer.stride, layer.padding, op)
    assert y.shape == ref.shape == (3,) + layer.out_shape
    np.testing.assert_allclose(y, ref, rtol=1e-14)
    np.testing.assert_allclose(layer.backward([], cache, np.ones_like(y), None), gx_unit, rtol=1e-14)


@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("cls", [MaxPool2d, AvgPool2d])
def test_pool_passes_fd(case, cls, kernels):
    k, s, p, shape = case
    check_layer_passes(cls(k, s, p), shape, n=2, seed=shape[2])


def test_global_avg_pool_passes():
    check_layer_passes(GlobalAvgPool(), (3, 4, 5), n=2)
    layer = GlobalAvgPool()
    assert layer.build((3, 4, 5)) == (3,)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5))
    y, _ = layer.forward([], x, Ctx())
    np.testing.assert_allclose(y, x.mean(axis=(2, 3)))


def test_maxpool_rops_route_through_argmax():
    """jvp gathers dx at the winners, backward_rop is backward applied to R{gy}; ties go to the
    first element of the window in every pass."""
    layer = MaxPool2d(2)
    layer.build((1, 4, 4))
    x = np.zeros((1, 1, 4, 4))  # all ties
    x[0, 0, 3, 3] = 1.0
    y, cache = layer.forward([], x, Ctx())
    dx = np.arange(16.0).reshape(1, 1, 4, 4)
    dy, _ = layer.jvp([], cache, dx, None)
    np.testing.assert_array_equal(dy[0, 0], [[0.0, 2.0], [8.0, 15.0]])
    gy = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    rgy = 10 * gy
    gx, rgx = layer.backward_rop([], cache, None, gy, rgy, None, None)
    expect = np.zeros((4, 4))
    expect[0, 0], expect[0, 2], expect[2, 0], expect[3, 3] = 1, 2, 3, 4
    np.testing.assert_array_equal(gx[0, 0], expect)
    np.testing.assert_array_equal(rgx[0, 0], 10 * expect)
    # ⟨gy, jvp(dx)⟩ = ⟨backward(gy), dx⟩ (adjointness on the selected piece)
    assert (gy * dy).sum() == (gx * dx).sum()
    assert layer.jvp([], cache, None, None) == (None, None)
    assert layer.backward_rop([], cache, None, gy, rgy, None, None, need_gx=False) == (None, None)


def test_maxpool_scatter_paths_agree():
    r = np.random.default_rng(5)
    old = conv_mod.KERNELS
    try:
        for k, s, p in [(2, 2, 0), (3, 2, 1), (3, 1, 1), ((1, 3), (1, 1), (0, 1))]:
            layer = MaxPool2d(k, s, p)
            layer.build((3, 6, 7))
            for dt in (np.float64, np.float32):
                x = r.standard_normal((4, 3, 6, 7)).astype(dt)
                y, cache = layer.forward([], x, Ctx())
                gy = r.standard_normal(y.shape).astype(dt)
                outs = []
                for mode in ("auto", "xp"):
                    conv_mod.KERNELS = mode
                    outs.append(layer.backward([], cache, gy, None))
                assert outs[0].dtype == outs[1].dtype == dt
                np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6 if dt == np.float32 else 1e-14)
    finally:
        conv_mod.KERNELS = old


def test_pool_bad_inputs():
    with pytest.raises(ValueError, match="kernel_size"):
        MaxPool2d(0)
    with pytest.raises(ValueError, match="at most half the kernel"):
        MaxPool2d(2, padding=2).build((1, 8, 8))
    with pytest.raises(ValueError, match="larger than the padded input"):
        AvgPool2d(5).build((1, 4, 8))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        MaxPool2d(2).build((10,))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        GlobalAvgPool().build((4, 4))
    layer = MaxPool2d(2)
    layer.build((2, 4, 4))
    with pytest.raises(ValueError, match="channel mismatch"):
        layer.forward([], np.zeros((1, 3, 4, 4)), Ctx())
    with pytest.raises(ValueError, match="expects a batch"):
        layer.forward([], np.zeros((2, 4, 4)), Ctx())


@pytest.mark.parametrize("cls", [MaxPool2d, AvgPool2d])
def test_objective_products_pooling_first(cls, kernels):
    """A pool as the first layer (no input direction) and global average pooling at the end."""
    model = Sequential([cls(2), Conv2d(3, 2), Tanh(), GlobalAvgPool(), Dense(2)], input_shape=(2, 6, 6))
    r = np.random.default_rng(9)
    X = r.standard_normal((3, 2, 6, 6))
    theta = model.init(0, scheme="gaussian", std=0.7)
    check_products(Objective(model, "softmax_ce", X, r.integers(0, 2, 3)), theta, seed=4)


@pytest.mark.gpu
def test_maxpool_gpu_matches_cpu():
    import cupy as cp

    from qnref import backend

    for k, s, p in [(2, 2, 0), (3, 2, 1)]:
        layer = MaxPool2d(k, s, p)
        layer.build((2, 7, 6))
        x = np.random.default_rng(0).standard_normal((3, 2, 7, 6))
        y, c = layer.forward([], x, Ctx())
        yg, cg = layer.forward([], cp.asarray(x), Ctx())
        np.testing.assert_allclose(backend.to_numpy(yg), y)
        gy = np.random.default_rng(1).standard_normal(y.shape)
        np.testing.assert_allclose(backend.to_numpy(layer.backward([], cg, cp.asarray(gy), None)), layer.backward([], c, gy, None))
        dx = np.random.default_rng(2).standard_normal(x.shape)
        np.testing.assert_allclose(backend.to_numpy(layer.jvp([], cg, cp.asarray(dx), None)[0]), layer.jvp([], c, dx, None)[0])
