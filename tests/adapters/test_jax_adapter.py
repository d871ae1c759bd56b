"""JAX adapter: spec conversion, products vs jax (float64, rtol 1e-10), JaxObjective, optax-style wrapper."""
import os

# XLA's CPU compile time dominates these tests; lower optimization levels change no result bits that
# matter here (all comparisons are at 1e-10) and cut compile time ~2x. Effective only when this module
# is the first to import jax in the process.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import qnref_jax as qj  # noqa: E402
from qnref.curvature.objective import Objective  # noqa: E402
from qnref.optim.base import Problem  # noqa: E402
from qnref.optim.first_order import NAG, SGD, Adam  # noqa: E402
from qnref.optim.lbfgs import LBFGS  # noqa: E402

RTOL = 1e-10


@pytest.fixture(autouse=True)
def _x64():
    """float64 for every test, scoped (the process-wide jax_enable_x64 flag is never switched)."""
    with qj.x64_scope():
        yield


def _targets(loss, n, c, rng):
    if loss == "softmax_ce":
        return rng.integers(0, c, n)
    if loss == "mse":
        return rng.standard_normal((n, c))
    return rng.random((n, c))


def _mlp_spec(sizes, act, rng):
    spec = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        spec.append({"type": "dense", "W": rng.standard_normal((b, a)) / np.sqrt(a), "b": 0.1 * rng.standard_normal(b)})
        if i < len(sizes) - 2:
            spec.append({"type": act})
    return spec


def _cnn_spec(rng):
    return [
        {"type": "conv2d", "W": 0.3 * rng.standard_normal((3, 2, 3, 3)), "b": 0.1 * rng.standard_normal(3), "padding": 1},
        {"type": "tanh"}, {"type": "maxpool2d", "kernel_size": 2},
        {"type": "conv2d", "W": 0.3 * rng.standard_normal((4, 3, 2, 2)), "b": 0.1 * rng.standard_normal(4), "stride": 1},
        {"type": "softplus"}, {"type": "avgpool2d", "kernel_size": 2, "stride": 1, "padding": 1},
        {"type": "flatten"}, {"type": "dense", "W": 0.2 * rng.standard_normal((3, 36)), "b": 0.1 * rng.standard_normal(3)},
    ]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_spec_roundtrip_outputs(kind):
    rng = np.random.default_rng(0)
    spec, shape = (_mlp_spec([5, 7, 3], "sigmoid", rng), (5,)) if kind == "mlp" else (_cnn_spec(rng), (2, 6, 6))
    X = rng.standard_normal((4,) + shape)
    model, theta = qj.from_spec(spec, shape)
    structure, params = qj.split(spec)
    z_j = np.asarray(qj.apply(structure, params, jnp.asarray(X)))
    z_q, _ = model.forward(theta, X)
    assert np.abs(z_q - z_j).max() <= 1e-13 * np.abs(z_j).max()
    spec2 = qj.to_spec(model, theta)
    model2, theta2 = qj.from_spec(spec2, shape)
    np.testing.assert_array_equal(theta2, theta)
    assert qj.merge(*qj.split(spec2))[0]["type"] == spec[0]["type"]


def test_unsupported_spec_layer_is_named():
    rng = np.random.default_rng(0)
    spec = _mlp_spec([3, 4, 2], "tanh", rng)
    spec.insert(2, {"type": "dropout", "rate": 0.1})
    with pytest.raises(qj.UnsupportedLayerError, match="'dropout' at position 2"):
        qj.from_spec(spec, (3,))
    with pytest.raises(qj.UnsupportedLayerError, match="position 0"):
        qj.from_spec([{"W": 1}], (3,))


MLP_CASES = [([5, 7, 4], "tanh", 9), ([6, 8, 5, 3], "sigmoid", 7), ([4, 6, 6, 2], "softplus", 5), ([3, 10, 4], "relu", 6)]


# every loss on every shape, two seeds spread over the cases (JAX compiles per shape: keep CI < 30 s)
JAX_GRID = [("softmax_ce", 0, 0), ("softmax_ce", 2, 1), ("mse", 1, 0), ("mse", 3, 1), ("sigmoid_ce", 2, 0),
            ("sigmoid_ce", 1, 1), ("softmax_ce", 3, 1), ("mse", 0, 1)]


