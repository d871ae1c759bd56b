"""Armijo backtracking and strong Wolfe line searches."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import line_search, rosen, rosen_der

from qnref.optim.linesearch import (
    CNN_COMPARISON_C1,
    LineSearchResult,
    backtracking_armijo,
    strong_wolfe,
)


def along(f, grad, x, p):
    def phi(a):
        return f(x + a * p)

    def phi_dphi(a):
        z = x + a * p
        return f(z), grad(z) @ p

    return phi, phi_dphi


def assert_armijo(res, phi0, dphi0, c1):
    assert res.success and res.alpha > 0
    assert res.value <= phi0 + c1 * res.alpha * dphi0


def assert_wolfe(res, phi0, dphi0, c1, c2):
    assert_armijo(res, phi0, dphi0, c1)
    assert abs(res.slope) <= c2 * abs(dphi0)


def quad_problem(seed=0, n=6):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    A = A @ A.T + np.eye(n)
    b = rng.standard_normal(n)
    return (lambda x: 0.5 * x @ A @ x - b @ x), (lambda x: A @ x - b), A, b


# ------------------------------------------------------------------------------- Armijo
def test_armijo_hand_case():
    # φ(α) = (α − 1)², φ0 = 1, φ'(0) = −2; from α0 = 4: φ(4)=9, φ(2)=1 (> 1 − 4e-4), φ(1)=0
    res = backtracking_armijo(lambda a: (a - 1.0) ** 2, 1.0, -2.0, alpha0=4.0)
    assert isinstance(res, LineSearchResult)
    assert res.alpha == 1.0 and res.value == 0.0 and res.n_evals == 3 and res.success
    assert res.slope is None


@pytest.mark.parametrize("c1", [1e-4, CNN_COMPARISON_C1])
def test_armijo_rosenbrock(c1):
    x = np.array([-1.2, 1.0])
    p = -rosen_der(x)
    phi, _ = along(rosen, rosen_der, x, p)
    res = backtracking_armijo(phi, rosen(x), rosen_der(x) @ p, c1=c1)
    assert_armijo(res, rosen(x), rosen_der(x) @ p, c1)
    # it is the first point of the sequence 0.5^j that passes
    j = round(math.log2(1.0 / res.alpha))
    assert res.n_evals == j + 1
    if j > 0:
        a_prev = 2 * res.alpha
        assert not phi(a_prev) <= rosen(x) + c1 * a_prev * (rosen_der(x) @ p)


def test_cnn_comparison_rule_is_stricter():
    # f(w + ηp) − f(w) ≤ 0.1 η ∇fᵀp rejects steps that c1 = 1e-4 accepts
    phi = lambda a: (a - 1.0) ** 2  # noqa: E731
    loose = backtracking_armijo(phi, 1.0, -2.0, alpha0=1.9)
    strict = backtracking_armijo(phi, 1.0, -2.0, alpha0=1.9, c1=CNN_COMPARISON_C1)
    assert loose.alpha == 1.9 and strict.alpha == 0.95
    assert CNN_COMPARISON_C1 == 0.1


def test_armijo_nonfinite_region():
    # φ is NaN for α > 0.3: 1 → 0.5 → 0.25 accepted
    phi = lambda a: (a - 1.0) ** 2 if a <= 0.3 else float("nan")  # noqa: E731
    res = backtracking_armijo(phi, 1.0, -2.0)
    assert res.success and res.alpha == 0.25 and res.n_evals == 3
    inf_phi = lambda a: float("inf") if a > 0.1 else -a  # noqa: E731
    res = backtracking_armijo(inf_phi, 0.0, -1.0)
    assert res.success and res.alpha == 0.0625


def test_armijo_failures_give_zero_step():
    res = backtracking_armijo(lambda a: float("nan"), 1.0, -1.0, max_evals=5)
    assert not res.success and res.alpha == 0.0 and res.n_evals == 5 and res.value == 1.0
    res = backtracking_armijo(lambda a: a, 0.0, 1.0)  # ascent direction
    assert not res.success and res.alpha == 0.0 and res.n_evals == 0
    res = backtracking_armijo(lambda a: a, float("nan"), -1.0)
    assert not res.success and res.alpha == 0.0


# ------------------------------------------------------------------------------- Wolfe
@pytest.mark.parametrize("alpha0", [1.0, 1e-3, 10.0, 100.0])
@pytest.mark.parametrize("c2", [0.9, 0.1])
def test_wolfe_rosenbrock(alpha0, c2):
    x = np.array([-1.2, 1.0])
    p = -rosen_der(x)
    _, pd = along(rosen, rosen_der, x, p)
    phi0, dphi0 = rosen(x), rosen_der(x) @ p
    res = strong_wolfe(pd, phi0, dphi0, alpha0=alpha0, c2=c2)
    assert_wolfe(res, phi0, dphi0, 1e-4, c2)
    f, g = pd(res.alpha)
    assert res.value == f and res.slope == g


@pytest.mark.parametrize("seed", range(4))
def test_wolfe_quadratic_and_scipy(seed):
    f, grad, A, b = quad_problem(seed)
    rng = np.random.default_rng(100 + seed)
    x = rng.standard_normal(6)
    # Newton direction: α = 1 is exact, both accept it at the first trial
    p = -np.linalg.solve(A, grad(x))
    _, pd = along(f, grad, x, p)
    res = strong_wolfe(pd, f(x), grad(x) @ p)
    sp = line_search(f, grad, x, p)
    assert res.alpha == 1.0 and sp[0] == 1.0 and res.n_evals == 1
    # steepest descent with a far-off first trial: both satisfy strong Wolfe (c2 = 0.1)
    p = -grad(x)
    _, pd = along(f, grad, x, p)
    phi0, dphi0 = f(x), grad(x) @ p
    res = strong_wolfe(pd, phi0, dphi0, alpha0=50.0, c2=0.1)
    assert_wolfe(res, phi0, dphi0, 1e-4, 0.1)
    sp = line_search(f, grad, x, p, c2=0.1, amax=50.0)
    assert sp[0] is not None
    assert abs(grad(x + sp[0] * p) @ p) <= 0.1 * abs(dphi0)
    # exact minimizer along p is (gᵀg)/(gᵀAg); with c2 = 0.1 both steps are close to it
    a_star = (p @ p) / (p @ A @ p)
    assert abs(res.alpha - a_star) <= 0.25 * a_star
    assert abs(sp[0] - a_star) <= 0.25 * a_star


def test_wolfe_extrapolates():
    # φ(α) = (α − 10)²: from α0 = 1 the bracketing phase must double up to 16 then zoom
    pd = lambda a: ((a - 10.0) ** 2, 2.0 * (a - 10.0))  # noqa: E731
    res = strong_wolfe(pd, 100.0, -20.0, alpha0=1.0, c2=0.5)
    assert_wolfe(res, 100.0, -20.0, 1e-4, 0.5)
    assert res.alpha > 5.0


def test_wolfe_nonfinite_region():
    # φ(α) = −log(1 − α) − 2α is +inf / NaN for α ≥ 1; minimizer α = 0.5
    def pd(a):
        if a >= 1.0:
            return float("nan"), float("nan")
        return -math.log(1.0 - a) - 2.0 * a, 1.0 / (1.0 - a) - 2.0

    res = strong_wolfe(pd, 0.0, -1.0, alpha0=4.0, c2=0.5)
    assert_wolfe(res, 0.0, -1.0, 1e-4, 0.5)
    assert 0.0 < res.alpha < 1.0
    # NaN beyond α = 0.3 of a quadratic whose minimizer 1 lies in the NaN region
    pd2 = lambda a: ((a - 1.0) ** 2, 2.0 * (a - 1.0)) if a <= 0.3 else (math.nan, math.nan)  # noqa: E731
    res = strong_wolfe(pd2, 1.0, -2.0, alpha0=1.0, c2=0.9)
    assert_wolfe(res, 1.0, -2.0, 1e-4, 0.9)
    assert res.alpha <= 0.3


def test_wolfe_failures_give_zero_step():
    nan = lambda a: (math.nan, math.nan)  # noqa: E731
    res = strong_wolfe(nan, 1.0, -1.0, max_evals=8)
    assert not res.success and res.alpha == 0.0 and not math.isnan(res.alpha)
    assert res.n_evals == 8
    res = strong_wolfe(lambda a: (a, 1.0), 0.0, 1.0)
    assert not res.success and res.alpha == 0.0 and res.n_evals == 0
    # unbounded below: φ = −α never satisfies the curvature condition
    res = strong_wolfe(lambda a: (-a, -1.0), 0.0, -1.0, alpha_max=64.0)
    assert not res.success and res.alpha == 0.0 and "alpha_max" in res.message
    with pytest.raises(ValueError):
        strong_wolfe(nan, 1.0, -1.0, c1=0.5, c2=0.4)
