"""The methods of the second-order CNN comparison [SOC] as the text runs them (issue 20):
``shg`` (Hessian-free with stochastic Hessian products), ``soc-sr1`` (L-SR1 with line search
eq. (2), c = 0.1), ``gd`` (fixed rate on 20 % of the data) and the fixed-rate variants of §4.4
(``step_rule="fixed"`` on HF/SHG and L-SR1-LS).

Oracles are written here from the texts, in plain NumPy (the MLP's loss and gradient by hand)
and with ``torch.autograd.functional.hessian`` of a torch function written here for the dense
Hessian; none of them calls qnref's forward, gradient or curvature code. float64 throughout;
tolerances 1e-10 relative (products, directions, steps) unless stated.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.optim import hessian_free, make_optimizer
from qnref.optim.base import Problem
from qnref.optim.costs import algebra_flops

L2 = 1e-3
D, H, C = 4, 5, 3
RTOL = 1e-10


# -- the independent oracle: a Dense(H)-Tanh-Dense(C) MLP, softmax CE (mean) + (l2/2)‖θ‖² --------
def unpack(theta):
    """θ = [W₁ | b₁] (H × (D+1), row-major) then [W₂ | b₂] (C × (H+1)): qnref's Dense layout."""
    a = H * (D + 1)
    W1b = theta[:a].reshape(H, D + 1)
    W2b = theta[a:a + C * (H + 1)].reshape(C, H + 1)
    return W1b[:, :-1], W1b[:, -1], W2b[:, :-1], W2b[:, -1]


def mlp_loss_grad(theta, X, y, l2=L2):
    """f and ∇f by hand (forward, softmax, backpropagation)."""
    W1, b1, W2, b2 = unpack(theta)
    a = np.tanh(X @ W1.T + b1)
    z = a @ W2.T + b2
    z = z - z.max(axis=1, keepdims=True)
    P = np.exp(z)
    P /= P.sum(axis=1, keepdims=True)
    N = X.shape[0]
    f = -np.mean(np.log(P[np.arange(N), y])) + 0.5 * l2 * theta @ theta
    dz = P.copy()
    dz[np.arange(N), y] -= 1.0
    dz /= N
    dW2, db2 = dz.T @ a, dz.sum(axis=0)
    da = dz @ W2
    dh = da * (1.0 - a * a)
    dW1, db1 = dh.T @ X, dh.sum(axis=0)
    g = np.concatenate([np.column_stack([dW1, db1]).ravel(), np.column_stack([dW2, db2]).ravel()])
    return f, g + l2 * theta


def torch_hessian(theta, X, y, l2=L2):
    """The dense Hessian of the same f, by torch autograd of a function written here."""
    import torch

    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def f(t):
        a = H * (D + 1)
        W1b = t[:a].reshape(H, D + 1)
        W2b = t[a:].reshape(C, H + 1)
        z = torch.tanh(Xt @ W1b[:, :-1].T + W1b[:, -1]) @ W2b[:, :-1].T + W2b[:, -1]
        return torch.nn.functional.cross_entropy(z, yt) + 0.5 * l2 * (t * t).sum()

    return torch.autograd.functional.hessian(f, torch.from_numpy(theta.copy())).numpy()


def setup(n=400, seed=0):
    r = np.random.default_rng(seed)
    model = Sequential([Dense(H), Tanh(), Dense(C)], input_shape=(D,))
    X = r.standard_normal((n, D))
    y = ((X[:, 0] * X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 0.5)).astype(np.int64)
    theta = model.init(seed=3, scheme="gaussian", std=0.8)
    return model, theta, Problem(model, "softmax_ce", X, y, L2, seed=seed)


def peek_batch(prob, size):
    """The batch the next ``prob.batch(size)`` will draw, without advancing the stream."""
    saved = prob.state()
    b = prob.batch(size)
    prob.load_state(saved)
    return b


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-300))