@pytest.mark.parametrize("loss, case, seed", JAX_GRID)
def test_mlp_products_agree_with_jax(loss, case, seed):
    sizes, act, n = MLP_CASES[case]
    rng = np.random.default_rng(10 * seed + case)
    spec = _mlp_spec(sizes, act, rng)
    X = rng.standard_normal((n, sizes[0]))
    qj.assert_agree(spec, loss, X, _targets(loss, n, sizes[-1], rng), what=qj.ALL_WHAT, seed=seed, l2=0.01 * seed,
                    rtol=RTOL)


def test_cnn_products_agree_with_jax():
    # one loss here (XLA compiles conv graphs slowly on the CPU); the other losses are covered on
    # the same layers by test_cnn_global_pool_relu (mse) and by the torch adapter's CNN tests
    rng = np.random.default_rng(3)
    spec = _cnn_spec(rng)
    X = rng.standard_normal((4, 2, 6, 6))
    qj.assert_agree(spec, "softmax_ce", X, _targets("softmax_ce", 4, 3, rng), what=qj.ALL_WHAT, l2=0.05, rtol=RTOL)


def test_cnn_global_pool_relu():
    rng = np.random.default_rng(4)
    spec = [{"type": "conv2d", "W": 0.5 * rng.standard_normal((4, 1, 3, 3)), "b": 0.1 * rng.standard_normal(4),
             "stride": 2, "padding": 1}, {"type": "relu"}, {"type": "global_avg_pool"},
            {"type": "dense", "W": rng.standard_normal((2, 4)), "b": np.zeros(2)}]
    qj.assert_agree(spec, "sigmoid_ce", rng.standard_normal((5, 1, 7, 7)), rng.random((5, 2)), what=qj.ALL_WHAT, rtol=RTOL)


# -- JaxObjective --------------------------------------------------------------------------------------
def _pytree_problem(loss, rng, n=10):
    spec = _mlp_spec([5, 6, 4], "tanh", rng)
    structure, params = qj.split(spec)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    X = rng.standard_normal((n, 5))
    y = _targets(loss, n, 4, rng)
    return spec, structure, params, X, y


@pytest.mark.parametrize("loss", ["softmax_ce", "mse", "sigmoid_ce"])
def test_jax_objective_matches_qnref(loss):
    rng = np.random.default_rng(5)
    spec, structure, params, X, y = _pytree_problem(loss, rng)
    apply_fn = lambda p, x: qj.apply(structure, p, x)  # noqa: E731
    prob = qj.JaxProblem(apply_fn, loss, params, X, y, l2=0.1)
    theta_j = prob.get_theta()
    model, theta_q = qj.from_spec(spec, (5,))
    # ravel_pytree order: per layer dict keys sorted ("W", "b") → map to qnref's W̄ = [W b]
    perm = qj.params_to_theta(model, structure, prob.unravel(np.arange(theta_j.size, dtype=np.float64))).astype(np.int64)
    np.testing.assert_array_equal(theta_j[perm], theta_q)
    pj = prob.full().at(theta_j)
    pq = Objective(model, loss, X, y, 0.1).at(theta_q)
    v = rng.standard_normal(theta_j.size)
    assert abs(pj.value - pq.value) <= 1e-14 * abs(pq.value)
    for a, b in [(pj.grad[perm], pq.grad), (pj.hvp(v)[perm], pq.hvp(v[perm])), (pj.ggn_vp(v)[perm], pq.ggn_vp(v[perm])),
                 (pj.fisher_vp(v)[perm], pq.fisher_vp(v[perm])), (pj.jvp(v), pq.jvp(v[perm]))]:
        assert qj.rel_diff(a, b) <= RTOL
    assert pj.grad.flags.writeable


def test_lbfgs_on_jax_problem_matches_qnref_engine():
    rng = np.random.default_rng(6)
    spec, structure, params, X, y = _pytree_problem("softmax_ce", rng, n=24)
    prob = qj.JaxProblem(lambda p, x: qj.apply(structure, p, x), "softmax_ce", params, X, y, l2=1e-3, seed=0)
    model, theta_q = qj.from_spec(spec, (5,))
    ref_problem = Problem(model, "softmax_ce", X, y, 1e-3, seed=0)
    opt_j, opt_q = LBFGS(memory=4, batch_size=8), LBFGS(memory=4, batch_size=8)
    tj, sj = prob.get_theta(), None
    sj, sq = opt_j.init(tj), opt_q.init(theta_q)
    for _ in range(5):
        tj, sj, ij = opt_j.step(tj, sj, prob)
        theta_q, sq, iq = opt_q.step(theta_q, sq, ref_problem)
        assert abs(ij.loss - iq.loss) <= 1e-10 * abs(iq.loss)


