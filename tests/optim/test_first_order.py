"""First-order baselines: update rules against hand-written formulas, convergence, safeguards.

The exact-rule tests use a linear least-squares model (one Dense(1) unit, MSE loss, L2), whose
objective is the quadratic f(θ) = ½ mean((X̄θ − y)²) + ½λ‖θ‖² with X̄ = [X 1]; its gradient
A θ − c is written out here, independently of the library's backward pass.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest

from qnref import backend
from qnref.curvature.objective import Objective
from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.optim import first_order as fo
from qnref.optim.base import Problem, state_from_host, state_to_host
from qnref.optim.registry import OPTIMIZERS

NAMES = ["sgd", "momentum", "nag", "adam", "rmsprop", "adadelta", "adagrad", "svrg", "gd-ls"]


# -- problems --------------------------------------------------------------------------------------
class RecordingProblem(Problem):
    """A Problem that remembers the data of every batch it hands out (for the references)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.drawn = []

    def batch(self, size):
        obj = super().batch(size)
        self.drawn.append((backend.to_numpy(obj.X).copy(), backend.to_numpy(obj.y).copy()))
        return obj


def quadratic(n_samples=8, d=3, l2=0.1, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    X = scale * rng.standard_normal((n_samples, d))
    y = rng.standard_normal((n_samples, 1))
    model = Sequential([Dense(1)], input_shape=(d,))
    prob = RecordingProblem(model, "mse", X, y, l2=l2, seed=seed)
    theta0 = np.array([0.5, -1.0, 2.0, 0.3])[: d + 1].copy()
    return prob, theta0


def q_grad(X, y, l2, theta):
    Xb = np.hstack([X, np.ones((X.shape[0], 1))])
    return Xb.T @ (Xb @ theta - y[:, 0]) / X.shape[0] + l2 * theta


def q_value(X, y, l2, theta):
    Xb = np.hstack([X, np.ones((X.shape[0], 1))])
    r = Xb @ theta - y[:, 0]
    return 0.5 * np.mean(r * r) + 0.5 * l2 * theta @ theta


def logistic(n_samples=60, d=4, classes=3, l2=1e-2, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_samples, d))
    y = (X @ rng.standard_normal((d, classes)) + 0.5 * rng.standard_normal((n_samples, classes))).argmax(1)
    model = Sequential([Dense(classes)], input_shape=(d,))
    return RecordingProblem(model, "softmax_ce", X, y, l2=l2, seed=seed), model.init(seed)


@pytest.fixture(scope="module")
def logistic_opt():
    """θ* of the strongly convex logistic problem, by scipy's L-BFGS-B at tight tolerance."""
    from scipy.optimize import minimize

    prob, theta0 = logistic()
    full = prob.full()
    res = minimize(full.value_and_grad, theta0, jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-13, "ftol": 1e-16, "maxiter": 10_000})
    assert np.linalg.norm(full.grad(res.x)) < 1e-9
    return res.x, full.value(res.x)


def run(opt, prob, theta, steps):
    state = opt.init(theta)
    infos = []
    for _ in range(steps):
        theta, state, info = opt.step(theta, state, prob)
        infos.append(info)
    return theta, state, infos


