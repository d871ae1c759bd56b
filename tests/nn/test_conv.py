"""Conv2d: forward/backward against direct loop convolutions, every pass against float64 central
finite differences, the numba and NumPy col2im paths against each other, KFC taps, errors, and the
Objective products on small CNNs.

``check_products`` below is the shared oracle for the CNN tests (test_pool/test_norm/test_residual
import it): gradient, Hessian-, GGN- and Fisher-vector products and per-example gradients against
finite differences and the explicit matrices of :mod:`qnref.curvature.dense`.
"""
import numpy as np
import pytest

import qnref.nn.conv as conv_mod
from qnref import backend
from qnref.curvature import dense
from qnref.curvature.objective import Objective
from qnref.nn.activations import Tanh
from qnref.nn.base import Ctx
from qnref.nn.conv import Conv2d, col2im, im2col
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.nn.pool import AvgPool2d, MaxPool2d
from qnref.nn.reshape import Flatten
from helpers import check_layer_passes, conv_pass, rel_err

TOL = 1e-7



# -- direct loop references ---------------------------------------------------------------------------
def conv_loop(x, W, b, stride, pad):
    n, c, h, w = x.shape
    co, _, kh, kw = W.shape
    (sh, sw), (ph, pw) = stride, pad
    xp_ = np.zeros((n, c, h + 2 * ph, w + 2 * pw))
    xp_[:, :, ph : ph + h, pw : pw + w] = x
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    y = np.zeros((n, co, ho, wo))
    for i in range(n):
        for o in range(co):
            for r in range(ho):
                for s in range(wo):
                    y[i, o, r, s] = (xp_[i, :, r * sh : r * sh + kh, s * sw : s * sw + kw] * W[o]).sum() + b[o]
    return y


def conv_loop_backward(x, W, gy, stride, pad):
    n, c, h, w = x.shape
    co, _, kh, kw = W.shape
    (sh, sw), (ph, pw) = stride, pad
    xp_ = np.zeros((n, c, h + 2 * ph, w + 2 * pw))
    xp_[:, :, ph : ph + h, pw : pw + w] = x
    gxp = np.zeros_like(xp_)
    gW = np.zeros_like(W)
    for i in range(n):
        for o in range(co):
            for r in range(gy.shape[2]):
                for s in range(gy.shape[3]):
                    win = (slice(r * sh, r * sh + kh), slice(s * sw, s * sw + kw))
                    gW[o] += gy[i, o, r, s] * xp_[i, :, win[0], win[1]]
                    gxp[i, :, win[0], win[1]] += gy[i, o, r, s] * W[o]
    return gxp[:, :, ph : ph + h, pw : pw + w], gW, gy.sum(axis=(0, 2, 3))


CASES = [
    # (C_in, H, W, C_out, kernel, stride, padding)
    (1, 5, 5, 2, 3, 1, 0),
    (2, 7, 6, 3, 3, 2, 1),
    (3, 6, 7, 2, (2, 3), (1, 2), (0, 1)),
    (2, 5, 5, 1, 5, 1, 0),  # kernel == input: one location
    (1, 4, 4, 2, 3, 3, 1),  # stride == kernel with padding, leftover border
    (2, 3, 3, 2, 1, 2, 0),  # 1×1 projection, stride 2, odd size
    (2, 4, 5, 3, 3, 1, 2),  # padding larger than needed ("full" convolution)
]


@pytest.mark.parametrize("case", CASES)
def test_conv_matches_loop(case, kernels):
    cin, h, w, cout, k, s, p = case
    layer = Conv2d(cout, k, stride=s, padding=p)
    layer.build((cin, h, w))
    r = np.random.default_rng(sum(map(hash, map(str, case))) % 2**32)
    wb = r.standard_normal((cout, layer.patch_size + 1))
    x = r.standard_normal((2, cin, h, w))
    W4 = wb[:, :-1].reshape(cout, cin, *layer.kernel_size)
    y, cache = layer.forward([wb], x, Ctx())
    ref = conv_loop(x, W4, wb[:, -1], layer.stride, layer.padding)
    assert y.shape == ref.shape == (2,) + layer.out_shape
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    gy = r.standard_normal(y.shape)
    gwb = np.zeros_like(wb)
    gx = layer.backward([wb], cache, gy, [gwb])
    gx_ref, gW_ref, gb_ref = conv_loop_backward(x, W4, gy, layer.stride, layer.padding)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gwb[:, :-1], gW_ref.reshape(cout, -1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gwb[:, -1], gb_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES[:5])
