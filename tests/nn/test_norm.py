"""BatchNorm: training and evaluation passes against finite differences, exact Hessian-vector
products through the batch statistics, running statistics as explicit buffers, errors."""
import numpy as np
import pytest

from qnref.curvature.objective import Objective
from qnref.nn.activations import Tanh
from qnref.nn.base import Ctx
from qnref.nn.conv import Conv2d
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.nn.norm import (
    BatchNorm,
    batchnorm_layers,
    estimate_batchnorm_stats,
    reset_batchnorm_stats,
    update_batchnorm_stats,
)
from qnref.nn.pool import MaxPool2d
from qnref.nn.reshape import Flatten
from qnref.nn.residual import basic_block
from helpers import check_layer_passes, rel_err
from test_conv import check_products


def _bn(shape):
    layer = BatchNorm()
    layer.build(shape)
    return layer


def test_training_forward_normalises_per_channel():
    r = np.random.default_rng(0)
    for shape, axes in [((3,), (0,)), ((2, 3, 4), (0, 2, 3))]:
        layer = _bn(shape)
        x = 3 + 2 * r.standard_normal((5,) + shape)
        y, cache = layer.forward([np.ones(shape[0]), np.zeros(shape[0])], x, Ctx(train=True))
        np.testing.assert_allclose(y.mean(axis=axes), 0, atol=1e-12)
        var = x.var(axis=axes)
        np.testing.assert_allclose((y * y).mean(axis=axes), var / (var + 1e-5), rtol=1e-12)
        gamma, beta = r.standard_normal(shape[0]), r.standard_normal(shape[0])
        y2, _ = layer.forward([gamma, beta], x, Ctx(train=True))
        b = (1, -1) + (1,) * (len(shape) - 1)
        np.testing.assert_allclose(y2, gamma.reshape(b) * y + beta.reshape(b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,n", [((3,), 3), ((3,), 6), ((2, 3, 2), 1), ((2, 3, 2), 4)])
def test_training_mode_passes_fd(shape, n):
    # (with two values per channel x̂ = ±1 up to ε and every derivative is O(ε): not a useful FD test)
    check_layer_passes(BatchNorm(), shape, n=n, seed=n + len(shape), scale=2.0)


@pytest.mark.parametrize("shape", [(4,), (3, 2, 3)])
def test_eval_mode_passes_fd(shape):
    layer = BatchNorm()
    layer.build(shape)
    r = np.random.default_rng(1)
    layer.running_mean = r.standard_normal(shape[0])
    layer.running_var = r.uniform(0.5, 2, shape[0])
    check_layer_passes(layer, shape, n=3, train=False)


def test_first_layer_passes():
    check_layer_passes(BatchNorm(), (3, 2, 2), n=3, first_layer=True)
    check_layer_passes(BatchNorm(), (4,), n=4, first_layer=True, train=False)


def test_per_example_grads_eval_and_train():
    layer = _bn((2, 3, 3))
    r = np.random.default_rng(2)
    p = [r.standard_normal(2), r.standard_normal(2)]
    x = r.standard_normal((4, 2, 3, 3))
    gy = r.standard_normal(x.shape)
    _, cache = layer.forward(p, x, Ctx(train=False))
    out = [np.zeros((4, 2)), np.zeros((4, 2))]
    gx = layer.per_example_grads(p, cache, gy, out)
    gp = [np.zeros(2), np.zeros(2)]
    np.testing.assert_allclose(gx, layer.backward(p, cache, gy, gp), rtol=1e-14)
    np.testing.assert_allclose(out[0].sum(0), gp[0], rtol=1e-12)
    np.testing.assert_allclose(out[1].sum(0), gp[1], rtol=1e-12)
    _, cache = layer.forward(p, x, Ctx(train=True))
    with pytest.raises(ValueError, match="couples the examples"):
        layer.per_example_grads(p, cache, gy, out)


def bn_cnn():
    return Sequential([Conv2d(3, 3, padding=1), BatchNorm(), Tanh(), MaxPool2d(2), Flatten(), Dense(4), BatchNorm(), Tanh(), Dense(3)],
                      input_shape=(2, 4, 4))


def _data(model, n=5, seed=0):
    r = np.random.default_rng(seed)
    return r.standard_normal((n,) + model.input_shape), r.integers(0, 3, n)


def test_objective_training_mode_exact_hvp():
    """Gradient, Pearlmutter H v (through batch mean and variance), GGN and exact Fisher in training mode."""
    model = bn_cnn()
    X, y = _data(model)
    theta = model.init(3, scheme="gaussian", std=0.6)
    before = [(l.running_mean.copy(), l.running_var.copy()) for l in batchnorm_layers(model)]
    obj = Objective(model, "softmax_ce", X, y, l2=1e-3, train=True)
    check_products(obj, theta, seed=2, per_example=False, full=True)
    with pytest.raises(ValueError, match="train=False"):
        obj.per_example_grads(theta)
    with pytest.raises(ValueError, match="train=False"):
        obj.fisher_vp(theta, theta, "empirical")
    # no product touched the running statistics
    for l, (m, v) in zip(batchnorm_layers(model), before):
        np.testing.assert_array_equal(l.running_mean, m)
        np.testing.assert_array_equal(l.running_var, v)


def test_objective_eval_mode_products():
    model = bn_cnn()
    X, y = _data(model, seed=1)
    theta = model.init(4, scheme="gaussian", std=0.6)
    estimate_batchnorm_stats(model, theta, X[:4], batch_size=2)
    obj = Objective(model, "softmax_ce", X, y, train=False)
    check_products(obj, theta, seed=3, per_example=True)


def test_training_hvp_differs_from_frozen_statistics():
    """Sanity: the batch statistics matter — H v in training mode is not the eval-mode H v."""
    model = Sequential([Dense(3), BatchNorm(), Tanh(), Dense(2)], input_shape=(3,))
    X, y = _data(model, n=6, seed=5)
    y = y % 2
    theta = model.init(0, scheme="gaussian", std=0.8)
    _, caches = model.forward(theta, X, train=True)
    update_batchnorm_stats(model, caches)
    model.layers[1].momentum = 1.0
    update_batchnorm_stats(model, caches)  # running = this batch (unbiased variance)
    v = np.random.default_rng(0).standard_normal(theta.size)
    h_train = Objective(model, "softmax_ce", X, y, train=True).hvp(theta, v)
    h_eval = Objective(model, "softmax_ce", X, y, train=False).hvp(theta, v)
    assert rel_err(h_train, h_eval) > 1e-3


def test_running_stats_update_rules():
    layer = _bn((2, 2, 2))
    r = np.random.default_rng(3)
    p = [np.ones(2), np.zeros(2)]
    xs = [1 + 2 * r.standard_normal((3, 2, 2, 2)) for _ in range(3)]
    m = 3 * 4  # values per channel
    np.testing.assert_array_equal(layer.running_mean, 0)
    np.testing.assert_array_equal(layer.running_var, 1)
    rm, rv = np.zeros(2), np.ones(2)
    for x in xs:
        _, cache = layer.forward(p, x, Ctx(train=True))
        layer.update_running_stats(cache)
        mu, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3)) * m / (m - 1)
        rm, rv = 0.9 * rm + 0.1 * mu, 0.9 * rv + 0.1 * var
        np.testing.assert_allclose(layer.running_mean, rm, rtol=1e-12)
        np.testing.assert_allclose(layer.running_var, rv, rtol=1e-12)
    assert layer.num_batches_tracked == 3
    # cumulative average (momentum=None)
    layer = BatchNorm(momentum=None)
    layer.build((2, 2, 2))
    for x in xs:
        layer.update_running_stats(layer.forward(p, x, Ctx(train=True))[1])
    np.testing.assert_allclose(layer.running_mean, np.mean([x.mean(axis=(0, 2, 3)) for x in xs], axis=0), rtol=1e-12)
    # eval forward uses them
    y, _ = layer.forward(p, xs[0], Ctx(train=False))
    b = (1, 2, 1, 1)
    np.testing.assert_allclose(y, (xs[0] - layer.running_mean.reshape(b)) / np.sqrt(layer.running_var.reshape(b) + 1e-5), rtol=1e-12)
    with pytest.raises(ValueError, match="training-mode"):
        layer.update_running_stats(layer.forward(p, xs[0], Ctx(train=False))[1])


