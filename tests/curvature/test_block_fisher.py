"""qnref.curvature.block_fisher (thesis §4.3.4, Fig. 4.1) against dense oracles.

* Fisher blocks: the dense Fisher (1/N) Σᵢ Jᵢᵀ Mᵢ Jᵢ of the whole θ from per-example output Jacobians
  Jᵢ (C × n, one ``vjp`` of a unit output per row, not ``per_example_grads``), with Mᵢ written here:
  diag pᵢ − pᵢpᵢᵀ ("exact"), eᵢeᵢᵀ with eᵢ = pᵢ − onehot(yᵢ) ("empirical") or onehot(ỹᵢ) ("sampled", the
  point's draws); its diagonal W̄ blocks = ``fisher_blocks`` to 1e-12 relative. Catches: a missing 1/N,
  wrong block slices (row- vs column-major), the √p weight squared or dropped.
* BlockFisher: one warm start + one update, d_l = (F̂_l + λI)⁻¹ ĝ_l by ``np.linalg.solve`` on the dense
  oracle's blocks (catches a swapped β/1−β, a missing λ, ĝ without (1−β)).
* cosine: against numpy's dot / norms.
"""
from __future__ import annotations

import numpy as np
import pytest

from qnref.curvature import block_fisher as bfm
from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.optim.base import Problem

TOL = 1e-12


def rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.abs(a - b).max()) / max(1e-300, float(np.abs(b).max()))


def setup(N=12, seed=0):
    r = np.random.default_rng(seed)
    m = Sequential([Dense(5), Tanh(), Dense(4), Tanh(), Dense(3)], input_shape=(4,))
    X, y = r.standard_normal((N, 4)), r.integers(0, 3, N)
    th = m.init(seed) + 0.3 * r.standard_normal(m.layout.size)
    return m, th, (lambda: Problem(m, "softmax_ce", X, y, seed=seed)), X, y


def jacobians(point):
    """(N, C, n): Jᵢ rows Jᵢᵀ e_c, one vjp of a unit output each."""
    N, C = point.z.shape
    J = np.zeros((N, C, point.theta.size))
    for i in range(N):
        for c in range(C):
            u = np.zeros((N, C))
            u[i, c] = 1.0
            J[i, c] = point.vjp(u)
    return J


def dense_fisher(point, y, targets):
    z = point.z
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    J = jacobians(point)
    N, C = z.shape
    F = np.zeros((J.shape[2],) * 2)
    for i in range(N):
        if targets == "exact":
            M = np.diag(p[i]) - np.outer(p[i], p[i])
        else:
            lab = y[i] if targets == "empirical" else int(point.sampled_targets()[i])
            e = p[i] - np.eye(C)[lab]
            M = np.outer(e, e)
        F += J[i].T @ M @ J[i]
    return F / N


@pytest.mark.parametrize("targets", ["exact", "empirical", "sampled"])
def test_fisher_blocks_are_the_diagonal_blocks_of_the_dense_fisher(targets):
    m, th, make, X, y = setup()
    point = make().full_objective.at(th)
    F = dense_fisher(point, y, targets)
    blocks = bfm.fisher_blocks(point, m, targets)
    sl = bfm.kron_slices(m)
    assert list(blocks) == [L.name for L in m.kron_layers]
    for name, (s, shape) in sl.items():
        assert blocks[name].shape == (s.stop - s.start,) * 2
        assert rel(blocks[name], F[s, s]) <= TOL, (name, targets)


def test_fisher_blocks_refuse_unknown_targets_and_exact_for_other_losses():
    m, th, make, X, y = setup()
    point = make().full_objective.at(th)
    with pytest.raises(ValueError, match="targets must be"):
        bfm.fisher_blocks(point, m, "typo")
    mse = Problem(m, "mse", X, np.zeros((len(X), 3)), seed=0).full_objective.at(th)
    with pytest.raises(ValueError, match="softmax_ce only"):
        bfm.fisher_blocks(mse, m, "exact")


def test_block_fisher_direction_against_dense_solve():
    m, th, make, X, y = setup()
    prob = make()
    bf = bfm.BlockFisher(m, damping=0.3, beta=0.9, targets="exact")
    bf.warm(prob, th, chunk=5)                          # chunks 5, 5, 2: a weighted mean
    F0 = dense_fisher(prob.full_objective.at(th), y, "exact")
    pt = prob.subset(np.arange(3, 9)).at(th)
    bf.update(pt)
    Fb = dense_fisher(pt, y[3:9], "exact")
    g = (1 - 0.9) * pt.grad
    d = bf.direction()
    for name, (s, _) in bfm.kron_slices(m).items():
        Fh = 0.9 * F0[s, s] + 0.1 * Fb[s, s]
        assert rel(bf.F[name], Fh) <= TOL
        ref = np.linalg.solve(Fh + 0.3 * np.eye(len(Fh)), g[s])
        assert rel(d[s], ref) <= 1e-10
    assert np.array_equal(bf.mom, g)


def test_block_fisher_validates():
    m, *_ = setup()
    with pytest.raises(ValueError, match="damping"):
        bfm.BlockFisher(m, damping=0.0)
    with pytest.raises(ValueError, match="beta"):
        bfm.BlockFisher(m, beta=1.0)


def test_cosine_against_numpy():
    r = np.random.default_rng(1)
    for _ in range(5):
        u, v = r.standard_normal(17), r.standard_normal(17)
        ref = np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))
        assert abs(bfm.cosine(u, v) - ref) <= 1e-15
    assert bfm.cosine(u, 3 * u) == pytest.approx(1.0, abs=1e-15)
    assert bfm.cosine(u, -u) == pytest.approx(-1.0, abs=1e-15)
    with pytest.raises(ValueError, match="nonzero"):
        bfm.cosine(u, np.zeros(17))
    with pytest.raises(ValueError, match="one size"):
        bfm.cosine(u, v[:3])


def test_cosine_study_smoke():
    m, th, make, X, y = setup(N=24)
    res = bfm.cosine_study(make, th, steps=3, batch_size=8, lr=0.1, damping=0.1)
    assert res.layers == [L.name for L in m.kron_layers]
    assert set(res.cosines) == set(bfm.DEFAULT_METHODS)
    for name, c in res.cosines.items():
        assert c.shape == (3, 3) and np.all(np.abs(c) <= 1 + 1e-12), name
    assert len(res.losses) == 3 and all(np.isfinite(res.losses))
    # the block-Fisher method compared with itself (methods={}) records nothing; KFAC alone works
    only = bfm.cosine_study(make, th, steps=2, batch_size=8, methods={"kfac": {"damping": 0.1}})
    assert set(only.cosines) == {"kfac"}
