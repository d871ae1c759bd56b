"""L-BFGS on the pair ring (issue 21): the two-loop reads a wrapped PairStore in place with its kept
row curvatures and gives the bits of the operator built from ordered copies; the fused update
``axpy_`` gives the bits of NumPy's ``q += c * y``; the optimizer's per-step passes."""
from __future__ import annotations

import numpy as np
import pytest

from qnref.nn import conv
from qnref.optim import make_optimizer
from qnref.optim.base import Problem
from qnref.optim.operators import LBFGSOperator, axpy_
from qnref.optim.pairs import PairStore


def _filled_ring(rng, n, cap, appends, dtype=np.float64, keep=True, ring=True):
    store = PairStore.empty(np.zeros(n, dtype=dtype), cap, grams=False, ring=ring)
    if keep:
        store.curvatures()
    for _ in range(appends):
        s = rng.standard_normal(n).astype(dtype)
        store.append(s, (s + 0.3 * rng.standard_normal(n)).astype(dtype))  # sᵀy > 0 (whp)
    return store


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("appends", [1, 3, 4, 7, 9])
@pytest.mark.parametrize("ring", [True, False])
def test_from_store_same_bits_as_ordered_rows(dtype, appends, ring):
    """from_store on a (wrapped) ring = LBFGSOperator(S, Y) on ordered copies, bit for bit, for H v
    (two-loop, kept curvatures) and the compact forms (gathered rows); the store is not rotated."""
    rng = np.random.default_rng(appends)
    n, cap = 50, 4
    store = _filled_ring(rng, n, cap, appends, dtype, ring=ring)
    v, V = rng.standard_normal(n).astype(dtype), rng.standard_normal((n, 3)).astype(dtype)
    start, wrapped = store.start, store.wrapped
    S = np.array([store.Sbuf[r] for r in store.rows()])
    Y = np.array([store.Ybuf[r] for r in store.rows()])
    op, ref = LBFGSOperator.from_store(store), LBFGSOperator(S, Y)
    np.testing.assert_array_equal(op.solve(v), ref.solve(v))
    np.testing.assert_array_equal(op.solve(V), ref.solve(V))
    assert store.start == start and store.wrapped == wrapped  # read in place
    assert op.gamma == ref.gamma
    np.testing.assert_array_equal(op.solve_compact(V), ref.solve_compact(V))
    np.testing.assert_array_equal(op.matvec(v), ref.matvec(v))
    np.testing.assert_array_equal(op.S, S)
    # and the store's curvatures formed late (after the appends) are the same numbers
    late = _filled_ring(np.random.default_rng(appends), n, cap, appends, dtype, keep=False)
    np.testing.assert_array_equal(LBFGSOperator.from_store(late).solve(v), ref.solve(v))


def test_from_store_dense_oracle_on_a_wrapped_ring():
    """H of a wrapped ring equals the dense inverse BFGS recursion over the pairs oldest first
    ([NW06] (6.17) from H₀ = γI, γ of the newest pair)."""
    rng = np.random.default_rng(7)
    n, cap = 6, 3
    A = rng.standard_normal((n, n))
    A = A @ A.T + n * np.eye(n)  # SPD: every pair has sᵀy > 0
    store = PairStore.empty(np.zeros(n), cap, grams=False, ring=True)
    for _ in range(5):
        s = rng.standard_normal(n)
        store.append(s, A @ s)
    assert store.wrapped
    pairs = [(store.Sbuf[r], store.Ybuf[r]) for r in store.rows()]
    s, y = pairs[-1]
    H = (s @ y) / (y @ y) * np.eye(n)
    for s, y in pairs:
        rho = 1.0 / (s @ y)
        E = np.eye(n) - rho * np.outer(s, y)
        H = E @ H @ E.T + rho * np.outer(s, s)
    np.testing.assert_allclose(LBFGSOperator.from_store(store).to_dense(inverse=True), H, rtol=1e-10, atol=1e-12)


def test_from_store_empty_is_gamma_identity():
    store = PairStore.empty(np.zeros(4), 3, grams=False)
    v = np.arange(4.0)
    np.testing.assert_array_equal(LBFGSOperator.from_store(store).solve(v), v)
    np.testing.assert_array_equal(LBFGSOperator.from_store(store, 2.0).solve(v), 2.0 * v)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 7, 64, 1001, 70001])
