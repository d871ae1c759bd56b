"""Kronecker-factor statistics, layout, damping, inverses and roots (qnref.curvature.kron)."""
import math

import numpy as np
import pytest

from qnref.curvature import kron
from qnref.curvature.objective import Objective
from qnref.nn.activations import Tanh
from qnref.nn.conv import Conv2d
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.nn.reshape import Flatten
from qnref.optim import _kron_common as kc
from qnref.optim.tnt import tnt_factors


def mlp(seed=0):
    m = Sequential([Dense(5), Tanh(), Dense(3)], input_shape=(4,))
    return m, m.init(seed)


def cnn(seed=0):
    m = Sequential([Conv2d(3, 3, padding=1), Tanh(), Conv2d(2, 2, stride=2), Tanh(), Flatten(), Dense(3)], input_shape=(2, 5, 5))
    return m, m.init(seed)


def data(shape, n, C, seed=1):
    r = np.random.default_rng(seed)
    return r.standard_normal((n,) + shape), r.integers(0, C, n)


def test_dense_factors_are_explicit_averages():
    m, th = mlp()
    X, y = data((4,), 7, 3)
    taps = Objective(m, "softmax_ce", X, y).at(th).layer_stats("empirical")
    assert len(taps) == 2
    for t in taps.values():
        A, G = kron.factors(t)
        a, g = t["a"], t["g"]
        assert np.allclose(a[:, -1], 1.0)
        A_ref = sum(np.outer(a[i], a[i]) for i in range(7)) / 7
        G_ref = sum(np.outer(g[i], g[i]) for i in range(7)) / 7
        np.testing.assert_allclose(A, A_ref, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(G, G_ref, rtol=1e-13, atol=1e-14)


def test_taps_g_is_per_example_gradient_and_grad_from_taps():
    """Σᵢ gᵢ āᵢᵀ / N is the mean-loss gradient (gᵢ per example); kron.weight_grad per layer,
    assembled by grad_from_blocks, reproduces p.grad (also when taken by a layer_stats reducer)."""
    m, th = mlp()
    X, y = data((4,), 6, 3)
    p = Objective(m, "softmax_ce", X, y, l2=1e-3).at(th)
    taps = p.layer_stats("empirical")
    layers, others = kc.kron_structure(m)
    assert others == []
    blocks = {n: kron.weight_grad(t) for n, t in taps.items()}
    np.testing.assert_allclose(kc.grad_from_blocks(m.layout, layers, blocks, p), p.grad, rtol=1e-12, atol=1e-14)
    reduced = p.layer_stats("empirical", lambda name, t: kron.weight_grad(t))
    assert set(reduced) == set(blocks) and all(np.array_equal(reduced[n], blocks[n]) for n in blocks)


def test_conv_factors_patch_formulas():
    """KFC: A = (1/N) Σᵢ Σₜ āāᵀ (sum over locations), G = (1/(N L)) Σᵢ Σₜ ggᵀ (thesis (3.9))."""
    m, th = cnn()
    X, y = data((2, 5, 5), 3, 3)
    taps = Objective(m, "softmax_ce", X, y).at(th).layer_stats("empirical")
    t = taps[m.layers[0].name]
    assert t["kind"] == "conv"
    N, L = t["a"].shape[:2]
    assert L == 25 and t["a"].shape[2] == 2 * 9 + 1
    A, G = kron.factors(t)
    A_ref = sum(np.outer(t["a"][i, s], t["a"][i, s]) for i in range(N) for s in range(L)) / N
    G_ref = sum(np.outer(t["g"][i, s], t["g"][i, s]) for i in range(N) for s in range(L)) / (N * L)
    np.testing.assert_allclose(A, A_ref, rtol=1e-12)
    np.testing.assert_allclose(G, G_ref, rtol=1e-12)
    # patch entries are the padded inputs at the (c, i, j) channel-major positions
    xpad = np.pad(X, ((0, 0), (0, 0), (1, 1), (1, 1)))
    np.testing.assert_allclose(t["a"][1, 7, :-1], xpad[1, :, 1:4, 2:5].reshape(-1))
    # the gradient of the block is the sum over locations of g āᵀ, averaged over examples
    p = Objective(m, "softmax_ce", X, y).at(th)
    layers, others = kc.kron_structure(m)
    blocks = {n: kron.weight_grad(t) for n, t in taps.items()}
    np.testing.assert_allclose(kc.grad_from_blocks(m.layout, layers, blocks, p), p.grad, rtol=1e-11, atol=1e-13)
    assert [L_.w_shape for L_ in layers] == [(3, 2, 9), (2, 3, 4), (3, 8)]


@pytest.mark.parametrize("targets", ["empirical", "sampled"])
def test_single_example_kron_fisher_is_exact(targets):
    """N = 1: G ⊗ A (row-major layout) equals the exact Fisher block g gᵀ of the per-example gradient."""
    m, th = mlp(3)
    X, y = data((4,), 1, 3, seed=5)
    p = Objective(m, "softmax_ce", X, y).at(th)
    P = p.per_example_grads(targets)
    taps = p.layer_stats(targets)
    layers, _ = kc.kron_structure(m)
    for L in layers:
        b = m.layout.blocks[L.block]
        gvec = P[0, b.offset:b.stop]
        F_exact = np.outer(gvec, gvec)
        A, G = kron.factors(taps[L.name])
        np.testing.assert_allclose(kron.kron_block(G, A), F_exact, rtol=1e-12, atol=1e-15)


def test_kfac_preconditioning_equals_explicit_damped_solve():
    r = np.random.default_rng(0)
    m, th = mlp()
    X, y = data((4,), 9, 3)
    p = Objective(m, "softmax_ce", X, y).at(th)
    taps = p.layer_stats("sampled")
    views = m.layout.views(p.grad)
    lam = 0.37
    for L in kc.kron_structure(m)[0]:
        A, G = kron.factors(taps[L.name])
        HA, HG, pi = kron.damped_inverses(A, G, lam)
        pi_ref = math.sqrt(np.trace(np.kron(A, np.eye(G.shape[0]))) / np.trace(np.kron(np.eye(A.shape[0]), G)))
        assert pi == pytest.approx(pi_ref, rel=1e-12)
        Ad = A + pi * math.sqrt(lam) * np.eye(A.shape[0])
        Gd = G + math.sqrt(lam) / pi * np.eye(G.shape[0])
        V = views[L.block]
        ref = np.linalg.solve(np.kron(Gd, Ad), V.reshape(-1)).reshape(V.shape)  # row-major vec
        np.testing.assert_allclose(kron.precondition(V, HG, HA), ref, rtol=1e-10, atol=1e-13)
        # random matrix too (not just the gradient)
        Z = r.standard_normal(V.shape)
        np.testing.assert_allclose(kron.precondition(Z, HG, HA), np.linalg.solve(np.kron(Gd, Ad), Z.ravel()).reshape(V.shape), rtol=1e-10)


def test_ema_and_pi_default():
    a, b = np.ones((2, 2)), np.zeros((2, 2))
    np.testing.assert_allclose(kron.ema(a, b, 0.9), 0.9 * a)
    assert kron.pi_split(np.zeros((2, 2)), np.eye(3)) == 1.0


@pytest.mark.parametrize("p", [1, 2, 4, 6])
def test_coupled_newton_roots_match_eigh(p):
    r = np.random.default_rng(p)
    Z = r.standard_normal((12, 30))
    M = Z @ Z.T / 30
    eps = 1e-3
    R, its, err = kron.inv_root_newton(M, p, eps)
    ref = kron.inv_root_eigh(M, p, eps)
    assert its <= 100 and err <= 1e-6
    assert np.abs(R - ref).max() / np.abs(ref).max() < 1e-6
    # rank-deficient statistics (a single gradient's contraction) with damping
    g = r.standard_normal((8, 1))
    R, _, _ = kron.inv_root_newton(g @ g.T, 2 * p, 1e-4)
    ref = kron.inv_root_eigh(g @ g.T, 2 * p, 1e-4)
    assert np.abs(R - ref).max() / np.abs(ref).max() < 1e-6


def test_newton_root_rejects_bad_input():
    with pytest.raises(ValueError):
        kron.inv_root_newton(np.eye(3), 0)
    with pytest.raises(ValueError):
        kron.inv_root_newton(np.zeros((3, 3)), 2)


def test_mode_products_are_kronecker_products_row_major():
    """(U₁ ⊗ U₂ ⊗ U₃) vec_r(X) = vec_r(X ×₁ U₁ ×₂ U₂ ×₃ U₃) (thesis Proposition 1)."""
    r = np.random.default_rng(2)
    X = r.standard_normal((2, 3, 4))
    Us = [r.standard_normal((d, d)) for d in X.shape]
    Y = X
    for i, U in enumerate(Us):
        Y = kron.mode_product(Y, U, i)
    np.testing.assert_allclose(Y.ravel(), np.kron(np.kron(Us[0], Us[1]), Us[2]) @ X.ravel(), rtol=1e-12)
    # contraction: mat_i(X) mat_i(X)ᵀ
    np.testing.assert_allclose(kron.contraction(X, 1), np.einsum("ajk,bjk->ab", X.transpose(1, 0, 2), X.transpose(1, 0, 2)), rtol=1e-12)
    np.testing.assert_allclose(kron.contraction(X, 0), X.reshape(2, -1) @ X.reshape(2, -1).T, rtol=1e-12)


def test_mode_products_and_contractions_of_a_matrix():
    """The one-GEMM routes of a weight matrix X (o × a): X ×₀ U = U X, X ×₁ V = X Vᵀ (non-symmetric
    U, V catch a transposition), mat₀(X)mat₀(X)ᵀ = X Xᵀ, mat₁(X)mat₁(X)ᵀ = Xᵀ X (einsum oracles)."""
    r = np.random.default_rng(7)
    X, U, V = r.standard_normal((5, 3)), r.standard_normal((4, 5)), r.standard_normal((6, 3))
    np.testing.assert_allclose(kron.mode_product(X, U, 0), np.einsum("pj,jk->pk", U, X), rtol=1e-13)
    np.testing.assert_allclose(kron.mode_product(X, V, 1), np.einsum("ij,qj->iq", X, V), rtol=1e-13)
    np.testing.assert_allclose(kron.contraction(X, 0), np.einsum("ik,jk->ij", X, X), rtol=1e-13)
    np.testing.assert_allclose(kron.contraction(X, 1), np.einsum("ki,kj->ij", X, X), rtol=1e-13)
    assert kron.mode_product(X, V, 1).flags.c_contiguous


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("d", [1, 5, kron.MIRROR_BLOCK - 1, kron.MIRROR_BLOCK, kron.MIRROR_BLOCK + 1, 3 * kron.MIRROR_BLOCK + 7])
def test_mirror_lower_copies_the_lower_triangle_in_place(d, dtype):
    """mirror_lower(c) = tril(c) + tril(c, −1)ᵀ bit for bit, in c itself, for orders below, at and
    across the panel size (the upper triangle's old entries are garbage and must not survive)."""
    c = np.random.default_rng(d).standard_normal((d, d)).astype(dtype)
    want = np.tril(c) + np.tril(c, -1).T
    out = kron.mirror_lower(c)
    assert out is c and np.array_equal(out, want)


def test_tnt_factors_match_definition():
    """(4.10): Ũᵢ = Ĝ⁽ⁱ⁾/(c₀^{k−1} Π_{j≠i} dⱼ); with E[G⁽ⁱ⁾] = Uᵢ Π_{j≠i} tr Uⱼ (4.2) the product ⊗Ũᵢ = ⊗Uᵢ."""
    r = np.random.default_rng(4)
    shape = (2, 3, 4)
    Us = []
    for d in shape:
        Z = r.standard_normal((d, d + 2))
        Us.append(Z @ Z.T)
    tr = [np.trace(U) for U in Us]
    stats = [Us[i] * np.prod([tr[j] for j in range(3) if j != i]) for i in range(3)]
    Ut = tnt_factors(stats, shape)
    c0 = (np.trace(stats[0]) / 24) ** (1 / 3)
    for i in range(3):
        others = 24 // shape[i]
        np.testing.assert_allclose(Ut[i], stats[i] / (c0 ** 2 * others), rtol=1e-12)
    avg = [np.trace(U) / d for U, d in zip(Ut, shape)]
    assert np.allclose(avg, avg[0])
    np.testing.assert_allclose(np.kron(np.kron(Ut[0], Ut[1]), Ut[2]), np.kron(np.kron(Us[0], Us[1]), Us[2]), rtol=1e-10)
    # the statistics of a sampled tensor-normal draw: E[G⁽ⁱ⁾] (Monte Carlo) is what the optimizer feeds in
    Ls = [np.linalg.cholesky(U) for U in Us]
    acc = [np.zeros((d, d)) for d in shape]
    for _ in range(4000):
        Z = r.standard_normal(shape)
        G = Z
        for i, Lc in enumerate(Ls):
            G = kron.mode_product(G, Lc, i)
        for i in range(3):
            acc[i] += kron.contraction(G, i) / 4000
    for i in range(3):
        assert np.abs(acc[i] - stats[i]).max() / np.abs(stats[i]).max() < 0.1


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_mean_g_rounding_bounds_the_error_of_mean_g(kind, dtype):
    """The bound of kron.mean_g_rounding holds against an exactly rounded mean (math.fsum), and it is
    tight enough to keep a genuine difference: a relative change of 1e-3 (float32) is far above it."""
    import math

    from qnref.curvature import kron

    r = np.random.default_rng(3)
    shape = (300, 5) if kind == "dense" else (40, 49, 5)
    g = (r.standard_normal(shape) * 10.0 ** r.uniform(-3, 3, shape[-1])).astype(dtype)
    tap = {"kind": kind, "g": g}
    got = kron.mean_g(tap)
    rows = g.reshape(-1, shape[-1]).astype(np.float64)
    exact = np.array([math.fsum(rows[:, j]) / rows.shape[0] for j in range(shape[-1])])
    bound = kron.mean_g_rounding(tap)
    assert np.all(np.abs(got - exact) <= bound)
    assert np.all(bound <= 20 * np.finfo(dtype).eps * np.abs(rows).mean(axis=0) * 1.0001)
    assert np.all(1e-3 * np.abs(rows).mean(axis=0) > 100 * bound)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 2e-4)])