def test_the_oracle_is_the_objective():
    """The hand-written f, ∇f are the problem's objective (else every oracle below is moot)."""
    _, theta, prob = setup()
    obj = prob.full_objective
    f, g = mlp_loss_grad(theta, prob.X, prob.y)
    p = obj.at(theta)
    assert abs(f - p.value) <= 1e-13 * abs(f)
    assert rel(p.grad, g) <= 1e-12


# -- registered names and their defaults -----------------------------------------------------------------
def test_registered_defaults_are_the_texts():
    shg, hf = make_optimizer("shg"), make_optimizer("hf")
    assert shg.curvature == "hessian" and hf.curvature == "ggn"     # [SOC] §2.1/§3.3; hf stays Martens'
    for opt in (shg, hf):
        assert (opt.grad_fraction, opt.curvature_batch, opt.c1, opt.step_rule) == (0.2, 100, 0.1, "armijo")
        assert opt.progress_eps == 5e-4 and not hasattr(opt, "lr")
    assert {k: v for k, v in shg.hyperparameters().items() if k != "curvature"} == \
        {k: v for k, v in hf.hyperparameters().items() if k != "curvature"}
    sr1, ls = make_optimizer("soc-sr1"), make_optimizer("lsr1-ls")
    assert (sr1.c1, sr1.batch_size, sr1.memory) == (0.1, 100, 5)      # eq. (2); batch 100 (§3.3)
    assert (ls.c1, ls.batch_size) == (1e-4, 128)                       # lsr1-ls keeps [RD16]'s
    gd = make_optimizer("gd")
    assert (gd.fraction, gd.lr) == (0.2, 0.01) and not hasattr(gd, "batch_size")
    # a configuration round-trips through its hyperparameters (adapters rebuild optimizers this way)
    for name, kw in [("shg", {"step_rule": "fixed", "lr": 0.3}), ("soc-sr1", {"step_rule": "fixed", "lr": 0.2}),
                     ("gd", {"lr": 0.5}), ("shg", {})]:
        opt = make_optimizer(name, **kw)
        assert type(opt)(**opt.hyperparameters()).hyperparameters() == opt.hyperparameters()


@pytest.mark.parametrize("name", ["hf", "shg", "lsr1-ls", "soc-sr1"])
def test_lr_goes_with_the_fixed_step_rule_only(name):
    with pytest.raises(ValueError, match="lr=0.1 is the step of step_rule='fixed'"):
        make_optimizer(name, lr=0.1)
    with pytest.raises(ValueError, match="step_rule='fixed' needs lr"):
        make_optimizer(name, step_rule="fixed")
    with pytest.raises(ValueError, match="lr"):
        make_optimizer(name, step_rule="fixed", lr=-1.0)
    with pytest.raises(ValueError, match="step_rule"):
        make_optimizer(name, step_rule="wolfe")
    assert make_optimizer(name, step_rule="fixed", lr=0.25).lr == 0.25


def test_shg_refuses_unknown_and_names_bad_batches():
    with pytest.raises(TypeError, match="nope"):
        make_optimizer("shg", nope=1)
    with pytest.raises(ValueError, match="grad_batch.*got nan"):
        make_optimizer("shg", grad_batch=math.nan)
    with pytest.raises(ValueError, match="grad_batch=1000000000, grad_fraction=0.2"):
        make_optimizer("shg", grad_batch=10**9)
    with pytest.raises(ValueError, match="fraction"):
        make_optimizer("gd", fraction=0.0)


# -- SHG: CG multiplies by the stochastic Hessian ---------------------------------------------------------
_REAL_CG, _REAL_COBJ = hessian_free.cg_solve, hessian_free.HessianFree._curvature_objective


