"""qnref_jax.transformation inside real optax (the jax extra installs optax): a genuine
optax.GradientTransformationExtraArgs run as optax's docs run optax.lbfgs, optax.chain (a gradient
transformation before a first-order method; a clear refusal before a method that evaluates ∇f
itself; transformations after any method), optax schedules as learning rates, the state through
jax.tree_util and a numpy.savez round trip (resuming bit-identically), and float64 trajectories
equal to qnref's engine on the converted model to 1e-10 (lbfgs, lsr1-tr, kfac). float64 only in
the scoped qj.x64_scope()."""
from __future__ import annotations

import io

import jax.flatten_util

import jax
import numpy as np
import pytest

import optax  # in the jax extra: installed wherever the adapter tests run (no silent skip)

import qnref_jax as qj  # noqa: E402
from qnref.optim.base import Problem  # noqa: E402
from qnref.optim.registry import make_optimizer  # noqa: E402
from adapter_fixtures import FullBatchProblem  # noqa: E402

L2 = 1e-3
N = 24


def _setup():
    rng = np.random.default_rng(0)
    spec = [{"type": "dense", "W": rng.standard_normal((6, 4)) / 2, "b": 0.3 * rng.standard_normal(6)},
            {"type": "tanh"},
            {"type": "dense", "W": rng.standard_normal((3, 6)) / 2, "b": 0.3 * rng.standard_normal(3)}]
    X, y = rng.standard_normal((N, 4)), rng.integers(0, 3, N)
    structure, params = qj.split(spec)
    ce = qj.jax_loss("softmax_ce")
    model, theta0 = qj.from_spec(spec, (4,))

    def loss_fn(p):       # qnref's objective: batch mean + (λ/2)‖θ‖²
        sq = sum(jax.numpy.sum(x * x) for x in jax.tree_util.tree_leaves(p))
        return ce(qj.apply(structure, p, X), y) + 0.5 * L2 * sq

    return spec, structure, params, X, y, loss_fn, model, theta0


def _optax_loop(opt, params, f, steps, state=None):
    """optax's documented loop for optax.lbfgs, verbatim (inside the caller's x64 scope)."""
    state = opt.init(params) if state is None else state
    trajectory = []
    for _ in range(steps):
        value, grads = jax.value_and_grad(f)(params)
        updates, state = opt.update(grads, state, params, value=value, grad=grads, value_fn=f)
        params = optax.apply_updates(params, updates)
        trajectory.append(params)
    return params, state, trajectory


def _engine(name, model, theta0, X, y, steps, full, **hp):
    opt = make_optimizer(name, **hp)
    prob = (FullBatchProblem if full else Problem)(model, "softmax_ce", X, y, L2, seed=0)
    th, st, out = theta0.copy(), opt.init(theta0.copy()), []
    for _ in range(steps):
        th, st, _ = opt.step(th, st, prob)
        out.append(th.copy())
    return out


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_is_a_genuine_optax_transformation_and_runs_like_optax_lbfgs():
    spec, structure, params, X, y, f, model, theta0 = _setup()
    tx = qj.transformation("lbfgs", batch_size=N)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    assert isinstance(tx, optax.GradientTransformation)
    with qj.x64_scope():
        params = jax.tree_util.tree_map(np.asarray, params)
        f0 = float(f(params))
        ours, state, _ = _optax_loop(tx, params, f, 10)
        theirs, _, _ = _optax_loop(optax.lbfgs(), params, f, 10)        # the same loop drives optax's own L-BFGS
        assert float(f(ours)) < 0.8 * f0 and float(f(theirs)) < 0.8 * f0
        assert jax.tree_util.tree_leaves(ours)[0].dtype == np.float64
    assert int(optax.tree_utils.tree_get(state, "count")) == 10


