"""Residual blocks: naming, parameter layout, taps of the children, every pass against finite
differences, Objective products through identity / option-A / projection shortcuts, errors."""
import numpy as np
import pytest

from qnref.curvature.objective import Objective
from qnref.nn.activations import Sigmoid, Tanh
from qnref.nn.base import Ctx
from qnref.nn.conv import Conv2d
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.nn.norm import BatchNorm, estimate_batchnorm_stats
from qnref.nn.pool import GlobalAvgPool
from qnref.nn.reshape import Flatten
from qnref.nn.residual import PadShortcut, Residual, basic_block
from helpers import check_layer_passes
from test_conv import check_products


def _named(block, name="res"):
    block.name = name
    return block


def test_identity_block_passes():
    block = Residual([Conv2d(3, 3, padding=1), Tanh(), Conv2d(3, 3, padding=1)], activation="tanh")
    check_layer_passes(_named(block), (3, 4, 5), n=2)


def test_dense_block_without_activation_passes():
    block = Residual([Dense(4), Sigmoid(), Dense(4)], activation=None)
    check_layer_passes(_named(block), (4,), n=3)
    check_layer_passes(_named(Residual([Dense(4), Tanh(), Dense(4)], activation="tanh")), (4,), n=3, first_layer=True)


@pytest.mark.parametrize("shortcut", ["pad", "projection"])
def test_downsampling_block_passes(shortcut):
    check_layer_passes(_named(basic_block(4, 2, shortcut=shortcut, activation="tanh")), (2, 5, 4), n=3)


def test_explicit_shortcut_and_nested_blocks_pass():
    inner = Residual([Conv2d(3, 1), Tanh()], activation=None)
    outer = Residual([Conv2d(3, 3, padding=1), inner, Tanh()], shortcut=[Conv2d(3, 1)], activation="tanh")
    check_layer_passes(_named(outer), (2, 3, 3), n=2)
    assert inner.name == "res.body1"
    assert [l.name for l in inner.sublayers()] == ["res.body1.body0", "res.body1.body1"]


def test_pad_shortcut():
    sc = PadShortcut(5, 2)
    assert sc.build((3, 5, 4)) == (5, 3, 2)
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 4))
    y, _ = sc.forward([], x, Ctx())
    np.testing.assert_array_equal(y[:, :3], x[:, :, ::2, ::2])
    np.testing.assert_array_equal(y[:, 3:], 0)
    check_layer_passes(PadShortcut(4, (2, 1)), (2, 3, 3), n=2)
    with pytest.raises(ValueError, match="cannot reduce channels"):
        PadShortcut(2).build((3, 4, 4))


def resnet_tiny(shortcut="projection", bn=True):
    return Sequential([Conv2d(3, 3, padding=1), BatchNorm() if bn else Tanh(),
                       basic_block(3, 1, shortcut=shortcut, batchnorm=bn, activation="tanh"),
                       basic_block(4, 2, shortcut=shortcut, batchnorm=bn, activation="tanh"),
                       GlobalAvgPool(), Dense(3)], input_shape=(2, 4, 4))


def test_names_layout_and_taps():
    model = resnet_tiny("projection")
    names = [b.name for b in model.layout.blocks]
    assert len(names) == len(set(names))
    assert "3.residual.short0.W" in names and "3.residual.body0.W" in names and "2.residual.body1.gamma" in names
    assert "2.residual.short0.W" not in names  # identity where the shape is kept
    kron = [l.name for l in model.kron_layers]
    assert kron == ["0.conv2d", "2.residual.body0", "2.residual.body3", "3.residual.body0", "3.residual.body3", "3.residual.short0", "5.dense"]
    # every block name is "<layer name>.<spec>" so Objective's bookkeeping finds the owner
    assert {b.name.rsplit(".", 1)[0] for b in model.layout.blocks if b.name.endswith(".W")} == set(kron)
    r = np.random.default_rng(0)
    X = r.standard_normal((3, 2, 4, 4))
    theta = model.init(0)
    _, caches = model.forward(theta, X, train=False)
    taps = {}
    model.backward(theta, caches, r.standard_normal((3, 3)), taps=taps)
    assert set(taps) == set(kron)
    assert taps["3.residual.short0"]["a"].shape == (3, 4, 4)  # 1×1 conv, 2×2 output: K+1 = 3+1
    assert "Residual[Conv2d(3→4, 3×3, stride 2, pad 1)" in model.summary()


@pytest.mark.parametrize("shortcut", ["pad", "projection"])
def test_objective_products_residual_net_eval(shortcut):
    model = resnet_tiny(shortcut)
    r = np.random.default_rng(1)
    X = r.standard_normal((4, 2, 4, 4))
    y = r.integers(0, 3, 4)
    theta = model.init(2, scheme="gaussian", std=0.5)
    estimate_batchnorm_stats(model, theta, X)
    check_products(Objective(model, "softmax_ce", X, y, l2=1e-4, train=False), theta, seed=5)


def test_objective_products_residual_net_training_bn():
    model = resnet_tiny("projection")
    r = np.random.default_rng(2)
    X = r.standard_normal((4, 2, 4, 4))
    theta = model.init(3, scheme="gaussian", std=0.5)
    check_products(Objective(model, "softmax_ce", X, r.integers(0, 3, 4), train=True), theta, seed=6, per_example=False)


def test_objective_products_residual_mlp_no_bn():
    model = Sequential([Dense(4), Tanh(), Residual([Dense(4), Tanh(), Dense(4)], activation="tanh"), Dense(2)], input_shape=(3,))
    r = np.random.default_rng(3)
    X = r.standard_normal((5, 3))
    theta = model.init(0, scheme="gaussian", std=0.8)
    p = check_products(Objective(model, "mse", X, r.standard_normal((5, 2))), theta, seed=7, full=True)
    assert p.z.shape == (5, 2)


def test_residual_first_layer_in_model():
    model = Sequential([Residual([Conv2d(2, 3, padding=1), Tanh()], activation="tanh"), Flatten(), Dense(2)], input_shape=(2, 3, 3))
    r = np.random.default_rng(4)
    X = r.standard_normal((3, 2, 3, 3))
    check_products(Objective(model, "softmax_ce", X, r.integers(0, 2, 3)), model.init(0), seed=8)


def test_residual_bad_inputs():
    with pytest.raises(ValueError, match="non-empty body"):
        Residual([])
    with pytest.raises(ValueError, match="unknown shortcut"):
        Residual([Tanh()], shortcut="projecton")
    with pytest.raises(ValueError, match="identity shortcut gives"):
        Sequential([Residual([Conv2d(4, 3, padding=1)])], input_shape=(2, 4, 4))
    with pytest.raises(ValueError, match="shortcut gives"):
        Sequential([Residual([Conv2d(4, 3, padding=1)], shortcut=[Conv2d(4, 1, stride=2)])], input_shape=(2, 4, 4))
    with pytest.raises(ValueError, match="shortcut must be"):
        basic_block(4, shortcut="identity")
    with pytest.raises(ValueError, match="unknown activation"):
        Residual([Tanh()], activation="tahn")