def _capture_products(monkeypatch, name, **kw):
    """One step of ``name``; returns (λ, [(v, Av)], curvature objective, θ)."""
    _, theta, prob = setup()
    calls, seen = [], {}
    real_cg, real_cobj = _REAL_CG, _REAL_COBJ

    def spy_cg(Av, b, x0=None, **kw2):
        def rec(v):
            out = Av(v)
            calls.append((v.copy(), out.copy()))
            return out
        return real_cg(rec, b, x0, **kw2)

    def spy_cobj(self, problem, gobj, th):
        seen["cobj"] = real_cobj(self, problem, gobj, th)
        return seen["cobj"]

    monkeypatch.setattr(hessian_free, "cg_solve", spy_cg)
    monkeypatch.setattr(hessian_free.HessianFree, "_curvature_objective", spy_cobj)
    opt = make_optimizer(name, curvature_batch=60, max_cg_iters=8, **kw)
    state = opt.init(theta)
    _, _, info = opt.step(theta, state, prob)
    return info.extra["damping_used"], calls, seen["cobj"], theta


def test_shg_cg_products_are_dense_hessian_products(monkeypatch):
    lam, calls, cobj, theta = _capture_products(monkeypatch, "shg")
    assert cobj.n_samples == 60 and len(calls) >= 3
    Hd = torch_hessian(theta, np.asarray(cobj.X), np.asarray(cobj.y))
    for v, Av in calls:
        assert rel(Av, Hd @ v + lam * v) <= RTOL
    # the test tells the Hessian from the Gauss–Newton matrix: hf's products are not these
    lam_g, calls_g, cobj_g, _ = _capture_products(monkeypatch, "hf")
    Hg = torch_hessian(theta, np.asarray(cobj_g.X), np.asarray(cobj_g.y))
    assert max(rel(Av, Hg @ v + lam_g * v) for v, Av in calls_g) > 1e-4


def test_shg_accepted_steps_satisfy_eq2_on_the_gradient_batch():
    """f(w + ηp) − f(w) ≤ 0.1 η ∇f(w)ᵀp on the step's gradient batch (20 % of the data)."""
    _, theta, prob = setup()
    opt = make_optimizer("shg")
    state = opt.init(theta)
    checked = 0
    for _ in range(6):
        Xg = peek_batch(prob, 80)      # the gradient batch the step draws: ⌈0.2 · 400⌉ examples
        new, state, info = opt.step(theta, state, prob)
        assert info.batch_size == 80
        if info.accepted:
            f0, g0 = mlp_loss_grad(theta, np.asarray(Xg.X), np.asarray(Xg.y))
            f1, _ = mlp_loss_grad(new, np.asarray(Xg.X), np.asarray(Xg.y))
            assert f1 - f0 <= 0.1 * g0 @ (new - theta) + 1e-14
            checked += 1
        theta = new
    assert checked >= 4
    assert prob.epochs == pytest.approx(6 * 0.2)


@pytest.mark.parametrize("name", ["hf", "shg"])
def test_fixed_step_is_lr_times_the_line_search_direction(name):
    """step_rule='fixed': θ₁ − θ₀ = lr · p, p the same CG direction (the Armijo run's step at α = 1)."""
    _, theta, prob = setup()
    ref = make_optimizer(name)
    th_ref, _, info_ref = ref.step(theta, ref.init(theta), setup()[2])
    assert info_ref.accepted and info_ref.step_size == 1.0
    p = th_ref - theta
    for lr in (0.3, 1.0, 2.5):
        opt = make_optimizer(name, step_rule="fixed", lr=lr)
        th, st, info = opt.step(theta, opt.init(theta), setup()[2])
        assert info.accepted and info.step_size == lr
        assert rel(th - theta, lr * p) <= RTOL
        # the reported loss is f on the gradient batch at the new point (no decrease required)
        Xg = peek_batch(prob, 80)
        assert info.loss == pytest.approx(mlp_loss_grad(th, np.asarray(Xg.X), np.asarray(Xg.y))[0], rel=1e-12)
        assert st.damping == pytest.approx(info_ref.extra["damping"], rel=1e-15)


