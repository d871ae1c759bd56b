"""SMW-GN / SMW-NG (Ren thesis ch. 5): SMW directions against dense solves, the λ_LM rule,
safeguards, hyperparameter validation and a short training comparison with SGD."""
from __future__ import annotations

import math

import numpy as np
import pytest

from qnref.curvature import dense
from qnref.curvature.objective import Objective
from qnref.nn.activations import Sigmoid, Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.optim.base import Problem
from qnref.optim.registry import OPTIMIZERS
from qnref.optim.smw import SMWGN, SMWNG, _solve, smw_direction, update_lambda_lm

N, D_IN, C = 7, 4, 3


def _targets(loss, r, n=N, c=C):
    if loss == "softmax_ce":
        return r.integers(0, c, n)
    if loss == "mse":
        return r.standard_normal((n, c))
    return r.random((n, c))


def _small(loss, l2=0.0, seed=0):
    r = np.random.default_rng(seed)
    m = Sequential([Dense(5), Tanh(), Dense(4), Sigmoid(), Dense(C)], input_shape=(D_IN,))
    theta = m.init(seed) + 0.3 * r.standard_normal(m.n_params)
    X = r.standard_normal((N, D_IN))
    return m, theta, Objective(m, loss, X, _targets(loss, r), l2=l2), r


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- the direction equals the dense LM solve ------------------------------------------------------
CASES = [(loss, form) for loss in ("softmax_ce", "mse", "sigmoid_ce") for form in ("5.6", "5.7", "5.6-inv")
         if not (loss == "softmax_ce" and form == "5.6-inv")]


@pytest.mark.parametrize("l2", [0.0, 0.05])
@pytest.mark.parametrize("lam", [1e-2, 1.0])
@pytest.mark.parametrize("loss,form", CASES)
def test_gn_direction_matches_dense_solve(loss, form, lam, l2):
    """p = −(B + λI)⁻¹ g with B = dense.ggn(products) = (1/N₂) Σ Jᵢᵀ H_{L,i} Jᵢ + l2·I (explicit n×n)."""
    m, theta, obj, r = _small(loss, l2)
    g = r.standard_normal(m.n_params)                 # any vector (in the optimizer: the S₁ gradient)
    B = dense.ggn(obj, theta, method="products")
    p_dense = -np.linalg.solve(B + lam * np.eye(m.n_params), g)
    d = smw_direction(obj.at(theta), g, lam, curvature="gn", form=form)
    assert d.finite and d.d_size == N * C
    assert _rel(d.p, p_dense) <= 1e-10
    # the quadratic-model pieces used by ρ (eq. 5.5) come from the SMW algebra, no extra pass
    assert abs(d.g_dot_p - g @ p_dense) <= 1e-10 * abs(g @ p_dense)
    assert abs(d.pBp - p_dense @ B @ p_dense) <= 1e-10 * abs(p_dense @ B @ p_dense)


@pytest.mark.parametrize("l2", [0.0, 0.05])
@pytest.mark.parametrize("lam", [1e-2, 1.0])
@pytest.mark.parametrize("loss", ["softmax_ce", "mse", "sigmoid_ce"])
def test_ng_direction_matches_dense_solve(loss, lam, l2):
    """B = (1/N₂) Σ ∇ℓᵢ ∇ℓᵢᵀ + l2·I from explicit per-example gradient rows (empirical Fisher, eq. 5.3)."""
    m, theta, obj, r = _small(loss, l2, seed=1)
    g = obj.grad(theta)
    P = obj.at(theta).per_example_grads()             # (N, n) explicit rows ∇ℓᵢ
    B = P.T @ P / N + l2 * np.eye(m.n_params)
    np.testing.assert_allclose(P.T @ P / N, dense.fisher(obj, theta, method="products"), rtol=0, atol=1e-12)
    p_dense = -np.linalg.solve(B + lam * np.eye(m.n_params), g)
    d = smw_direction(obj.at(theta), g, lam, curvature="ng")
    assert d.finite and d.d_size == N
    assert _rel(d.p, p_dense) <= 1e-10
    assert abs(d.pBp - p_dense @ B @ p_dense) <= 1e-10 * abs(p_dense @ B @ p_dense)


