"""Tests for the gaps the mutation run (tools/mutation_run.py, docs/mutation.md) found.

* ``block_fisher.KFACDirection`` (the KFAC direction of the Fig. 4.1 cosine study): the study reads it only
  through cosines, which do not see a constant factor, so ĝ ← μĝ + (1−μ)∇f in place of Alg. 12's μĝ + ∇f
  survived the suite. Here its value is checked against plain NumPy written from thesis Algorithm 12
  (T₁ = T₂ = 1, statistics at the given point): softmax regression, so h = z, the per-example pre-activation
  gradient is gᵢ = pᵢ − e_{yᵢ} (empirical targets) and āᵢ = [xᵢ; 1]; A, G warm-started on the whole set,
  A ← βA + (1−β)Â, G ← βG + (1−β)Ĝ, π = √((tr A/d_A)/(tr G/d_G)), H_A = (A + π√λ I)⁻¹,
  H_G = (G + √λ/π I)⁻¹, ĝ ← μĝ + ∇f, P = H_G ĝ H_A, over three points. Float64, 1e-12 relative.
  Catches: (1−μ) on the gradient, β/1−β swapped, π inverted or dropped, λ unsplit, a missing warm start.
"""
from __future__ import annotations

import numpy as np

from qnref.curvature import block_fisher as bfm
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.optim.base import Problem

TOL = 1e-12


def rel(a, b):
    return float(np.abs(a - b).max()) / float(np.abs(b).max())


def oracle_stats(W, X, y):
    """(Â, Ĝ, ∇f) of softmax regression at W̄ = [W b] (o × a), from the formulas alone."""
    N = X.shape[0]
    ab = np.hstack([X, np.ones((N, 1))])
    z = ab @ W.T
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    g = p - np.eye(W.shape[0])[y]                 # ∂ℓᵢ/∂zᵢ, per example
    return ab.T @ ab / N, g.T @ g / N, g.T @ ab / N


def test_kfac_direction_of_the_cosine_study_is_algorithm_12():
    r = np.random.default_rng(3)
    N, d, C = 30, 4, 3
    lam, mu, beta = 0.05, 0.9, 0.9
    m = Sequential([Dense(C)], input_shape=(d,))
    X, y = r.standard_normal((N, d)), r.integers(0, C, N)
    problem = Problem(m, "softmax_ce", X, y, seed=0)
    (name, (s, shape)), = bfm.kron_slices(m).items()
    assert shape == (C, d + 1)
    kd = bfm.KFACDirection(m, lam, momentum=mu, beta=beta, targets="empirical")
    th0 = m.init(0) + 0.2 * r.standard_normal(m.layout.size)
    kd.warm(problem, th0, chunk=N)
    A, G, _ = oracle_stats(th0[s].reshape(shape), X, y)
    mom = np.zeros(shape)
    th = th0
    for k in range(3):
        th = th + 0.3 * r.standard_normal(th.size)
        P = kd.direction(problem.full_objective.at(th))
        Ab, Gb, grad = oracle_stats(th[s].reshape(shape), X, y)
        A, G = beta * A + (1 - beta) * Ab, beta * G + (1 - beta) * Gb
        pi = np.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))
        HA = np.linalg.inv(A + pi * np.sqrt(lam) * np.eye(A.shape[0]))
        HG = np.linalg.inv(G + np.sqrt(lam) / pi * np.eye(G.shape[0]))
        mom = mu * mom + grad
        want = HG @ mom @ HA
        assert rel(P[s].reshape(shape), want) <= TOL, k


def test_every_mutant_of_the_mutation_run_still_applies():
    """Each injected bug of tools/mutation_run.py matches its file exactly once: a rewrite of the code
    it targets must move the mutant along (12 had silently become "n/a" after the streamed taps)."""
    import importlib.util
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("mutation_run", root / "tools" / "mutation_run.py")
    mr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mr)
    counts = {m[0]: (root / m[1]).read_text().count(m[2]) for m in mr.MUTANTS}
    assert len(counts) == len(mr.MUTANTS) >= 91
    assert {k: c for k, c in counts.items() if c != 1} == {}
