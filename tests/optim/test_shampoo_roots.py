"""Shampoo's inverse roots (thesis Alg. 16 line 12): the eigendecomposition route (the CPU default,
``root="auto"``), the thesis's coupled Newton iteration (``root="newton"``) and SciPy's
``fractional_matrix_power`` (an independent oracle: Schur–Padé, no eigendecomposition) agree on SPD
matrices; the optimizer takes the route its ``root`` names."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from qnref.curvature import kron
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.optim.base import Problem
from qnref.optim.registry import make_optimizer
from qnref.optim.shampoo import ROOTS, Shampoo, root_route


def _spd(d: int, cond: float, seed: int) -> np.ndarray:
    """A random SPD matrix with eigenvalues log-spaced in [1/cond, 1] (a contraction-like spectrum)."""
    r = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(r.standard_normal((d, d)))
    return (Q * np.logspace(-np.log10(cond), 0, d)) @ Q.T


def _oracle(M: np.ndarray, p: int, eps: float) -> np.ndarray:
    R = scipy.linalg.fractional_matrix_power(M + eps * np.eye(M.shape[0]), -1.0 / p)
    return np.real(R)


def _rel(A: np.ndarray, B: np.ndarray) -> float:
    return float(np.linalg.norm(A - B) / np.linalg.norm(B))


@pytest.mark.parametrize("d,p,cond", [(7, 2, 1e2), (30, 4, 1e3), (60, 6, 1e4)])
def test_eigh_route_matches_scipy(d, p, cond):
    M, eps = _spd(d, cond, d), 1e-3
    assert _rel(kron.inv_root_eigh(M, p, eps), _oracle(M, p, eps)) < 1e-10


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [1, 3, 64, 127, 128, 300])
def test_eigh_root_is_exactly_symmetric_on_both_eigh_routes(d, dtype):
    """The root is formed as the Gram matrix of V D^½ (kron.gram: one syrk on the host), so it is
    symmetric to the last bit, below and above CHOLESKY_MIN_DIM (NumPy's eigh, SciPy's syevd), and
    within each dtype's rounding of scipy's root of the float64 matrix."""
    M = _spd(d, 1e3, 7 + d).astype(dtype)
    R = kron.inv_root_eigh(M, 4, 1e-3)
    assert R.dtype == dtype and R.flags.c_contiguous
    np.testing.assert_array_equal(R, R.T)
    tol = 1e-10 if dtype == np.float64 else 2e-4
    assert _rel(R.astype(np.float64), _oracle(M.astype(np.float64), 4, 1e-3)) < tol


def test_gram_is_u_times_its_transpose():
    U = np.random.default_rng(3).standard_normal((50, 20))
    G = kron.gram(U)
    np.testing.assert_array_equal(G, G.T)
    assert np.abs(G - np.einsum("ik,jk->ij", U, U)).max() < 1e-12 * np.abs(G).max()


@pytest.mark.parametrize("d,p,cond", [(7, 2, 1e2), (30, 4, 1e3), (60, 6, 1e4)])
def test_newton_route_matches_scipy(d, p, cond):
    """Run to float64 round-off (tol 1e-13) the Newton root is the same matrix to 1e-10; with the
    thesis's stop (100 iterations, 1e-6 on max|Mₖ − I|) it is within ~1e-6 of it."""
    M, eps = _spd(d, cond, 100 + d), 1e-3
    ref = _oracle(M, p, eps)
    R, its, err = kron.inv_root_newton(M, p, eps, max_iter=500, tol=1e-13)
    assert _rel(R, ref) < 1e-10, (its, err)
    R6, _, err6 = kron.inv_root_newton(M, p, eps)  # thesis defaults
    assert err6 <= 1e-6 and _rel(R6, ref) < 1e-5


def test_routes_agree_with_each_other():
    M, eps = _spd(40, 1e3, 5), 1e-2
    R_e = kron.inv_root_eigh(M, 4, eps)
    R_n, _, _ = kron.inv_root_newton(M, 4, eps, max_iter=500, tol=1e-13)
    assert _rel(R_n, R_e) < 1e-10
    # the root really is (M + εI)^(−1/4): R⁴ (M + εI) = I (a wrong exponent, e.g. −1/k, fails this)
    I = np.eye(40)
    assert np.abs(np.linalg.matrix_power(R_e, 4) @ (M + eps * I) - I).max() < 1e-9


def test_auto_resolves_to_eigh_on_numpy():
    M = _spd(5, 10.0, 0)
    assert root_route("auto", M) == "eigh"
    assert root_route("newton", M) == "newton" and root_route("eigh", M) == "eigh"
    assert Shampoo().root == "auto" and set(ROOTS) == {"auto", "eigh", "newton"}


def _problem():
    r = np.random.default_rng(3)
    X, y = r.standard_normal((24, 4)), r.integers(0, 3, 24)
    model = Sequential([Dense(5), Dense(3)], input_shape=(4,))
    return model, model.init(0), Problem(model, "softmax_ce", X, y, seed=0)


@pytest.mark.parametrize("root", ["auto", "eigh", "newton"])
def test_optimizer_takes_the_route_it_names(root):
    """After the warm start the preconditioners are (Ĝ⁽ⁱ⁾ + εI)^(−1/(2k)) of the stored statistics:
    by SciPy's oracle to 1e-10 for the eigh routes, to the Newton stop's accuracy for "newton"
    (and then not equal to the eigh matrices bit for bit — the route really differs)."""
    model, theta, prob = _problem()
    opt = make_optimizer("shampoo", root=root, inv_freq=1, batch_size=8, damping=1e-2)
    state = opt.init(theta)
    theta, state, info = opt.step(theta, state, prob)
    assert info.accepted
    for stats, mats, part in zip(state.stats, state.precond, [None] * len(state.stats)):
        k = len(stats)
        for S, U in zip(stats, mats):
            ref = _oracle(S, 2 * k, opt.damping)
            if root == "newton":
                assert _rel(U, ref) < 1e-4
                R, _, _ = kron.inv_root_newton(S, 2 * k, opt.damping)
                np.testing.assert_array_equal(U, R)
            else:
                assert _rel(U, ref) < 1e-10
                np.testing.assert_array_equal(U, kron.inv_root_eigh(S, 2 * k, opt.damping))


def test_bad_root_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"root must be 'auto', 'eigh' or 'newton', got 'svd'"):
        Shampoo(root="svd")


def test_cost_model_counts_the_route():
    from qnref.optim.costs import algebra_flops

    model = Sequential([Dense(3)], input_shape=(2,), name="tiny")  # W (3, 2), b (3,)
    eig = lambda d: 3 * d ** 3 + d * d * (d + 1) // 2 + 2 * d * d   # eigh, the syrk (V D^½)(V D^½)ᵀ, the scaling
    for root in ("auto", "eigh"):
        t = algebra_flops(make_optimizer("shampoo", inv_freq=1, root=root), model)["terms"]
        assert t["roots"] == eig(3) + eig(2) + eig(3)
    t = algebra_flops(make_optimizer("shampoo", inv_freq=1, root="newton", newton_iters=2), model)["terms"]
    assert t["roots"] == (6 * 9 + 2 * (5 * 27 + 18)) + (6 * 4 + 2 * (5 * 8 + 8)) + (6 * 9 + 2 * (3 * 27 + 18))