def test_spd_inverse_by_cholesky_is_the_symmetric_inverse(dtype, tol):
    """kron.spd_inverse by potrf + potri (order ≥ CHOLESKY_MIN_DIM): the inverse of the dense
    oracle, exactly symmetric (the LU route is not), in M's dtype."""
    from qnref.curvature import kron

    r = np.random.default_rng(5)
    d = kron.CHOLESKY_MIN_DIM
    X = r.standard_normal((d, d + 20))
    M = (X @ X.T / (d + 20) + 0.1 * np.eye(d)).astype(dtype)
    V = kron.spd_inverse(M)
    assert V.dtype == M.dtype and np.array_equal(V, V.T)
    want = np.linalg.inv(M.astype("float64"))
    assert np.abs(V - want).max() <= tol * np.abs(want).max()
    assert np.abs(V.astype("float64") @ M - np.eye(d)).max() <= 50 * tol
    assert not np.array_equal(V, np.linalg.inv(M))                 # it did not take the LU route


@pytest.mark.parametrize("d", [5, 127, 128, 300])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_spd_inverse_lower_reads_the_lower_triangle_only(d, dtype):
    """``lower=True`` on both routes (LU below CHOLESKY_MIN_DIM, Cholesky from it): the inverse of
    the symmetric matrix of M's lower triangle (noise above the diagonal is not read), the same bits
    as the default for an exactly symmetric M, exactly symmetric, and M is left as it was."""
    from qnref.curvature import kron

    r = np.random.default_rng(d)
    X = r.standard_normal((d, d + 20))
    S = X @ X.T / (d + 20) + 0.1 * np.eye(d)               # a syrk: exactly symmetric
    S = S.astype(dtype)
    assert np.array_equal(S, S.T)
    np.testing.assert_array_equal(kron.spd_inverse(S, lower=True), kron.spd_inverse(S))
    M = S.copy()
    M[np.triu_indices(d, 1)] += 7.0                        # noise above the diagonal
    before = M.copy()
    V = kron.spd_inverse(M, lower=True)
    np.testing.assert_array_equal(M, before)
    assert V.dtype == M.dtype and np.array_equal(V, V.T)
    want = np.linalg.inv(S.astype("float64"))
    tol = 1e-11 if dtype == "float64" else 3e-4
    assert np.abs(V - want).max() <= tol * np.abs(want).max()
    np.testing.assert_array_equal(kron.from_lower(M), S)


