"""Losses: value, output gradient, Hessian products, square-root factors and target sampling."""
import itertools

import numpy as np
import pytest

from qnref.nn.losses import MeanSquaredError, SigmoidCrossEntropy, SoftmaxCrossEntropy, get_loss
from helpers import EPS, rel_err

LOSSES = ["softmax_ce", "softmax_ce_soft", "mse", "sigmoid_ce"]


def make(name, n, c, r):
    z = r.standard_normal((n, c)) * 2
    if name == "softmax_ce":
        return SoftmaxCrossEntropy(), z, r.integers(0, c, n)
    if name == "softmax_ce_soft":
        y = r.random((n, c))
        return SoftmaxCrossEntropy(), z, y / y.sum(1, keepdims=True)  # probability rows (other masses are refused)
    if name == "mse":
        return MeanSquaredError(), z, r.standard_normal((n, c))
    return SigmoidCrossEntropy(), z, r.random((n, c))


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("n", [1, 4])
def test_gradient_hessian_against_fd(name, n, rng):
    loss, z, y = make(name, n, 5, rng)
    loss.check(z.shape, y)
    dz = loss.dz(z, y)
    H = loss.hessian(z, y)
    fd_g, fd_h = np.empty_like(dz), np.empty_like(H)
    for k in range(z.shape[1]):
        e = np.zeros_like(z)
        e[:, k] = EPS
        fd_g[:, k] = (loss.per_example(z + e, y) - loss.per_example(z - e, y)) / (2 * EPS)
        fd_h[:, :, k] = (loss.dz(z + e, y) - loss.dz(z - e, y)) / (2 * EPS)
    assert rel_err(dz, fd_g) < 1e-8
    assert rel_err(H, fd_h) < 1e-8
    v = rng.standard_normal(z.shape)
    assert rel_err(loss.hvp(z, y, v), np.einsum("ncd,nd->nc", H, v)) < 1e-13
    S = loss.sqrt_hessian(z, y)
    assert rel_err(np.einsum("nck,ndk->ncd", S, S), H) < 1e-13
    np.testing.assert_allclose(loss.value(z, y), loss.per_example(z, y).mean(), rtol=1e-15)


def test_softmax_ce_value_matches_definition(rng):
    z = rng.standard_normal((3, 4))
    y = np.array([0, 3, 1])
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(SoftmaxCrossEntropy().per_example(z, y), -np.log(p[np.arange(3), y]), rtol=1e-13)
    zbig = np.array([[1000.0, 0.0, -1000.0]])
    assert np.isfinite(SoftmaxCrossEntropy().per_example(zbig, np.array([2]))).all()


def test_sigmoid_ce_matches_definition(rng):
    z = rng.standard_normal((3, 4))
    y = rng.random((3, 4))
    p = 1 / (1 + np.exp(-z))
    ref = -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum(1)
    np.testing.assert_allclose(SigmoidCrossEntropy().per_example(z, y), ref, rtol=1e-12)


def test_fisher_identity_exact_expectation(rng):
    """E_{ỹ ~ p(y|z)}[∇ℓ ∇ℓᵀ] = H_L, computed exactly by enumerating the outcomes."""
    z = rng.standard_normal((1, 3))
    ce = SoftmaxCrossEntropy()
    p = np.exp(z) / np.exp(z).sum()
    E = sum(p[0, k] * np.outer(ce.dz(z, np.array([k]))[0], ce.dz(z, np.array([k]))[0]) for k in range(3))
    assert rel_err(E, ce.hessian(z, np.array([0]))[0]) < 1e-14
    bce = SigmoidCrossEntropy()
    q = 1 / (1 + np.exp(-z[0]))
    E = np.zeros((3, 3))
    for bits in itertools.product([0.0, 1.0], repeat=3):
        t = np.array([bits])
        prob = np.prod(np.where(t[0] == 1, q, 1 - q))
        g = bce.dz(z, t)[0]
        E += prob * np.outer(g, g)
    assert rel_err(E, bce.hessian(z, t)[0]) < 1e-14


def test_sampling_follows_predictive_distribution():
    r = np.random.default_rng(0)
    z = np.array([[0.0, 1.0, -1.0]] * 20000)
    p = np.exp(z[0]) / np.exp(z[0]).sum()
    s = SoftmaxCrossEntropy().sample(z, r)
    freq = np.bincount(s, minlength=3) / len(s)
    assert np.abs(freq - p).max() < 0.01  # ~4 standard errors
    b = SigmoidCrossEntropy().sample(z, r)
    assert np.abs(b.mean(0) - 1 / (1 + np.exp(-z[0]))).max() < 0.01
    g = MeanSquaredError().sample(z, r)
    assert np.abs(g.mean(0) - z[0]).max() < 0.03 and np.abs(g.std(0) - 1).max() < 0.02