# -- exact update rules on the quadratic --------------------------------------------------------------
def reference(name, X, y, l2, theta, steps, batches=None):
    """The iterates of each formula, written out from the papers (full batch unless ``batches``)."""
    th = theta.copy()
    g_at = lambda t: q_grad(X, y, l2, t)  # noqa: E731
    out = []
    m = np.zeros_like(th)
    v = np.zeros_like(th)
    u = np.zeros_like(th)
    for t in range(1, steps + 1):
        if name == "sgd":
            th = th - 0.05 * g_at(th)
        elif name == "momentum":  # Polyak / Sutskever eq. 1–2, μ = 0.8
            v = 0.8 * v - 0.05 * g_at(th)
            th = th + v
        elif name == "nag":  # Sutskever eq. 3–4
            v = 0.8 * v - 0.05 * g_at(th + 0.8 * v)
            th = th + v
        elif name == "adam":  # Kingma & Ba Alg. 1, lr 0.1, β = (0.8, 0.9), ε = 1e-3
            g = g_at(th)
            m = 0.8 * m + 0.2 * g
            v = 0.9 * v + 0.1 * g**2
            mh, vh = m / (1 - 0.8**t), v / (1 - 0.9**t)
            th = th - 0.1 * mh / (np.sqrt(vh) + 1e-3)
        elif name == "rmsprop":  # Tieleman & Hinton, lr 0.1, ρ = 0.7, ε = 1e-3
            g = g_at(th)
            v = 0.7 * v + 0.3 * g**2
            th = th - 0.1 * g / (np.sqrt(v) + 1e-3)
        elif name == "rmsprop-ren":  # Ren's thesis variant: Adam without bias correction, β₁ = 0.5
            g = g_at(th)
            m = 0.5 * m + 0.5 * g
            v = 0.7 * v + 0.3 * g**2
            th = th - 0.1 * m / (np.sqrt(v) + 1e-3)
        elif name == "adagrad":  # Duchi et al., lr 0.2, δ = 1e-3
            g = g_at(th)
            v = v + g**2
            th = th - 0.2 * g / (np.sqrt(v) + 1e-3)
        elif name == "adadelta":  # Zeiler Alg. 1, ρ = 0.9, ε = 1e-2, lr 0.5
            g = g_at(th)
            v = 0.9 * v + 0.1 * g**2
            d = -np.sqrt(u + 1e-2) / np.sqrt(v + 1e-2) * g
            u = 0.9 * u + 0.1 * d**2
            th = th + 0.5 * d
        else:
            raise KeyError(name)
        out.append(th.copy())
    return out


RULES = {
    "sgd": fo.SGD(lr=0.05, batch_size=None),
    "momentum": fo.Momentum(lr=0.05, momentum=0.8, batch_size=None),
    "nag": fo.NAG(lr=0.05, momentum=0.8, batch_size=None),
    "adam": fo.Adam(lr=0.1, beta1=0.8, beta2=0.9, eps=1e-3, batch_size=None),
    "rmsprop": fo.RMSprop(lr=0.1, rho=0.7, eps=1e-3, batch_size=None),
    "rmsprop-ren": fo.RMSprop(lr=0.1, rho=0.7, eps=1e-3, beta1=0.5, batch_size=None),
    "adagrad": fo.AdaGrad(lr=0.2, eps=1e-3, batch_size=None),
    "adadelta": fo.AdaDelta(lr=0.5, rho=0.9, eps=1e-2, batch_size=None),
}


@pytest.mark.parametrize("name", list(RULES))
def test_update_rule_matches_formula(name):
    prob, theta = quadratic()
    X, y = backend.to_numpy(prob.X), backend.to_numpy(prob.y)
    expected = reference(name, X, y, prob.l2, theta, 3)
    opt, state = RULES[name], RULES[name].init(theta)
    for k in range(3):
        theta_old = theta
        theta, state, info = opt.step(theta, state, prob)
        np.testing.assert_allclose(theta, expected[k], rtol=1e-12, atol=1e-14)
        assert info.accepted and not info.nonfinite
        assert info.step_norm == pytest.approx(np.linalg.norm(theta - theta_old), rel=1e-12)
        assert info.batch_size == 8 and info.evals == 1
        assert info.loss == info.loss_start
        if name != "nag":  # NAG reports the loss at its look-ahead point
            assert info.loss_start == pytest.approx(q_value(X, y, prob.l2, theta_old), rel=1e-12)
    assert prob.epochs == 3  # batch_size=None counts one epoch per step


def test_expected_arrays_hand_checked():
    """First SGD and Adam steps written as literal numbers (1-D model y = w x + b, no L2)."""
    X, y = np.array([[1.0], [2.0]]), np.array([[1.0], [0.0]])
    prob = Problem(Sequential([Dense(1)], input_shape=(1,)), "mse", X, y)
    theta = np.array([1.0, 0.0])  # residuals r = (0, 2), grad = mean(r x̄) = (2, 1)
    th, _, _ = fo.SGD(lr=0.1, batch_size=None).step(theta, fo.SGD().init(theta), prob)
    np.testing.assert_allclose(th, [0.8, -0.1], rtol=0, atol=1e-15)
    # Adam's first step is −lr·g/(|g| + ε) per coordinate
    th, _, _ = fo.Adam(lr=0.1, eps=1e-8, batch_size=None).step(theta, fo.Adam().init(theta), prob)
    np.testing.assert_allclose(th, [1 - 0.1 * 2 / (2 + 1e-8), -0.1 * 1 / (1 + 1e-8)], rtol=1e-14)


