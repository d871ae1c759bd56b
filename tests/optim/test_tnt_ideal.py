"""Idealized TNT (Ren's thesis Algorithm 14, §4.4): one step against a dense recomputation from the
text's formulas with the expectation over y ~ p(y|x) taken by enumerating the labels.

Oracle (written from the text, sharing no algebra with :mod:`qnref.optim.tnt`): for every example x
of the population and every label value y, the per-example gradient Gₓ,ᵧ = ∇_θ ℓ(xₓ, y) (the model's
per-example backward at targets y); its tensor parts (W and b of each layer, conv W as the 3-way
(C_out, C_in, kh·kw), §4.3.4 (ii) / §4.7.2); E[G⁽ⁱ⁾] = (1/|X|) Σₓ Σᵧ p(y|x) matᵢ(G) matᵢ(G)ᵀ with
matᵢ as defined in §4.2.1; Ũᵢ by (4.10); p = (⊗ᵢ (Ũᵢ + εI)⁻¹) vec(∇L̄) (Proposition 1's left side,
an explicit Kronecker product) and θ₊ = θ − α p. The labels: softmax_ce all C classes with
softmax weights; sigmoid_ce all 2^C binary vectors with Bernoulli weights; mse the 2^C points
z ± 1 with weights 2^−C (exact for the second moment of N(z, I)). Tolerance 1e-12 relative.
"""
from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest

from qnref.curvature.objective import Objective
from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.nn.zoo import build_model
from qnref.optim._kron_common import tensor_parts
from qnref.optim.base import Problem
from qnref.optim.costs import algebra_flops
from qnref.optim.registry import OPTIMIZERS
from qnref.optim.tnt import TNTIdeal

C = 3


def _labels(loss, z):
    """[(targets for every example, weights (N,))] enumerating y ~ p(y | z)."""
    N = z.shape[0]
    if loss == "softmax_ce":
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return [(np.full(N, c, dtype=np.int64), p[:, c]) for c in range(C)]
    if loss == "sigmoid_ce":
        p = 1.0 / (1.0 + np.exp(-z))
        out = []
        for bits in itertools.product([0.0, 1.0], repeat=C):
            b = np.array(bits)
            out.append((np.tile(b, (N, 1)), np.prod(np.where(b == 1.0, p, 1.0 - p), axis=1)))
        return out
    assert loss == "mse"
    return [(z + np.array(s), np.full(N, 2.0 ** -C)) for s in itertools.product([-1.0, 1.0], repeat=C)]


def _mat(A, i):
    """matᵢ(A): row j is vec(A's j-th slice along mode i) (row-major vec, thesis §4.2.1)."""
    return np.stack([np.take(A, j, axis=i).reshape(-1) for j in range(A.shape[i])])


def _parts_of(model, row, conv_in):
    """The tensor variables of a parameter vector: per layer W (o × d_in, or (o, C_in, kh·kw)) and b."""
    out = []
    for b in model.layout.blocks:
        Wb = row[b.offset:b.offset + int(np.prod(b.shape))].reshape(b.shape)
        W = Wb[:, :-1]
        cin = conv_in.get(b.name)
        out.append(W.reshape(W.shape[0], cin, -1) if cin else W.copy())
        out.append(Wb[:, -1].copy())
    return out


def _from_parts(model, parts):
    vec = []
    for k, b in enumerate(model.layout.blocks):
        W, bias = parts[2 * k], parts[2 * k + 1]
        vec.append(np.concatenate([W.reshape(b.shape[0], -1), bias[:, None]], axis=1).reshape(-1))
    return np.concatenate(vec)


