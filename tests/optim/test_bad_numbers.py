"""Issue 19 items 6–9 on the optimizer side: NaN trial gradients named in the step info, the
scale-safe trust-region solver (rows ×1e150), and the objective's accepted-but-wrong inputs."""
import math

import numpy as np
import pytest

from qnref.curvature.objective import NonFiniteError, Objective, Point
from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.optim import load_all, make_optimizer
from qnref.optim.base import Problem
from qnref.optim.trust_region import _norm, _secular_slope, solve_dense_subproblem
from qnref.validate import ValidationError


def _mlp():
    return Sequential([Dense(5), Tanh(), Dense(3)], input_shape=(4,))


def _data(n=200, seed=0):
    r = np.random.default_rng(seed)
    return r.standard_normal((n, 4)), r.integers(0, 3, n)


# -- item 6: a NaN gradient at the trial points (finite loss) ------------------------------------------
class _NaNGradPoint(Point):
    @property
    def grad(self):
        g = Point.grad.fget(self)
        return g * math.nan if np.linalg.norm(self.theta - self.obj.center) > 1e-9 else g


class _NaNGradObjective(Objective):
    def at(self, theta):
        p = super().at(theta)
        p.__class__ = _NaNGradPoint
        return p


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name", ["lbfgs", "s-lbfgs", "lsr1-ls", "gd-ls"])
def test_nan_trial_gradients_are_reported_as_such(name):
    model = _mlp()
    X, y = _data()
    prob = Problem(model, "softmax_ce", X, y, 1e-3, seed=0)
    th0 = model.init(0)
    for obj in [prob._full]:
        obj.__class__ = _NaNGradObjective
        obj.center = th0
    orig = prob.subset

    def subset(idx):
        o = orig(idx)
        o.__class__, o.center = _NaNGradObjective, th0
        return o
    prob.subset = subset
    opt = make_optimizer(name, batch_size=None)
    th, st, info = opt.step(th0, opt.init(th0), prob)
    assert np.all(np.isfinite(th))
    if name == "lbfgs":  # the Wolfe search read ∇f at every trial
        assert info.nonfinite and not info.accepted
        assert "non-finite gradient" in info.extra["message"], info.extra["message"]
    else:  # Armijo searches use f only; the NaN ∇f at θ⁺ shows up when it is used
        th, st, info2 = opt.step(th, st, prob)
        assert np.all(np.isfinite(th))
        assert info.nonfinite or info.skipped or info2.nonfinite or info2.skipped


# -- item 8: the trust-region solver on finite but huge inputs -----------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name", ["lsr1-tr", "lssr1-tr", "mb-lsr1", "s-lsr1"])
@pytest.mark.parametrize("where", ["y", "X"])
def test_huge_rows_do_not_overflow_the_tr_solver(name, where):
    r = np.random.default_rng(0)
    model = _mlp()
    X = r.standard_normal((300, 4))
    Y = r.standard_normal((300, 3))
    (Y if where == "y" else X)[:3] *= 1e150
    prob = Problem(model, "mse", X, Y, 0.0, seed=0)
    opt = make_optimizer(name, batch_size=300)
    th = model.init(0)
    st = opt.init(th)
    for _ in range(10):
        th, st, info = opt.step(th, st, prob)  # no OverflowError
        assert np.all(np.isfinite(th))
        assert math.isfinite(info.loss) or info.nonfinite or not info.accepted


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("scale", [1e150, 1e300])
@pytest.mark.parametrize("name", sorted(load_all()))
def test_every_optimizer_survives_huge_rows(name, scale):
    """Finite but huge targets (×1e150: f ≈ 1e298; ×1e300: f overflows to inf) for every method."""
    r = np.random.default_rng(0)
    model = _mlp()
    X, Y = r.standard_normal((300, 4)), r.standard_normal((300, 3))
    Y[:3] *= scale
    prob = Problem(model, "mse", X, Y, 0.0, seed=0)
    opt = make_optimizer(name)
    th = model.init(0)
    st = opt.init(th)
    for _ in range(4):
        th, st, info = opt.step(th, st, prob)
        assert np.all(np.isfinite(th))