def test_svrg_rule_matches_formula():
    """Snapshot every 3 steps; inner steps use ∇f_B(θ) − ∇f_B(θ̃) + μ̃ on the drawn batch."""
    prob, theta = quadratic()
    X, y, l2 = prob.X, prob.y, prob.l2
    opt = fo.SVRG(lr=0.1, inner_steps=3, batch_size=2)
    state = opt.init(theta)
    th = theta.copy()
    snap = mu = None
    n_batches = 0
    for k in range(7):
        theta, state, info = opt.step(theta, state, prob)
        if k % 3 == 0:
            snap, mu = th.copy(), q_grad(X, y, l2, th)
            th = th - 0.1 * mu
            assert info.extra["snapshot"] and info.batch_size == 8 and info.evals == 1
        else:
            Xb, yb = prob.drawn[n_batches]
            n_batches += 1
            th = th - 0.1 * (q_grad(Xb, yb, l2, th) - q_grad(Xb, yb, l2, snap) + mu)
            assert not info.extra["snapshot"] and info.batch_size == 2 and info.evals == 2
        np.testing.assert_allclose(theta, th, rtol=1e-12, atol=1e-14)
    assert n_batches == len(prob.drawn) == 4
    assert fo.SVRG(batch_size=2).period(prob) == 8  # m = ⌈2N / b⌉


def test_gd_ls_rule_matches_backtracking():
    """α = 1, ½, ¼, … until f(θ − αg) − f(θ) ≤ −0.1 α‖g‖² (scaled data so that α = 1 fails)."""
    prob, theta = quadratic(scale=3.0)
    X, y, l2 = prob.X, prob.y, prob.l2
    th = theta.copy()
    opt = fo.GDLineSearch(batch_size=None)
    state = opt.init(theta)
    shrunk = False
    for _ in range(3):
        g, f0 = q_grad(X, y, l2, th), q_value(X, y, l2, th)
        alpha, trials = 1.0, 1
        while q_value(X, y, l2, th - alpha * g) - f0 > -0.1 * alpha * (g @ g):
            alpha, trials = alpha / 2, trials + 1
        shrunk |= alpha < 1
        th = th - alpha * g
        theta, state, info = opt.step(theta, state, prob)
        np.testing.assert_allclose(theta, th, rtol=1e-12, atol=1e-14)
        assert info.step_size == alpha and info.evals == 1 + trials
        assert info.loss == pytest.approx(q_value(X, y, l2, th), rel=1e-12)
    assert shrunk


# -- convergence on a strongly convex logistic regression ----------------------------------------------
# (optimizer, steps, tolerance on ‖θ − θ*‖, on ‖∇f(θ)‖), full batch, hyperparameters tuned for this
# problem (‖θ*‖ ≈ 3.7, Hessian spectrum [0.01, 0.17] at θ*). θ* comes from L-BFGS-B, which stops on
# relative f-reduction at machine precision ~5e-9 away from the exact minimizer, so methods that converge
# exactly are held to 1e-7 in θ and, more sharply, to ‖∇f‖ ≤ 1e-10. Constant-step RMSprop has no
# bias-corrected decay of its step and hovers at an η-sized distance: it is held to 1e-2.
CONVERGENCE = [
    (fo.SGD(lr=4.0, batch_size=None), 600, 1e-7, 1e-10),
    (fo.Momentum(lr=4.0, momentum=0.5, batch_size=None), 300, 1e-7, 1e-10),
    (fo.NAG(lr=4.0, momentum=0.5, batch_size=None), 300, 1e-7, 1e-10),
    (fo.GDLineSearch(alpha0=8.0, batch_size=None), 300, 1e-7, 1e-10),
    (fo.SVRG(lr=4.0, batch_size=None), 600, 1e-7, 1e-10),
    (fo.AdaGrad(lr=1.0, batch_size=None), 1000, 1e-7, 1e-10),
    (fo.Adam(lr=0.1, batch_size=None), 1000, 1e-7, 1e-10),
    (fo.AdaDelta(batch_size=None), 2000, 1e-4, 1e-5),
    (fo.RMSprop(lr=3e-3, batch_size=None), 1000, 1e-2, 1e-3),
]