def oracle_step(model, loss, theta, X_pop, y_pop, X_b, y_b, l2, lr, eps, conv_in=None):
    conv_in = conv_in or {}
    pop = Objective(model, loss, X_pop, y_pop).at(theta)
    E = None
    for targets, w in _labels(loss, pop.z):
        R = pop.per_example_grads(targets=targets)                 # rows ∇ℓ(xₓ, y) (N_pop, n)
        for x in range(R.shape[0]):
            parts = _parts_of(model, R[x], conv_in)
            c = [[w[x] * _mat(G, i) @ _mat(G, i).T for i in range(G.ndim)] for G in parts]
            E = c if E is None else [[a + b for a, b in zip(ea, eb)] for ea, eb in zip(E, c)]
    E = [[a / X_pop.shape[0] for a in ea] for ea in E]
    g = Objective(model, loss, X_b, y_b, l2=l2).grad(theta)
    gp = _parts_of(model, g, conv_in)
    out = []
    for Es, G in zip(E, gp):
        k, dims = G.ndim, G.shape
        tot = math.prod(dims)
        V = None
        for i in range(k):
            c0 = (np.trace(Es[i]) / tot) ** (1.0 / k)                     # (4.10)
            U = Es[i] / (c0 ** (k - 1) * (tot // dims[i]))
            Vi = np.linalg.inv(U + eps * np.eye(dims[i]))
            V = Vi if V is None else np.kron(V, Vi)
        out.append((V @ G.reshape(-1)).reshape(dims))                      # (⊗ Vᵢ) vec(∇L̄)
    return theta - lr * _from_parts(model, out), E


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _mlp_problem(loss, n=9, seed=0, l2=1e-2):
    r = np.random.default_rng(seed)
    m = Sequential([Dense(4), Tanh(), Dense(C)], input_shape=(3,))
    X = r.standard_normal((n, 3))
    y = {"softmax_ce": lambda: r.integers(0, C, n), "mse": lambda: r.standard_normal((n, C)),
         "sigmoid_ce": lambda: r.random((n, C))}[loss]()
    theta = m.init(seed) + 0.3 * r.standard_normal(m.n_params)
    return m, theta, X, y, Problem(m, loss, X, y, l2, seed=seed)


@pytest.mark.parametrize("damping", [1e-3, 0.1])
@pytest.mark.parametrize("loss", ["softmax_ce", "sigmoid_ce", "mse"])
def test_step_matches_enumeration_oracle_full_batch(loss, damping):
    m, theta, X, y, prob = _mlp_problem(loss)
    opt = TNTIdeal(lr=0.05, damping=damping, batch_size=X.shape[0])
    new, state, info = opt.step(theta, opt.init(theta), prob)
    want, _ = oracle_step(m, loss, theta, X, y, X, y, prob.l2, 0.05, damping)
    assert info.accepted and not info.nonfinite and state.k == 1 and info.extra["population"] == X.shape[0]
    assert _rel(new - theta, want - theta) <= 1e-12


@pytest.mark.parametrize("population", ["data", "batch"])
def test_minibatch_gradient_and_population(population):
    """m < N: the gradient of the step's minibatch (line 3); the expectation over the training set
    ("data") or over that minibatch ("batch")."""
    m, theta, X, y, prob = _mlp_problem("softmax_ce", n=11, seed=4)
    opt = TNTIdeal(lr=0.1, damping=0.05, batch_size=5, population=population)
    saved = copy.deepcopy(prob.state())
    batch = prob.batch(5)                                                  # the batch the step will draw
    prob.load_state(saved)
    new, _, info = opt.step(theta, opt.init(theta), prob)
    Xp, yp = (X, y) if population == "data" else (batch.X, batch.y)
    want, _ = oracle_step(m, "softmax_ce", theta, Xp, yp, batch.X, batch.y, prob.l2, 0.1, 0.05)
    assert info.batch_size == 5 and info.extra["population"] == Xp.shape[0]
    assert _rel(new - theta, want - theta) <= 1e-12


def test_conv_weights_are_three_way_tensors():
    """lenet-digits (no BatchNorm): conv W as (C_out, C_in, kh·kw), the 3-way Kronecker preconditioner."""
    r = np.random.default_rng(2)
    m = build_model("lenet-digits", width=0.5, n_outputs=C, activation="tanh")
    X, y = r.standard_normal((6, 1, 8, 8)), r.integers(0, C, 6)
    theta = m.init(2) + 0.1 * r.standard_normal(m.n_params)
    conv_in = {"0.conv2d.W": 1, "3.conv2d.W": 4}
    assert [q.shape for q in tensor_parts(m)] == [(4, 1, 9), (4,), (8, 4, 9), (8,), (3, 32), (3,)]
    prob = Problem(m, "softmax_ce", X, y, 0.0, seed=0)
    opt = TNTIdeal(lr=0.1, damping=0.01, batch_size=6)
    new, _, _ = opt.step(theta, opt.init(theta), prob)
    want, _ = oracle_step(m, "softmax_ce", theta, X, y, X, y, 0.0, 0.1, 0.01, conv_in)
    assert _rel(new - theta, want - theta) <= 1e-12


def test_population_in_chunks_equals_one_pass(monkeypatch):
    import qnref.optim.tnt as tnt

    m, theta, X, y, prob = _mlp_problem("sigmoid_ce", n=10)
    opt = TNTIdeal(lr=0.1, batch_size=4)
    a, _, _ = opt.step(theta, opt.init(theta), prob)
    monkeypatch.setattr(tnt, "CHUNK_ELEMENTS", 3 * m.n_params)             # chunks of 3 examples (3, 3, 3, 1)
    b, _, info = opt.step(theta, opt.init(theta), _mlp_problem("sigmoid_ce", n=10)[4])
    assert info.extra["population"] == 10 and _rel(b - theta, a - theta) <= 1e-13


def test_step_size_decay_and_state():
    """α_t = α t^(−β) (Theorem 5's form); the state counts t; two steps as the oracle twice."""
    m, theta, X, y, prob = _mlp_problem("softmax_ce")
    opt = TNTIdeal(lr=0.2, damping=0.1, batch_size=X.shape[0], decay=0.75)
    state = opt.init(theta)
    th = theta
    for t in (1, 2):
        want, _ = oracle_step(m, "softmax_ce", th, X, y, X, y, prob.l2, 0.2 * t ** -0.75, 0.1)
        th, state, info = opt.step(th, state, prob)
        assert state.k == t and info.step_size == pytest.approx(0.2 * t ** -0.75, rel=1e-15)
        assert _rel(th, want) <= 1e-12


def test_batchnorm_in_training_mode_is_refused():
    m = build_model("lenet-digits", batchnorm=True, width=0.5, n_outputs=C)
    r = np.random.default_rng(0)
    prob = Problem(m, "softmax_ce", r.standard_normal((8, 1, 8, 8)), r.integers(0, C, 8), seed=0)
    opt = TNTIdeal(batch_size=4)
    th = m.init(0)
    with pytest.raises(ValueError, match="independent examples"):
        opt.step(th, opt.init(th), prob)


def test_nonfinite_statistics_do_not_move_theta(monkeypatch):
    import qnref.optim.tnt as tnt

    m, theta, X, y, prob = _mlp_problem("softmax_ce")
    real = tnt.fisher_contractions
    monkeypatch.setattr(tnt, "fisher_contractions", lambda pt, parts: [[S * np.nan for S in a] for a in real(pt, parts)])
    opt = TNTIdeal(batch_size=X.shape[0])
    new, st, info = opt.step(theta, opt.init(theta), prob)
    assert new is theta and not info.accepted and info.nonfinite and info.skipped == 1 and st.k == 1


@pytest.mark.parametrize("kwargs,name", [(dict(population="train"), "population"), (dict(decay=1.0), "decay"),
                                         (dict(decay=-0.1), "decay"), (dict(lr=0.0), "lr"),
                                         (dict(damping=-1.0), "damping"), (dict(batch_size=0), "batch_size")])
def test_invalid_hyperparameters_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TNTIdeal(**kwargs)


def test_registry_and_cost_model():
    assert OPTIMIZERS["tnt-ideal"] is TNTIdeal
    m = Sequential([Dense(3), Tanh(), Dense(2)], input_shape=(4,))    # parts (3, 4), (3,), (2, 3), (2,)
    t = algebra_flops(TNTIdeal(batch_size=5, population="batch"), m)["terms"]
    modes = (3 * 12 + 4 * 12) + 3 * 3 + (2 * 6 + 3 * 6) + 2 * 2
    assert t["statistics"] == 2 * 5 * modes and t["precondition"] == modes
    assert t["statistics_mean"] == 9 + 16 + 9 + 4 + 9 + 4
    assert t["inverses"] == sum(d ** 3 + 4 * d * d for d in (3, 4, 3, 2, 3, 2))   # LU below kron.CHOLESKY_MIN_DIM
    assert t["step"] == 2 * m.n_params


def test_tnt_floor_counts_the_sampled_backward_per_t1():
    """TNT's floor (issue 21): gradient F + B, the sampled backward B/T₁, the algebra, in gradients."""
    from qnref.optim.costs import model_shapes
    from qnref.optim.registry import make_optimizer

    m = Sequential([Dense(3), Tanh(), Dense(2)], input_shape=(4,))
    F, B = 8 * 23, 8 * 29
    for T1, fisher in ((1, "sampled"), (10, "sampled"), (10, "empirical")):
        opt = make_optimizer("tnt", stat_freq=T1, inv_freq=20, batch_size=8, fisher=fisher)
        fl = opt.step_floor(m)
        assert fl["pass_terms"] == {"gradient": F + B, "sampled_backward": B / T1 if fisher == "sampled" else 0.0}
        alg = sum(opt.algebra_flops(model_shapes(m), 8, None).values())
        assert fl["floor"] == pytest.approx((F + B + fl["pass_terms"]["sampled_backward"] + alg) / (F + B), rel=1e-14)


def test_shampoo_floor_is_the_gradient_and_its_algebra():
    """Shampoo's floor (issue 21, the same :meth:`step_floor` as TNT's): no pass beyond the gradient
    (its statistics are the minibatch gradient's), the algebra by hand for the eigh route at T₁ = T₂ = 1."""
    from qnref.optim.registry import make_optimizer

    m = Sequential([Dense(3), Tanh(), Dense(2)], input_shape=(4,))
    F, B = 8 * 23, 8 * 29              # forward 3·5 + 2·4 per example; backward + γW of layer 2 (2·3)
    opt = make_optimizer("shampoo", stat_freq=1, inv_freq=1, batch_size=8)
    fl = opt.step_floor(m)
    assert fl["pass_terms"] == {"gradient": F + B} and fl["passes"] == 1.0
    parts = [(3, 4), (3,), (2, 3), (2,)]              # W and b of each layer (tensor_parts)
    dims = [d for shp in parts for d in shp]
    modes = sum(d * np.prod(shp) for shp in parts for d in shp)        # mode products: GEMMs
    stats = sum(d * (d + 1) // 2 * np.prod(shp) // d for shp in parts for d in shp)   # symmetric: syrk
    roots = sum(3 * d ** 3 + d * d * (d + 1) // 2 + 2 * d * d for d in dims)   # eigh, (V D^½)(V D^½)ᵀ, scaling
    alg = m.n_params + stats + sum(2 * d * d for d in dims) + roots + modes + 2 * m.n_params
    assert fl["algebra"] == alg
    assert fl["floor"] == pytest.approx((F + B + alg) / (F + B), rel=1e-14)


def test_damped_inverse_factors_leave_the_statistics_alone():
    """ε is added in place to the fresh Ũᵢ of (4.10), never to the state's Ĝ⁽ⁱ⁾; the result is (Ũᵢ + εI)⁻¹."""
    from qnref.optim.tnt import damped_inverse_factors, tnt_factors

    r = np.random.default_rng(6)
    X = r.standard_normal((3, 4, 7))
    stats = [np.moveaxis(X, i, 0).reshape(X.shape[i], -1) @ np.moveaxis(X, i, 0).reshape(X.shape[i], -1).T
             for i in range(3)]
    before = [s.copy() for s in stats]
    mats = damped_inverse_factors(stats, (3, 4, 7), 0.1)
    assert all(np.array_equal(s, b) for s, b in zip(stats, before))
    for U, V in zip(tnt_factors(stats, (3, 4, 7)), mats):
        assert np.abs(V - np.linalg.inv(U + 0.1 * np.eye(len(U)))).max() <= 1e-12 * np.abs(V).max()