def test_axpy_same_bits_as_numpy(dtype, n, monkeypatch):
    """The fused kernel rounds the product and the sum separately (no FMA): the bits of q += c*y,
    also with NaN, ±inf, subnormals and huge values (every size on the kernel: MIN_SIZE 0)."""
    from qnref import host_kernels

    monkeypatch.setattr(host_kernels, "MIN_SIZE", 0)
    rng = np.random.default_rng(n)
    for trial in range(4):
        q = (rng.standard_normal(n) * 10.0 ** rng.uniform(-30, 30, n)).astype(dtype)
        y = (rng.standard_normal(n) * 10.0 ** rng.uniform(-30, 30, n)).astype(dtype)
        if n > 4:
            q[:4] = [np.nan, np.inf, -np.inf, np.finfo(dtype).tiny / 8]
            y[1:5] = [np.inf, 2.0, np.nan, np.finfo(dtype).max]
        c = dtype(rng.standard_normal() * 10.0 ** rng.uniform(-3, 3))
        want = q.copy()
        with np.errstate(all="ignore"):
            want += c * y
        got = q.copy()
        axpy_(got, c, y)
        np.testing.assert_array_equal(got, want)  # NaN positions equal too
        got2 = q.copy()
        axpy_(got2, -c, y)
        want2 = q.copy()
        with np.errstate(all="ignore"):
            want2 -= c * y  # the two-loop's q −= αy through axpy_(q, −α, y)
        np.testing.assert_array_equal(got2, want2)


def test_axpy_falls_back_outside_its_domain(monkeypatch):
    """Mixed dtypes, a Python-float c, matrices, views and the 'xp' switch take NumPy's own update."""
    rng = np.random.default_rng(0)
    q32, y32 = rng.standard_normal(10).astype(np.float32), rng.standard_normal(10).astype(np.float32)
    for q, c, y in ((q32, 0.3, y32), (q32, np.float64(0.3), y32), (q32.astype(np.float64), np.float64(0.3), y32),
                    (rng.standard_normal((5, 2)), np.float64(0.3), rng.standard_normal((5, 2))),
                    (rng.standard_normal(20)[::2], np.float64(0.3), rng.standard_normal(10))):
        want = q.copy()
        want += c * y
        got = q.copy()
        axpy_(got, c, y)
        np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(conv, "KERNELS", "xp")
    q = rng.standard_normal(10)
    want = q + np.float64(0.5) * q
    axpy_(q, np.float64(0.5), q.copy())
    np.testing.assert_array_equal(q, want)


def test_lbfgs_step_memory_is_a_ring_and_resumes_from_old_checkpoints():
    """L-BFGS steps leave the ring wrapped (no per-step reordering) with kept curvatures; a state
    whose store is rewritten in the pre-ring checkpoint form (ordered rows, no start/sy) continues
    with the same iterates."""
    from qnref.nn.activations import Tanh
    from qnref.nn.dense import Dense
    from qnref.nn.model import Sequential
    from qnref.optim.base import state_from_host, state_to_host
    from qnref.optim.lbfgs import LBFGSState

    rng = np.random.default_rng(0)
    model = Sequential([Dense(8), Tanh(), Dense(3)], input_shape=(5,))
    X, yv = rng.standard_normal((40, 5)), rng.integers(0, 3, 40)
    prob = Problem(model, "softmax_ce", X, yv, seed=0)
    opt = make_optimizer("lbfgs", batch_size=None, memory=3)
    theta = model.init(0)
    state = opt.init(theta)
    for _ in range(10):
        theta, state, info = opt.step(theta, state, prob)
        if state.memory.count == 3 and state.memory.start > 0:
            break
    mem = state.memory
    assert mem.count == 3 and mem.sy is not None and mem.ring and mem.start > 0
    d = state_to_host(state)
    S = np.array([mem.Sbuf[r] for r in mem.rows()])
    Y = np.array([mem.Ybuf[r] for r in mem.rows()])
    d["memory"] = {"Sbuf": S, "Ybuf": Y, "count": 3, "SY": None, "SS": None, "YY": None}
    old = state_from_host(LBFGSState, d)
    assert old.memory.ring and old.memory.start == 0 and old.memory.sy is None
    t1, t2, s1, s2 = theta, theta.copy(), state, old
    for _ in range(4):
        t1, s1, _ = opt.step(t1, s1, prob)
        t2, s2, _ = opt.step(t2, s2, prob)
        np.testing.assert_array_equal(t1, t2)