@pytest.mark.parametrize("name", ["lbfgs", "lsr1-tr", "kfac"])
def test_float64_trajectory_equals_the_engine(name):
    spec, structure, params, X, y, f, model, theta0 = _setup()
    steps = 6
    if name == "kfac":       # needs layer taps: the spec problem draws the minibatches (same stream as the engine's)
        hp = {"batch_size": 8}
        prob = qj.JaxProblem.from_spec(spec, "softmax_ce", X, y, L2, seed=0)
        tx = qj.transformation(name, problem=prob, **hp)
        ref = _engine(name, model, theta0, X, y, steps, full=False, **hp)
    else:                    # value_fn: every evaluation is the full batch
        hp = {"batch_size": N}
        tx = qj.transformation(name, **hp)
        ref = _engine(name, model, theta0, X, y, steps, full=True, **hp)
    with qj.x64_scope():
        params = jax.tree_util.tree_map(np.asarray, params)
        _, _, traj = _optax_loop(tx, params, f, steps)
    got = [np.asarray(qj.params_to_theta(model, structure, p)) for p in traj]
    assert _rel(ref[-1], theta0) > 1e-3          # it moved
    for k, (a, b) in enumerate(zip(got, ref)):
        assert _rel(a, b) <= 1e-10, f"step {k}: {_rel(a, b):.3e}"


def test_chain_clip_before_a_first_order_method():
    spec, structure, params, X, y, f, model, theta0 = _setup()
    c = 0.05
    tx = optax.chain(optax.clip_by_global_norm(c), qj.transformation("sgd", learning_rate=0.1, batch_size=N))
    with qj.x64_scope():
        params = jax.tree_util.tree_map(np.asarray, params)
        state = tx.init(params)
        for _ in range(3):
            value, grads = jax.value_and_grad(f)(params)
            updates, state = tx.update(grads, state, params, value=value, grad=grads, value_fn=f)
            g = np.asarray(jax.flatten_util.ravel_pytree(grads)[0])
            u = np.asarray(jax.flatten_util.ravel_pytree(updates)[0])
            gn = np.linalg.norm(g)
            assert gn > c                                       # the clip is active
            assert _rel(u, -0.1 * g * (c / gn)) <= 1e-12
            params = optax.apply_updates(params, updates)


def test_chain_after_a_second_order_method_and_refusal_before_it():
    spec, structure, params, X, y, f, model, theta0 = _setup()
    plain = qj.transformation("lbfgs", batch_size=N)
    halved = optax.chain(qj.transformation("lbfgs", batch_size=N), optax.scale(0.5))
    clipped = optax.chain(optax.clip_by_global_norm(1e-3), qj.transformation("lbfgs", batch_size=N))
    with qj.x64_scope():
        params = jax.tree_util.tree_map(np.asarray, params)
        value, grads = jax.value_and_grad(f)(params)
        u1, _ = plain.update(grads, plain.init(params), params, value=value, grad=grads, value_fn=f)
        u2, _ = halved.update(grads, halved.init(params), params, value=value, grad=grads, value_fn=f)
        for a, b in zip(jax.tree_util.tree_leaves(u1), jax.tree_util.tree_leaves(u2)):
            assert _rel(np.asarray(b), 0.5 * np.asarray(a)) <= 1e-15
        with pytest.raises(ValueError, match="optax.chain is not meaningful"):
            clipped.update(grads, clipped.init(params), params, value=value, grad=grads, value_fn=f)


@pytest.mark.parametrize("schedule", [optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5),
                                      optax.warmup_cosine_decay_schedule(0.01, 0.2, warmup_steps=2, decay_steps=6,
                                                                         end_value=0.001)],
                         ids=["exponential_decay", "warmup_cosine"])
