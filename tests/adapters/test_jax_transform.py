"""qnref_jax.transformation: optax.lbfgs's calling convention, a pytree state that resumes
bit-identically, schedules for the learning rate, refusals (jit, missing value_fn, layer methods
without a spec problem). float64 in a scoped x64 context only."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import qnref_jax as qj
from qnref.optim.registry import make_optimizer
from adapter_fixtures import FullBatchProblem


def _spec(rng):
    return [{"type": "dense", "W": rng.standard_normal((6, 4)) / 2, "b": 0.3 * rng.standard_normal(6)},
            {"type": "tanh"},
            {"type": "dense", "W": rng.standard_normal((3, 6)) / 2, "b": 0.3 * rng.standard_normal(3)}]


def _setup():
    rng = np.random.default_rng(0)
    spec = _spec(rng)
    X, y = rng.standard_normal((20, 4)), rng.integers(0, 3, 20)
    structure, params = qj.split(spec)
    loss = qj.jax_loss("softmax_ce")

    def loss_fn(p):
        return loss(qj.apply(structure, p, X), y)

    return spec, structure, params, X, y, loss_fn


def _run(tx, params, loss_fn, steps, state=None):
    with qj.x64_scope():
        params = jax.tree_util.tree_map(np.asarray, params)
        state = tx.init(params) if state is None else state
        for _ in range(steps):
            value, grad = jax.value_and_grad(loss_fn)(params)
            updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=loss_fn)
            params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    return params, state


def test_lbfgs_value_fn_convention_matches_engine():
    spec, structure, params, X, y, loss_fn = _setup()
    model, theta0 = qj.from_spec(spec, (4,))
    tx = qj.transformation("lbfgs", batch_size=20)
    out, state = _run(tx, params, loss_fn, 5)
    opt = make_optimizer("lbfgs", batch_size=20)
    prob = FullBatchProblem(model, "softmax_ce", X, y, seed=0)
    th, st = theta0.copy(), opt.init(theta0.copy())
    for _ in range(5):
        th, st, _ = opt.step(th, st, prob)
    got = qj.params_to_theta(model, structure, out)
    assert np.abs(got - th).max() <= 1e-10 * np.abs(th).max()
    assert int(state.count) == 5


def test_state_is_a_pytree_of_arrays_and_resumes_bit_identically():
    spec, structure, params, X, y, loss_fn = _setup()
    tx = qj.transformation("lsr1-ls", batch_size=20)
    p2, state = _run(tx, params, loss_fn, 2)
    leaves = jax.tree_util.tree_leaves(state)
    assert leaves and all(hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves)
    restored = jax.tree_util.tree_map(lambda x: np.array(x), state)     # e.g. a save/restore through NumPy
    a, _ = _run(tx, p2, loss_fn, 2, state)
    b, _ = _run(tx, p2, loss_fn, 2, restored)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_schedule_sets_the_learning_rate_per_count():
    spec, structure, params, X, y, loss_fn = _setup()
    tx = qj.transformation("sgd", learning_rate=lambda count: 0.1 * 0.5 ** count, batch_size=20)
    with qj.x64_scope():
        params = jax.tree_util.tree_map(np.asarray, params)
        state = tx.init(params)
        for k in range(3):
            g = jax.grad(loss_fn)(params)
            upd, state = tx.update(g, state, params)
            for u, gg in zip(jax.tree_util.tree_leaves(upd), jax.tree_util.tree_leaves(g)):
                np.testing.assert_allclose(np.asarray(u), -0.1 * 0.5 ** k * np.asarray(gg), rtol=1e-10, atol=1e-16)
            params = jax.tree_util.tree_map(lambda p, u: p + u, params, upd)


def test_refusals():
    spec, structure, params, X, y, loss_fn = _setup()
    with pytest.raises(ValueError, match="JaxProblem.from_spec"):
        qj.transformation("kfac")
    tx = qj.transformation("lbfgs", batch_size=20)
    with qj.x64_scope():
        state = tx.init(params)
        g = jax.grad(loss_fn)(params)
        with pytest.raises(ValueError, match="value_fn"):
            tx.update(g, state, params)
        with pytest.raises(TypeError, match="jax.jit"):
            jax.jit(lambda p, s: tx.update(g, s, p, value_fn=loss_fn))(params, state)


def test_x64_is_scoped():
    before = bool(jax.config.jax_enable_x64)
    spec, structure, params, X, y, loss_fn = _setup()
    tx = qj.transformation("sgd", batch_size=20)
    with qj.x64_scope():
        params = jax.tree_util.tree_map(np.asarray, params)
    state = tx.init(params)                   # float64 params: init/update enter the x64 scope themselves
    upd, state = tx.update(jax.tree_util.tree_map(np.zeros_like, params), state, params)
    assert np.asarray(jax.tree_util.tree_leaves(upd)[0]).dtype == np.float64
    assert bool(jax.config.jax_enable_x64) == before   # the process-wide flag is left alone


def test_compare_and_objective_leave_the_x64_flag_alone():
    before = bool(jax.config.jax_enable_x64)
    spec, structure, params, X, y, loss_fn = _setup()
    res = qj.compare(spec, "softmax_ce", X, y, what=("grad", "hvp"))
    assert res["grad"] <= 1e-12 and res["hvp"] <= 1e-12          # float64 inside the scope
    prob = qj.JaxProblem.from_spec(spec, "softmax_ce", X, y)
    assert prob.full_objective.at(prob.get_theta()).grad.dtype == np.float64
    assert bool(jax.config.jax_enable_x64) == before