@pytest.mark.parametrize("scale", [1e-200, 1e-120, 1e120, 1e200, 1e300])
def test_scale_safe_norm_and_secular_slope(scale):
    v = np.array([3.0, -4.0, 0.0]) * scale
    assert _norm(v) == pytest.approx(5.0 * scale, rel=1e-15)
    d = np.array([2.0, 1.0, 5.0])
    q = v / d
    pn = _norm(q)
    ref = float(np.sum((q / pn) ** 2 / d)) / pn
    assert math.isfinite(pn) and pn > 0
    got = _secular_slope(q, d, pn)
    assert got == pytest.approx(ref, rel=1e-12)


def test_normal_scale_norm_is_numpy_bit_for_bit():
    v = np.random.default_rng(1).standard_normal(17)
    assert _norm(v) == float(np.linalg.norm(v))
    d = np.abs(v) + 1.0
    q = v / d
    pn = float(np.linalg.norm(q))
    assert _secular_slope(q, d, pn) == float(np.sum(q * q / d)) / pn ** 3


@pytest.mark.parametrize("scale", [1.0, 1e150, 1e300])
def test_dense_subproblem_scales(scale):
    r = np.random.default_rng(2)
    A = r.standard_normal((6, 6))
    B = (A + A.T) / 2
    g = r.standard_normal(6)
    base = solve_dense_subproblem(g, B, 0.5)
    sol = solve_dense_subproblem(g * scale, B, 0.5)  # σ scales with g; p stays on the boundary
    assert np.all(np.isfinite(sol.p)) and sol.step_norm == pytest.approx(0.5, rel=1e-9)
    if scale == 1.0:
        np.testing.assert_array_equal(sol.p, base.p)


# -- item 9: the objective's accepted-but-wrong inputs ------------------------------------------------
def test_empty_batch_is_refused():
    model = _mlp()
    X, y = _data(10)
    with pytest.raises(ValueError, match="batch is empty"):
        Objective(model, "softmax_ce", X[:0], y[:0])


@pytest.mark.parametrize("l2,exc", [(None, ValidationError), (math.inf, ValidationError), (math.nan, ValidationError),
                                    (-1.0, ValidationError), ("0.1", ValidationError), (True, ValidationError)])
def test_bad_l2_is_refused_by_name(l2, exc):
    model = _mlp()
    X, y = _data(10)
    with pytest.raises(exc, match="^l2 must be"):
        Objective(model, "softmax_ce", X, y, l2)
    with pytest.raises(exc, match="^l2 must be"):
        Problem(model, "softmax_ce", X, y, l2)


@pytest.mark.parametrize("product", ["hvp", "ggn_vp", "fisher_vp", "jvp"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_directions_raise(product, bad):
    model = _mlp()
    X, y = _data(10)
    obj = Objective(model, "softmax_ce", X, y, 1e-3)
    th = model.init(0)
    v = np.ones_like(th)
    v[3] = bad
    with pytest.raises(NonFiniteError, match="v contains NaN or Inf"):
        getattr(obj.at(th), product)(v)


def test_big_endian_theta_is_refused_with_its_dtype():
    model = _mlp()
    X, y = _data(10)
    obj = Objective(model, "softmax_ce", X, y)
    th = model.init(0).astype(">f8")
    with pytest.raises(Exception, match=r">f8.*big-endian.*astype\('float64'\)"):
        obj.at(th)
    assert math.isfinite(obj.at(th.astype("float64")).value)


@pytest.mark.parametrize("seed", [None, -1, 1.5, math.nan, "3", True])
def test_problem_seed_is_checked_by_name(seed):
    model = _mlp()
    X, y = _data(10)
    with pytest.raises(ValidationError, match="^seed must be an integer ≥ 0"):
        Problem(model, "softmax_ce", X, y, seed=seed)


@pytest.mark.parametrize("size", [math.nan, 0, -3, 2.5, "4", None, True, 11, 10**9])
def test_problem_batch_size_is_checked_by_name(size):
    model = _mlp()
    X, y = _data(10)
    prob = Problem(model, "softmax_ce", X, y)
    with pytest.raises(ValueError, match="^batch_size"):
        prob.batch(size)
    with pytest.raises(ValueError, match="^sample size"):
        prob.sample(size)


def test_point_value_is_read_once():
    model = _mlp()
    X, y = _data(10)
    p = Objective(model, "softmax_ce", X, y, 1e-2).at(model.init(0))
    v = p.value
    p._losses = p._losses * 0 + 7.0  # a cached value is not recomputed
    assert p.value == v