def test_spd_inverse_lower_falls_back_on_an_indefinite_lower_triangle():
    """potrf fails on the lower triangle's matrix: the LU inverse of that symmetric matrix."""
    from qnref.curvature import kron

    d = kron.CHOLESKY_MIN_DIM
    M = np.eye(d)
    M[1, 0] = 2.0                                             # lower triangle: indefinite
    M[0, 1] = -9.0                                            # not read
    L = np.eye(d)
    L[0, 1] = L[1, 0] = 2.0
    np.testing.assert_allclose(kron.spd_inverse(M, lower=True), np.linalg.inv(L), rtol=1e-15)


def test_spd_inverse_falls_back_and_flags_nonfinite():
    """Not numerically positive definite: the LU inverse (checked against numpy's); NaN input: NaN out."""
    from qnref.curvature import kron

    d = kron.CHOLESKY_MIN_DIM
    M = np.eye(d)
    M[0, 1] = M[1, 0] = 2.0                                      # indefinite: potrf fails
    np.testing.assert_allclose(kron.spd_inverse(M), np.linalg.inv(M), rtol=1e-15)
    bad = np.eye(d)
    bad[1, 1] = np.nan
    assert not np.isfinite(kron.spd_inverse(bad)).all()


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 2e-5)])
def test_sym_eigh_by_scipy_syevd_is_the_eigendecomposition(dtype, tol):
    """kron.sym_eigh by SciPy's syevd (order ≥ CHOLESKY_MIN_DIM): ascending eigenvalues and
    orthonormal eigenvectors of the lower triangle, against float64 numpy.linalg.eigh of the same
    lower triangle (the strictly upper part holds noise that must not be read), in S's dtype."""
    r = np.random.default_rng(6)
    d = kron.CHOLESKY_MIN_DIM + 3
    X = r.standard_normal((d, d + 10))
    S = (X @ X.T / (d + 10)).astype(dtype)
    S[np.triu_indices(d, 1)] += 5.0                                # noise above the diagonal
    w, V = kron.sym_eigh(S)
    assert w.dtype == V.dtype == S.dtype and V.shape == (d, d)
    w0 = np.linalg.eigh(S.astype("float64"), UPLO="L")[0]
    assert np.all(np.diff(w) >= 0)
    assert np.abs(w - w0).max() <= tol * np.abs(w0).max()
    L = np.tril(S.astype("float64")) + np.tril(S.astype("float64"), -1).T
    assert np.abs((V.astype("float64") * w) @ V.T - L).max() <= 10 * tol * np.abs(L).max()
    assert np.abs(V.T.astype("float64") @ V - np.eye(d)).max() <= 10 * tol * d ** 0.5