@pytest.mark.parametrize(
    "loss,z_shape,y,msg",
    [
        ("softmax_ce", (3, 4), np.array([0, 1, 4]), "labels must lie in"),
        ("softmax_ce", (3, 4), np.array([0.0, 1.0, 2.0]), "must be integers"),
        ("softmax_ce", (3, 4), np.array([0, 1]), "2 labels for 3 examples"),
        ("mse", (3, 4), np.zeros((3, 5)), "output shape"),
        ("sigmoid_ce", (2, 2), np.array([[0.0, 2.0], [0.5, 0.5]]), r"lie in \[0, 1\]"),
    ],
)
def test_bad_targets(loss, z_shape, y, msg):
    with pytest.raises(ValueError, match=msg):
        get_loss(loss).check(z_shape, y)


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("hinge")


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_sigmoid_and_softplus_match_scipy_and_are_shared(dt):
    """The stable logistic and softplus (one implementation for the activations and the sigmoid
    cross-entropy) against independent oracles: scipy.special.expit and numpy.logaddexp(0, x),
    within 4 ulp (absolute: the smallest normal number, where results are subnormal), including
    ±inf, ±0 and NaN; the loss's p and dz use the same bits."""
    from scipy.special import expit

    from qnref.nn.activations import Sigmoid, Softplus, sigmoid, softplus
    from qnref.nn.losses import SigmoidCrossEntropy

    x = (np.random.default_rng(3).standard_normal(20000) * 40).astype(dt)
    x[:6] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30]
    with np.errstate(over="ignore", invalid="ignore"):  # the oracles on NaN and inf
        for got, ref in ((sigmoid(np, x), expit(x)), (softplus(np, x), np.logaddexp(dt(0), x))):
            assert got.dtype == dt
            assert np.array_equal(np.isnan(got), np.isnan(x))
            ok = ~np.isnan(x)
            eps, tiny = np.finfo(dt).eps, np.finfo(dt).tiny
            np.testing.assert_allclose(got[ok], ref[ok].astype(dt), rtol=4 * eps, atol=tiny)
    z, y = x[:19990].reshape(-1, 10), np.random.default_rng(4).random((1999, 10)).astype(dt)
    loss = SigmoidCrossEntropy()
    assert sigmoid(np, z).tobytes() == loss._p(z).tobytes() == Sigmoid().f(np, z).tobytes()
    assert (sigmoid(np, z) - y).tobytes() == loss.dz(z, y).tobytes()
    assert sigmoid(np, z).tobytes() == Softplus().d1(np, z, None).tobytes()


@pytest.mark.parametrize("dt", ["float64", "float32"])
@pytest.mark.parametrize("name", LOSSES)
def test_predictive_reuse_gives_the_same_bits(name, dt):
    """dz, hvp, sqrt_hessian, hessian and sample with ``p=loss.predictive(z)`` are bit for bit the
    calls that compute p themselves (z with saturating entries and a (300, 300) output, so that the
    sigmoid cross-entropy's rowwise passes split over the threads); mse has nothing to cache."""
    r = np.random.default_rng(7)
    for n, c in ((4, 5), (300, 300)):
        loss, z, y = make(name, n, c, r)
        z = z.astype(dt)
        z.flat[:3] = [40.0, -40.0, 0.0]
        y = y.astype(dt) if y.dtype.kind == "f" else y
        p = loss.predictive(z)
        if name == "mse":
            assert p is None
            continue
        v = r.standard_normal(z.shape).astype(dt)
        for method, args in (("dz", (z, y)), ("hvp", (z, y, v)), ("sqrt_hessian", (z, y)), ("hessian", (z, y))):
            got, want = getattr(loss, method)(*args, p=p), getattr(loss, method)(*args)
            assert got.dtype == want.dtype and np.array_equal(got, want), (method, n)
        got = loss.sample(z, np.random.default_rng(3), p=p)
        assert np.array_equal(got, loss.sample(z, np.random.default_rng(3)))


@pytest.mark.parametrize("loss", ["sigmoid_ce", "softmax_ce"])
def test_a_point_computes_its_predictive_distribution_once(monkeypatch, loss):
    """The sampled targets, their output gradients and three G v products at one point share one
    predictive pass, after the gradient's own fused pass (the same bits as a point that recomputes p
    for every call)."""
    from qnref.curvature.objective import Objective
    from qnref.nn.activations import Tanh
    from qnref.nn.dense import Dense
    from qnref.nn.model import Sequential

    r = np.random.default_rng(2)
    m = Sequential([Dense(6), Tanh(), Dense(4)], input_shape=(3,))
    X = r.standard_normal((10, 3))
    y = r.random((10, 4)) if loss == "sigmoid_ce" else r.integers(0, 4, 10)
    theta = m.init(0)
    vs = [r.standard_normal(m.n_params) for _ in range(3)]

    def run():
        p = Objective(m, loss, X, y, rng=np.random.default_rng(5)).at(theta)
        return [p.grad, p.sampled_targets(), p.output_grads("sampled")] + [p.ggn_vp(v) for v in vs]

    import qnref.nn.losses as L

    calls = []
    for fname in ("_softmax", "sigmoid", "sigmoid_expr"):              # every σ / softmax pass of the losses
        real = getattr(L, fname)
        monkeypatch.setattr(L, fname, lambda *a, _real=real, _f=fname: calls.append(_f) or _real(*a))
    cached = run()
    # the gradient's fused ∂ℓ/∂z pass, then one p for the sampled targets, their gradients and the G v
    assert calls == (["sigmoid_expr", "sigmoid"] if loss == "sigmoid_ce" else ["_softmax", "_softmax"])
    cls = type(Objective(m, loss, X, y).loss)
    monkeypatch.setattr(cls, "predictive", lambda self, z: None)      # every call computes p itself
    for a, b in zip(cached, run()):
        assert np.array_equal(a, b)
