"""MB-LSR1 / L-SSR1-TR (Griffin et al., Algorithms 1–6): sub-algorithms by hand, safeguards, digits."""
from __future__ import annotations

import numpy as np
import pytest

from qnref.curvature.objective import NonFiniteError, Objective
from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.optim.base import Problem, state_from_host, state_to_host
from qnref.optim.pairs import PairStore
from qnref.optim.mb_lsr1 import (LSSR1TR, MBLSR1, MBLSR1State, batch_rule, clip_to_radius,
                                 hybrid_direction, progress_sample_size, restart_test)
from qnref.optim.drivers import trust_region_update
from qnref.optim.registry import make_optimizer
from qnref.optim.trust_region import AveragedRadiusRule


# -- getRadius (Alg. 5) ----------------------------------------------------------------------------
def get_radius(delta, s_norm, rho, zeta, rho_hat, T, delta_min=0.0):
    """Alg. 5 through the shared driver (ared = ρ, pred = 1): (δ, ρ̂, T)."""
    dec = trust_region_update(AveragedRadiusRule(delta_min=delta_min), delta, rho, 1.0, s_norm,
                              average=(zeta, rho_hat, T))
    return dec.delta, dec.rho_hat, dec.T


def test_get_radius_sequence_zeta_one():
    d, rh, T = 1.0, 0.0, 0.0
    d, rh, T = get_radius(d, 1.0, 1.0, 1.0, rh, T)       # ρ̂ = 1, ‖s‖ = δ → double
    assert (d, rh, T) == (2.0, 1.0, 1.0)
    d, rh, T = get_radius(d, 2.0, 0.2, 1.0, rh, T)       # ρ̂ = (1 + 0.2)/2 = 0.6 ≥ 0.5, ‖s‖ = δ
    assert d == 4.0 and rh == pytest.approx(0.6) and T == 2.0
    d, rh, T = get_radius(d, 0.5, -1.0, 1.0, rh, T)      # ρ̂ = (1.2 − 1)/3 < 0.1 → δ = min(δ, ‖s‖)
    assert d == 0.5 and rh == pytest.approx(0.2 / 3) and T == 3.0
    d, rh, T = get_radius(d, 0.1, 1.0, 1.0, rh, T)       # ρ̂ = 1.2/4 = 0.3: unchanged
    assert d == 0.5 and rh == pytest.approx(0.3)
    d, rh, T = get_radius(d, 0.2, 0.99, 1.0, rh, T)      # ρ̂ ≥ 0.5 but ‖s‖ < δ: unchanged
    assert d == 0.5


def test_get_radius_zeta_zero_and_half():
    d, rh, T = get_radius(1.0, 0.3, 0.05, 0.0, 0.9, 5.0)  # ζ = 0: ρ̂ = ρ, T = 1 (classical)
    assert (d, rh, T) == (0.3, 0.05, 1.0)
    rh, T = 0.0, 0.0
    out = []
    for rho in (1.0, 0.0, 0.0):
        _, rh, T = get_radius(1.0, 0.0, rho, 0.5, rh, T)
        out.append((rh, T))
    # T: 1, 1.5, 1.75;  ρ̂: 1, (0.5·1·1 + 0)/1.5 = 1/3, (0.5·1.5·(1/3))/1.75 = 1/7
    assert out[1] == (pytest.approx(1 / 3), 1.5) and out[2] == (pytest.approx(1 / 7), 1.75)
    assert get_radius(1.0, 0.0, -5.0, 0.0, 0.0, 0.0, delta_min=1e-3)[0] == 1e-3  # floor


# -- getBatch (Alg. 6) -----------------------------------------------------------------------------
def test_batch_doubling_rule():
    assert batch_rule(100, 1000, 1.0, np.inf, 0.0, 0.1, 0.0, 1.0) == (100, 1.0, False)  # first check
    assert batch_rule(100, 1000, 0.95, 1.0, 0.0, 0.1, 0.0, 1.0) == (200, 1.0, True)      # −0.05 ≥ −0.1
    assert batch_rule(100, 1000, 0.85, 1.0, 0.0, 0.1, 0.0, 1.0) == (100, 1.0, False)     # −0.15 < −0.1
    assert batch_rule(600, 1000, 1.0, 1.0, 0.0, 0.1, 0.0, 1.0) == (1000, 0.0, True)      # n_b = N → ζ = 0
    # γ₂ ΣR: threshold −γ₁ + γ₂ΣR = 0.1·(−1) = −0.1
    assert batch_rule(100, 1000, 0.8, 1.0, -1.0, 0.0, 0.1, 1.0)[2] is False
    assert batch_rule(100, 1000, 0.95, 1.0, -1.0, 0.0, 0.1, 1.0)[2] is True
    assert batch_rule(100, 1000, np.nan, 1.0, 0.0, 0.0, 0.1, 1.0)[2] is True             # non-finite: no progress