def test_conv_passes_fd(case, kernels):
    cin, h, w, cout, k, s, p = case
    check_layer_passes(Conv2d(cout, k, stride=s, padding=p), (cin, h, w), n=2, seed=h * w + cout)


def test_conv_first_layer_passes():
    check_layer_passes(Conv2d(2, 3, padding=1), (1, 4, 5), n=3, first_layer=True)


def test_col2im_is_adjoint_of_im2col_and_paths_agree():
    r = np.random.default_rng(3)
    for (shape, k, s, p) in [((2, 3, 7, 6), (3, 2), (2, 1), (1, 0)), ((1, 2, 5, 5), (5, 5), (1, 1), (2, 2)), ((3, 1, 9, 4), (2, 2), (3, 3), (0, 1))]:
        x = r.standard_normal(shape)
        cols = im2col(x, *k, *s, *p)
        u = r.standard_normal(cols.shape)
        old = conv_mod.KERNELS
        try:
            outs = {}
            for mode in ("auto", "xp"):
                conv_mod.KERNELS = mode
                outs[mode] = col2im(u, shape, *k, *s, *p)
        finally:
            conv_mod.KERNELS = old
        np.testing.assert_allclose(outs["auto"], outs["xp"], rtol=1e-13, atol=1e-13)
        # ⟨im2col(x), u⟩ = ⟨x, col2im(u)⟩
        assert abs((cols * u).sum() - (x * outs["xp"]).sum()) < 1e-10 * abs((cols * u).sum())
    for dt in (np.float32, np.float64):  # dtype preserved on both paths
        x = r.standard_normal((2, 2, 5, 5)).astype(dt)
        assert col2im(im2col(x, 3, 3, 1, 1, 1, 1), x.shape, 3, 3, 1, 1, 1, 1).dtype == dt


def test_conv_per_example_grads_and_kron_taps():
    layer = Conv2d(3, 3, stride=2, padding=1)
    wb, x, y, cache, gy = conv_pass(layer, (2, 5, 6), 4, seed=0)
    out = np.zeros((4,) + wb.shape)
    gx_pe = layer.per_example_grads([wb], cache, gy, [out])
    gwb = np.zeros_like(wb)
    gx = layer.backward([wb], cache, gy, [gwb])
    np.testing.assert_allclose(gx_pe, gx, rtol=1e-13)
    np.testing.assert_allclose(out.sum(axis=0), gwb, rtol=1e-12)
    for i in range(4):  # each row is the gradient of example i alone
        _, c_i = layer.forward([wb], x[i : i + 1], Ctx())
        g_i = np.zeros_like(wb)
        layer.backward([wb], c_i, gy[i : i + 1], [g_i])
        np.testing.assert_allclose(out[i], g_i, rtol=1e-12, atol=1e-14)
    taps = layer.kron_taps(cache, gy)
    L = y.shape[2] * y.shape[3]
    assert taps["kind"] == "conv"
    assert taps["a"].shape == (4, L, layer.patch_size + 1) and taps["g"].shape == (4, L, 3)
    np.testing.assert_array_equal(taps["a"][..., -1], 1.0)  # homogeneous coordinate
    np.testing.assert_allclose(np.einsum("nlo,nlk->ok", taps["g"], taps["a"]), gwb, rtol=1e-12)
    # h_t = W̄ ā_t at every location
    np.testing.assert_allclose(taps["a"] @ wb.T, y.transpose(0, 2, 3, 1).reshape(4, L, 3), rtol=1e-12)


def test_conv_jvp_without_any_direction_is_zero():
    layer = Conv2d(2, 3)
    layer.build((1, 4, 4))
    x = np.ones((2, 1, 4, 4))
    wb = np.ones((2, 10))
    _, cache = layer.forward([wb], x, Ctx())
    dy, rc = layer.jvp([wb], cache, None, None)
    assert dy.shape == (2, 2, 2, 2) and not dy.any() and rc[1] is None  # rc = (patches, no dx patches)


def test_conv_float32():
    layer = Conv2d(2, 3, padding=1)
    layer.build((2, 5, 5))
    r = np.random.default_rng(1)
    x = r.standard_normal((3, 2, 5, 5))
    wb = r.standard_normal((2, 19))
    y64, c64 = layer.forward([wb], x, Ctx())
    y32, c32 = layer.forward([wb.astype(np.float32)], x.astype(np.float32), Ctx())
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y64, rtol=1e-5, atol=1e-5)
    g32 = layer.backward([wb.astype(np.float32)], c32, np.ones_like(y32), None)
    assert g32.dtype == np.float32


