"""Every problem/objective/point type of the repository against the written protocol (qnref.curvature.protocol).

One parametrized fixture builds the same model (a tanh MLP, 4 → 5 → 3), data and θ for each type —
the NumPy engine, the data-parallel problem on one rank (SerialComm, no MPI), torch and JAX — with
an index map ``perm`` from the type's θ layout to qnref's W̄ layout (qnref θ = θ_type[perm]). The
tests check:

- isinstance against the runtime-checkable Protocols and the common attributes (xp, layout, model);
- every product against independent dense oracles in qnref's layout: 5-point finite differences
  (O(ε⁴)) of f, of the analytic gradient and of the network outputs, with the loss's output-space
  Hessian and gradient written out explicitly (qnref.curvature.dense), float64, ≤ 1e-10 relative;
- agreement of every point type with the NumPy point on the same θ (≤ 1e-11 relative);
- the documented errors for bad directions (shape → ValueError, dtype → TypeError, NaN → NonFiniteError)
  and for products a type cannot offer (UnsupportedProductError, never AttributeError);
- the problem protocol: same seed → same batches, epochs, sample, full/full_objective, subset,
  state()/load_state().

JAX runs in float64 through the objective's scoped ``jax.enable_x64`` (the process-wide flag is not
touched, checked below).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

import qnref_jax as qj
import qnref_torch as qt
from qnref.curvature import dense
from qnref.curvature.objective import NonFiniteError, Objective
from qnref.curvature.protocol import (ModelStructure, ObjectiveProtocol, PointPrimitives, PointProtocol,
                                      ProblemProtocol, UnsupportedProductError)
from qnref.distributed import SerialComm
from qnref.distributed.problem import DistributedProblem
from qnref.optim.base import Problem

N, D_IN, HIDDEN, C, L2, SEED = 6, 4, 5, 3, 0.1, 3
KINDS = ("numpy", "distributed", "torch", "jax")
LOSSES = ("softmax_ce", "mse")
ORACLE_RTOL = 1e-10   # 5-point finite differences, eps 1e-3
AGREE_RTOL = 1e-11    # two exact implementations


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# -- the shared task ------------------------------------------------------------------------------
@functools.cache
def task(loss: str):
    """(torch module, qnref conversion, X, y): one model and data set for every type."""
    torch.manual_seed(SEED)
    module = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, C)).double()
    conv = qt.convert(module, (D_IN,))
    rng = np.random.default_rng(SEED)
    X = rng.standard_normal((N, D_IN))
    y = rng.integers(0, C, N) if loss == "softmax_ce" else rng.standard_normal((N, C))
    return module, conv, X, y


class Case:
    """One point type on the shared task: ``problem``, ``theta`` (its layout) and ``perm``."""

    def __init__(self, kind: str, loss: str):
        module, conv, X, y = task(loss)
        self.kind, self.loss, self.model, self.theta_ref = kind, loss, conv.model, conv.theta
        n = conv.theta.size
        if kind == "numpy":
            self.problem = Problem(conv.model, loss, X, y, L2, seed=SEED)
            self.perm = np.arange(n)
        elif kind == "distributed":
            self.problem = DistributedProblem(conv.model, loss, X, y, L2, seed=SEED, comm=SerialComm())
            self.perm = np.arange(n)
        elif kind == "torch":
            self.problem = qt.TorchProblem(module, loss, X, y, l2=L2, seed=SEED)
            probe, d, off = np.arange(n, dtype=np.float64), {}, 0
            for name, p in module.named_parameters():
                d[name] = torch.from_numpy(probe[off:off + p.numel()].reshape(p.shape))
                off += p.numel()
            self.perm = qt.torch_to_theta(conv, d).astype(np.int64)
        elif kind == "jax":
            structure, params = qj.split(qj.to_spec(conv.model, conv.theta))
            self.problem = qj.JaxProblem(lambda p, x: qj.apply(structure, p, x), loss, params, X, y, l2=L2, seed=SEED)
            self.perm = qj.params_to_theta(conv.model, structure,
                                           self.problem.unravel(np.arange(n, dtype=np.float64))).astype(np.int64)
        else:  # pragma: no cover
            raise ValueError(kind)
        self.theta = self.from_ref(conv.theta)
        assert np.array_equal(self.to_ref(self.theta), conv.theta)

    def to_ref(self, v):
        """A vector (or the columns of a matrix) of this type's layout in qnref's layout."""
        return np.asarray(v)[..., self.perm]

    def from_ref(self, v):
        out = np.empty_like(v)
        out[..., self.perm] = v
        return out

    def point(self):
        return self.problem.full_objective.at(self.theta)


@pytest.fixture(params=[(k, l) for l in LOSSES for k in KINDS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request) -> Case:
    return Case(*request.param)


# -- independent dense oracles (qnref layout) ----------------------------------------------------------
@functools.cache
def oracle(loss: str) -> dict:
    _, conv, X, y = task(loss)
    obj = Objective(conv.model, loss, X, y, L2)
    th, n = conv.theta, conv.theta.size
    eps = 1e-3
    J = dense.jacobian_fd(obj, th, eps, order=4)                    # (N, C, n) from forward passes only
    z, _ = conv.model.forward(th, X, train=True)
    HL = obj.loss.hessian(z, obj.y)                                 # explicit (N, C, C)
    e = obj.loss.dz(z, obj.y)                                       # explicit (N, C)
    P = np.einsum("icn,ic->in", J, e)
    G0 = np.einsum("ica,icd,idb->ab", J, HL, J) / N
    ytil = obj.at(th).sampled_targets()
    Ps = np.einsum("icn,ic->in", J, obj.loss.dz(z, ytil))
    Jrows = J.reshape(N * C, n)
    return {
        "value": float(obj.loss.per_example(z, obj.y).mean() + 0.5 * L2 * th @ th),
        "grad": dense.gradient_fd(obj, th, eps, order=4),
        "H": dense.hessian(obj, th, "fd", eps, order=4),
        "G": G0 + L2 * np.eye(n), "F_exact": G0, "F_emp": P.T @ P / N, "F_sampled": Ps.T @ Ps / N,
        "ytil": ytil, "J": J, "P": P, "gram_grad": P @ P.T, "gram_jac": Jrows @ Jrows.T, "z": z, "e": e,
    }


def directions(n: int, seed: int = 1):
    r = np.random.default_rng(seed)
    return r.standard_normal(n), r.standard_normal((N, C))


# product name → (evaluate on a point of the case in qnref layout, oracle in qnref layout)
def _products(case: Case, p, o: dict) -> dict:
    v_ref, u = directions(case.theta.size)
    v = case.from_ref(v_ref)
    ytil = o["ytil"]
    return {
        "value": (lambda: p.value, lambda: o["value"]),
        "grad": (lambda: case.to_ref(p.grad), lambda: o["grad"]),
        "hvp": (lambda: case.to_ref(p.hvp(v)), lambda: o["H"] @ v_ref),
        "ggn_vp": (lambda: case.to_ref(p.ggn_vp(v)), lambda: o["G"] @ v_ref),
        "fisher_empirical": (lambda: case.to_ref(p.fisher_vp(v)), lambda: o["F_emp"] @ v_ref),
        "fisher_exact": (lambda: case.to_ref(p.fisher_vp(v, "exact")), lambda: o["F_exact"] @ v_ref),
        "fisher_sampled": (lambda: case.to_ref(p.fisher_vp(v, "sampled", targets=ytil)), lambda: o["F_sampled"] @ v_ref),
        "jvp": (lambda: p.jvp(v), lambda: np.einsum("icn,n->ic", o["J"], v_ref)),
        "vjp": (lambda: case.to_ref(p.vjp(u)), lambda: np.einsum("icn,ic->n", o["J"], u)),
        "per_example_grads": (lambda: case.to_ref(p.per_example_grads()), lambda: o["P"]),
        "gram_grad": (lambda: p.gram("grad"), lambda: o["gram_grad"]),
        "gram_jacobian": (lambda: p.gram("jacobian"), lambda: o["gram_jac"]),
        "z": (lambda: p.z, lambda: o["z"]),
        "dz": (lambda: p.dz, lambda: o["e"]),
    }


PRODUCTS = ("value", "grad", "hvp", "ggn_vp", "fisher_empirical", "fisher_exact", "fisher_sampled", "jvp", "vjp",
            "per_example_grads", "gram_grad", "gram_jacobian", "z", "dz")


# -- protocol membership and common attributes -----------------------------------------------------------
def test_types_satisfy_the_protocols(case):
    prob = case.problem
    obj = prob.full_objective
    p = obj.at(case.theta)
    assert isinstance(prob, ProblemProtocol)
    assert isinstance(obj, ObjectiveProtocol)
    assert isinstance(p, PointPrimitives) and isinstance(p, PointProtocol)
    assert isinstance(prob.model, ModelStructure) and isinstance(obj.model, ModelStructure)
    n = case.theta.size
    assert prob.layout.size == obj.layout.size == p.layout.size == n
    assert prob.xp is np and obj.xp is np and p.xp is np
    assert p.N == obj.n_samples == prob.n_samples == N
    assert p.l2 == obj.l2 == prob.l2 == L2
    assert p.counter is obj.counter is prob.counter
    assert tuple(p.output_shape) == (N, C)
    # layout views cover θ block by block in the type's own order
    assert sum(b.size for b in prob.layout.blocks) == n
    assert np.array_equal(np.concatenate([w.reshape(-1) for w in prob.layout.views(case.theta)]), case.theta)


# -- every product against the dense oracle ---------------------------------------------------------------
@pytest.mark.parametrize("product", PRODUCTS)
def test_product_matches_dense_oracle(case, product):
    got, want = _products(case, case.point(), oracle(case.loss))[product]
    g, w = got(), want()
    if product == "value":
        assert abs(g - w) <= 1e-14 * abs(w)
    else:
        assert rel(g, w) <= ORACLE_RTOL, f"{case.kind}: {product} off by {rel(g, w):.2e}"


def test_sampled_per_example_grads_and_own_draws(case):
    """Explicit targets replace y; the point's own draws are fixed per point and shaped like y."""
    o = oracle(case.loss)
    p = case.point()
    ps = case.to_ref(p.per_example_grads(o["ytil"]))
    z, _ = case.model.forward(case.theta_ref, task(case.loss)[2], train=True)
    from qnref.nn.losses import get_loss

    want = np.einsum("icn,ic->in", o["J"], get_loss(case.loss).dz(z, o["ytil"]))
    assert rel(ps, want) <= ORACLE_RTOL
    t1, t2 = p.sampled_targets(), p.sampled_targets()
    assert t1 is t2 and tuple(t1.shape) == tuple(np.shape(task(case.loss)[3]))
    v = case.from_ref(directions(case.theta.size)[0])
    assert np.all(np.isfinite(p.fisher_vp(v, "sampled")))


