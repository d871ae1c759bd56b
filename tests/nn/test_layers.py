"""Dense, activations and Flatten: every pass against float64 central finite differences."""
import numpy as np
import pytest

from qnref.nn.activations import ReLU, Sigmoid, Softplus, Tanh, Identity, activation
from qnref.nn.dense import Dense
from qnref.nn.reshape import Flatten
from helpers import check_layer_passes


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("d_in,units", [(3, 2), (5, 7)])
def test_dense_passes(n, d_in, units):
    check_layer_passes(Dense(units), (d_in,), n=n, seed=d_in + units + n)


def test_dense_first_layer_passes():
    check_layer_passes(Dense(3), (4,), n=2, first_layer=True)


@pytest.mark.parametrize("cls", [Tanh, Sigmoid, Softplus, Identity])
@pytest.mark.parametrize("n", [1, 5])
def test_smooth_activation_passes(cls, n):
    check_layer_passes(cls(), (6,), n=n, seed=n, scale=1.5)


def test_relu_passes_away_from_kink():
    # ReLU is piecewise linear: check at points bounded away from 0 so FD stays on one piece
    layer = ReLU()
    layer.build((8,))
    x = np.random.default_rng(0).standard_normal((3, 8))
    x += np.sign(x) * 0.5
    from qnref.nn.base import Ctx

    y, cache = layer.forward([], x, Ctx())
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    check_layer_passes(ReLU(), (8,), n=3, seed=3)


def test_flatten_passes():
    check_layer_passes(Flatten(), (2, 3, 2), n=2)


def test_activation_lookup():
    assert isinstance(activation("TANH"), Tanh)
    with pytest.raises(ValueError, match="unknown activation 'tahn'"):
        activation("tahn")


def test_dense_rejects_bad_config():
    with pytest.raises(ValueError, match="positive integer"):
        Dense(0)
    with pytest.raises(ValueError, match="Flatten"):
        Dense(3).build((2, 3))


def test_sigmoid_softplus_stable_for_large_inputs():
    from qnref.nn.base import Ctx

    x = np.array([[-800.0, -30.0, 0.0, 30.0, 800.0]])
    for layer in (Sigmoid(), Softplus()):
        layer.build((5,))
        y, _ = layer.forward([], x, Ctx())
        assert np.isfinite(y).all()
    y, _ = Softplus().forward([], x, Ctx())
    np.testing.assert_allclose(y[0, [0, 4]], [0.0, 800.0], rtol=1e-15, atol=1e-300)
