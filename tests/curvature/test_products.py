"""Every Objective product against an independent oracle on tiny nets (float64).

Oracles: central finite differences of f (gradient), of the analytic gradient (Hessian), of the
network outputs (Jacobians J, with the loss Hessian written out explicitly for G = Jᵀ H_L J and
per-example gradients Jᵢᵀ ∂ℓ/∂zᵢ).
"""
import numpy as np
import pytest

from qnref.curvature import dense
from qnref.curvature.objective import Objective
from qnref.nn.activations import Sigmoid, Softplus, Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from helpers import rel_err

TOL = 1e-7


def make_problem(kind, n, seed=0, l2=0.0, dtype="float64"):
    r = np.random.default_rng(seed)
    if kind == "ce":
        model = Sequential([Dense(4), Tanh(), Dense(3), Softplus(), Dense(3)], input_shape=(5,))
        y = r.integers(0, 3, n)
        loss = "softmax_ce"
    elif kind == "mse":
        model = Sequential([Dense(4), Sigmoid(), Dense(2)], input_shape=(3,))
        y = r.standard_normal((n, 2))
        loss = "mse"
    else:  # autoencoder with binary cross-entropy
        model = Sequential([Dense(2), Tanh(), Dense(4)], input_shape=(4,))
        y = None
        loss = "sigmoid_ce"
    X = r.standard_normal((n,) + model.input_shape)
    if y is None:
        y = 1 / (1 + np.exp(-X))
    theta = model.init(seed + 1, scheme="gaussian", std=0.7)
    obj = Objective(model, loss, X.astype(dtype), y if y.dtype.kind == "i" else y.astype(dtype), l2=l2)
    return obj, theta.astype(dtype), r


CASES = [(k, n, l2) for k in ("ce", "mse", "bce") for n in (1, 5) for l2 in (0.0, 0.03)]


@pytest.mark.parametrize("kind,n,l2", CASES)
def test_gradient(kind, n, l2):
    obj, th, _ = make_problem(kind, n, l2=l2)
    assert rel_err(obj.grad(th), dense.gradient_fd(obj, th)) < TOL


@pytest.mark.parametrize("kind,n,l2", CASES)
def test_hvp_equals_fd_hessian(kind, n, l2):
    obj, th, r = make_problem(kind, n, l2=l2)
    H = dense.hessian(obj, th, "fd")
    for _ in range(3):
        v = r.standard_normal(th.shape)
        assert rel_err(obj.hvp(th, v), H @ v) < TOL
    Hp = dense.hessian(obj, th, "products")
    assert np.abs(Hp - Hp.T).max() <= 1e-12 * np.abs(Hp).max()


@pytest.mark.parametrize("kind,n,l2", CASES)
def test_ggn_is_jt_hl_j(kind, n, l2):
    obj, th, r = make_problem(kind, n, l2=l2)
    G = dense.ggn(obj, th, "fd")
    Gp = dense.ggn(obj, th, "products")
    assert rel_err(Gp, G) < TOL
    assert np.abs(Gp - Gp.T).max() <= 1e-12 * np.abs(Gp).max()
    assert np.linalg.eigvalsh(Gp).min() > -1e-12  # PSD: convex losses


@pytest.mark.parametrize("kind,n", [("ce", 1), ("ce", 5), ("mse", 4), ("bce", 3)])
def test_jvp_vjp_against_fd_jacobian(kind, n):
    obj, th, r = make_problem(kind, n)
    J = dense.jacobian_fd(obj, th)
    v = r.standard_normal(th.shape)
    assert rel_err(obj.jvp(th, v).reshape(n, -1), J @ v) < TOL
    u = r.standard_normal((n,) + obj.model.output_shape)
    assert rel_err(obj.vjp(th, u), np.einsum("icn,ic->n", J, u.reshape(n, -1))) < TOL


@pytest.mark.parametrize("kind,n", [("ce", 1), ("ce", 6), ("mse", 4), ("bce", 3)])
def test_per_example_grads_and_fisher(kind, n):
    obj, th, r = make_problem(kind, n, l2=0.1)
    P_fd = dense.per_example_grads_fd(obj, th)
    p = obj.at(th)
    P = p.per_example_grads()
    assert rel_err(P, P_fd) < TOL
    F = P_fd.T @ P_fd / n
    v = r.standard_normal(th.shape)
    assert rel_err(p.fisher_vp(v, "empirical"), F @ v) < TOL
    # sampled Fisher: the same formula with the point's sampled targets
    yt = p.sampled_targets()
    Ps = dense.per_example_grads_fd(obj, th, targets=yt)
    assert rel_err(p.fisher_vp(v, "sampled"), Ps.T @ (Ps @ v) / n) < TOL
    # exact Fisher = GGN without the L2 term (canonical losses)
    assert rel_err(p.fisher_vp(v, "exact"), p.ggn_vp(v) - obj.l2 * v) < 1e-12
    assert rel_err(dense.fisher(obj, th, "exact"), dense.ggn(obj, th) - obj.l2 * np.eye(th.size)) < TOL


@pytest.mark.parametrize("kind,n", [("ce", 1), ("ce", 5), ("mse", 4), ("bce", 3)])
def test_gram_matrices(kind, n):
    obj, th, _ = make_problem(kind, n)
    p = obj.at(th)
    P = dense.per_example_grads_fd(obj, th)
    assert rel_err(p.gram("grad"), P @ P.T) < TOL
    J = dense.jacobian_fd(obj, th).reshape(-1, th.size)  # rows i·C + c
    assert rel_err(p.gram("jacobian"), J @ J.T) < TOL