# -- agreement between point types --------------------------------------------------------------------------
@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "numpy"])
@pytest.mark.parametrize("loss", LOSSES)
def test_point_types_agree_with_numpy_point(kind, loss, product):
    case, ref = Case(kind, loss), Case("numpy", loss)
    o = oracle(case.loss)
    got = _products(case, case.point(), o)[product][0]()
    want = _products(ref, ref.point(), o)[product][0]()
    if product == "value":
        assert abs(got - want) <= 1e-14 * abs(want)
    else:
        assert rel(got, want) <= AGREE_RTOL, f"{case.kind} vs numpy: {product} off by {rel(got, want):.2e}"


# -- documented errors ----------------------------------------------------------------------------------------
DIRECTION_PRODUCTS = {
    "hvp": lambda p, v: p.hvp(v),
    "ggn_vp": lambda p, v: p.ggn_vp(v),
    "jvp": lambda p, v: p.jvp(v),
    "fisher_empirical": lambda p, v: p.fisher_vp(v),
    "fisher_sampled": lambda p, v: p.fisher_vp(v, "sampled"),
    "fisher_exact": lambda p, v: p.fisher_vp(v, "exact"),
}


@pytest.mark.parametrize("product", sorted(DIRECTION_PRODUCTS))
def test_bad_directions_raise_the_documented_errors(case, product):
    p, f, n = case.point(), DIRECTION_PRODUCTS[product], case.theta.size
    with pytest.raises(ValueError, match="length|shape"):
        f(p, np.ones(n + 1))
    with pytest.raises(ValueError, match="flat 1-D"):
        f(p, np.ones((n, 1)))
    with pytest.raises(TypeError, match="float32"):
        f(p, np.ones(n, dtype=np.float32))
    bad = np.ones(n)
    bad[2] = np.nan
    with pytest.raises(NonFiniteError, match="NaN"):
        f(p, bad)


