"""The quasi-Newton operators (qnref.optim.operators) against dense recursive updates and SciPy."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import LbfgsInvHessProduct

from qnref.optim.compact import bfgs_update, sr1_inverse_update, sr1_update
from qnref.optim.operators import (
    DenseInverseBFGS,
    LBFGSOperator,
    LSR1Operator,
    bfgs_inverse_update,
    lsr1_prune,
    operator_flops,
    sr1_skip,
)
from qnref.optim.operators import lsr1_prune_count as prune_on_grams
from qnref.optim.pairs import PairStore


def lbfgs_two_loop(v, S, Y, gamma=None):
    return LBFGSOperator(S, Y, gamma).solve(v)


def lsr1_prune_count(S, Y, gamma, **kw):
    return prune_on_grams(S @ Y.T, S @ S.T, Y @ Y.T, gamma, **kw)

RTOL = 1e-10


def rel(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def spd_pairs(rng, n, k):
    """Pairs from an SPD quadratic plus noise, with sᵢᵀyᵢ > 0."""
    A = rng.standard_normal((n, n))
    A = A @ A.T / n + np.eye(n)
    S = rng.standard_normal((k, n))
    Y = S @ A + 0.1 * rng.standard_normal((k, n))
    assert np.all(np.sum(S * Y, axis=1) > 0)
    return S, Y


def dense_bfgs(S, Y, gamma):
    n = S.shape[1]
    B, H = np.eye(n) / gamma, gamma * np.eye(n)
    for s, y in zip(S, Y):
        B, H = bfgs_update(B, s, y), bfgs_inverse_update(H, s, y)
    return B, H


def dense_sr1(S, Y, gamma, r=1e-8):
    n = S.shape[1]
    B, H = gamma * np.eye(n), np.eye(n) / gamma
    for s, y in zip(S, Y):
        B, skipped = sr1_update(B, s, y, r)
        H, skipped_h = sr1_inverse_update(H, s, y, r)
        assert not skipped and not skipped_h
    return B, H


# ---------------------------------------------------------------------------------- L-BFGS
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gamma", [None, 1.0, 0.37])
def test_lbfgs_compact_equals_dense_recursion(seed, gamma):
    rng = np.random.default_rng(seed)
    n, k = 12, 5
    S, Y = spd_pairs(rng, n, k)
    op = LBFGSOperator(S, Y, gamma)
    g_used = float(op.gamma)
    if gamma is None:
        assert g_used == pytest.approx(S[-1] @ Y[-1] / (Y[-1] @ Y[-1]), rel=1e-15)
    B, H = dense_bfgs(S, Y, g_used)
    assert rel(op.to_dense(), B) < RTOL
    assert rel(op.to_dense(inverse=True), H) < RTOL
    v = rng.standard_normal(n)
    assert rel(op.matvec(v), B @ v) < RTOL
    assert rel(op.solve(v), H @ v) < RTOL  # the two-loop recursion
    assert rel(op.solve_compact(v), H @ v) < RTOL  # the compact form, its oracle
    V = rng.standard_normal((n, 3))  # matrix right-hand sides, both forms
    assert rel(op.solve(V), H @ V) < RTOL and rel(op.solve_compact(V), H @ V) < RTOL
    # B and H are inverses
    assert rel(op.matvec(op.solve(v)), v) < RTOL


def test_two_loop_default_gamma_is_newest_pair():
    rng = np.random.default_rng(3)
    S, Y = spd_pairs(rng, 9, 4)
    v = rng.standard_normal(9)
    g = S[-1] @ Y[-1] / (Y[-1] @ Y[-1])
    assert rel(lbfgs_two_loop(v, S, Y), lbfgs_two_loop(v, S, Y, g)) < 1e-14


@pytest.mark.parametrize("seed", [0, 1])
def test_two_loop_matches_scipy(seed):
    # SciPy's LbfgsInvHessProduct uses H0 = I (no scaling): gamma = 1.
    rng = np.random.default_rng(seed)
    n, k = 15, 6
    S, Y = spd_pairs(rng, n, k)
    v = rng.standard_normal(n)
    ref = LbfgsInvHessProduct(S, Y).matvec(v)
    assert rel(lbfgs_two_loop(v, S, Y, 1.0), ref) < RTOL
    assert rel(LBFGSOperator(S, Y, 1.0).solve_compact(v), ref) < RTOL
    # H0 = γI on (s, y) equals γ · H_scipy on (s, γy): checks the γ convention
    gam = 0.3
    ref_g = gam * LbfgsInvHessProduct(S, gam * Y).matvec(v)
    assert rel(lbfgs_two_loop(v, S, Y, gam), ref_g) < RTOL


def test_lbfgs_secant_and_empty_memory():
    rng = np.random.default_rng(4)
    S, Y = spd_pairs(rng, 10, 4)
    op = LBFGSOperator(S, Y)
    assert rel(op.matvec(S[-1]), Y[-1]) < RTOL
    assert rel(op.solve(Y[-1]), S[-1]) < RTOL
    assert rel(op.solve_compact(Y[-1]), S[-1]) < RTOL
    e = LBFGSOperator(np.zeros((0, 10)), np.zeros((0, 10)), 2.0)
    v = rng.standard_normal(10)
    assert np.allclose(e.solve(v), 2.0 * v) and np.allclose(e.matvec(v), 0.5 * v)
    assert np.allclose(e.solve_compact(v), 2.0 * v)
    assert np.allclose(lbfgs_two_loop(v, np.zeros((0, 10)), np.zeros((0, 10))), v)


def test_lbfgs_rejects_nonpositive_curvature():
    S = np.eye(3)[:2]
    Y = -S
    with pytest.raises(ValueError, match="s_i"):
        LBFGSOperator(S, Y, 1.0).solve_compact(S[0])
    with pytest.raises(ValueError, match="gamma > 0"):
        LBFGSOperator(S, -Y, -1.0)
    with pytest.raises(ValueError):
        bfgs_update(np.eye(3), S[0], Y[0])
    with pytest.raises(ValueError, match="s\\^T y > 0"):
        bfgs_inverse_update(np.eye(3), S[0], Y[0])


# ---------------------------------------------------------------------------------- L-SR1
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("gamma", [1.0, 0.5, -0.7])
def test_lsr1_compact_equals_dense_recursion(seed, gamma):
    rng = np.random.default_rng(seed)
    n, k = 10, 5
    A = rng.standard_normal((n, n))
    A = A + A.T  # indefinite
    S = rng.standard_normal((k, n))
    Y = S @ A + 0.05 * rng.standard_normal((k, n))
    B, H = dense_sr1(S, Y, gamma)
    op = LSR1Operator.from_pairs(S, Y, gamma)
    assert rel(op.to_dense(), B) < RTOL
    assert rel(op.to_dense(inverse=True), H) < 1e-9
    assert rel(op.to_dense(inverse=True) @ B, np.eye(n)) < 1e-9
    # exposed pieces
    assert op.Psi.shape == (n, k) and op.M.shape == (k, k)
    assert rel(gamma * np.eye(n) + op.Psi @ op.M @ op.Psi.T, B) < RTOL
    # noisy pairs: the secant equation holds for the newest pair
    assert rel(op.matvec(S[-1]), Y[-1]) < 1e-9
    assert rel(op.solve(Y[-1]), S[-1]) < 1e-9
    assert not op.singular and 0 < op.rcond <= 1
    # the same operator from a PairStore's incrementally kept Grams (Ψ never formed)
    store = PairStore.empty(np.zeros(n), k)
    for s_, y_ in zip(S, Y):
        store.append(s_, y_)
    og = LSR1Operator.from_store(store, gamma)
    assert og._Psi_rows is None
    v = rng.standard_normal(n)
    assert rel(og.matvec(v), B @ v) < RTOL and rel(og.solve(v), H @ v) < 1e-9
    assert rel(og.psi_gram(), op.Psi.T @ op.Psi) < 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lsr1_hereditary_secant_on_quadratic(seed):
    # [NW06] Thm 6.1: with yᵢ = A sᵢ, SR1 satisfies B sᵢ = yᵢ for every stored pair
    rng = np.random.default_rng(seed)
    n, k = 12, 6
    A = rng.standard_normal((n, n))
    A = A + A.T
    S = rng.standard_normal((k, n))
    Y = S @ A
    op = LSR1Operator.from_pairs(S, Y, 0.8)
    for s, y in zip(S, Y):
        assert rel(op.matvec(s), y) < 1e-10
        assert rel(op.solve(y), s) < 1e-9


def test_sr1_recovers_quadratic_hessian():
    # [NW06] Thm 6.1: n independent steps on a quadratic give B = A exactly
    rng = np.random.default_rng(7)
    n = 8
    A = rng.standard_normal((n, n))
    A = A + A.T
    S = rng.standard_normal((n, n))
    Y = S @ A
    op = LSR1Operator.from_pairs(S, Y, 1.0)
    assert rel(op.to_dense(), A) < 1e-9
    B, _ = dense_sr1(S, Y, 1.0)
    assert rel(B, A) < 1e-9


def test_lsr1_singular_middle_reported():
    rng = np.random.default_rng(0)
    n = 6
    s = rng.standard_normal(n)
    S = np.stack([s, 2 * s])
    Y = np.stack([3 * s, 6 * s])  # dependent pairs: M⁻¹ singular
    with pytest.raises(ValueError, match="singular"):
        LSR1Operator.from_pairs(S, Y, 1.0)
    op = LSR1Operator.from_pairs(S, Y, 1.0, check=False)
    assert op.singular
    with pytest.raises(ValueError, match="singular"):
        op.matvec(s)
    assert lsr1_prune_count(S, Y, 1.0) == 1
    assert LSR1Operator.from_pairs(S[1:], Y[1:], 1.0).matvec(S[1]) == pytest.approx(Y[1], rel=1e-12)
    with pytest.raises(ValueError, match="finite gamma"):
        LSR1Operator.from_pairs(S, Y, float("nan"))


def test_lsr1_gamma_zero_direct_form():
    """B₀ = 0 (sampled L-SR1): B = Y (D + L + Lᵀ)⁻¹ Yᵀ equals the dense SR1 recursion from B = 0."""
    r = np.random.default_rng(3)
    n, k = 7, 3
    A = r.standard_normal((n, n))
    A = A + A.T
    S = r.standard_normal((k, n))
    Y = S @ A
    B = np.zeros((n, n))
    for s, y in zip(S, Y):
        B, skipped = sr1_update(B, s, y)
        assert not skipped
    op = LSR1Operator.from_pairs(S, Y, 0.0)
    np.testing.assert_allclose(op.to_dense(), B, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="gamma != 0"):
        op.solve(S[0])


def test_lsr1_solve_raises_when_B_singular():
    # B = γI + ΨMΨᵀ with an eigenvalue 0: y = 0·s along s
    n = 4
    s = np.eye(n)[0]
    y = np.zeros(n)  # B s = 0 after the update, B singular
    op = LSR1Operator.from_pairs(s[None], y[None], 1.0)
    assert np.allclose(op.matvec(s), 0.0)
    with pytest.raises(ValueError, match="singular"):
        op.solve(s)


def test_lsr1_prune_count_inverse_and_clean():
    rng = np.random.default_rng(5)
    S, Y = spd_pairs(rng, 8, 3)
    assert lsr1_prune_count(S, Y, 0.5) == 0
    assert lsr1_prune_count(S, Y, 0.5, inverse=True) == 0
    assert lsr1_prune_count(np.zeros((2, 8)), np.zeros((2, 8)), 1.0) == 2


def test_sr1_skip_rule_hand_cases():
    s = np.array([1.0, 0.0])
    Bs = np.zeros(2)
    # y − Bs = (1, 1): sᵀv = 1, ‖s‖‖v‖ = √2 → update for r < 1/√2
    y = np.array([1.0, 1.0])
    assert not sr1_skip(s, y, Bs, r=0.7)
    assert sr1_skip(s, y, Bs, r=0.71)
    # y − Bs ⟂ s: always skipped
    assert sr1_skip(s, np.array([0.0, 1.0]), Bs, r=1e-8)
    # y = Bs: nothing to update (would divide by zero) → skipped
    assert sr1_skip(s, Bs, Bs, r=1e-8)
    # non-finite → skipped
    assert sr1_skip(s, np.array([np.nan, 0.0]), Bs)
    B, skipped = sr1_update(np.eye(2), s, np.array([1.0, 5.0]), r=1e-8)
    # v = (0, 5) ⟂ s → skipped, B unchanged (a copy)
    assert skipped and np.array_equal(B, np.eye(2))
    B, skipped = sr1_update(np.eye(2), s, np.array([3.0, 1.0]), r=1e-8)
    # v = (2, 1), vᵀs = 2 → B = I + vvᵀ/2
    assert not skipped
    assert np.allclose(B, np.eye(2) + np.outer([2.0, 1.0], [2.0, 1.0]) / 2.0, rtol=0, atol=1e-15)
    assert np.allclose(B @ s, [3.0, 1.0])
    H, skipped = sr1_inverse_update(np.eye(2), s, np.array([3.0, 1.0]))
    assert not skipped and np.allclose(H @ np.array([3.0, 1.0]), s)
    assert np.allclose(H, np.linalg.inv(B))


def test_flop_counts():
    n, m = 1000, 5
    assert operator_flops("lsr1_matvec_paper", n, m) == (4 * m + 1) * n + m * m
    assert operator_flops("lbfgs_two_loop", n, m) == 4 * m * n + n
    assert operator_flops("lbfgs_compact", n, m) == (4 * m + 1) * n + 4 * m * m
    assert operator_flops("lsr1_form", n, m) == m * n + 2 * m * m * n + m ** 3
    assert operator_flops("lsr1_matvec", n, m) < operator_flops("lsr1_matvec_paper", n, m)
    rng = np.random.default_rng(0)
    S, Y = spd_pairs(rng, 6, 2)
    assert LSR1Operator.from_pairs(S, Y, 1.0).flops_matvec == operator_flops("lsr1_matvec", 6, 2)
    store = PairStore.from_rows(S, Y)
    assert LSR1Operator.from_store(store, 1.0).flops_matvec == operator_flops("lsr1_matvec_paper", 6, 2)
    op = LBFGSOperator(S, Y)
    assert op.flops_solve == 4 * 2 * 6 + 6 and op.flops_matvec == operator_flops("lbfgs_compact", 6, 2)
    assert DenseInverseBFGS(np.eye(6)).flops_solve == 36
    with pytest.raises(ValueError, match="unknown kind"):
        operator_flops("nope", 1, 1)


def test_dense_inverse_bfgs_operator():
    """DenseInverseBFGS.update is [NW06] (6.17): the secant equation H⁺y = s, and it is the
    inverse of the direct BFGS update (6.19); k updates equal the L-BFGS operator."""
    rng = np.random.default_rng(8)
    n, k = 7, 4
    S, Y = spd_pairs(rng, n, k)
    op = DenseInverseBFGS.identity(np.zeros(n), 0.6)
    B = np.eye(n) / 0.6
    for s, y in zip(S, Y):
        op = op.update(s, y)
        B = bfgs_update(B, s, y)
        assert rel(op.solve(y), s) < 1e-12
    assert rel(op.to_dense(inverse=True), np.linalg.inv(B)) < 1e-10
    assert rel(op.to_dense(), B) < 1e-10
    v = rng.standard_normal(n)
    assert rel(op.solve(v), LBFGSOperator(S, Y, 0.6).solve(v)) < 1e-10
    sym = DenseInverseBFGS(op.H).update(S[0], Y[0], symmetrize=True).H
    assert np.array_equal(sym, sym.T)
    with pytest.raises(ValueError, match="square"):
        DenseInverseBFGS(np.zeros((2, 3)))


@pytest.mark.parametrize("inverse", [False, True])
def test_lsr1_prune_same_with_kept_and_fresh_grams(inverse):
    """lsr1_prune drops the same pairs whether the store keeps its Grams or forms them (and ΨᵀΨ
    from Ψ itself); the dependent oldest pair goes, the rest stay in order."""
    rng = np.random.default_rng(11)
    n = 9
    s, y = rng.standard_normal(n), rng.standard_normal(n)
    rows = [(s, y), (2 * s, 2 * y)] + [(rng.standard_normal(n), rng.standard_normal(n)) for _ in range(2)]
    out = []
    for grams in (True, False):
        store = PairStore.empty(np.zeros(n), 5, grams=grams)
        for a, b in rows:
            store.append(a, b)
        d = lsr1_prune(store, 1.0, inverse=inverse)
        out.append((d, store.S.copy()))
        assert store.has_grams == grams
    S0, Y0 = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    assert out[0][0] == out[1][0] == lsr1_prune_count(S0, Y0, 1.0, inverse=inverse)
    assert out[0][0] >= 1  # s₁ ∥ s₀, y₁ ∥ y₀: the first two rows make the middle matrix singular
    np.testing.assert_array_equal(out[0][1], out[1][1])
    assert lsr1_prune(PairStore.empty(np.zeros(n), 2), 1.0) == 0
    with pytest.raises(ValueError, match="pruning test needs"):
        prune_on_grams(np.eye(2), None, np.eye(2), 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 5, 64, 333])
def test_bfgs_inverse_update_kernel_same_bits_as_the_expression(dtype, n, monkeypatch):
    """The one-pass numba update (host, C-contiguous, one dtype) gives the bits of NumPy's
    H − ρ(s(Hy)ᵀ + (Hy)sᵀ) + ρ(1 + ρyᵀHy)ssᵀ, also for huge and tiny entries; outside its domain
    (a transposed H, mixed dtypes, the 'xp' switch) the expression itself runs. Every size runs on
    the kernel here (MIN_SIZE 0)."""
    from qnref import host_kernels
    from qnref.nn import conv
    from qnref.optim.operators import bfgs_inverse_update

    monkeypatch.setattr(host_kernels, "MIN_SIZE", 0)

    rng = np.random.default_rng(n)
    A = (rng.standard_normal((n, n)) * 10.0 ** rng.uniform(-15, 15, (n, 1))).astype(dtype)
    H = (A @ A.T + np.eye(n)).astype(dtype)
    s = (rng.standard_normal(n) * 10.0 ** rng.uniform(-5, 5, n)).astype(dtype)
    y = (s + 0.1 * rng.standard_normal(n)).astype(dtype)
    if float(s @ y) <= 0:
        y = -y

    def expression(H, s=s, y=y):
        rho = 1.0 / (s @ y)
        Hy = H @ y
        return H - rho * (np.outer(s, Hy) + np.outer(Hy, s)) + (rho * (1.0 + rho * (y @ Hy))) * np.outer(s, s)

    with np.errstate(all="ignore"):
        want = expression(H)
        got = bfgs_inverse_update(H, s, y)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == H.dtype and got.flags.c_contiguous
        np.testing.assert_array_equal(bfgs_inverse_update(H, s, y, symmetrize=True), 0.5 * (want + want.T))
        Ht = np.asfortranarray(H)                       # not C-contiguous: the expression (H y by another BLAS path)
        np.testing.assert_array_equal(bfgs_inverse_update(Ht, s, y), expression(Ht))
        s64, y64 = s.astype(np.float64), y.astype(np.float64)   # mixed dtypes (float32 H): the expression
        np.testing.assert_array_equal(bfgs_inverse_update(H, s64, y64), expression(H, s64, y64))
        monkeypatch.setattr(conv, "KERNELS", "xp")
        np.testing.assert_array_equal(bfgs_inverse_update(H, s, y), want)
