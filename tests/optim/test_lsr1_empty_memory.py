"""L-SR1-TR with an empty memory and the step test of [RD16] Algorithm 1 (issue 20).

Alg. 1 lines 3–5: "if k = 0 or S_k.colDim = 0 then s_k ← −∇f(x_k); B_k ← B₀" — the step is the
negative gradient whatever the radius (and whatever γ), pred = −(gᵀs + ½ sᵀB₀s), and the radius
rule of lines 18–25 follows as on every step. Line 2: the loop runs while ‖s_k‖ > t
(``step_tol``). The oracle is the hand-written MLP loss/gradient of test_soc_methods.py (no
qnref forward or gradient), on the full training set so that the batch is known.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from qnref.optim import make_optimizer
from qnref.optim.lsr1 import LSR1State
from qnref.optim.pairs import PairStore
from test_soc_methods import mlp_loss_grad, setup


def _radius_rule(delta, rho, snorm, u=0.75, l=0.1, frac=0.8):  # noqa: E741
    """Alg. 1 lines 18–25 as printed."""
    if rho > u:
        return 2.0 * delta if snorm > frac * delta else delta
    if rho < l:
        return 0.5 * delta
    return delta


@pytest.mark.parametrize("gamma", [1.0, 0.5])
@pytest.mark.parametrize("gram_cache", [True, False])
@pytest.mark.parametrize("solver", ["exact", "steihaug"])
@pytest.mark.parametrize("ratio", [0.05, 0.5, 3.0])
def test_empty_memory_step_is_minus_the_gradient(gamma, gram_cache, solver, ratio):
    """A state at k = 4 whose memory is empty (e.g. emptied by pruning) and Δ = ratio·‖g‖."""
    _, theta, prob = setup(n=300)
    X, y = np.asarray(prob.X), np.asarray(prob.y)
    f0, g = mlp_loss_grad(theta, X, y)
    gnorm = math.sqrt(g @ g)
    delta = ratio * gnorm
    opt = make_optimizer("lsr1-tr", batch_size=None, gamma=gamma, gram_cache=gram_cache, solver=solver)
    state = LSR1State(PairStore.empty(theta, opt.memory, grams=gram_cache), delta=delta, k=4, trial_norm=0.3)
    new, st, info = opt.step(theta, state, prob)
    # the trial step is −∇f exactly (not −∇f/γ, not cut to Δ)
    assert info.extra["trial_norm"] == pytest.approx(gnorm, rel=1e-12)
    assert info.extra["delta_used"] == delta
    pred = gnorm ** 2 - 0.5 * gamma * gnorm ** 2           # −(gᵀs + ½ sᵀ(γI)s), s = −g
    assert info.extra["pred"] == pytest.approx(pred, rel=1e-12)
    f1, g1 = mlp_loss_grad(theta - g, X, y)
    rho = (f0 - f1) / pred
    assert info.extra["rho"] == pytest.approx(rho, rel=1e-10)
    assert info.accepted == (rho > 1e-4)
    if info.accepted:
        assert np.abs((new - theta) + g).max() <= 1e-12 * np.abs(g).max()
    else:
        assert np.array_equal(new, theta)
    # then the radius rule of lines 18–25, with ‖s‖ = ‖g‖
    assert info.radius == pytest.approx(_radius_rule(delta, rho, gnorm), rel=1e-15)
    assert st.delta == info.radius and st.k == 5 and st.trial_norm == pytest.approx(gnorm, rel=1e-12)
    # the pair (−g, ∇f(θ − g) − g) is stored by the SR1 rule with B₀ s = −γg
    if not info.skipped:
        s_, y_ = st.memory.newest()
        assert np.abs(s_ + g).max() <= 1e-12 * np.abs(g).max()
        assert np.abs(y_ - (g1 - g)).max() <= 1e-10 * np.abs(g1 - g).max()


def test_the_cut_step_is_gone_where_it_mattered():
    """Δ < ‖g‖ and γ = 1: the old radius-cut B₀ step had ‖s‖ = Δ; Alg. 1 takes ‖s‖ = ‖g‖."""
    _, theta, prob = setup(n=300)
    opt = make_optimizer("lsr1-tr", batch_size=None)
    g = mlp_loss_grad(theta, np.asarray(prob.X), np.asarray(prob.y))[1]
    delta = 0.1 * math.sqrt(g @ g)
    state = LSR1State(PairStore.empty(theta, 5), delta=delta, k=2)
    _, _, info = opt.step(theta, state, prob)
    assert info.extra["trial_norm"] > 9 * delta


def test_the_first_step_is_unchanged():
    """k = 0: Δ₀ = ‖g‖ and γ = 1, so −∇f is also the exact trust-region step of B₀ (the reference
    trajectory of lsr1-tr stays)."""
    _, theta, prob = setup(n=300)
    opt = make_optimizer("lsr1-tr", batch_size=None)
    g = mlp_loss_grad(theta, np.asarray(prob.X), np.asarray(prob.y))[1]
    _, st, info = opt.step(theta, opt.init(theta), prob)
    assert info.extra["delta_used"] == pytest.approx(math.sqrt(g @ g), rel=1e-12)
    assert info.extra["trial_norm"] == pytest.approx(math.sqrt(g @ g), rel=1e-12)


# -- Alg. 1 line 2: while … ‖s_k‖ > t -------------------------------------------------------------------------
def test_step_tol_stops_after_a_short_trial_step():
    _, theta, prob = setup(n=300)
    opt = make_optimizer("lsr1-tr", batch_size=None, step_tol=1e9)   # every trial step is "short"
    state = opt.init(theta)
    th1, state, info1 = opt.step(theta, state, prob)                 # k = 0: no step yet, it runs
    assert "converged" not in info1.extra and state.trial_norm < 1e9
    saved = copy.deepcopy(state)
    th2, state2, info2 = opt.step(th1, state, prob)
    assert np.array_equal(th2, th1) and not info2.accepted and info2.extra["converged"] is True
    assert "step_tol" in info2.extra["message"]
    assert state2.k == saved.k and state2.delta == saved.delta     # the state does not move either


def test_step_tol_between_the_step_norms():
    """t between two trial norms: the run stops exactly after the first trial with ‖s‖ ≤ t."""
    _, theta, prob = setup(n=300)
    ref = make_optimizer("lsr1-tr", batch_size=None)
    th, st, norms = theta, ref.init(theta), []
    for _ in range(8):
        th, st, info = ref.step(th, st, prob)
        norms.append(info.extra["trial_norm"])
    j = int(np.argmin(norms[:7]))
    t = norms[j] * (1 + 1e-9)
    first = next(i for i, v in enumerate(norms) if v <= t)
    _, theta, prob = setup(n=300)
    opt = make_optimizer("lsr1-tr", batch_size=None, step_tol=t)
    th, st = theta, opt.init(theta)
    for i in range(first + 3):
        th, st, info = opt.step(th, st, prob)
        assert ("converged" in info.extra) == (i > first), i


def test_step_tol_zero_changes_nothing_and_is_validated():
    _, theta, pa = setup(n=300)
    pb = setup(n=300)[2]
    a, b = make_optimizer("lsr1-tr", batch_size=64), make_optimizer("lsr1-tr", batch_size=64, step_tol=0.0)
    ta, tb, sa, sb = theta, theta, a.init(theta), b.init(theta)
    for _ in range(5):
        ta, sa, _ = a.step(ta, sa, pa)
        tb, sb, _ = b.step(tb, sb, pb)
    assert np.array_equal(ta, tb)
    for bad in (-1.0, math.nan, math.inf, "x"):
        with pytest.raises(ValueError, match="step_tol"):
            make_optimizer("lsr1-tr", step_tol=bad)


def test_after_a_non_finite_trial_the_empty_memory_step_is_cut():
    """Safeguard (not in the paper): f is NaN outside ‖x‖ < 1.5; the first −∇f = (2, 0) leaves the
    ball, stores no pair and halves Δ to 1. Alg. 1 as printed would try (2, 0) forever; the step
    after a non-finite trial is −∇f cut to Δ, (1, 0), the minimiser of x·x − 2x₀."""
    from test_lsr1_lbfgs import FunctionProblem

    prob = FunctionProblem(lambda x: float(x @ x) - 2 * x[0] if x @ x < 2.25 else math.nan,
                           lambda x: 2 * x - np.array([2.0, 0.0]))
    opt = make_optimizer("lsr1-tr", batch_size=None)
    x, st, info = opt.step(np.zeros(2), opt.init(np.zeros(2)), prob)
    assert info.nonfinite and st.trial_nonfinite and st.memory.count == 0 and st.delta == 1.0
    assert info.extra["trial_norm"] == 2.0                      # the text's −∇f, uncut
    x, st, info = opt.step(x, st, prob)
    assert info.accepted and not st.trial_nonfinite and info.extra["trial_norm"] == 1.0
    np.testing.assert_array_equal(x, [1.0, 0.0])
    # the (finite) trial stored its pair: the memory is no longer empty
    assert st.memory.count == 1