def test_bad_output_arrays_and_kinds(case):
    p = case.point()
    with pytest.raises(ValueError, match="output shape"):
        p.vjp(np.ones((N + 1, C)))
    u = np.ones((N, C))
    u[0, 0] = np.inf
    with pytest.raises(NonFiniteError):
        p.vjp(u)
    v = case.from_ref(directions(case.theta.size)[0])
    with pytest.raises(ValueError, match="Fisher kind"):
        p.fisher_vp(v, "true")
    with pytest.raises(ValueError, match="targets are for kind='sampled'"):
        p.fisher_vp(v, "empirical", targets=oracle(case.loss)["ytil"])
    with pytest.raises(ValueError, match="Gram kind"):
        p.gram("hessian")
    with pytest.raises(NonFiniteError):
        case.problem.full_objective.at(np.full(case.theta.size, np.nan))


def test_layer_structure_is_offered_or_refused_clearly(case):
    p = case.point()
    if case.kind in ("numpy", "distributed"):
        taps = p.layer_stats()
        assert len(taps) == len(case.problem.model.kron_layers) == 2
        for t in taps.values():
            assert t["a"].shape[0] == N and t["g"].shape[0] == N
        return
    with pytest.raises(UnsupportedProductError, match="layer_stats.*convert"):
        p.layer_stats()
    with pytest.raises(UnsupportedProductError, match="kron_layers"):
        list(case.problem.model.kron_layers)
    assert not isinstance(UnsupportedProductError("x"), AttributeError)