@pytest.mark.parametrize("opt,steps,tol,gtol", CONVERGENCE, ids=lambda o: getattr(o, "name", None))
def test_converges_on_logistic_regression(opt, steps, tol, gtol, logistic_opt):
    theta_star, f_star = logistic_opt
    prob, theta = logistic()
    theta, _, infos = run(opt, prob, theta, steps)
    assert all(i.accepted for i in infos)
    assert np.linalg.norm(theta - theta_star) <= tol
    assert np.linalg.norm(prob.full().grad(theta)) <= gtol
    assert prob.full().value(theta) - f_star <= tol**2 + 1e-15


def test_svrg_converges_linearly_with_minibatches(logistic_opt):
    """‖∇f(θ̃ₛ)‖ = ‖μ̃ₛ‖ at successive snapshots contracts at a linear rate (batches of 10 of 60,
    m = 24 inner steps, η = 4 ≈ 0.7/L); plain SGD with the same η and steps stalls at its noise floor."""
    theta_star, _ = logistic_opt
    prob, theta0 = logistic()
    opt = fo.SVRG(lr=4.0, batch_size=10, inner_steps=24)
    theta, state = theta0, opt.init(theta0)
    norms = []
    for _ in range(20 * 24):
        theta, state, info = opt.step(theta, state, prob)
        if info.extra["snapshot"]:
            norms.append(np.linalg.norm(state.mu))
    norms = np.array(norms)
    assert len(norms) == 20
    assert norms[-1] < 1e-9 * norms[0]
    ratios = norms[1:] / norms[:-1]
    rate = (norms[-1] / norms[0]) ** (1 / (len(norms) - 1))
    assert rate < 0.4 and ratios.max() < 0.8  # linear: ≥ 60 % per outer loop on average, never stalls
    assert np.linalg.norm(theta - theta_star) < 1e-7
    sgd_theta, _, _ = run(fo.SGD(lr=4.0, batch_size=10), *logistic(), 20 * 24)
    assert np.linalg.norm(prob.full().grad(sgd_theta)) > 1e3 * norms[-1]


def test_gd_ls_accepted_steps_satisfy_armijo():
    prob, theta = logistic()
    opt = fo.GDLineSearch(alpha0=16.0, batch_size=10)  # large α₀ so that backtracking happens
    state = opt.init(theta)
    n_shrunk = 0
    for _ in range(40):
        old = theta
        theta, state, info = opt.step(theta, state, prob)
        Xb, yb = prob.drawn[-1]
        obj = Objective(prob.model, "softmax_ce", Xb, yb, prob.l2)
        f0, g = obj.value_and_grad(old)
        f1 = obj.value(theta)
        assert info.accepted
        alpha = info.step_size
        np.testing.assert_allclose(theta, old - alpha * g, rtol=1e-13, atol=1e-15)
        assert f1 - f0 <= 0.1 * alpha * (g @ -g)
        assert info.loss == pytest.approx(f1, rel=1e-13) and info.loss_start == pytest.approx(f0, rel=1e-13)
        if alpha < 16.0:  # the previous trial 2α failed the test (first acceptable α is taken)
            n_shrunk += 1
            assert obj.value(old - 2 * alpha * g) - f0 > 0.1 * 2 * alpha * (g @ -g)
    assert n_shrunk > 0