def test_fixed_step_takes_an_increase_but_not_a_non_finite_point():
    _, theta, prob = setup()
    opt = make_optimizer("shg", step_rule="fixed", lr=40.0)   # far past the minimiser along p
    th, _, info = opt.step(theta, opt.init(theta), setup()[2])
    assert info.accepted and info.loss > info.loss_start     # a fixed rate takes what it is given
    opt = make_optimizer("shg", step_rule="fixed", lr=1e308)  # the forward at θ + lr·p overflows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        th, _, info = opt.step(theta, opt.init(theta), setup()[2])
    assert not info.accepted and info.nonfinite and np.array_equal(th, theta)
    assert "non-finite" in info.extra["message"]


# -- soc-sr1: L-SR1 with eq. (2), c = 0.1, and a dense inverse-SR1 direction ---------------------------------
def dense_inverse_sr1(S, Y, gamma, n):
    """H₀ = I/γ, then H ← H + (s − Hy)(s − Hy)ᵀ / ((s − Hy)ᵀy) for the pairs oldest first
    (Nocedal & Wright eq. 6.25; [RD16] §3 self-duality)."""
    Hm = np.eye(n) / gamma
    for s, y in zip(S, Y):
        u = s - Hm @ y
        Hm = Hm + np.outer(u, u) / (u @ y)
    return Hm


@pytest.mark.parametrize("c1_name", ["soc-sr1"])
def test_soc_sr1_direction_and_eq2(c1_name):
    _, theta, prob = setup(n=800)
    opt = make_optimizer(c1_name)
    state = opt.init(theta)
    n = theta.size
    checked_dir = checked_bt = 0
    prev_alpha = 1.0          # the state's initial step length
    for k in range(25):
        S, Y = np.array(state.memory.S), np.array(state.memory.Y)
        Xb = peek_batch(prob, 100)
        Xb, yb = np.asarray(Xb.X), np.asarray(Xb.y)
        new, state, info = opt.step(theta, state, prob)
        assert info.batch_size == 100
        if info.accepted:
            f0, g = mlp_loss_grad(theta, Xb, yb)
            step = new - theta
            alpha = info.step_size
            if not info.extra["fallback"] and len(S):
                d = -dense_inverse_sr1(S, Y, 1.0, n) @ g
                assert rel(step, alpha * d) <= 1e-9, k
                checked_dir += 1
            else:
                d = -g
            f1, _ = mlp_loss_grad(new, Xb, yb)
            assert f1 - f0 <= 0.1 * alpha * (g @ d) + 1e-14          # eq. (2), c = 0.1
            lam0 = 1.0 if k == 0 else min(1.0, 2.0 * prev_alpha)
            if alpha < lam0:                                          # the trial before failed eq. (2)
                ft, _ = mlp_loss_grad(theta + 2 * alpha * d, Xb, yb)
                assert ft - f0 > 0.1 * 2 * alpha * (g @ d)
                checked_bt += 1
            prev_alpha = alpha
        theta = new
    assert checked_dir >= 10 and checked_bt >= 1, (checked_dir, checked_bt)


def test_soc_sr1_c_is_the_texts_point_one():
    """f = 0.95‖x‖²: the first step d = −∇f at α = 1 lands at −0.9x, a decrease of 19 % — enough
    for c = 10⁻⁴ (lsr1-ls) but not for eq. (2)'s c = 0.1, which halves to α = ½ (by hand:
    f(½d) − f = −0.9975 f ≤ 0.1 · ½ · ∇fᵀd = −0.19 f)."""
    from test_lsr1_lbfgs import FunctionProblem

    prob = FunctionProblem(lambda x: 0.95 * float(x @ x), lambda x: 1.9 * x)
    x0 = np.array([1.0, -2.0, 0.5])
    alphas = {}
    for name in ("soc-sr1", "lsr1-ls"):
        opt = make_optimizer(name, batch_size=None)
        x1, _, info = opt.step(x0, opt.init(x0), prob)
        alphas[name] = info.step_size
        np.testing.assert_allclose(x1, x0 - info.step_size * 1.9 * x0, rtol=1e-15)
    assert alphas == {"soc-sr1": 0.5, "lsr1-ls": 1.0}