def test_progress_sample_size():
    assert progress_sample_size(128, 10_000) == 141          # ⌈1.1·128⌉
    assert progress_sample_size(100, 10_000) == 110
    assert progress_sample_size(8000, 100_000) == 5000       # cap
    assert progress_sample_size(1000, 1050) == 1050          # ≤ N
    assert progress_sample_size(128, 1797, full=True) == 1797


# -- getStep pieces (Alg. 4) -----------------------------------------------------------------------
def test_hybrid_direction_hand_case():
    g = np.array([1.0, 0.0])
    p_star = np.array([-1.0, 1.0])
    v = np.array([0.0, 2.0])
    s = np.array([2.0, 0.0])
    # η = μ = 0.5, α_s = 1, δ = 10: v = 0.5v − 0.5g + 0.5s = (0.5, 1); p = 0.5p* + 0.5v = (−0.25, 1)
    p, v_new = hybrid_direction(p_star, g, v, s, 10.0, eta=0.5, mu=0.5, alpha_s=1.0)
    np.testing.assert_allclose(v_new, [0.5, 1.0])
    np.testing.assert_allclose(p, [-0.25, 1.0])
    # δ = 0.5: v clipped to norm 0.5, p clipped to 0.5; pᵀg > 0 is flipped
    p, v_new = hybrid_direction(-p_star, g, v, s, 0.5, eta=0.0, mu=0.0, alpha_s=1.0)
    assert np.linalg.norm(p) == pytest.approx(0.5) and p @ g < 0
    assert np.linalg.norm(v_new) == pytest.approx(0.5)
    np.testing.assert_allclose(clip_to_radius(np.array([3.0, 4.0]), 1.0), [0.6, 0.8])


def test_restart_trigger():
    assert restart_test(0.0, 1.0, 1.0, 1e-8)                   # p ⟂ g
    assert not restart_test(-1e-3, 1e-3, 1.0, 1e-8)            # p = −10⁻³ g
    assert restart_test(-1e-3, 1e-3, 1.0, 1e-2)                # |gᵀp| = 10⁻³ < ξ‖g‖ = 10⁻²
    assert restart_test(0.0, 0.0, 1.0, 1e-8)                   # zero step
    assert not restart_test(0.0, 0.0, 0.0, 1e-8)               # g = 0


# -- problems -------------------------------------------------------------------------------------
def _digits(n=None):
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    if n is not None:
        X, y = X[:n], y[:n]
    return X, y


def _mlp():
    return Sequential([Dense(32), Tanh(), Dense(10)], input_shape=(64,))


def _problem(n=300, seed=0):
    X, y = _digits(n)
    model = _mlp()
    return model, Problem(model, "softmax_ce", X, y, seed=seed)


def test_updateSY_restart_warm_and_classic():
    model, prob = _problem()
    theta = model.init(0)
    p = prob.full_objective.at(theta)
    rng = np.random.default_rng(0)
    s, y = rng.standard_normal(model.n_params), rng.standard_normal(model.n_params)
    # m̂ = 0: ρ < τ clears the memory
    opt = MBLSR1(memory=4, restart_memory=0, tau=0.0)
    mem = PairStore.empty(theta, 4)
    mem.append(s, y)
    assert opt.update_sy(mem, s, y, -0.5, p, prob)[0] == "restart" and mem.count == 0
    # ρ ≥ τ: classic append
    assert opt.update_sy(mem, s, y, 0.5, p, prob)[0] == "push" and mem.count == 1
    # m̂ = −1 (L-SSR1-TR): never restarts
    lssr1 = LSSR1TR(memory=4)
    assert lssr1.update_sy(mem, 2 * s, y, -10.0, p, prob)[0] in ("push", "skip") and mem.count >= 1
    # m̂ = m: warm start with sampled pairs, y = ∇²f s exactly (option II)
    warm = MBLSR1(memory=4, restart_memory=4, tau=0.0)
    action, _, _ = warm.update_sy(mem, s, y, -1.0, p, prob)
    assert action == "warm" and 1 <= mem.count <= 4
    for i in range(mem.count):
        hv = p.hvp(mem.S[i].copy())
        assert np.abs(hv - mem.Y[i]).max() <= 1e-10 * np.abs(hv).max()