def test_model_level_stat_helpers_reach_residual_children():
    model = Sequential([Conv2d(2, 3, padding=1), BatchNorm(), basic_block(3, 2, shortcut="projection"), Flatten(), Dense(2)], input_shape=(1, 4, 4))
    bns = batchnorm_layers(model)
    assert len(bns) == 4  # top level, two in the body, one in the projection shortcut
    X = np.random.default_rng(0).standard_normal((4, 1, 4, 4))
    theta = model.init(0)
    _, caches = model.forward(theta, X, train=True)
    assert update_batchnorm_stats(model, caches) == 4
    assert all(l.num_batches_tracked == 1 for l in bns)
    assert all(not np.allclose(l.running_var, 1) for l in bns)
    # full-batch estimate = the batch statistics themselves (unbiased variance)
    estimate_batchnorm_stats(model, theta, X)
    top = bns[0]
    h, _ = model.layers[0].forward(model.layout.views(theta)[:1], X, Ctx())
    np.testing.assert_allclose(top.running_mean, h.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(top.running_var, h.var(axis=(0, 2, 3), ddof=1), rtol=1e-12)
    assert top.momentum == 0.1  # restored
    reset_batchnorm_stats(model)
    assert all(l.num_batches_tracked == 0 and np.all(l.running_var == 1) for l in bns)
    with pytest.raises(ValueError, match="caches"):
        update_batchnorm_stats(model, caches[:-1])


def test_batchnorm_bad_inputs():
    with pytest.raises(ValueError, match="eps"):
        BatchNorm(eps=0)
    with pytest.raises(ValueError, match="momentum"):
        BatchNorm(momentum=1.5)
    with pytest.raises(ValueError, match=r"\(C,\) or \(C, H, W\)"):
        BatchNorm().build((3, 4))
    layer = _bn((3,))
    p = [np.ones(3), np.zeros(3)]
    with pytest.raises(ValueError, match="more than one value per channel"):
        layer.forward(p, np.ones((1, 3)), Ctx(train=True))
    layer.forward(p, np.ones((1, 3)), Ctx(train=False))  # fine with running statistics
    with pytest.raises(ValueError, match="channel mismatch|built for"):
        layer.forward(p, np.ones((2, 4)), Ctx())
    conv = _bn((2, 3, 3))
    with pytest.raises(ValueError, match="channel mismatch"):
        conv.forward([np.ones(2), np.zeros(2)], np.ones((2, 3, 3, 3)), Ctx())


def test_params_init_scale_one_shift_zero():
    model = Sequential([Dense(3), BatchNorm(), Dense(2)], input_shape=(2,))
    theta = model.init(0)
    v = model.layout.views(theta)
    np.testing.assert_array_equal(v[1], 1.0)
    np.testing.assert_array_equal(v[2], 0.0)
    assert [b.name for b in model.layout.blocks] == ["0.dense.W", "1.batchnorm.gamma", "1.batchnorm.beta", "2.dense.W"]
