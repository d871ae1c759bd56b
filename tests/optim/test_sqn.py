"""SQN (Byrd, Hansen, Nocedal & Singer 2016): curvature pairs against a dense Hessian at averaged
iterates, the pair schedule, the two-loop direction against scipy, safeguards, training on digits."""
import math

import numpy as np
import pytest
from scipy.optimize import LbfgsInvHessProduct
from sklearn.datasets import load_digits

import qnref.optim.sqn as sqnmod
from qnref.curvature import dense
from qnref.curvature.objective import Objective
from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.optim import make_optimizer
from qnref.optim.base import Problem, state_from_host, state_to_host
from qnref.optim.operators import LBFGSOperator
from qnref.optim.sqn import SQN, SQNState, sqn_direction


def small_problem(seed=0, N=40, d=5, h=4, c=3, l2=1e-2, hidden=True):
    r = np.random.default_rng(seed)
    X = r.standard_normal((N, d))
    y = r.integers(0, c, N)
    layers = [Dense(h), Tanh(), Dense(c)] if hidden else [Dense(c)]
    model = Sequential(layers, input_shape=(d,))
    return model, Problem(model, "softmax_ce", X, y, l2=l2, seed=seed)


def digits(n=1200):
    d = load_digits()
    return d.data[:n] / 16.0, d.target[:n]