# -- hyperparameter validation, registry ---------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs,param", [
    (fo.SGD, {"lr": 0.0}, "lr"),
    (fo.SGD, {"lr": -1.0}, "lr"),
    (fo.SGD, {"lr": math.nan}, "lr"),
    (fo.SGD, {"batch_size": 0}, "batch_size"),
    (fo.SGD, {"batch_size": 2.5}, "batch_size"),
    (fo.Momentum, {"momentum": 1.0}, "momentum"),
    (fo.NAG, {"momentum": -0.1}, "momentum"),
    (fo.Adam, {"beta1": 1.0}, "beta1"),
    (fo.Adam, {"beta2": 1.5}, "beta2"),
    (fo.Adam, {"eps": 0.0}, "eps"),
    (fo.RMSprop, {"rho": 1.0}, "rho"),
    (fo.RMSprop, {"beta1": -0.5}, "beta1"),
    (fo.AdaGrad, {"eps": -1e-10}, "eps"),
    (fo.AdaDelta, {"rho": 2.0}, "rho"),
    (fo.AdaDelta, {"eps": math.inf}, "eps"),
    (fo.AdaDelta, {"lr": 0}, "lr"),
    (fo.SVRG, {"inner_steps": 0}, "inner_steps"),
    (fo.SVRG, {"lr": -0.1}, "lr"),
    (fo.GDLineSearch, {"c1": 1.0}, "c1"),
    (fo.GDLineSearch, {"c1": 0.0}, "c1"),
    (fo.GDLineSearch, {"shrink": 1.0}, "shrink"),
    (fo.GDLineSearch, {"alpha0": 0.0}, "alpha0"),
    (fo.GDLineSearch, {"max_evals": 0}, "max_evals"),
])
def test_invalid_hyperparameters_raise(cls, kwargs, param):
    with pytest.raises(ValueError, match=param):
        cls(**kwargs)


def test_registry_and_defaults():
    for name in NAMES:
        assert name in OPTIMIZERS and OPTIMIZERS[name].name == name
        assert OPTIMIZERS[name].family == "first-order"
    assert fo.Adam().hyperparameters() == {"lr": 1e-3, "batch_size": 128, "eps": 1e-8, "beta1": 0.9, "beta2": 0.999}
    assert fo.RMSprop().hyperparameters() == {"lr": 1e-3, "batch_size": 128, "eps": 1e-8, "rho": 0.9, "beta1": 0.0,
                                           "warm_start": False}
    assert fo.AdaDelta().hyperparameters() == {"lr": 1.0, "batch_size": 128, "rho": 0.95, "eps": 1e-6}
    assert fo.GDLineSearch().hyperparameters() == {"batch_size": 128, "alpha0": 1.0, "c1": 0.1, "shrink": 0.5,
                                                  "max_evals": 30}
    assert "lr=0.01" in repr(fo.SGD())


# -- safeguards ------------------------------------------------------------------------------------------
class _PoisonedPoint:
    def __init__(self, p):
        self._p = p
        self.value = p.value

    @property
    def grad(self):
        g = self._p.grad.copy()
        g[1] = np.nan
        return g


class _PoisonedObjective:
    def __init__(self, obj):
        self._obj = obj
        self.n_samples = obj.n_samples

    def at(self, theta):
        return _PoisonedPoint(self._obj.at(theta))


class PoisonedProblem(RecordingProblem):
    """Gradients (of batches and of the full set) turn NaN once ``poison`` is set; losses stay finite."""

    poison = False

    def _wrap(self, obj):
        return _PoisonedObjective(obj) if self.poison and not isinstance(obj, _PoisonedObjective) else obj

    def batch(self, size):
        return self._wrap(super().batch(size))

    def full(self):
        return self._wrap(super().full())


def _instance(name):
    kw = {"batch_size": 4}
    if name == "svrg":
        kw["inner_steps"] = 2
    return OPTIMIZERS[name](**kw)


@pytest.mark.parametrize("name", NAMES)
def test_nan_gradient_does_not_move(name):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((12, 3)), rng.standard_normal((12, 1))
    prob = PoisonedProblem(Sequential([Dense(1)], input_shape=(3,)), "mse", X, y, l2=1e-3)
    opt = _instance(name)
    theta = np.array([0.1, 0.2, -0.3, 0.0])
    theta, state, _ = run(opt, prob, theta, 3)
    before, host_state = theta.copy(), state_to_host(state)
    prob.poison = True
    for _ in range(3):  # covers SVRG's snapshot and inner steps
        theta, state, info = opt.step(theta, state, prob)
        assert np.all(np.isfinite(theta)) and np.array_equal(theta, before)
        assert info.nonfinite and not info.accepted and info.step_norm == 0.0
    _assert_state_equal(state_to_host(state), host_state)
    prob.poison = False
    theta, state, info = opt.step(theta, state, prob)
    assert info.accepted and np.all(np.isfinite(theta))