def test_gram_general_path_matches_kronecker_trick():
    obj, th, _ = make_problem("ce", 4)
    p = obj.at(th)
    P = p.per_example_grads()
    assert rel_err(p.gram("grad"), P @ P.T) < 1e-13
    C = 3
    rows = []
    for c in range(C):
        gz = np.zeros((4, C))
        gz[:, c] = 1
        rows.append(obj.model.per_example_grads(th, p.caches, gz))
    J = np.stack(rows, 1).reshape(4 * C, -1)
    assert rel_err(p.gram("jacobian"), J @ J.T) < 1e-13


def test_layer_stats_reproduce_gradient_blocks():
    obj, th, _ = make_problem("ce", 6)
    p = obj.at(th)
    taps = p.layer_stats("empirical")
    grads = obj.model.layout.views(p.grad)
    for block, gv in zip(obj.model.layout.blocks, grads):
        t = taps[block.name.rsplit(".", 1)[0]]
        assert t["kind"] == "dense"
        assert np.all(t["a"][:, -1] == 1)
        assert rel_err(t["g"].T @ t["a"] / 6, gv) < 1e-13


@pytest.mark.parametrize("l2", [0.0, 0.03])
def test_grad_with_taps_is_the_gradient_and_the_mean_loss_taps(l2):
    """One backward pass: ∇f bit for bit :attr:`Point.grad` of a fresh point (and cached as it), the
    taps those of ``layer_stats("empirical")`` with g scaled by 1/N (ā the same bits), counted as one
    backward; the gradient also matches central finite differences."""
    obj, th, _ = make_problem("ce", 6, l2=l2)
    p = obj.at(th)
    before = obj.counter.backward
    g, taps = p.grad_with_taps()
    assert obj.counter.backward - before == 6 and p.grad is g
    assert np.array_equal(g, obj.at(th).grad)
    assert rel_err(g, dense.gradient_fd(obj, th)) < TOL
    ref = obj.at(th).layer_stats("empirical")
    assert set(taps) == set(ref)
    for name, t in taps.items():
        assert t["kind"] == "dense" and np.array_equal(t["a"], ref[name]["a"])
        assert rel_err(t["g"] * 6, ref[name]["g"]) < 1e-15


def test_float32_agrees_with_float64():
    obj64, th, r = make_problem("ce", 5, l2=0.01)
    obj32, th32, _ = make_problem("ce", 5, l2=0.01, dtype="float32")
    v = r.standard_normal(th.shape)
    p64, p32 = obj64.at(th), obj32.at(th32)
    assert p32.grad.dtype == np.float32
    assert abs(p32.value - p64.value) < 1e-5 * abs(p64.value)
    for a, b in [(p32.grad, p64.grad), (p32.hvp(v.astype("float32")), p64.hvp(v)), (p32.ggn_vp(v.astype("float32")), p64.ggn_vp(v))]:
        assert a.dtype == np.float32
        assert rel_err(a, b) < 1e-5


def test_point_reuses_forward_and_counts_passes():
    obj, th, r = make_problem("ce", 5)
    p = obj.at(th)
    v = r.standard_normal(th.shape)
    p.grad, p.hvp(v), p.ggn_vp(v)
    c = obj.counter
    assert (c.forward, c.backward, c.rforward, c.rbackward) == (5, 15, 10, 5)
    assert c.grad_equivalents == 17.5
    assert c.calls["forward"] == 1 and c.calls["hvp"] == 1


def test_hvp_sets_gradient_consistently():
    obj, th, r = make_problem("mse", 3, l2=0.2)
    p = obj.at(th)
    p.hvp(r.standard_normal(th.shape))
    assert rel_err(p.grad, obj.grad(th)) < 1e-14


@pytest.mark.parametrize("kind", ["ce", "bce"])
def test_hvp_at_a_point_with_known_gradient_skips_only_the_gradient(kind, monkeypatch):
    """Once ∇f is known, an R-op does not redo the gradient's parameter GEMMs (``want_grad=False``):
    H v is bit for bit that of a fresh point (which also forms ∇f), and no layer's plain ``backward``
    runs (a fresh point's product calls it once per parameter layer)."""
    obj, th, r = make_problem(kind, 5, l2=0.03)
    v = r.standard_normal(th.shape)
    fresh = obj.at(th)
    hv_fresh = fresh.hvp(v)
    g_from_rop = fresh.grad  # cached by the first product
    hv_fd = dense.hessian(obj, th, "fd") @ v
    n_dense = sum(isinstance(layer, Dense) for layer in obj.model.layers)
    calls = []
    for layer in obj.model.layers:
        if isinstance(layer, Dense):
            orig = layer.backward
            monkeypatch.setattr(layer, "backward", lambda *a, _o=orig, **k: calls.append(1) or _o(*a, **k))
    known = obj.at(th)
    g = known.grad
    n_grad = len(calls)
    assert n_grad == n_dense  # the gradient's backward pass itself
    hv_known = known.hvp(v)
    assert len(calls) == n_grad  # no plain backward inside the R-op now
    np.testing.assert_array_equal(hv_known, hv_fresh)
    np.testing.assert_array_equal(g, g_from_rop)
    assert rel_err(hv_known, hv_fd) < TOL
    again = obj.at(th)
    again.hvp(v)
    assert len(calls) == 2 * n_dense  # a fresh point's R-op forms ∇f: one plain backward per Dense layer