def test_forms_agree_and_softmax_inverse_form_raises():
    m, theta, obj, r = _small("sigmoid_ce")
    g = r.standard_normal(m.n_params)
    ps = [smw_direction(obj.at(theta), g, 0.1, curvature="gn", form=f).p for f in ("5.6", "5.7", "5.6-inv")]
    assert _rel(ps[1], ps[0]) <= 1e-12 and _rel(ps[2], ps[0]) <= 1e-12
    _, th2, obj2, _ = _small("softmax_ce")
    with pytest.raises(ValueError, match="singular"):
        smw_direction(obj2.at(th2), g, 0.1, curvature="gn", form="5.6-inv")
    with pytest.raises(ValueError, match="coincide"):
        smw_direction(obj2.at(th2), g, 0.1, curvature="ng", form="5.7")
    with pytest.raises(ValueError):
        smw_direction(obj2.at(th2), g, 0.0, curvature="gn")


def test_gram_jacobian_sanity():
    """One check of the engine's Kronecker Gram against explicit finite-difference Jacobians."""
    m, theta, obj, _ = _small("mse")
    J = dense.jacobian_fd(obj, theta).reshape(N * C, -1)  # row i·C + c
    np.testing.assert_allclose(obj.gram(theta, "jacobian"), J @ J.T, rtol=0, atol=1e-7 * np.abs(J @ J.T).max())


def test_singular_solve_is_reported_not_raised():
    assert _solve(np, np.zeros((3, 3)), np.ones(3)) is None


# -- the λ_LM rule (§5.2.3) ------------------------------------------------------------------------------
def test_lambda_rule_hand_computed_sequence():
    lam = 1.0
    seq = []
    for rho in [0.1, 0.9, 0.5, -math.inf, math.nan, 0.25, 0.75, 0.76, 0.24]:
        lam = update_lambda_lm(lam, rho, eps=0.25, boost=1.01, drop=0.99)
        seq.append(lam)
    # 0.1<ε: ×1.01; 0.9>1−ε: ×0.99; 0.5: =; −∞: ×1.01; NaN: =; 0.25 (not < ε): =; 0.75 (not > 1−ε): =;
    # 0.76: ×0.99; 0.24: ×1.01
    expect = [1.01, 0.9999, 0.9999, 1.009899, 1.009899, 1.009899, 1.009899, 0.99980001, 1.0097980101]
    np.testing.assert_allclose(seq, expect, rtol=1e-12)
    assert update_lambda_lm(2.0, 0.0, eps=0.1, boost=3.0, drop=0.5) == 6.0
    assert update_lambda_lm(2.0, 0.95, eps=0.1, boost=3.0, drop=0.5) == 1.0
    assert update_lambda_lm(2.0, 0.9, eps=0.1, boost=3.0, drop=0.5) == 2.0


def _full_batch_problem(loss="sigmoid_ce", l2=0.01, n=12):
    r = np.random.default_rng(3)
    m = Sequential([Dense(5), Tanh(), Dense(C)], input_shape=(D_IN,))
    X = r.standard_normal((n, D_IN))
    return m, m.init(3), Problem(m, loss, X, _targets(loss, r, n), l2=l2, seed=0), n


@pytest.mark.parametrize("cls", [SMWGN, SMWNG])
def test_step_follows_algorithm_23(cls):
    """N₁ = N₂ = N: θ₊ = θ + α p with p the dense LM solve, ρ of eq. 5.5, λ_LM by the rule, λ = λ_LM + τ."""
    m, theta, prob, n = _full_batch_problem()
    opt = cls(lr=0.5, batch_size=n, curvature_batch=n, lambda_lm=0.3, tau=1e-3)
    state = opt.init(theta)
    full = prob.full_objective
    for _ in range(4):
        lam = state.lambda_lm + 1e-3
        g = full.grad(theta)
        if cls is SMWGN:
            B = dense.ggn(full, theta, method="products")
        else:
            P = full.at(theta).per_example_grads()
            B = P.T @ P / n + prob.l2 * np.eye(m.n_params)
        p = -np.linalg.solve(B + lam * np.eye(m.n_params), g)
        rho = (full.value(theta) - full.value(theta + p)) / (-(g @ p) - 0.5 * p @ B @ p)
        new, new_state, info = opt.step(theta, state, prob)
        assert info.accepted and not info.nonfinite
        assert info.extra["lambda"] == pytest.approx(lam, rel=1e-15)
        assert info.extra["rho"] == pytest.approx(rho, rel=1e-9)
        assert new_state.lambda_lm == pytest.approx(update_lambda_lm(state.lambda_lm, rho), rel=1e-15)
        assert _rel(new - theta, 0.5 * p) <= 1e-10
        theta, state = new, new_state