def test_lssr1_is_the_special_case():
    opt = make_optimizer("lssr1-tr")
    assert isinstance(opt, MBLSR1)
    assert (opt.restart_memory, opt.gamma2, opt.eta, opt.zeta) == (-1, 0.0, 0.0, 0.0)
    assert opt._full_progress and not MBLSR1._full_progress
    with pytest.raises(TypeError):
        LSSR1TR(eta=0.1)


def test_invalid_hyperparameters_raise():
    for bad in [dict(memory=0), dict(restart_memory=5, memory=3), dict(restart_memory=-2), dict(gamma1=2.0),
                dict(gamma2=-0.1), dict(zeta=1.5), dict(eta=1.5), dict(mu=1.0), dict(alpha_s=2.0),
                dict(delta0=0.0), dict(K=0), dict(c1=0.0), dict(gamma=0.0), dict(xi=-1.0),
                dict(progress_factor=0.5), dict(rho_floor=float("-inf")), dict(warm_option="III"),
                dict(tau=float("nan")), dict(delta_min=1.0), dict(batch_size=0)]:
        with pytest.raises((ValueError, TypeError)):
            MBLSR1(**bad)


def test_restart_when_direction_fails_the_xi_test():
    model, prob = _problem()
    theta = model.init(0)
    opt = MBLSR1(batch_size=100, xi=1.0)  # ξ = 1: every direction not parallel to ĝ restarts
    st = opt.init(theta)
    th, st, info = opt.step(theta, st, prob)
    assert info.extra["restarts"] >= 1 and info.extra["fallback_gradient"]
    assert info.loss < info.loss_start and np.isfinite(th).all()


class _FarIsNaN(Objective):
    theta0 = None
    limit = 0.02

    def at(self, theta):
        if np.linalg.norm(theta - self.theta0) > self.limit:
            raise NonFiniteError("simulated overflow")
        return super().at(theta)


def test_nonfinite_trials_are_rejected():
    model, prob = _problem()
    theta0 = model.init(0)
    prob.subset = lambda idx: _wrap(prob, theta0, idx)
    opt = MBLSR1(batch_size=100, delta0=1.0)
    th, st = theta0.copy(), opt.init(theta0)
    for _ in range(4):
        th, st, info = opt.step(th, st, prob)
        assert np.isfinite(th).all() and np.linalg.norm(th - theta0) <= _FarIsNaN.limit + 1e-12


def _wrap(prob, theta0, idx):
    o = _FarIsNaN(prob.model, prob.loss, prob.X[idx], prob.y[idx], counter=prob.counter)
    o.theta0 = theta0
    return o


def test_nonfinite_start_and_exit_check():
    model, prob = _problem()
    theta = model.init(0)
    bad = theta.copy()
    bad[0] = np.inf
    opt = MBLSR1(batch_size=50)
    th, st, info = opt.step(bad, opt.init(theta), prob)
    assert info.nonfinite and th is bad
    # ExitCheck: with ε huge the batch gradient passes and the full-data re-check confirms
    opt = MBLSR1(batch_size=50, eps=1e6)
    th, st, info = opt.step(theta, opt.init(theta), prob)
    assert st.converged and info.extra["converged"]
    th2, st2, info2 = opt.step(th, st, prob)
    assert th2 is th and not info2.accepted