# -- the problem protocol ---------------------------------------------------------------------------------------
def test_problem_stream_matches_the_numpy_problem(case):
    ref = Case("numpy", case.loss)
    a, b = case.problem, ref.problem
    for size in (2, 4, 4, 3):
        va, vb = a.batch(size).at(case.theta).value, b.batch(size).at(ref.theta).value
        assert abs(va - vb) <= 1e-14 * abs(vb)
    assert a.epochs == b.epochs == 13 / N
    sa, sb = a.sample(3).at(case.theta).value, b.sample(3).at(ref.theta).value
    assert abs(sa - sb) <= 1e-14 * abs(sb) and a.epochs == b.epochs  # sample() does not advance the stream
    e0 = a.epochs
    assert a.full().n_samples == N and a.epochs == e0 + 1
    assert a.full_objective.n_samples == N and a.epochs == e0 + 1
    sub = a.subset(np.array([4, 1]))
    assert sub.n_samples == 2
    assert abs(sub.at(case.theta).value - b.subset(np.array([4, 1])).at(ref.theta).value) <= 1e-14
    assert sub.subset(np.array([1])).n_samples == 1
    mask = np.zeros(N, dtype=bool)
    mask[[0, 5]] = True
    for idx in (slice(1, 4), mask):
        sa, sb = a.full_objective.subset(idx), b.full_objective.subset(idx)
        assert sa.n_samples == sb.n_samples
        assert abs(sa.at(case.theta).value - sb.at(ref.theta).value) <= 1e-14 * abs(sb.at(ref.theta).value)


def test_problem_state_resumes_the_stream(case):
    prob = case.problem
    prob.batch(4)
    st = prob.state()
    first = [prob.batch(3).at(case.theta).value for _ in range(3)]
    prob.load_state(st)
    again = [prob.batch(3).at(case.theta).value for _ in range(3)]
    assert first == again


def test_jax_float64_is_scoped_not_process_wide():
    import jax

    before = bool(jax.config.jax_enable_x64)
    c = Case("jax", "softmax_ce")
    g = c.point().grad
    assert g.dtype == np.float64
    assert rel(c.to_ref(g), oracle("softmax_ce")["grad"]) <= ORACLE_RTOL
    assert bool(jax.config.jax_enable_x64) == before


# -- plain functions: the same protocol, seen as the identity network on one example ------------------------
def _rosenbrock():
    from qnref.curvature.function import rosenbrock_problem

    prob = rosenbrock_problem(5)
    x = np.array([0.3, -0.7, 1.1, 0.4, -0.2])
    g = prob.full_objective.at(x).grad
    H = np.stack([dense.central_difference(lambda t: prob.full_objective.at(t).grad, x, i, 1e-3, 4) for i in range(5)],
                 axis=1)
    return prob, x, g, H


def test_function_problem_satisfies_the_protocols():
    prob, x, g, H = _rosenbrock()
    p = prob.full_objective.at(x)
    assert isinstance(prob, ProblemProtocol) and isinstance(prob.full_objective, ObjectiveProtocol)
    assert isinstance(p, PointProtocol) and isinstance(prob.model, ModelStructure)
    assert prob.layout.size == p.layout.size == 5 and p.xp is np and p.N == 1
    v, u = np.random.default_rng(2).standard_normal(5), np.random.default_rng(3).standard_normal((1, 5))
    for got, want in [(p.hvp(v), H @ v), (p.ggn_vp(v), H @ v), (p.fisher_vp(v, "exact"), H @ v),
                      (p.fisher_vp(v), np.outer(g, g) @ v), (p.jvp(v), v[None]), (p.vjp(u), u[0]),
                      (p.per_example_grads(), g[None]), (p.gram(), np.array([[g @ g]])),
                      (p.gram("jacobian"), np.eye(5))]:
        assert rel(got, want) <= ORACLE_RTOL
    for f in (DIRECTION_PRODUCTS[k] for k in ("hvp", "ggn_vp", "jvp", "fisher_empirical", "fisher_exact")):
        with pytest.raises(ValueError, match="length"):
            f(p, np.ones(6))
        with pytest.raises(NonFiniteError):
            f(p, np.full(5, np.nan))
    with pytest.raises(UnsupportedProductError, match="predictive distribution"):
        p.fisher_vp(v, "sampled")
    with pytest.raises(UnsupportedProductError, match="layer_stats"):
        p.layer_stats()
    with pytest.raises(UnsupportedProductError, match="kron_layers"):
        list(prob.model.kron_layers)
    st = prob.state()
    prob.full(), prob.batch(1)
    prob.load_state(st)
    assert prob.epochs == 0 and prob.subset([0]) is prob.full_objective
