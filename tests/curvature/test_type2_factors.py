"""Type-2 ("exact") KFAC factors of ``Point.layer_stats("exact")`` and BackPACK's conv convention
(``kron.backpack_conv_factors``), against independent oracles.

Oracle of the type-2 G (Botev, Ritter & Barber 2017): the expectation over ỹ ~ p(y|x) by *enumerating
every target* and weighting by its probability, each target's taps taken with an explicit target array
(``layer_stats(targets=array)``, the empirical route of the backward pass):

* softmax_ce: Σ_c p_ic g_i(c) g_i(c)ᵀ over the C labels, p = softmax(z) computed here in NumPy;
* sigmoid_ce: Σ_{y ∈ {0,1}^C} Π_c p_c^{y_c}(1 − p_c)^{1−y_c} g_i(y) g_i(y)ᵀ over all 2^C label vectors;
* mse: ỹ ~ N(z, I), E[(z − ỹ)(z − ỹ)ᵀ] = I = Σ_c e_c e_cᵀ: the targets z − e_c for each c.

G_exact = (1/(N L)) Σᵢ Σₜ E_ỹ[gᵢₜgᵢₜᵀ] (conv: mean over locations, thesis (3.9)) to 1e-12 relative, on a
tiny MLP and a conv net. A bug this catches: a missing √p (G weighted by p² or 1), the ppᵀ term of the
softmax Hessian dropped, the class axis averaged instead of summed, the per-location mean lost.

BackPACK's convention (``HBPConvNd._factor_from_sqrt``: the backpropagated quantities summed over the
locations before the outer product): G_BackPACK = the Fisher block of the conv bias, built here from
per-example gradients (``per_example_grads``, a different pass: the bias gradient Σₜ gᵢₜ), and
A_BackPACK = (1/N) Σᵢ Σₜ xᵢₜxᵢₜᵀ from an im2col written here with loops over the input.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from qnref.curvature import kron
from qnref.curvature.objective import Objective
from qnref.nn.activations import Tanh
from qnref.nn.conv import Conv2d
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.nn.norm import BatchNorm
from qnref.nn.reshape import Flatten

TOL = 1e-12


def rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.abs(a - b).max()) / max(1e-300, float(np.abs(b).max()))


def mlp(C=3):
    return Sequential([Dense(5), Tanh(), Dense(4), Tanh(), Dense(C)], input_shape=(4,))


def convnet(C=3):
    return Sequential([Conv2d(3, 3, padding=1), Tanh(), Conv2d(4, 2, stride=2), Tanh(), Flatten(), Dense(C)],
                      input_shape=(2, 6, 6))


def objective(kind, loss, N=7, C=3, seed=0):
    r = np.random.default_rng(seed)
    m = mlp(C) if kind == "mlp" else convnet(C)
    X = r.standard_normal((N,) + m.input_shape)
    if loss == "softmax_ce":
        y = r.integers(0, C, N)
    elif loss == "sigmoid_ce":
        y = (r.random((N, C)) < 0.5).astype(float)
    else:
        y = r.standard_normal((N, C))
    th = m.init(seed) + 0.3 * r.standard_normal(m.layout.size)
    return Objective(m, loss, X, y), th


def G_of(taps_w):
    """(1/(N L)) Σᵢ Σ_targets wᵢ Σₜ gᵢₜgᵢₜᵀ from [(weights (N,), taps)] — dense written out here."""
    out = {}
    for w, taps in taps_w:
        for name, t in taps.items():
            g = t["g"]
            N = g.shape[0]
            L = g.shape[1] if g.ndim == 3 else 1
            g3 = g.reshape(N, L, g.shape[-1])
            term = np.einsum("i,itp,itq->pq", w, g3, g3) / (N * L)
            out[name] = out.get(name, 0) + term
    return out


def enumerated_G(obj, th, loss):
    p = obj.at(th)
    z = p.z
    N, C = z.shape
    pairs = []
    if loss == "softmax_ce":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        prob = e / e.sum(axis=1, keepdims=True)
        for c in range(C):
            pairs.append((prob[:, c], p.layer_stats(np.full(N, c))))
    elif loss == "sigmoid_ce":
        s = 1 / (1 + np.exp(-z))
        for bits in itertools.product([0.0, 1.0], repeat=C):
            yv = np.array(bits)
            w = np.prod(np.where(yv == 1, s, 1 - s), axis=1)
            pairs.append((w, p.layer_stats(np.broadcast_to(yv, (N, C)).copy())))
    else:
        for c in range(C):
            pairs.append((np.ones(N), p.layer_stats(z - np.eye(C)[c])))
    return G_of(pairs)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("loss", ["softmax_ce", "sigmoid_ce", "mse"])
def test_type2_G_equals_label_enumeration(kind, loss):
    obj, th = objective(kind, loss)
    p = obj.at(th)
    taps = p.layer_stats("exact")
    ref = enumerated_G(obj, th, loss)
    emp = p.layer_stats("empirical")
    assert set(taps) == set(ref) and len(taps) == 3
    for name, t in taps.items():
        assert t["targets"] == "exact" and t["g"].shape[1] == 3
        A, G = kron.factors(t)
        assert rel(G, ref[name]) <= TOL, (name, rel(G, ref[name]))
        A_emp, _ = kron.factors(emp[name])
        assert np.array_equal(A, A_emp)          # A does not depend on the targets


def test_type2_alias_and_pass_count():
    obj, th = objective("mlp", "softmax_ce")
    p = obj.at(th)
    b0 = obj.counter.backward
    t1 = p.layer_stats("exact")
    assert obj.counter.backward - b0 == 3 * obj.n_samples           # one backward per class
    t2 = p.layer_stats("type2")
    for name in t1:
        assert np.array_equal(t1[name]["g"], t2[name]["g"])


def test_type2_G_is_the_mean_of_sampled_G():
    """Sampled-target G averaged over many draws approaches the type-2 G (law of large numbers, 4σ-loose)."""
    obj, th = objective("mlp", "softmax_ce", N=5)
    G_exact = {n: kron.factors(t)[1] for n, t in obj.at(th).layer_stats("exact").items()}
    acc, draws = {}, 3000
    for _ in range(draws):
        for n, t in obj.at(th).layer_stats("sampled").items():   # a fresh point: fresh ỹ
            acc[n] = acc.get(n, 0) + kron.factors(t)[1] / draws
    for n in G_exact:
        assert rel(acc[n], G_exact[n]) < 0.1


def test_type2_refuses_batchnorm_in_training_mode():
    m = Sequential([Dense(4), BatchNorm(), Tanh(), Dense(3)], input_shape=(3,))
    r = np.random.default_rng(0)
    obj = Objective(m, "softmax_ce", r.standard_normal((6, 3)), r.integers(0, 3, 6))
    with pytest.raises(ValueError, match="independent examples"):
        obj.at(m.init(0)).layer_stats("exact")
    ev = Objective(m, "softmax_ce", r.standard_normal((6, 3)), r.integers(0, 3, 6), train=False)
    assert len(ev.at(m.init(0)).layer_stats("exact")) == 2


def test_unknown_targets_still_refused():
    obj, th = objective("mlp", "softmax_ce")
    with pytest.raises(ValueError, match="unknown targets"):
        obj.at(th).layer_stats("typo")


def test_mean_g_refuses_type2_taps():
    obj, th = objective("mlp", "softmax_ce")
    t = next(iter(obj.at(th).layer_stats("exact").values()))
    with pytest.raises(ValueError, match="type-2"):
        kron.mean_g(t)


# -- BackPACK's conv convention ----------------------------------------------------------------------------
def first_conv_net(C=3):
    return Sequential([Conv2d(3, 3, padding=1, stride=1), Tanh(), Flatten(), Dense(C)], input_shape=(2, 5, 4))


def im2col_loops(X, kh, kw, pad, stride):
    """(N, L, C_in·kh·kw) patches, channel-major (c, i, j) — the order of torch's W.reshape(C_out, -1)."""
    N, Cin, H, W = X.shape
    Xp = np.zeros((N, Cin, H + 2 * pad, W + 2 * pad))
    Xp[:, :, pad:pad + H, pad:pad + W] = X
    Ho, Wo = (H + 2 * pad - kh) // stride + 1, (W + 2 * pad - kw) // stride + 1
    out = np.zeros((N, Ho * Wo, Cin * kh * kw))
    for n in range(N):
        for th in range(Ho):
            for tw in range(Wo):
                col = []
                for c in range(Cin):
                    for i in range(kh):
                        for j in range(kw):
                            col.append(Xp[n, c, th * stride + i, tw * stride + j])
                out[n, th * Wo + tw] = col
    return out