@pytest.mark.parametrize("hidden", [False, True])
def test_pairs_are_hessian_products_at_averaged_iterates(hidden):
    L = 3
    model, prob = small_problem(hidden=hidden)
    full = prob.full_objective
    th = model.init(0)
    opt = SQN(L=L, memory=5, batch_size=10, curvature_batch=prob.n_samples)  # b_H = N: S_H is the full set
    st = opt.init(th)
    thetas = []
    for _ in range(5 * L):
        thetas.append(th.copy())
        th, st, info = opt.step(th, st, prob)
    wbar = [np.mean(thetas[t * L:(t + 1) * L], axis=0) for t in range(5)]
    expected = []
    for t in range(1, 5):
        s = wbar[t] - wbar[t - 1]
        y = dense.hessian(full, wbar[t], method="fd") @ s  # finite differences of the gradient
        if s @ y > 1e-10 * (s @ s):
            expected.append((s, y))
    mem = st.memory
    assert mem.count == len(expected) and st.pairs == len(expected) and st.skipped == 4 - len(expected)
    assert len(expected) >= 2
    for (s, y), s_m, y_m in zip(expected, mem.S, mem.Y):
        np.testing.assert_allclose(s_m, s, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(y_m, y, rtol=1e-6, atol=1e-8 * np.abs(y).max())
    np.testing.assert_allclose(st.wbar_prev, wbar[4], rtol=1e-12)


def test_pairs_change_exactly_every_L_iterations():
    L = 4
    model, prob = small_problem(hidden=False)
    th = model.init(0)
    opt = SQN(L=L, memory=3, batch_size=8, curvature_batch=20)
    st = opt.init(th)
    added_at, qn_at = [], []
    prev_S = None
    for k in range(1, 8 * L + 1):
        th, st, info = opt.step(th, st, prob)
        S = st.memory.S.copy()
        if info.extra.get("pair_added") or info.extra.get("pair_skipped"):
            added_at.append(k)
        if info.extra.get("quasi_newton"):
            qn_at.append(k)
        if prev_S is not None and k % L != 0:
            np.testing.assert_array_equal(S, prev_S)  # the memory only changes at k = 2L, 3L, …
        prev_S = S
    assert added_at == list(range(2 * L, 8 * L + 1, L))
    assert st.pairs == 7 and st.memory.count == 3  # oldest dropped (M = 3)
    assert qn_at and qn_at[0] == 2 * L + 1 and all(k > 2 * L for k in qn_at)
    assert st.k == 8 * L and st.t == 8


def test_two_loop_direction_matches_scipy_lbfgs_inverse_hessian():
    model, prob = small_problem(hidden=False, N=60)
    th = model.init(0)
    opt = SQN(L=2, memory=4, batch_size=20, curvature_batch=30)
    st = opt.init(th)
    for _ in range(14):
        th, st, _ = opt.step(th, st, prob)
    mem = st.memory
    S, Y = mem.S.copy(), mem.Y.copy()
    assert mem.count == 4
    g = np.random.default_rng(1).standard_normal(th.shape)
    # scipy uses H0 = I: equal to ours with gamma = 1
    np.testing.assert_allclose(LBFGSOperator(S, Y, 1.0).solve(g), LbfgsInvHessProduct(S, Y).matvec(g), rtol=1e-10)
    # SQN (Byrd et al. Alg. 2) uses H0 = (sᵀy / yᵀy) I of the newest pair: H_γ(S, Y) = γ · H_I(S, γY)
    gamma = (S[-1] @ Y[-1]) / (Y[-1] @ Y[-1])
    ref = gamma * LbfgsInvHessProduct(S, gamma * Y).matvec(g)
    np.testing.assert_allclose(sqn_direction(g, mem), ref, rtol=1e-10)
    # and the optimizer's actual step (decay rule, full batch): θ⁺ − θ = −(β/k) H g
    opt2 = SQN(L=2, memory=4, batch_size=None, curvature_batch=30, step_rule="decay", beta=0.5)
    st2 = SQNState(memory=st.memory, wbar_sum=st.wbar_sum.copy(), wbar_prev=st.wbar_prev.copy(), t=st.t, k=st.k)
    gfull = prob.full_objective.grad(th)
    H_g = gamma * LbfgsInvHessProduct(S, gamma * Y).matvec(gfull)
    th2, st2, info = opt2.step(th, st2, prob)
    np.testing.assert_allclose(th2 - th, -(0.5 / 15) * H_g, rtol=1e-9)
    assert info.step_size == pytest.approx(0.5 / 15)


def test_sqn_trains_digits_mlp():
    """Dense(32)-Tanh-Dense(10) on 1200 digits, defaults (b = 100, L = 20, M = 10, b_H = 300, Armijo
    c₁ = 0.1): ≥ 97% training accuracy and loss < 0.05 after 10 epochs. Measured: 99.7%, 0.0101."""
    X, y = digits()
    model = Sequential([Dense(32), Tanh(), Dense(10)], input_shape=(64,))
    prob = Problem(model, "softmax_ce", X, y, seed=0)
    th = model.init(0)
    opt = make_optimizer("sqn")
    st = opt.init(th)
    while prob.epochs < 10 - 1e-9:
        th, st, info = opt.step(th, st, prob)
        assert np.all(np.isfinite(th))
    ev = Objective(model, "softmax_ce", X, y).at(th)
    acc = float((ev.z.argmax(1) == y).mean())
    assert acc >= 0.97, acc
    assert ev.value < 0.05, ev.value
    assert st.pairs >= 4


def test_nonfinite_safeguards(monkeypatch):
    model, prob = small_problem()
    th0 = model.init(0)
    import qnref.optim.drivers as drivers

    real = sqnmod.try_point

    def patch(fn):  # SQN evaluates points itself and through the shared line function
        monkeypatch.setattr(sqnmod, "try_point", fn)
        monkeypatch.setattr(drivers, "evaluate", lambda obj, theta: (lambda p: (p, math.nan if p is None else p.value))(fn(obj, theta)))

    patch(lambda obj, theta: None if np.linalg.norm(theta - th0) > 1e-3 else real(obj, theta))
    opt = SQN(L=2, batch_size=10, curvature_batch=20)
    st = opt.init(th0)
    th, st, info = opt.step(th0, st, prob)
    assert np.all(np.isfinite(th)) and np.linalg.norm(th - th0) <= 1e-3
    # nothing finite anywhere: θ unchanged, flagged; pair formation skipped, never NaN in memory
    patch(lambda obj, theta: None)
    for _ in range(5):
        th1, st, info = opt.step(th, st, prob)
        assert not info.accepted and info.nonfinite
        np.testing.assert_array_equal(th1, th)
    mem = st.memory
    assert np.all(np.isfinite(mem.S)) and np.all(np.isfinite(mem.Y))
    # decay rule with an overflowing step is rejected
    patch(real)
    opt3 = SQN(L=2, batch_size=10, step_rule="decay", beta=1e308)
    th3, _, info3 = opt3.step(th0 * 1e10, opt3.init(th0), prob)
    assert np.all(np.isfinite(th3)) and not info3.accepted and info3.nonfinite
    np.testing.assert_array_equal(th3, th0 * 1e10)


@pytest.mark.parametrize("kw", [
    dict(L=0), dict(L=2.5), dict(memory=0), dict(curvature_batch=0), dict(batch_size=0),
    dict(curvature="fisher"), dict(step_rule="fixed"), dict(alpha0=0.0), dict(c1=0.0), dict(c1=1.0),
    dict(shrink=1.0), dict(beta=-1.0), dict(beta=math.inf), dict(curvature_eps=-1.0), dict(max_ls_evals=0),
])
def test_invalid_hyperparameters_raise(kw):
    with pytest.raises((ValueError, TypeError)):
        SQN(**kw)


def test_checkpoint_roundtrip_is_bit_identical():
    model, prob = small_problem()
    th = model.init(0)
    opt = make_optimizer("sqn", L=2, batch_size=10, curvature_batch=20)
    st = opt.init(th)
    for _ in range(7):
        th, st, _ = opt.step(th, st, prob)
    st2 = state_from_host(SQNState, state_to_host(st))
    pstate = prob.state()
    a = th
    b = th
    sa, sb = st, st2
    for _ in range(4):
        a, sa, _ = opt.step(a, sa, prob)
    prob.load_state(pstate)
    for _ in range(4):
        b, sb, _ = opt.step(b, sb, prob)
    np.testing.assert_array_equal(a, b)