def test_soc_sr1_fixed_step():
    """step_rule='fixed': s = lr·d with the same d; the pair (s, y) is stored by the SR1 rule."""
    _, theta, prob = setup()
    opt = make_optimizer("soc-sr1", step_rule="fixed", lr=0.3)
    state = opt.init(theta)
    n = theta.size
    for k in range(6):
        S, Y = np.array(state.memory.S), np.array(state.memory.Y)
        b = peek_batch(prob, 100)
        Xb, yb = np.asarray(b.X), np.asarray(b.y)
        new, state, info = opt.step(theta, state, prob)
        _, g = mlp_loss_grad(theta, Xb, yb)
        d = -dense_inverse_sr1(S, Y, 1.0, n) @ g if len(S) and not info.extra["fallback"] else -g
        assert info.accepted and info.step_size == 0.3 and info.evals == 2
        assert rel(new - theta, 0.3 * d) <= 1e-9
        s_new, y_new = state.memory.newest()
        if not info.skipped:
            assert rel(s_new, new - theta) <= 1e-12
            assert rel(y_new, mlp_loss_grad(new, Xb, yb)[1] - g) <= 1e-10
        theta = new
    bad = make_optimizer("soc-sr1", step_rule="fixed", lr=1e308)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        th, st, info = bad.step(theta, bad.init(theta), prob)
    assert not info.accepted and info.nonfinite and np.array_equal(th, theta) and st.memory.count == 0


# -- gd: −lr × the mean gradient of 20 % of the data ---------------------------------------------------------
def test_gd_step_is_lr_times_the_dense_mean_gradient_of_a_fifth_of_the_data():
    _, theta, prob = setup(n=403)          # ⌈0.2 · 403⌉ = 81
    opt = make_optimizer("gd", lr=0.7)
    state = opt.init(theta)
    seen = []
    for k in range(7):
        b = peek_batch(prob, 81)
        Xb, yb = np.asarray(b.X), np.asarray(b.y)
        new, state, info = opt.step(theta, state, prob)
        assert info.batch_size == 81 and info.accepted and info.step_size == 0.7
        _, g = mlp_loss_grad(theta, Xb, yb)
        assert rel(new - theta, -0.7 * g) <= 1e-12
        seen.append(Xb)
        theta = new
    assert prob.epochs == pytest.approx(7 * 81 / 403)
    # the epoch stream: the first five batches are disjoint (405 > 403 rows only at the sixth)
    rows = np.concatenate(seen[:4])
    assert len(np.unique(rows, axis=0)) == len(rows)


def test_gd_takes_a_fixed_step_even_uphill():
    _, theta, prob = setup()
    opt = make_optimizer("gd", lr=500.0)
    b = peek_batch(prob, 80)
    new, _, info = opt.step(theta, opt.init(theta), prob)
    Xb, yb = np.asarray(b.X), np.asarray(b.y)
    assert info.accepted
    assert mlp_loss_grad(new, Xb, yb)[0] > mlp_loss_grad(theta, Xb, yb)[0]   # no line search


# -- cost models by counting (the harness of test_costs.py) --------------------------------------------------
def test_gd_and_fixed_soc_sr1_counts_match_their_cost_models():
    from test_costs import _counting_run, _vector_layout

    gd = make_optimizer("gd")
    for counted, _, _ in _counting_run(gd, steps=4):
        assert counted == algebra_flops(gd, _vector_layout(40))["per_step"] == 2 * 40
    for name, kw in [("soc-sr1", {"memory": 3, "step_rule": "fixed", "lr": 0.05}), ("soc-sr1", {"memory": 3})]:
        opt = make_optimizer(name, **kw)
        checked = 0
        for counted, info, pairs in _counting_run(opt, steps=8):
            if not info.accepted or info.skipped or info.extra.get("fallback"):
                continue
            t = max(info.evals - 1, 1)
            expected = algebra_flops(opt, _vector_layout(40), trials=t, pairs=pairs)["per_step"]
            assert counted == pytest.approx(expected, abs=24), (kw, pairs, counted, expected)
            checked += 1
        assert checked >= 3