def _bias_rows(m, P):
    """Per-example gradient rows of the first conv's bias (last column of its W̄ block)."""
    b = m.layout.blocks[0]
    Wbar = P[:, :int(np.prod(b.shape))].reshape((P.shape[0],) + tuple(b.shape))
    return Wbar[:, :, -1]


@pytest.mark.parametrize("targets", ["empirical", "exact"])
def test_backpack_conv_factors_against_dense(targets):
    r = np.random.default_rng(3)
    m = first_conv_net()
    N = 6
    X = r.standard_normal((N, 2, 5, 4))
    y = r.integers(0, 3, N)
    th = m.init(1) + 0.3 * r.standard_normal(m.layout.size)
    obj = Objective(m, "softmax_ce", X, y)
    p = obj.at(th)
    name = m.kron_layers[0].name
    tap = p.layer_stats(targets)[name]
    A_bp, G_bp = kron.backpack_conv_factors(tap)
    # A: im2col by loops, no homogeneous coordinate
    x = im2col_loops(X, 3, 3, 1, 1)
    A_ref = np.einsum("ntk,ntl->kl", x, x) / N
    assert rel(A_bp, A_ref) <= TOL
    # G: the (exact or empirical) Fisher block of the bias, from per-example gradients
    if targets == "empirical":
        gb = _bias_rows(m, p.per_example_grads("empirical"))
        G_ref = gb.T @ gb / N
    else:
        z = p.z
        e = np.exp(z - z.max(axis=1, keepdims=True))
        prob = e / e.sum(axis=1, keepdims=True)
        G_ref = 0
        for c in range(3):
            gb = _bias_rows(m, p.per_example_grads(np.full(N, c)))
            G_ref = G_ref + (gb * prob[:, c:c + 1]).T @ gb / N
    assert rel(G_bp, G_ref) <= TOL
    # not a rescaling of qnref's per-location G: the cross-location terms enter BackPACK's
    A_q, G_q = kron.factors(tap)
    L = tap["a"].shape[1]
    assert rel(A_q[:-1, :-1], A_bp) <= TOL
    assert rel(L * G_q, G_bp) > 1e-3


def test_backpack_conv_factors_refuse_dense_taps():
    obj, th = objective("mlp", "softmax_ce")
    with pytest.raises(ValueError, match="conv tap"):
        kron.backpack_conv_factors(next(iter(obj.at(th).layer_stats().values())))