@pytest.mark.parametrize("name", NAMES)
def test_overflowing_loss_does_not_move(name):
    """At θ = 1e200 the least-squares loss overflows to inf (real objective, no mocking)."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((12, 3)), rng.standard_normal((12, 1))
    prob = Problem(Sequential([Dense(1)], input_shape=(3,)), "mse", X, y)
    opt = _instance(name)
    theta = np.full(4, 1e200)
    state = opt.init(theta)
    with np.errstate(over="ignore", invalid="ignore"):
        new, state2, info = opt.step(theta, state, prob)
    assert np.array_equal(new, theta) and info.nonfinite and not info.accepted
    assert math.isinf(info.loss_start) or math.isnan(info.loss_start)


def _assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k])
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip(name):
    prob, theta = logistic()
    opt = _instance(name)
    theta, state, _ = run(opt, prob, theta, 3)
    host = state_to_host(state)
    restored = state_from_host(type(state), host)
    assert type(restored) is type(state)
    _assert_state_equal(state_to_host(restored), host)
    for f in dataclasses.fields(state):
        assert type(getattr(restored, f.name)) is type(getattr(state, f.name))
    # continuing from the restored state on a copy of the problem's stream gives the same iterates
    twin, _ = logistic()
    twin.load_state(prob.state())
    a, _, _ = opt.step(theta, state, prob)
    b, _, _ = opt.step(theta, restored, twin)
    np.testing.assert_array_equal(a, b)


# -- GPU (CuPy) ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not backend.gpu_available(), reason="no usable CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_gpu_matches_cpu(name):
    import cupy

    prob, theta = logistic()
    gprob = Problem(prob.model, "softmax_ce", cupy.asarray(prob.X), cupy.asarray(prob.y), l2=prob.l2, seed=1)
    opt = OPTIMIZERS[name](batch_size=None)
    a, sa, _ = run(opt, prob, theta, 3)
    b, sb, infos = run(opt, gprob, cupy.asarray(theta), 3)
    assert isinstance(b, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(b), a, rtol=1e-10, atol=1e-12)
    for key, val in state_to_host(sa).items():
        other = state_to_host(sb)[key]
        if isinstance(val, np.ndarray):
            np.testing.assert_allclose(other, val, rtol=1e-10, atol=1e-12)
        else:
            assert other == val
    assert all(isinstance(i.loss, float) and isinstance(i.step_norm, float) for i in infos)


# -- training a small MLP on digits ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    d = sklearn_datasets.load_digits()
    X, y = d.data / 16.0, d.target.astype(np.int64)
    return X[:1200], y[:1200], X[1200:], y[1200:]


# (optimizer, epochs, minimum test accuracy) on the 597 test digits; batch 128 (≈ 9.4 steps per epoch).
# Default hyperparameters except where a larger rate reaches 0.90 in fewer epochs; each run < 0.2 s.
# SVRG's epochs include its snapshot passes (problem.full() counts one data pass).
TRAINING = [
    (fo.Adam(lr=3e-3), 30, 0.90),
    (fo.Momentum(lr=0.1), 10, 0.90),
    (fo.NAG(lr=0.1), 10, 0.90),
    (fo.RMSprop(), 60, 0.90),
    (fo.SGD(lr=0.3), 30, 0.90),
    (fo.AdaGrad(lr=0.1), 10, 0.90),
    (fo.AdaDelta(), 30, 0.90),
    (fo.SVRG(lr=0.3), 40, 0.90),
    (fo.GDLineSearch(), 10, 0.90),
]


@pytest.mark.parametrize("opt,epochs,min_acc", TRAINING, ids=lambda o: getattr(o, "name", None))
def test_mlp_on_digits(opt, epochs, min_acc, digits):
    Xtr, ytr, Xte, yte = digits
    model = Sequential([Dense(32), Tanh(), Dense(10)], input_shape=(64,))
    theta = model.init(0)
    prob = Problem(model, "softmax_ce", Xtr, ytr, l2=1e-4, seed=0)
    state = opt.init(theta)
    t0 = time.perf_counter()
    while prob.epochs < epochs:
        theta, state, info = opt.step(theta, state, prob)
    z, _ = model.forward(theta, Xte, train=False)
    acc = float(np.mean(z.argmax(1) == yte))
    assert acc >= min_acc, f"{opt.name}: test accuracy {acc:.3f} after {epochs} epochs"
    assert time.perf_counter() - t0 < 5.0