# -- errors -----------------------------------------------------------------------------------------------
def test_conv_bad_inputs():
    with pytest.raises(ValueError, match="positive integer"):
        Conv2d(0, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        Conv2d(2, 0)
    with pytest.raises(ValueError, match="padding"):
        Conv2d(2, 3, padding=-1)
    with pytest.raises(ValueError, match="stride"):
        Conv2d(2, 3, stride=(1, 0))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        Conv2d(2, 3).build((16,))
    with pytest.raises(ValueError, match="larger than the padded input"):
        Conv2d(2, 5).build((1, 4, 4))
    with pytest.raises(ValueError, match="larger than the padded input"):
        Conv2d(2, (3, 7), padding=1).build((1, 6, 4))
    Conv2d(2, 5, padding=1).build((1, 3, 3))  # fits once padded
    with pytest.raises(ValueError, match="channel mismatch"):
        Conv2d(2, 3, in_channels=3).build((1, 5, 5))
    layer = Conv2d(2, 3)
    layer.build((3, 6, 6))
    wb = np.zeros((2, 28))
    with pytest.raises(ValueError, match="channel mismatch.*NHWC"):
        layer.forward([wb], np.zeros((2, 6, 6, 3)), Ctx())
    with pytest.raises(ValueError, match="channel mismatch"):
        layer.forward([wb], np.zeros((2, 1, 6, 6)), Ctx())
    with pytest.raises(ValueError, match="expects a batch"):
        layer.forward([wb], np.zeros((3, 6, 6)), Ctx())
    with pytest.raises(ValueError, match="built for per-example shape"):
        layer.forward([wb], np.zeros((2, 3, 7, 6)), Ctx())
    model = Sequential([Conv2d(2, 3)], input_shape=(3, 6, 6))
    with pytest.raises(ValueError, match=r"input must have shape \(N, 3, 6, 6\)"):
        Objective(model, "mse", np.zeros((2, 6, 6, 3)), np.zeros((2, 2, 4, 4)))


def test_numba_not_imported_by_package_import():
    import subprocess
    import sys

    code = "import sys, qnref, qnref.nn.conv, qnref.nn.pool, qnref.nn.norm, qnref.nn.residual, qnref.nn.zoo; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- Objective products on small CNNs ----------------------------------------------------------------------
def check_products(obj, theta, seed=0, tol=TOL, per_example=True, full=False):
    """grad, hvp, ggn_vp, fisher_vp, jvp and per-example gradients of ``obj`` against oracles.

    ``per_example=False`` skips the per-example quantities (batch norm in training mode).
    ``full=True`` also compares the full gradient with finite differences of f.
    """
    r = np.random.default_rng(seed)
    n = theta.size
    v, u = r.standard_normal(n), r.standard_normal(n)
    eps = 1e-6
    p = obj.at(theta)
    g = p.grad
    fd = (obj.value(theta + eps * v) - obj.value(theta - eps * v)) / (2 * eps)
    assert abs(g @ v - fd) <= tol * max(1.0, abs(fd)), f"grad·v {g @ v} vs {fd}"
    if full:
        assert rel_err(g, dense.gradient_fd(obj, theta)) < tol
    # Hessian-vector product: finite differences of the analytic gradient, and symmetry
    hv = obj.hvp(theta, v)
    fd_h = (obj.grad(theta + eps * v) - obj.grad(theta - eps * v)) / (2 * eps)
    assert rel_err(hv, fd_h) < tol, f"hvp {rel_err(hv, fd_h)}"
    hu = obj.hvp(theta, u)
    assert abs(u @ hv - v @ hu) <= 1e-10 * max(1.0, abs(u @ hv))
    # GGN and exact Fisher: explicit (1/N) Σ Jᵢᵀ H_L Jᵢ with finite-difference Jacobians
    J = dense.jacobian_fd(obj, theta)
    HL = dense.output_hessians(obj, theta)
    Gv = np.einsum("ica,icd,idb,b->a", J, HL, J, v) / J.shape[0] + obj.l2 * v
    assert rel_err(obj.ggn_vp(theta, v), Gv) < tol
    assert rel_err(obj.fisher_vp(theta, v, "exact"), Gv - obj.l2 * v) < tol
    # J v
    assert rel_err(obj.jvp(theta, v), np.einsum("icn,n->ic", J, v).reshape(p.z.shape)) < tol
    if per_example:
        P = obj.per_example_grads(theta)
        dz = obj.loss.dz(p.z, obj.y)
        P_fd = np.einsum("icn,ic->in", J, dz)
        assert rel_err(P, P_fd) < tol
        np.testing.assert_allclose(P.mean(axis=0) + obj.l2 * theta, g, rtol=1e-10, atol=1e-13)
        assert rel_err(obj.fisher_vp(theta, v, "empirical"), P.T @ (P @ v) / P.shape[0]) < 1e-10
        # Kronecker taps: Σ over examples and locations of g āᵀ / N is the gradient of W̄ₗ
        check_layer_stats(obj, theta, g - obj.l2 * theta)
    return p


def check_layer_stats(obj, theta, data_grad):
    taps = obj.layer_stats(theta)
    assert set(taps) == {l.name for l in obj.model.kron_layers}
    for name, t in taps.items():
        block = obj.model.layout.index(f"{name}.W")
        gW = data_grad[block.offset : block.stop].reshape(block.shape)
        if t["kind"] == "conv":
            est = np.einsum("nlo,nlk->ok", t["g"], t["a"]) / obj.n_samples
        else:
            est = t["g"].T @ t["a"] / obj.n_samples
        np.testing.assert_allclose(est, gW, rtol=1e-10, atol=1e-13)


def small_cnn(pool="max"):
    P = {"max": MaxPool2d(2), "max-overlap": MaxPool2d(3, stride=2, padding=1), "avg": AvgPool2d(2)}[pool]
    return Sequential([Conv2d(3, 3, padding=1), Tanh(), P, Conv2d(2, 2, stride=1), Tanh(), Flatten(), Dense(3)], input_shape=(2, 6, 5))


@pytest.mark.parametrize("pool", ["max", "max-overlap", "avg"])
@pytest.mark.parametrize("loss", ["softmax_ce", "mse"])
def test_objective_products_small_cnn(pool, loss, kernels):
    model = small_cnn(pool)
    r = np.random.default_rng(7)
    X = r.standard_normal((4,) + model.input_shape)
    y = r.integers(0, 3, 4) if loss == "softmax_ce" else r.standard_normal((4, 3))
    theta = model.init(2, scheme="gaussian", std=0.6)
    obj = Objective(model, loss, X, y, l2=1e-3)
    check_products(obj, theta, seed=1, full=pool == "max")


def test_layer_stats_conv_net_gradient():
    """Σ_locations g āᵀ averaged over examples equals the gradient of W̄ for every conv layer."""
    model = Sequential([Conv2d(4, 3, stride=2, padding=1), Tanh(), Conv2d(3, (2, 3)), Tanh(), Flatten(), Dense(2)], input_shape=(3, 7, 7))
    r = np.random.default_rng(11)
    X = r.standard_normal((5, 3, 7, 7))
    y = r.integers(0, 2, 5)
    theta = model.init(0)
    obj = Objective(model, "softmax_ce", X, y)
    check_layer_stats(obj, theta, obj.grad(theta))
    taps = obj.layer_stats(theta)
    assert taps["0.conv2d"]["a"].shape == (5, 16, 28) and taps["2.conv2d"]["g"].shape == (5, 6, 3)


def test_gram_falls_back_to_per_example_for_conv():
    model = small_cnn("max")
    r = np.random.default_rng(2)
    X = r.standard_normal((3,) + model.input_shape)
    obj = Objective(model, "softmax_ce", X, r.integers(0, 3, 3))
    theta = model.init(1)
    P = obj.per_example_grads(theta)
    np.testing.assert_allclose(obj.gram(theta), P @ P.T, rtol=1e-12)


# -- GPU (skipped without a CUDA device) --------------------------------------------------------------------
@pytest.mark.gpu
def test_conv_gpu_matches_cpu():
    import cupy as cp

    layer = Conv2d(3, 3, stride=2, padding=1)
    layer.build((2, 7, 6))
    r = np.random.default_rng(0)
    wb = r.standard_normal((3, 19))
    x = r.standard_normal((2, 2, 7, 6))
    y, c = layer.forward([wb], x, Ctx())
    yg, cg = layer.forward([cp.asarray(wb)], cp.asarray(x), Ctx())
    np.testing.assert_allclose(backend.to_numpy(yg), y, rtol=1e-12)
    gy = r.standard_normal(y.shape)
    gw, gwg = np.zeros_like(wb), cp.zeros(wb.shape)
    gx = layer.backward([wb], c, gy, [gw])
    gxg = layer.backward([cp.asarray(wb)], cg, cp.asarray(gy), [gwg])
    np.testing.assert_allclose(backend.to_numpy(gxg), gx, rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(gwg), gw, rtol=1e-12)