def test_sym_eigh_routes_and_refuses_nonfinite():
    """Below CHOLESKY_MIN_DIM (and for any matrix under KERNELS = "xp") it is numpy.linalg.eigh bit
    for bit; on the LAPACK route a non-finite matrix is refused with LinAlgError (LAPACK never sees
    NaN); on either route inv_root_eigh's root is then non-finite (the driver's non-finite rejection)."""
    from qnref.nn import conv

    r = np.random.default_rng(7)
    for d in (kron.CHOLESKY_MIN_DIM - 1, kron.CHOLESKY_MIN_DIM):
        X = r.standard_normal((d, d))
        S = X @ X.T
        w, V = kron.sym_eigh(S)
        w0, V0 = np.linalg.eigh(S)
        small = d < kron.CHOLESKY_MIN_DIM
        if small:
            assert np.array_equal(w, w0) and np.array_equal(V, V0)
        old = conv.KERNELS
        conv.KERNELS = "xp"
        try:
            wx, Vx = kron.sym_eigh(S)
        finally:
            conv.KERNELS = old
        assert np.array_equal(wx, w0) and np.array_equal(Vx, V0)
        bad = S.copy()
        bad[2, 1] = np.inf
        if not small:
            with pytest.raises(np.linalg.LinAlgError, match="non-finite"):
                kron.sym_eigh(bad)
        assert not np.isfinite(kron.inv_root_eigh(bad, 4, 1e-3)).any()