def test_optax_schedules_set_the_step(schedule):
    spec, structure, params, X, y, f, model, theta0 = _setup()
    sgd = qj.transformation("sgd", learning_rate=schedule, batch_size=N)     # lr is sgd's own hyperparameter
    lb = qj.transformation("lbfgs", learning_rate=schedule, batch_size=N)    # no lr: the schedule scales the step
    lb1 = qj.transformation("lbfgs", batch_size=N)
    with qj.x64_scope():
        rates = [float(schedule(k)) for k in range(6)]       # evaluated in the params' precision, as update does
        assert len(set(rates)) == 6                          # the schedule really changes
        params = jax.tree_util.tree_map(np.asarray, params)
        ps, s_sgd = params, sgd.init(params)
        pl, s_lb = params, lb.init(params)
        for k in range(6):
            g = jax.grad(f)(ps)
            u, s_sgd = sgd.update(g, s_sgd, ps)
            assert _rel(np.asarray(jax.flatten_util.ravel_pytree(u)[0]),
                        -rates[k] * np.asarray(jax.flatten_util.ravel_pytree(g)[0])) <= 1e-12
            ps = optax.apply_updates(ps, u)
            value, g = jax.value_and_grad(f)(pl)
            unit, _ = lb1.update(g, s_lb, pl, value=value, grad=g, value_fn=f)       # the same state, lr 1
            u, s_lb = lb.update(g, s_lb, pl, value=value, grad=g, value_fn=f)
            assert _rel(np.asarray(jax.flatten_util.ravel_pytree(u)[0]),
                        rates[k] * np.asarray(jax.flatten_util.ravel_pytree(unit)[0])) <= 1e-12
            pl = optax.apply_updates(pl, u)


def _save(state) -> bytes:
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    buf = io.BytesIO()
    np.savez(buf, **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
    return buf.getvalue()


def _restore(blob: bytes, target):
    """flax/orbax-style: the arrays restored into the structure of a freshly initialised target."""
    data = np.load(io.BytesIO(blob))
    paths, treedef = jax.tree_util.tree_flatten_with_path(target)
    return jax.tree_util.tree_unflatten(treedef, [data[jax.tree_util.keystr(p)] for p, _ in paths])


@pytest.mark.parametrize("name", ["lbfgs", "lsr1-tr", "adam", "kfac"])
def test_state_pytree_roundtrips_and_savez_resumes_bit_identically(name):
    spec, structure, params, X, y, f, model, theta0 = _setup()

    def make():
        if name == "kfac":
            return qj.transformation(name, problem=qj.JaxProblem.from_spec(spec, "softmax_ce", X, y, L2, seed=0),
                                     batch_size=N)
        return qj.transformation(name, batch_size=N)

    def resumed_tx():
        """A fresh transformation (kfac: its problem's batch stream replayed to the same point)."""
        tx2 = make()
        if name == "kfac":
            _optax_loop(tx2, params, f, 3)
        return tx2

    with qj.x64_scope():
        params = jax.tree_util.tree_map(np.asarray, params)
        tx = make()
        p2, state, _ = _optax_loop(tx, params, f, 3)
        leaves, treedef = jax.tree_util.tree_flatten(state)
        assert all(isinstance(x, (np.ndarray, jax.Array)) for x in leaves)
        assert jax.tree_util.tree_structure(jax.tree_util.tree_unflatten(treedef, leaves)) == treedef
        blob = _save(state)
        buf = io.BytesIO()
        np.savez(buf, **qj.state_to_arrays(state))
        a, _, _ = _optax_loop(tx, p2, f, 3, state)             # uninterrupted
        runs = []
        same = jax.tree_util.tree_structure(make().init(params)) == treedef
        if same:           # flax/orbax-style restore into the structure of a fresh init
            tx2 = resumed_tx()
            runs.append(_optax_loop(tx2, p2, f, 3, _restore(blob, tx2.init(params)))[0])
        else:              # kfac's factors appear at its first step: no init-time target, restore by name
            assert name == "kfac"
        tx3 = resumed_tx()
        restored = qj.state_from_arrays(np.load(io.BytesIO(buf.getvalue())))
        assert jax.tree_util.tree_structure(restored) == treedef
        runs.append(_optax_loop(tx3, p2, f, 3, restored)[0])
    for b in runs:
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