def test_rho_at_update_reports_new_loss():
    m, theta, prob, n = _full_batch_problem("mse")
    opt = SMWGN(lr=0.5, batch_size=n, curvature_batch=n, rho_at="update")
    new, _, info = opt.step(theta, opt.init(theta), prob)
    assert info.loss == pytest.approx(prob.full_objective.value(new), rel=1e-14)


def test_semi_stochastic_variant_is_monotone():
    """full_gradient=True (Theorem 6): α = 1, accept only if ρ ≥ η, so f(θ) never increases."""
    m, theta, prob, n = _full_batch_problem("softmax_ce", n=40)
    opt = SMWGN(full_gradient=True, curvature_batch=8, lambda_lm=0.1)
    assert opt.lr == 1.0 and opt.eta == 0.125
    state = opt.init(theta)
    f = [prob.full_objective.value(theta)]
    rejected = 0
    for _ in range(25):
        theta, state, info = opt.step(theta, state, prob)
        f.append(prob.full_objective.value(theta))
        assert info.extra["curvature_batch"] == 8
        if info.accepted:
            assert info.extra["rho"] >= opt.eta
        else:
            rejected += 1
            assert f[-1] == f[-2]
    assert all(b <= a for a, b in zip(f, f[1:]))
    assert f[-1] < 0.9 * f[0]
    assert state.rejected == rejected


# -- safeguards and validation ----------------------------------------------------------------------------
def test_overflowing_trial_is_rejected():
    """α = 10³⁰⁵ with ρ at the update: the trial's loss overflows → rejected, λ_LM boosted."""
    m, theta, prob, n = _full_batch_problem()
    opt = SMWGN(lr=1e305, batch_size=n, curvature_batch=4, rho_at="update")
    new, st, info = opt.step(theta, opt.init(theta), prob)
    assert info.nonfinite and not info.accepted
    assert new is theta and np.isfinite(new).all()
    assert st.rejected == 1 and info.extra["rho"] == -math.inf and st.lambda_lm == pytest.approx(1.01)


def test_nonfinite_trial_loss_is_rejected(monkeypatch):
    import qnref.optim.smw as smw

    m, theta, prob, n = _full_batch_problem()
    monkeypatch.setattr(smw, "try_point", lambda obj, th: None)     # f(θ + p) is NaN/Inf
    opt = SMWGN(batch_size=n, curvature_batch=4)
    new, st, info = opt.step(theta, opt.init(theta), prob)
    assert info.nonfinite and not info.accepted and new is theta
    assert st.lambda_lm == pytest.approx(1.01)


def test_overflowing_update_is_rejected():
    """ρ at θ + p is fine, but θ + αp overflows (α = 10³⁰⁸ · huge): never returned."""
    m, theta, prob, n = _full_batch_problem()
    opt = SMWGN(lr=1.7e308, batch_size=n, curvature_batch=4)
    new, st, info = opt.step(theta, opt.init(theta), prob)
    assert np.isfinite(new).all()
    if not info.accepted:
        assert info.nonfinite and new is theta


def test_nonfinite_direction_is_rejected(monkeypatch):
    import qnref.optim.smw as smw

    m, theta, prob, n = _full_batch_problem()

    def broken(real):
        def direction(*a, **k):
            d = real(*a, **k)
            d.p = d.p * np.nan
            d.finite = False
            return d
        return direction

    # both routes: the passes on S₂ (smw_direction) and the taps of S₁ (taps_direction, dense nets)
    monkeypatch.setattr(smw, "smw_direction", broken(smw.smw_direction))
    monkeypatch.setattr(smw, "taps_direction", broken(smw.taps_direction))
    for opt in (SMWNG(batch_size=n, curvature_batch=4), SMWNG(batch_size=n, curvature_batch=4, full_gradient=True)):
        new, st, info = opt.step(theta, opt.init(theta), prob)
        assert info.nonfinite and not info.accepted and new is theta and st.lambda_lm == pytest.approx(1.01)