def test_batch_grows_when_no_progress_and_checkpoint_resumes():
    model, prob = _problem(n=300, seed=3)
    theta = model.init(1)
    # γ₁ = 1: any progress check decreasing f̂ by less than 1 doubles n_b (progress every K = 2)
    opt = MBLSR1(batch_size=40, K=2, gamma1=1.0, gamma2=0.0)
    th, st = theta.copy(), opt.init(theta)
    sizes = []
    for _ in range(3):
        th, st, info = opt.step(th, st, prob)
        sizes.append(st.n_b)
    assert sizes == [40, 40, 80]  # k = 0: first check sets f̂_K; k = 2: doubles
    for _ in range(4):
        th, st, info = opt.step(th, st, prob)
    assert st.n_b == 300 and st.zeta == 0.0  # 80 → 160 → 300 = N, ζ ← 0
    saved = (prob.state(), state_to_host(st), th.copy())
    for _ in range(2):
        th, st, _ = opt.step(th, st, prob)
    prob.load_state(saved[0])
    th2, st2 = saved[2], state_from_host(MBLSR1State, saved[1])
    for _ in range(2):
        th2, st2, _ = opt.step(th2, st2, prob)
    assert np.array_equal(th, th2) and st.delta == st2.delta


# -- digits: MB-LSR1 vs L-SSR1-TR, large batch -----------------------------------------------------
SEEDS, ITERS, BATCH = (0, 1, 2), 30, 512


def test_digits_mb_lsr1_vs_lssr1(record_property, capsys):
    """sklearn digits (all 1797, pixels/16), MLP 64-32-10 tanh, softmax_ce, Glorot init (seed),
    initial batch 512, 30 iterations, default hyperparameters of both methods; full-data loss."""
    X, y = _digits()
    model = _mlp()
    res = {"mb-lsr1": [], "lssr1-tr": []}
    starts = []
    for seed in SEEDS:
        theta0 = model.init(seed)
        for name in res:
            prob = Problem(model, "softmax_ce", X, y, seed=seed)
            opt = make_optimizer(name, batch_size=BATCH)
            th, st = theta0.copy(), opt.init(theta0)
            for _ in range(ITERS):
                th, st, _ = opt.step(th, st, prob)
                assert np.isfinite(th).all()
            res[name].append(prob.full_objective.value(th))
        starts.append(prob.full_objective.value(theta0))
    with capsys.disabled():
        print(f"\n[digits] full loss after {ITERS} its, batch {BATCH}: start {np.round(starts, 4)}")
        for name, v in res.items():
            print(f"  {name:9s} {np.round(v, 4)}  mean {np.mean(v):.4f}")
    record_property("digits_losses", res)
    # Honest assertion only: both decrease the loss by more than half on every seed. (Measured:
    # L-SSR1-TR reaches a lower loss than MB-LSR1 with these defaults — see docs/mb_lsr1.md.)
    for name, v in res.items():
        assert all(f < 0.5 * f0 for f, f0 in zip(v, starts)), name


def test_gram_route_matches_the_qr_route_per_step():
    """gram_cache=True (kept Grams, subproblem from ΨᵀΨ and Ψ products) against the QR route:
    from the same state (the QR run's, Grams rebuilt from its pairs), one step of each agrees to
    ≤ 1e-10 relative on a well-conditioned problem (l2 = 0.1, the full set each step)."""
    import copy

    from qnref.optim.base import Problem

    X, y = _digits(200)
    model = _mlp()
    prob_qr = Problem(model, "softmax_ce", X, y, l2=0.1, seed=0)
    th = model.init(0)
    qr, gram = MBLSR1(memory=5, batch_size=200, delta0=0.1), MBLSR1(memory=5, batch_size=200, delta0=0.1,
                                                                    gram_cache=True)
    st = qr.init(th)
    checked = 0
    for _ in range(15):
        st_g = copy.deepcopy(st)
        st_g.memory.ensure_grams()
        pg = Problem(model, "softmax_ce", X, y, l2=0.1, seed=0)
        pg.load_state(prob_qr.state())
        th_g, st_g, info_g = gram.step(th, st_g, pg)
        th_new, st, info = qr.step(th, st, prob_qr)
        assert info_g.extra["gram_fallback"] == 0
        assert info_g.extra["sy_action"] == info.extra["sy_action"]
        s, s_g = th_new - th, th_g - th
        assert np.linalg.norm(s_g - s) <= 1e-10 * np.linalg.norm(s), np.linalg.norm(s_g - s) / np.linalg.norm(s)
        th = th_new
        assert abs(info_g.radius - info.radius) <= 1e-10 * info.radius
        checked += st.memory.count > 1
    assert checked >= 5