def test_plus_identity_is_the_identity_shift_without_temporaries():
    """kron.plus_identity / add_identity_: M + c·I bit for bit (off the diagonal x + 0 = x), on a
    copy or in place, for any layout (a transposed view too)."""
    r = np.random.default_rng(8)
    M = r.standard_normal((5, 7))[:, :5]                         # a strided view
    want = M + 0.3 * np.eye(5)
    got = kron.plus_identity(M, 0.3)
    assert np.array_equal(got, want) and not np.shares_memory(got, M)
    T = np.ascontiguousarray(r.standard_normal((4, 4))).T
    want = T + 1.5 * np.eye(4)
    assert kron.add_identity_(T, 1.5) is T and np.array_equal(T, want)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bias_mode_product_and_contraction_are_the_general_route(dtype):
    """A 1-D part (a bias) skips tensordot's and moveaxis's bookkeeping but forms the same products:
    bit for bit the general route, and U x / x xᵀ against float64 oracles."""
    r = np.random.default_rng(9)
    for d in (1, 3, 64, 300):
        x = r.standard_normal(d).astype(dtype)
        U = r.standard_normal((d, d)).astype(dtype)
        general = np.moveaxis(np.tensordot(U, x, axes=([1], [0])), 0, 0)
        got = kron.mode_product(x, U, 0)
        assert got.shape == (d,) and got.dtype == x.dtype and np.array_equal(got, general)
        col = np.moveaxis(x, 0, 0).reshape(d, -1)
        C = kron.contraction(x, 0)
        assert np.array_equal(C, col @ col.T)
        x64, U64 = x.astype("float64"), U.astype("float64")
        tol = 1e-5 if dtype == "float32" else 1e-13
        assert np.abs(got - U64 @ x64).max() <= tol * (np.abs(U64) @ np.abs(x64)).max()
        assert np.abs(C - np.outer(x64, x64)).max() <= tol * (x64 ** 2).max()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 33), (3, 4, 5)])