@pytest.mark.parametrize("kwargs", [
    dict(lr=-1.0), dict(lr=float("nan")), dict(lr=0.0), dict(batch_size=0), dict(curvature_batch=0),
    dict(batch_size=10, curvature_batch=20), dict(lambda_lm=0.0), dict(lambda_lm=-1.0), dict(tau=-1e-3),
    dict(tau=float("inf")), dict(boost=1.0), dict(boost=0.5), dict(drop=1.0), dict(drop=0.0),
    dict(eps=0.0), dict(eps=0.5), dict(form="5.8"), dict(eta=0.3), dict(eta=-0.1), dict(rho_at="x"),
])
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        SMWGN(**kwargs)


def test_ng_accepts_only_symmetric_form_and_registry():
    with pytest.raises(ValueError, match="coincide"):
        SMWNG(form="5.7")
    assert OPTIMIZERS["smw-gn"] is SMWGN and OPTIMIZERS["smw-ng"] is SMWNG
    opt = SMWGN()
    assert (opt.lr, opt.batch_size, opt.curvature_batch, opt.lambda_lm, opt.tau, opt.boost, opt.drop, opt.eps) == \
        (0.1, 60, 30, 1.0, 1e-3, 1.01, 0.99, 0.25)
    assert opt.eta is None and opt.form == "5.6"


# -- training -------------------------------------------------------------------------------------------
def test_smw_gn_beats_sgd_on_digits_autoencoder():
    """64-32-8-32-64 tanh autoencoder, sigmoid_ce on pixels/16, 2 epochs, N₁ = 60.

    SMW-GN with the thesis defaults except N₂ = 5 (for speed; D is 320 × 320) against SGD at the
    best learning rate of {0.1, 0.3, 0.5} (0.3). Measured: SMW-GN ≈ 23.5, SGD ≈ 24.3 / 26.4 / 27.3.
    """
    from sklearn.datasets import load_digits

    X = load_digits().data / 16.0

    def fresh():
        m = Sequential([Dense(32), Tanh(), Dense(8), Tanh(), Dense(32), Tanh(), Dense(64)], input_shape=(64,))
        return m, m.init(0), Problem(m, "sigmoid_ce", X, X, l2=0.0, seed=0)

    m, theta, prob = fresh()
    f0 = prob.full_objective.value(theta)
    opt = SMWGN(batch_size=60, curvature_batch=5)
    state = opt.init(theta)
    while prob.epochs < 2:
        theta, state, info = opt.step(theta, state, prob)
        assert np.isfinite(theta).all()
    f_smw = prob.full_objective.value(theta)
    f_sgd = {}
    for lr in (0.1, 0.3, 0.5):
        m, th, prob = fresh()
        while prob.epochs < 2:
            th = th - lr * prob.batch(60).at(th).grad
        f_sgd[lr] = prob.full_objective.value(th)
    assert f_smw < 0.6 * f0
    assert f_smw < min(f_sgd.values()), (f_smw, f_sgd)


