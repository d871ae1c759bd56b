"""The step open/close helpers, the line-search driver and the trust-region driver (qnref.optim.drivers)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from qnref.curvature.function import FunctionProblem, rosenbrock_problem
from qnref.optim.base import StepInfo
from qnref.optim.drivers import (LineOutcome, Opened, TrustRegionDecision, close_step, line_search, open_step,
                                 stay, trust_region_update, with_extra)
from qnref.optim.trust_region import RadiusRule


def quad(n=5, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    A = A @ A.T + np.eye(n)
    b = rng.standard_normal(n)
    return FunctionProblem(lambda x: 0.5 * x @ A @ x - b @ x, lambda x: A @ x - b), A, b


# -- open / close -------------------------------------------------------------------------------------
def test_open_step_goes_on_at_a_finite_point():
    prob, A, b = quad()
    x = np.ones(5)
    o = open_step(prob, None, x)
    assert isinstance(o, Opened) and o.stop is None
    assert o.f0 == 0.5 * x @ A @ x - b @ x
    np.testing.assert_array_equal(o.g, A @ x - b)
    assert o.batch_size == 1


def test_open_step_stops_on_nonfinite_start_and_on_convergence():
    prob = FunctionProblem(lambda x: float("nan"), lambda x: x)
    o = open_step(prob, None, np.ones(3))
    assert o.point is None and o.stop.nonfinite and not o.stop.accepted and math.isnan(o.stop.loss)
    assert o.stop.evals == 1 and o.stop.extra == {}
    prob, A, b = quad()
    xstar = np.linalg.solve(A, b)
    o = open_step(prob, None, xstar, tol=1e-8)
    assert o.stop is not None and o.stop.extra == {"converged": True} and not o.stop.nonfinite
    assert o.stop.loss == o.stop.loss_start == o.f0
    # tol = 0 goes on unless ∇f is exactly zero
    assert open_step(prob, None, xstar + 1e-3).stop is None


def test_close_step_and_with_extra_build_new_infos():
    prob, _, _ = quad()
    o = open_step(prob, None, np.ones(5))
    info = close_step(o, loss=0.25, accepted=True, evals=3, step_norm=0.5, radius=2.0, extra={"rho": 0.9})
    assert isinstance(info, StepInfo)
    assert (info.loss, info.loss_start, info.evals, info.batch_size, info.radius) == (0.25, o.f0, 3, 1, 2.0)
    info2 = with_extra(info, pairs=3)
    assert info2 is not info and info.extra == {"rho": 0.9} and info2.extra == {"rho": 0.9, "pairs": 3}
    s = stay(o.obj, 1.5, converged=True)
    assert not s.accepted and s.loss == s.loss_start == 1.5 and s.extra == {"converged": True}


# -- line search --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["armijo", "wolfe"])
def test_line_search_conditions_on_rosenbrock(rule):
    prob = rosenbrock_problem(2)
    x = np.array([-1.2, 1.0])
    o = open_step(prob, None, x)
    d = -o.g
    slope = float(o.g @ d)
    out = line_search(o.obj, x, d, o.f0, slope, rule=rule, alpha0=1.0, c1=1e-4, c2=0.9, max_evals=40)
    assert isinstance(out, LineOutcome) and out.success
    assert out.value <= o.f0 + 1e-4 * out.alpha * slope
    assert out.value == out.point.value
    np.testing.assert_array_equal(out.point.theta, x + out.alpha * d)
    # the accepted trial θ is handed back as the step's new θ: bit for bit θ + αd, the evaluated array itself
    np.testing.assert_array_equal(out.theta, x + out.alpha * d)
    assert out.theta is out.point.theta
    if rule == "wolfe":
        assert abs(float(out.point.grad @ d)) <= 0.9 * abs(slope)


def test_line_search_failure_and_nonfinite_trials():
    prob = FunctionProblem(lambda x: 0.0 if abs(x[0]) < 1e-6 else float("inf"), lambda x: x * 0 + 1.0)
    x = np.zeros(2) + 1e-9
    out = line_search(prob.full(), x, np.ones(2), 0.0, -1.0, rule="armijo", max_evals=3)
    assert not out.success and out.alpha == 0.0 and out.point is None and out.value == 0.0 and out.theta is None
    assert out.evals == 3 and out.nonfinite
    with pytest.raises(ValueError, match="rule must be"):
        line_search(prob.full(), x, np.ones(2), 0.0, -1.0, rule="cubic")


# -- trust region -------------------------------------------------------------------------------------
def test_trust_region_update_follows_the_rule():
    rule = RadiusRule(eta=1e-4, u=0.75, l=0.1, boundary_fraction=0.8, increase=2.0, decrease=0.5)
    # very successful, on the boundary → grow
    dec = trust_region_update(rule, 1.0, 0.9, 1.0, 1.0)
    assert isinstance(dec, TrustRegionDecision)
    assert dec.rho == 0.9 and dec.accepted and dec.delta == rule.update(1.0, 0.9, 1.0) == 2.0
    # poor → shrink, rejected
    dec = trust_region_update(rule, 1.0, -0.5, 1.0, 1.0)
    assert dec.rho == -0.5 and not dec.accepted and dec.delta == 0.5
    # non-finite trial (ared = −∞) → rejected, shrunk; the floor clips ρ
    dec = trust_region_update(rule, 1.0, -math.inf, 1.0, 1.0)
    assert dec.rho == -math.inf and not dec.accepted and dec.delta == 0.5
    dec = trust_region_update(rule, 1.0, -math.inf, 1.0, 1.0, rho_floor=-1.0)
    assert dec.rho == -1.0


def test_trust_region_update_averaged_ratio():
    """[MB] Alg. 5: ρ̂ = (ζTρ̂ + ρ)/(ζT + 1), T = ζT + 1, and the radius rule sees ρ̂."""
    seen = []

    class Rule:
        def accept(self, rho):
            return True

        def update(self, delta, rho, step_norm):
            seen.append(rho)
            return delta

    dec = trust_region_update(Rule(), 1.0, 0.2, 1.0, 0.5, average=(1.0, 0.8, 3.0))
    assert dec.rho == 0.2 and dec.T == 4.0 and dec.rho_hat == pytest.approx((3 * 0.8 + 0.2) / 4, abs=1e-15)
    assert seen == [dec.rho_hat]
    dec = trust_region_update(Rule(), 1.0, 0.2, 1.0, 0.5, average=(0.0, 0.8, 3.0))
    assert dec.T == 1.0 and dec.rho_hat == 0.2