# -- optax-style transformation -----------------------------------------------------------------------
def test_gradient_transformation_first_order_matches_engine():
    rng = np.random.default_rng(7)
    spec, structure, params, X, y = _pytree_problem("mse", rng, n=12)
    apply_fn = lambda p, x: qj.apply(structure, p, x)  # noqa: E731
    loss_fn = qj.jax_loss("mse")
    tx = qj.as_gradient_transformation(Adam(lr=0.01, batch_size=None))
    state = tx.init(params)
    p = params
    model, theta_q = qj.from_spec(spec, (5,))
    ref_problem = Problem(model, "mse", X, y, seed=0)
    ref = Adam(lr=0.01, batch_size=None)
    sq = ref.init(theta_q)
    for _ in range(5):
        g = jax.grad(lambda q: loss_fn(apply_fn(q, jnp.asarray(X)), jnp.asarray(y)))(p)
        upd, state = tx.update(g, state, p)
        p = jax.tree_util.tree_map(lambda a, b: a + b, p, upd)
        theta_q, sq, _ = ref.step(theta_q, sq, ref_problem)
    structure_, _ = qj.split(spec)
    got = qj.params_to_theta(model, structure_, p)
    assert np.abs(got - theta_q).max() <= 1e-12 * np.abs(theta_q).max()


def test_gradient_transformation_needs_problem_for_non_pure_methods():
    with pytest.raises(ValueError, match="problem_fn"):
        qj.as_gradient_transformation(LBFGS())
    with pytest.raises(ValueError, match="problem_fn"):
        qj.as_gradient_transformation(NAG())
    rng = np.random.default_rng(8)
    spec, structure, params, X, y = _pytree_problem("softmax_ce", rng, n=16)
    prob = qj.JaxProblem(lambda p, x: qj.apply(structure, p, x), "softmax_ce", params, X, y)
    tx = qj.as_gradient_transformation(LBFGS(batch_size=None), prob)
    state = tx.init(params)
    f0 = prob.full().value(prob.get_theta())
    p = params
    for _ in range(3):
        upd, state = tx.update(None, state, p)
        p = jax.tree_util.tree_map(lambda a, b: a + b, p, upd)
    assert prob.full().value(prob.get_theta(p)) < f0
    assert SGD.__name__ == "SGD"


# -- BatchNorm and residual blocks in the spec --------------------------------------------------------------
def _bn(c, rng):
    return {"type": "batchnorm", "gamma": 1 + 0.2 * rng.standard_normal(c), "beta": 0.1 * rng.standard_normal(c),
            "running_mean": 0.3 * rng.standard_normal(c), "running_var": 0.5 + rng.random(c), "eps": 1e-5, "momentum": 0.1}


def _res_spec(rng):
    """conv → BN → residual [conv s2 → BN → tanh] + projection [1×1 conv s2 → BN], tanh → GAP →
    residual [dense → BN1d → tanh] + identity (no activation) → dense (few ops: XLA compile time)."""
    conv = lambda co, ci, k, **kw: {"type": "conv2d", "W": 0.4 * rng.standard_normal((co, ci, k, k)),  # noqa: E731
                                    "b": 0.1 * rng.standard_normal(co), **kw}
    dense = lambda o, i: {"type": "dense", "W": rng.standard_normal((o, i)) / np.sqrt(i), "b": 0.1 * rng.standard_normal(o)}  # noqa: E731
    return [conv(3, 1, 3, padding=1), _bn(3, rng),
            {"type": "residual", "body": [conv(4, 3, 3, stride=2, padding=1), _bn(4, rng), {"type": "tanh"}],
             "shortcut": [conv(4, 3, 1, stride=2), _bn(4, rng)], "activation": "tanh"},
            {"type": "global_avg_pool"},
            {"type": "residual", "body": [dense(4, 4), _bn(4, rng), {"type": "tanh"}], "shortcut": None, "activation": None},
            dense(3, 4)]


