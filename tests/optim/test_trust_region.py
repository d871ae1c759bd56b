"""Trust-region radius rules (L-SR1 paper, Alg. 1) and subproblem solvers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from qnref.optim.operators import LBFGSOperator, LSR1Operator
from qnref.optim.pairs import PairStore
from qnref.optim.trust_region import (
    RadiusRule,
    reduction_ratio,
    solve_dense_subproblem,
    solve_lsr1_subproblem,
    steihaug_cg,
)

TOL = 1e-8


def dense_B(gamma, Psi, M):
    return gamma * np.eye(Psi.shape[0]) + Psi @ M @ Psi.T


def assert_optimal(g, B, sol, delta, tol=TOL):
    """(B + σI)p = −g, σ ≥ 0, σ(Δ − ‖p‖) = 0, ‖p‖ ≤ Δ, B + σI ⪰ 0, pred consistent."""
    n = g.shape[0]
    p, s = sol.p, sol.sigma
    scale = max(np.linalg.norm(g), np.linalg.norm(B, 2) * delta, 1e-300)
    assert np.linalg.norm((B + s * np.eye(n)) @ p + g) <= tol * scale
    assert s >= 0.0
    pn = np.linalg.norm(p)
    assert pn <= delta * (1 + tol)
    assert abs(s * (delta - pn)) <= tol * max(s, 1.0) * delta
    assert np.linalg.eigvalsh(B + s * np.eye(n)).min() >= -tol * np.linalg.norm(B, 2)
    assert sol.pred == pytest.approx(-(g @ p + 0.5 * p @ B @ p), rel=1e-10, abs=1e-12)
    assert sol.step_norm == pytest.approx(pn, rel=1e-12)
    assert sol.pred >= -1e-12
    assert sol.lambda_min == pytest.approx(np.linalg.eigvalsh(B).min(), rel=1e-9, abs=1e-9)


def assert_same(a, b, tol=1e-9):
    assert np.linalg.norm(a.p - b.p) <= tol * max(np.linalg.norm(b.p), 1e-300)
    assert a.sigma == pytest.approx(b.sigma, rel=tol, abs=tol)
    assert a.pred == pytest.approx(b.pred, rel=1e-10)
    assert a.boundary == b.boundary and a.hard_case == b.hard_case


GRAM_TOL = 1e-9  # ΨᵀΨ squares κ(Ψ): about ε·κ(Ψ)² relative; these Ψ have κ ≲ 10


def gram_solve(g, gamma, Psi, M, delta, **kw):
    return solve_lsr1_subproblem_gram(g, gamma, lambda v: Psi.T @ v, lambda c: Psi @ c,
                                      Psi.T @ Psi, M, delta, **kw)


#: the exact OBS solvers under test and the relative accuracy of σ, ‖p‖ each reaches in the hard case
SOLVERS = {"qr": (solve_lsr1_subproblem, 1e-12), "gram": (gram_solve, 1e-10)}


def structured(rng, n, d, gamma):
    """Ψ, M with B = γI + Q diag(d) Qᵀ exactly in a known orthonormal basis Q (n × k)."""
    k = len(d)
    Q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    R = rng.standard_normal((k, k)) + 3 * np.eye(k)
    Psi = Q @ R
    Rinv = np.linalg.inv(R)
    M = Rinv @ np.diag(d) @ Rinv.T
    M = 0.5 * (M + M.T)
    return Psi, M, Q


# ------------------------------------------------------------------------- random compact B
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("gamma", [1.0, 0.1, -0.5])
def test_lsr1_subproblem_random_pairs(seed, gamma):
    rng = np.random.default_rng(seed)
    n = [30, 45, 60, 40, 50][seed]
    k = [3, 5, 8, 4, 6][seed]
    A = rng.standard_normal((n, n))
    A = (A + A.T) / np.sqrt(n)  # indefinite "Hessian"
    S = rng.standard_normal((k, n))
    Y = S @ A + 0.01 * rng.standard_normal((k, n))
    op = LSR1Operator.from_pairs(S, Y, gamma)
    B = op.to_dense()
    g = rng.standard_normal(n)
    for delta in [1e-2, 1.0, 1e3]:
        sol = solve_lsr1_subproblem(g, gamma, op.Psi, op.M, delta)
        ref = solve_dense_subproblem(g, B, delta)
        assert_optimal(g, B, sol, delta)
        assert_optimal(g, B, ref, delta)
        assert_same(sol, ref)
        assert sol.rank == k


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("solver", ["qr", "gram"])
def test_lsr1_subproblem_random_psi_m(seed, solver):
    solve = {"qr": solve_lsr1_subproblem, "gram": gram_solve}[solver]
    rng = np.random.default_rng(10 + seed)
    n, k = 35, 4 + seed
    Psi = rng.standard_normal((n, k))
    M = rng.standard_normal((k, k))
    M = M + M.T
    for gamma in [2.0, -1.0]:
        B = dense_B(gamma, Psi, M)
        g = rng.standard_normal(n)
        for delta in [0.05, 2.0, 50.0]:
            sol = solve(g, gamma, Psi, M, delta)
            assert_optimal(g, B, sol, delta)
            assert_same(sol, solve_dense_subproblem(g, B, delta), tol=GRAM_TOL)
            assert sol.boundary  # B is indefinite


def test_interior_newton_step():
    rng = np.random.default_rng(1)
    n, k = 40, 5
    Psi = rng.standard_normal((n, k))
    C = rng.standard_normal((k, k))
    M = C @ C.T  # B = I + ΨMΨᵀ positive definite
    B = dense_B(1.0, Psi, M)
    g = rng.standard_normal(n)
    newton = -np.linalg.solve(B, g)
    delta = 2.0 * np.linalg.norm(newton)
    sol = solve_lsr1_subproblem(g, 1.0, Psi, M, delta)
    assert not sol.boundary and not sol.hard_case and sol.sigma == 0.0
    assert np.linalg.norm(sol.p - newton) <= 1e-10 * np.linalg.norm(newton)
    assert_optimal(g, B, sol, delta)
    assert_same(sol, solve_dense_subproblem(g, B, delta))
    # shrinking the radius below ‖p_N‖ moves the solution to the boundary
    sol = solve_lsr1_subproblem(g, 1.0, Psi, M, 0.5 * np.linalg.norm(newton))
    assert sol.boundary and sol.sigma > 0
    assert_optimal(g, B, sol, 0.5 * np.linalg.norm(newton))


def test_gamma_smallest_not_hard():
    # γ = −1 < every range eigenvalue; g has a complement component → σ > 1
    rng = np.random.default_rng(2)
    n = 30
    Psi, M, _ = structured(rng, n, np.array([0.5, 2.0, 3.0]), -1.0)
    B = dense_B(-1.0, Psi, M)
    g = rng.standard_normal(n)
    for delta in [0.1, 10.0]:
        sol = solve_lsr1_subproblem(g, -1.0, Psi, M, delta)
        assert sol.lambda_min == pytest.approx(-1.0) and sol.sigma > 1.0 and not sol.hard_case
        assert_optimal(g, B, sol, delta)
        assert_same(sol, solve_dense_subproblem(g, B, delta))


# ------------------------------------------------------------------------- hard case
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_hard_case_range_eigenvalue(seed, solver):
    solve, tol = SOLVERS[solver]
    rng = np.random.default_rng(seed)
    n, gamma = 40, 1.0
    d = np.array([-3.0, 0.5, 2.0, 4.0])  # λ_min = γ − 3 = −2 from the range of Ψ
    Psi, M, Q = structured(rng, n, d, gamma)
    B = dense_B(gamma, Psi, M)
    g = rng.standard_normal(n)
    g -= (Q[:, 0] @ g) * Q[:, 0]  # g ⟂ eigenvector of λ_min
    # ‖p(−λ_min)‖ with the λ_min component removed
    p_hat = -np.linalg.lstsq(B + 2.0 * np.eye(n), g, rcond=1e-10)[0]
    delta = 3.0 * np.linalg.norm(p_hat)
    sol = solve(g, gamma, Psi, M, delta)
    assert sol.hard_case and sol.boundary
    assert sol.sigma == pytest.approx(2.0, rel=tol)
    assert np.linalg.norm(sol.p) == pytest.approx(delta, rel=tol)
    assert_optimal(g, B, sol, delta)
    ref = solve_dense_subproblem(g, B, delta)
    assert ref.hard_case
    assert_optimal(g, B, ref, delta)
    assert sol.pred == pytest.approx(ref.pred, rel=1e-10)  # p is not unique, the value is
    # the step is p̂ plus a multiple of the eigenvector
    resid = sol.p - p_hat
    assert np.linalg.norm(resid - (Q[:, 0] @ resid) * Q[:, 0]) <= 1e-9 * delta
    # a radius below ‖p̂‖: not the hard case, σ > −λ_min
    small = 0.5 * np.linalg.norm(p_hat)
    sol = solve(g, gamma, Psi, M, small)
    assert not sol.hard_case and sol.sigma > 2.0
    assert_optimal(g, B, sol, small)
    assert_same(sol, solve_dense_subproblem(g, B, small))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_hard_case_gamma_smallest(seed, solver):
    solve, tol = SOLVERS[solver]
    # γ = −1 is λ_min (multiplicity n − k) and g ∈ range(Ψ): z from the complement of range(Ψ)
    rng = np.random.default_rng(seed)
    n, gamma = 35, -1.0
    Psi, M, Q = structured(rng, n, np.array([1.5, 2.5, 4.0]), gamma)
    B = dense_B(gamma, Psi, M)
    g = Psi @ rng.standard_normal(3)
    p_hat = -np.linalg.lstsq(B + np.eye(n), g, rcond=1e-10)[0]
    delta = 2.0 * np.linalg.norm(p_hat)
    sol = solve(g, gamma, Psi, M, delta)
    assert sol.hard_case and sol.boundary and sol.sigma == pytest.approx(1.0, rel=tol)
    assert_optimal(g, B, sol, delta)
    z = sol.p - p_hat
    assert np.linalg.norm(Q.T @ z) <= 1e-9 * delta  # null-vector part ⟂ range(Ψ)
    ref = solve_dense_subproblem(g, B, delta)
    assert ref.hard_case and sol.pred == pytest.approx(ref.pred, rel=1e-10)


def test_hard_case_zero_gradient_and_no_memory():
    rng = np.random.default_rng(3)
    n = 20
    Psi, M, Q = structured(rng, n, np.array([-2.0, 1.0]), 0.5)
    B = dense_B(0.5, Psi, M)
    sol = solve_lsr1_subproblem(np.zeros(n), 0.5, Psi, M, 0.7)
    assert sol.hard_case and np.linalg.norm(sol.p) == pytest.approx(0.7)
    assert abs(Q[:, 0] @ sol.p) == pytest.approx(0.7)
    assert sol.pred == pytest.approx(0.5 * 1.5 * 0.49)  # −½ λ_min Δ²
    assert_optimal(np.zeros(n), B, sol, 0.7)
    # k = 0: B = γI
    g = rng.standard_normal(n)
    e, e0 = np.zeros((n, 0)), np.zeros((0, 0))
    sol = solve_lsr1_subproblem(g, 2.0, e, e0, 100.0)
    assert not sol.boundary and np.allclose(sol.p, -g / 2.0, rtol=1e-14)
    sol = solve_lsr1_subproblem(g, -1.0, e, e0, 0.3)
    assert sol.sigma == pytest.approx(np.linalg.norm(g) / 0.3 + 1.0, rel=1e-12)
    assert_optimal(g, -np.eye(n), sol, 0.3)
    sol = solve_lsr1_subproblem(np.zeros(n), -1.0, e, e0, 0.3)
    assert sol.hard_case and np.linalg.norm(sol.p) == pytest.approx(0.3)


def test_singular_psd_min_norm():
    # γ = 0, B = ΨMΨᵀ ⪰ 0 singular, g ∈ range: σ = 0, p = −B⁺g (a global minimizer)
    rng = np.random.default_rng(4)
    n = 25
    Psi, M, _ = structured(rng, n, np.array([1.0, 2.0, 3.0]), 0.0)
    B = dense_B(0.0, Psi, M)
    g = Psi @ rng.standard_normal(3)
    pinv = -np.linalg.pinv(B, rcond=1e-10) @ g
    sol = solve_lsr1_subproblem(g, 0.0, Psi, M, 10 * np.linalg.norm(pinv))
    assert sol.sigma == 0.0 and not sol.boundary and not sol.hard_case
    assert np.linalg.norm(sol.p - pinv) <= 1e-10 * np.linalg.norm(pinv)
    assert_optimal(g, B, sol, 10 * np.linalg.norm(pinv))


def check_rank_deficient_psi(solve, tol):
    """Ψ of rank 4 out of 6 columns: ``solve`` finds the rank and the dense solution.
    Returns the generator for further draws."""
    rng = np.random.default_rng(5)
    n, k = 40, 6
    Psi = rng.standard_normal((n, k))
    Psi[:, 3] = Psi[:, 0] + 2 * Psi[:, 1]
    Psi[:, 5] = Psi[:, 2]
    M = rng.standard_normal((k, k))
    M = M + M.T
    for gamma in [1.0, -0.3]:
        B = dense_B(gamma, Psi, M)
        g = rng.standard_normal(n)
        for delta in [0.1, 5.0]:
            sol = solve(g, gamma, Psi, M, delta)
            assert sol.rank == 4
            assert_optimal(g, B, sol, delta)
            assert_same(sol, solve_dense_subproblem(g, B, delta), tol=tol)
    return rng


def test_rank_deficient_psi():
    check_rank_deficient_psi(solve_lsr1_subproblem, 1e-9)


# ------------------------------------------------------------------------- Steihaug-CG
def spd(rng, n):
    A = rng.standard_normal((n, n))
    return A @ A.T / n + 0.5 * np.eye(n)


@pytest.mark.parametrize("seed", range(3))
def test_steihaug_interior_matches_exact(seed):
    rng = np.random.default_rng(seed)
    n = 40
    B = spd(rng, n)
    g = rng.standard_normal(n)
    newton = -np.linalg.solve(B, g)
    delta = 2 * np.linalg.norm(newton)
    cg = steihaug_cg(g, lambda v: B @ v, delta, tol=1e-13)
    ex = solve_dense_subproblem(g, B, delta)
    assert cg.converged and not cg.boundary and not cg.negative_curvature
    assert np.linalg.norm(cg.p - ex.p) <= 1e-10 * np.linalg.norm(ex.p)
    assert cg.pred == pytest.approx(ex.pred, rel=1e-12)
    assert cg.n_iter <= 2 * n


@pytest.mark.parametrize("seed", range(3))
def test_steihaug_boundary(seed):
    rng = np.random.default_rng(seed)
    n = 40
    g = rng.standard_normal(n)
    for B in (spd(rng, n), spd(rng, n) - 1.5 * np.eye(n)):  # SPD, then indefinite
        for delta in (0.05, 1.0, 1e6):
            cg = steihaug_cg(g, lambda v: B @ v, delta)
            ex = solve_dense_subproblem(g, B, delta)
            pn = np.linalg.norm(cg.p)
            assert pn <= delta * (1 + 1e-12)
            assert cg.pred == pytest.approx(-(g @ cg.p + 0.5 * cg.p @ B @ cg.p), rel=1e-10)
            # Cauchy decrease ≤ CG decrease ≤ optimal decrease
            gBg = g @ B @ g
            gn = np.linalg.norm(g)
            tau = 1.0 if gBg <= 0 else min(1.0, gn ** 3 / (delta * gBg))
            pc = -tau * delta / gn * g
            cauchy = -(g @ pc + 0.5 * pc @ B @ pc)
            assert cauchy * (1 - 1e-12) <= cg.pred <= ex.pred * (1 + 1e-12)
            if cg.boundary:
                assert pn == pytest.approx(delta, rel=1e-12)
            if np.linalg.eigvalsh(B).min() < 0 and delta == 1e6:
                assert cg.boundary and cg.negative_curvature


def test_steihaug_hand_cases():
    g = np.array([3.0, 4.0])
    cg = steihaug_cg(g, lambda v: -v, 2.0)  # B = −I: first direction has negative curvature
    assert cg.negative_curvature and cg.boundary and cg.n_iter == 1
    assert np.allclose(cg.p, -2.0 * g / 5.0, rtol=0, atol=1e-15)
    assert cg.pred == pytest.approx(2.0 * 5.0 + 0.5 * 4.0)
    cg = steihaug_cg(np.zeros(2), lambda v: v, 1.0)
    assert cg.converged and np.all(cg.p == 0) and cg.pred == 0.0
    cg = steihaug_cg(g, lambda v: v, 10.0)  # B = I: one step to −g
    assert cg.converged and np.allclose(cg.p, -g) and cg.pred == pytest.approx(12.5)


# ------------------------------------------------------------------------- radius rules
def test_radius_rule_hand_sequence():
    # [RD16] Alg. 1: ρ > 0.75 and ‖s‖ > 0.8Δ → 2Δ; ρ < 0.1 → 0.5Δ; otherwise unchanged
    steps = [  # (ρ, ‖s‖, expected Δ after)
        (0.9, 1.0, 2.0),     # very good, on the boundary → double
        (0.9, 1.0, 2.0),     # very good but ‖s‖ = 1 ≤ 0.8·2 → keep
        (0.5, 2.0, 2.0),     # fair → keep
        (0.05, 2.0, 1.0),    # poor → halve
        (-3.0, 0.2, 0.5),    # rejected step → halve
        (0.76, 0.41, 1.0),   # > 0.75 and 0.41 > 0.4 → double
        (0.75, 1.0, 1.0),    # ρ = u exactly: strict, keep
        (0.8, 0.8, 1.0),     # ‖s‖ = 0.8Δ exactly: strict, keep
        (0.1, 1.0, 1.0),     # ρ = l exactly: strict, keep
        (math.nan, 1.0, 0.5),  # NaN ratio → shrink
        (-math.inf, 0.0, 0.25),
    ]
    delta = 1.0
    for rho, sn, expected in steps:
        delta = RadiusRule().update(delta, rho, sn)
        assert delta == expected
    rule = RadiusRule()
    assert rule.update(1.0, 0.9, 1.0) == 2.0 and rule.update(1.0, 0.0, 1.0) == 0.5


def test_radius_rule_configurable():
    assert RadiusRule(boundary_fraction=0.4).update(1.0, 0.95, 0.5) == 2.0
    assert RadiusRule().update(1.0, 0.95, 0.5) == 1.0
    assert RadiusRule(increase=3.0, delta_max=2.5).update(1.0, 0.95, 1.0) == 2.5
    assert RadiusRule(l=0.25, decrease=0.25).update(1.0, 0.2, 1.0) == 0.25
    assert RadiusRule(u=0.5).update(1.0, 0.6, 1.0) == 2.0
    rule = RadiusRule(eta=0.01, increase=4.0)
    assert rule.update(1.0, 0.9, 1.0) == 4.0
    assert rule.accept(0.02) and not rule.accept(0.01)


def test_accept_step_and_ratio():
    assert RadiusRule(eta=1e-4).accept(1e-3) and not RadiusRule(eta=1e-4).accept(1e-4)  # strict ρ > η (line 13)
    assert not RadiusRule().accept(math.nan) and not RadiusRule().accept(-1.0)
    assert reduction_ratio(0.5, 1.0) == 0.5
    assert reduction_ratio(1.0, 0.0) == -math.inf
    assert reduction_ratio(math.nan, 1.0) == -math.inf
    assert reduction_ratio(-math.inf, 1.0) == -math.inf
    assert not RadiusRule().accept(reduction_ratio(1.0, -1.0))


# ------------------------------------------------------------------------- CuPy (GPU)
@pytest.mark.gpu
def test_cupy_matches_numpy():
    from qnref import backend

    if not backend.gpu_available():
        pytest.skip("no usable CUDA device")
    import cupy as cp

    rng = np.random.default_rng(0)
    n, k = 50, 5
    A = rng.standard_normal((n, n))
    A = (A + A.T) / np.sqrt(n)
    S = rng.standard_normal((k, n))
    Y = S @ A + 0.01 * rng.standard_normal((k, n))
    g = rng.standard_normal(n)
    op = LSR1Operator.from_pairs(S, Y, 0.5)
    op_d = LSR1Operator.from_pairs(cp.asarray(S), cp.asarray(Y), 0.5)
    assert np.allclose(cp.asnumpy(op_d.matvec(cp.asarray(g))), op.matvec(g), rtol=1e-12)
    assert np.allclose(cp.asnumpy(op_d.solve(cp.asarray(g))), op.solve(g), rtol=1e-10)
    for delta in (0.1, 100.0):
        ref = solve_lsr1_subproblem(g, 0.5, op.Psi, op.M, delta)
        sol = solve_lsr1_subproblem(cp.asarray(g), 0.5, op_d.Psi, op_d.M, delta)
        assert isinstance(sol.p, cp.ndarray)
        assert np.allclose(cp.asnumpy(sol.p), ref.p, rtol=1e-9, atol=1e-12)
        assert sol.sigma == pytest.approx(ref.sigma, rel=1e-9)
    mem = PairStore.empty(cp.asarray(g), 3)
    for s, y in zip(S, Y):
        mem.append(cp.asarray(s), cp.asarray(y))
    assert mem.count == 3 and np.array_equal(cp.asnumpy(mem.S), S[-3:])
    np.testing.assert_allclose(cp.asnumpy(mem.SY), S[-3:] @ Y[-3:].T, rtol=1e-13)
    assert np.allclose(cp.asnumpy(LBFGSOperator(mem.S, mem.Y).solve(cp.asarray(g))),
                       LBFGSOperator(S[-3:], Y[-3:]).solve(g), rtol=1e-12)
    B = cp.asarray(op.to_dense())
    cg = steihaug_cg(cp.asarray(g), lambda v: B @ v, 0.3)
    assert cg.boundary and float(cp.linalg.norm(cg.p)) == pytest.approx(0.3, rel=1e-12)


# ------------------------------------------------------------------------- Gram-based solver
from qnref.optim.trust_region import solve_lsr1_subproblem_gram  # noqa: E402

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("gamma", [1.0, 0.1, -0.5])
def test_gram_solver_random_pairs(seed, gamma):
    rng = np.random.default_rng(seed)
    n = [30, 45, 60, 40, 50][seed]
    k = [3, 5, 8, 4, 6][seed]
    A = rng.standard_normal((n, n))
    A = (A + A.T) / np.sqrt(n)
    S = rng.standard_normal((k, n))
    Y = S @ A + 0.01 * rng.standard_normal((k, n))
    op = LSR1Operator.from_pairs(S, Y, gamma)
    B = op.to_dense()
    g = rng.standard_normal(n)
    for delta in [1e-2, 1.0, 1e3]:
        sol = gram_solve(g, gamma, op.Psi, op.M, delta)
        assert_optimal(g, B, sol, delta)
        assert_same(sol, solve_lsr1_subproblem(g, gamma, op.Psi, op.M, delta), tol=GRAM_TOL)
        assert_same(sol, solve_dense_subproblem(g, B, delta), tol=GRAM_TOL)
        assert sol.rank == k
        np.testing.assert_allclose(sol.Bp, B @ sol.p, rtol=1e-10, atol=1e-12)
        # the same from the implicit products of a Gram-built LSR1Operator
        opg = LSR1Operator(S, Y, gamma, S @ Y.T, S @ S.T, Y @ Y.T)
        sol2 = solve_lsr1_subproblem_gram(g, gamma, opg.psi_t, opg.psi, opg.psi_gram(), opg.M, delta)
        assert_same(sol2, sol, tol=GRAM_TOL)


def test_gram_solver_rank_deficient_and_empty():
    rng = check_rank_deficient_psi(gram_solve, GRAM_TOL)
    n = 40
    g = rng.standard_normal(n)
    e, e0 = np.zeros((n, 0)), np.zeros((0, 0))
    sol = gram_solve(g, 2.0, e, e0, 100.0)
    assert not sol.boundary and np.allclose(sol.p, -g / 2.0, rtol=1e-14)


def test_no_pairs_is_psi_none():
    """``Psi = M = None`` means B = γI: the same solution as an empty (n, 0) Ψ, bit for bit."""
    g = np.random.default_rng(4).standard_normal(12)
    for delta in (0.05, 100.0):
        a = solve_lsr1_subproblem(g, 0.7, None, None, delta)
        b = solve_lsr1_subproblem(g, 0.7, np.zeros((12, 0)), np.zeros((0, 0)), delta)
        np.testing.assert_array_equal(a.p, b.p)
        assert a.pred == b.pred and a.boundary == (np.linalg.norm(g) / 0.7 > delta)
        np.testing.assert_allclose(a.p, -g / 0.7 * min(1.0, delta * 0.7 / np.linalg.norm(g)), rtol=1e-14)