def test_ema_kernel_same_bits_as_the_expression(dtype, shape, monkeypatch):
    """kron.ema's one-pass numba route (host, contiguous, one dtype, Python-float β) gives the bits
    of NumPy's β·old + (1 − β)·new, also for huge and tiny entries and β whose float32 rounding
    matters; a NumPy-scalar β (which NumPy does not round to float32), mixed dtypes, a transposed
    operand and the 'xp' switch run the expression itself; the inputs are not written. Every size
    runs on the kernel here (MIN_SIZE 0; tests/test_host_kernels.py has the threshold)."""
    from qnref import host_kernels
    from qnref.nn import conv

    monkeypatch.setattr(host_kernels, "MIN_SIZE", 0)

    rng = np.random.default_rng(len(shape))
    old = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-30, 30, shape)).astype(dtype)
    new = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-30, 30, shape)).astype(dtype)
    o0, n0 = old.copy(), new.copy()
    calls = []
    real = host_kernels.kernel
    monkeypatch.setattr(kron, "kernel", lambda name, size: calls.append(name) or real(name, size))
    for beta in (0.9, 0.95, 1.0 / 3.0, 0.0):
        got = kron.ema(old, new, beta)
        np.testing.assert_array_equal(got, beta * old + (1.0 - beta) * new)
        assert got.dtype == old.dtype and got.shape == old.shape and got.flags.c_contiguous
    assert calls == ["ema"] * 4                                   # the kernel route was taken
    np.testing.assert_array_equal(old, o0)
    np.testing.assert_array_equal(new, n0)
    b64 = np.float64(1.0 / 3.0)
    np.testing.assert_array_equal(kron.ema(old, new, b64), b64 * old + (1.0 - b64) * new)
    other = new.astype(np.float64 if dtype == np.float32 else np.float32)
    np.testing.assert_array_equal(kron.ema(old, other, 0.9), 0.9 * old + (1.0 - 0.9) * other)
    if len(shape) == 2:
        np.testing.assert_array_equal(kron.ema(old, new.T, 0.9), 0.9 * old + (1.0 - 0.9) * new.T)
    assert calls == ["ema"] * 4                                   # none of those took it
    monkeypatch.setattr(conv, "KERNELS", "xp")
    assert host_kernels.kernel("ema", old.size) is None


def test_contraction_is_the_gram_of_the_unfolding(monkeypatch):
    """Every contraction (matrix, bias, higher-order tensor, each mode) is kron.gram of mat_i(X): on
    the host the bits of mat_i(X) @ mat_i(X).T, and on CuPy gram's symmetrised GEMM (one
    implementation of the symmetric product)."""
    r = np.random.default_rng(11)
    cases = [(r.standard_normal((7, 5)), (0, 1)), (r.standard_normal(6), (0,)), (r.standard_normal((3, 4, 5)), (0, 1, 2))]
    for X, modes in cases:
        for i in modes:
            Xi = np.moveaxis(X, i, 0).reshape(X.shape[i], -1)
            C = kron.contraction(X, i)
            assert np.array_equal(C, Xi @ Xi.T) and np.array_equal(C, C.T)
    seen = []
    real = kron.gram

    def spy(U):
        out = real(U)
        seen.append(out)
        return out

    monkeypatch.setattr(kron, "gram", spy)
    for X, modes in cases:
        for i in modes:
            assert kron.contraction(X, i) is seen[-1]