def test_spec_batchnorm_residual_roundtrip():
    from qnref.nn.residual import Residual
    from qnref.nn.zoo import build_model
    rng = np.random.default_rng(30)
    spec = _res_spec(rng)
    X = rng.standard_normal((4, 1, 5, 5))
    model, theta = qj.from_spec(spec, (1, 5, 5))
    assert isinstance(model.layers[2], Residual) and len(model.layers[2].shortcut) == 2
    np.testing.assert_array_equal(model.layers[1].running_var, spec[1]["running_var"])
    structure, params = qj.split(spec)
    for train in (True, False):
        z_j = np.asarray(qj.apply(structure, params, jnp.asarray(X), train=train))
        assert np.abs(model.forward(theta, X, train=train)[0] - z_j).max() <= 1e-13 * np.abs(z_j).max()
    spec2 = qj.to_spec(model, theta)
    model2, theta2 = qj.from_spec(spec2, (1, 5, 5))
    np.testing.assert_array_equal(theta2, theta)
    np.testing.assert_array_equal(spec2[2]["shortcut"][1]["running_mean"], spec[2]["shortcut"][1]["running_mean"])
    assert spec2[4]["shortcut"] is None and spec2[4]["activation"] is None
    assert qj.merge(*qj.split(spec2))[2]["body"][1]["type"] == "batchnorm"
    # qnref's zoo ResNet (option A and option B shortcuts) → spec → qnref
    for shortcut in ("projection", "pad"):
        m = build_model("resnet-digits", shortcut=shortcut, width=0.5)
        th = m.init(1)
        sp = qj.to_spec(m, th)
        st, pp = qj.split(sp)
        Xd = rng.standard_normal((3, 1, 8, 8))
        for train in ((True, False) if shortcut == "projection" else (False,)):
            z_j = np.asarray(qj.apply(st, pp, jnp.asarray(Xd), train=train))
            assert np.abs(m.forward(th, Xd, train=train)[0] - z_j).max() <= 1e-13 * np.abs(z_j).max()
        np.testing.assert_array_equal(qj.from_spec(sp, (1, 8, 8))[1], th)


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_residual_products_agree_with_jax(train):
    rng = np.random.default_rng(31)
    spec = _res_spec(rng)
    X = rng.standard_normal((4, 1, 5, 5))
    what = ("grad", "jvp", "vjp", "hvp", "ggn", "kfac_factors") if train else qj.ALL_WHAT
    res = qj.assert_agree(spec, "softmax_ce", X, rng.integers(0, 3, 4), what=what, l2=0.01, train=train, rtol=RTOL)
    assert set(what) <= set(res)
    if train:
        with pytest.raises(ValueError, match="independent examples"):
            qj.compare(spec, "softmax_ce", X, rng.integers(0, 3, 4), what=("fisher",), train=True)


def test_unsupported_spec_layer_inside_residual_is_named():
    rng = np.random.default_rng(32)
    spec = [{"type": "residual", "body": [_mlp_spec([3, 3], "tanh", rng)[0], {"type": "gelu"}]}]
    with pytest.raises(qj.UnsupportedLayerError, match="'gelu' at position 0.body.1"):
        qj.from_spec(spec, (3,))


@pytest.mark.parametrize("loss", ["softmax_ce", "mse", "sigmoid_ce"])
def test_jax_point_fisher_kinds_match_qnref(loss):
    rng = np.random.default_rng(33)
    spec, structure, params, X, y = _pytree_problem(loss, rng, n=7)
    prob = qj.JaxProblem(lambda p, x: qj.apply(structure, p, x), loss, params, X, y, l2=0.2)
    theta_j = prob.get_theta()
    model, theta_q = qj.from_spec(spec, (5,))
    perm = qj.params_to_theta(model, structure, prob.unravel(np.arange(theta_j.size, dtype=np.float64))).astype(np.int64)
    pj = prob.full().at(theta_j)
    pq = Objective(model, loss, X, y, 0.2, rng=np.random.default_rng(4)).at(theta_q)
    v = rng.standard_normal(theta_j.size)
    ytil = pq.sampled_targets()
    assert qj.rel_diff(pj.fisher_vp(v, "sampled", targets=ytil)[perm], pq.fisher_vp(v[perm], "sampled")) <= RTOL
    assert qj.rel_diff(pj.fisher_vp(v, "exact")[perm], pq.fisher_vp(v[perm], "exact")) <= RTOL
    p1, p2 = prob.full().at(theta_j), prob.full().at(theta_j)
    np.testing.assert_array_equal(p1.fisher_vp(v, "sampled", key=3), p2.fisher_vp(v, "sampled", key=jax.random.PRNGKey(3)))
    assert p1.sampled_targets().shape == y.shape
    with pytest.raises(ValueError, match="kind"):
        pj.fisher_vp(v, "true")