def test_smw_gn_beats_hf_and_sgd_per_epoch_on_digits_autoencoder():
    """Thesis ch. 5 claim at small scale: digits autoencoder 64-32-8-32-64 (tanh, sigmoid_ce on
    pixels/16, all 1797 images), seeds 0–3. SMW-GN (N₁ = 60, N₂ = 10, α = 0.5, other defaults
    from the thesis) vs HF (defaults: 20 % gradient sample, curvature batch 100) and SGD (batch 64,
    lr 0.3). Measured full training loss after epochs 1, 2 (OpenBLAS 0.3.31, Haswell kernels):
    seed 0: SMW-GN 21.85, 20.45; HF 24.41, 20.37; SGD 26.35, 25.19;
    seed 1: SMW-GN 21.40, 19.85; HF 23.55, 20.05; SGD 27.32, 26.32;
    seed 2: SMW-GN 21.81, 20.06; HF 23.28, 20.02; SGD 27.60, 27.36;
    seed 3: SMW-GN 22.91, 20.73; HF 25.23, 20.28; SGD 27.50, 26.06.
    Asserted: SMW-GN < HF < SGD after epoch 1 (margin ≥ 1.4 between SMW-GN and HF on every seed),
    and both second-order methods < SGD after epoch 2. Not asserted: SMW-GN < HF after epoch 2. The
    two are level there (HF ahead on seeds 0, 2, 3 above), and HF's epoch-2 loss depends on
    rounding: the same code gives 20.53 on seed 0 with OpenBLAS's AVX-512 kernels
    (OPENBLAS_CORETYPE=SkylakeX) against 20.37 with its Haswell kernels (HF's discrete choices —
    CG stop, iterate backtracking, line search — amplify last-bit differences; SMW-GN and SGD
    agree to 1e-14 across the two). An earlier version asserted epoch 2 on seeds 0 and 1, true only
    with the AVX-512 kernels."""
    from sklearn.datasets import load_digits

    from qnref.nn.activations import Tanh
    from qnref.nn.dense import Dense
    from qnref.nn.model import Sequential
    from qnref.optim import make_optimizer
    from qnref.train import Data, train

    X = load_digits().data / 16.0
    data = Data(X, X, None, None, "sigmoid_ce", "digits-ae")
    m = Sequential([Dense(32), Tanh(), Dense(8), Tanh(), Dense(32), Tanh(), Dense(64)], input_shape=(64,))
    for seed in (0, 1, 2, 3):
        curves = {name: [h["train_loss"] for h in train(m, make_optimizer(name, **kw), data, epochs=2, seed=seed).history[1:]]
                  for name, kw in [("smw-gn", {"curvature_batch": 10, "lr": 0.5}), ("hf", {}), ("sgd", {"batch_size": 64, "lr": 0.3})]}
        assert curves["smw-gn"][0] + 1.0 < curves["hf"][0] < curves["sgd"][0], (seed, curves)
        assert max(curves["smw-gn"][1], curves["hf"][1]) < curves["sgd"][1], (seed, curves)


def test_update_skips_only_the_passes_the_trial_decides():
    """θ + αp (Alg. 23): the trial itself for t = α; for t = 1 ≥ α finite whenever the trial is (monotone
    rounding), bit-equal to θ + αp; otherwise checked (α > 1 may overflow where θ + p does not)."""
    from qnref.optim.smw import _update

    r = np.random.default_rng(3)
    theta, p = r.standard_normal(50), r.standard_normal(50)
    trial = theta + 0.3 * p
    assert _update(theta, p, 0.3, 0.3, trial) is trial
    assert np.array_equal(_update(theta, p, 0.3, 1.0, theta + p), theta + 0.3 * p)
    big = np.array([1.0e308, -1.0e308, 1.7e308])                # θ + p at the edge of the range
    step = np.array([7.0e307, -7.0e307, -1.7e308])
    edge = big + step
    assert np.isfinite(edge).all()
    for lr in (1.0, 0.999999, 0.5, 1e-300):
        new = _update(big, step, lr, 1.0, edge)
        assert np.isfinite(new).all() and np.array_equal(new, big + lr * step)
    with np.errstate(over="ignore", invalid="ignore"):          # as in the step (SMWOptimizer.step)
        assert _update(big, step, 3.0, 1.0, edge) is None       # α > 1: θ + αp overflows


def test_direction_with_an_overflowing_norm_is_not_finite():
    """_finished checks p through ‖p‖² (one pass): Inf/NaN entries and an overflowing finite p are refused."""
    from qnref.optim.smw import _finished

    m, theta, prob, n = _full_batch_problem()
    pt = prob.full_objective.at(theta)
    g = pt.grad
    d = _finished(pt.l2, g, -g, 0.5, 1.0, n, "5.6")
    assert d.finite and d.pp == pytest.approx(g @ g, rel=1e-15) and d.g_dot_p == pytest.approx(-(g @ g), rel=1e-15)
    for bad in (np.inf, np.nan, 1e200):
        q = -g.copy()
        q[0] = bad
        with np.errstate(over="ignore", invalid="ignore"):      # as in the step (SMWOptimizer.step)
            assert not _finished(pt, g, q, 0.5, 1.0, n, "5.6").finite
