"""Data on the device: datasets moved once, batches drawn on the GPU give the CPU's objectives."""
import numpy as np
import pytest

from qnref import backend
from qnref.data.dataset import Dataset
from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.optim.base import Problem

pytestmark = pytest.mark.gpu


def _ds():
    r = np.random.default_rng(5)
    return Dataset.from_arrays("toy", r.standard_normal((80, 3)), r.integers(0, 3, 80), n_test=20)


def test_dataset_pipeline_on_device_equals_host():
    host = _ds().to("cpu").standardized().subset(40, 10, seed=1)
    dev = _ds().to("gpu").standardized().subset(40, 10, seed=1)
    assert dev.device == "gpu" and backend.is_cupy_array(dev.X_train) and backend.is_cupy_array(dev.y_train)
    np.testing.assert_allclose(backend.to_numpy(dev.X_train), host.X_train, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(backend.to_numpy(dev.y_test), host.y_test)


def test_problem_batches_on_device_equal_host():
    model = Sequential([Dense(4), Tanh(), Dense(3)], input_shape=(3,))
    theta = model.init(seed=0)
    ds = _ds()
    pc = Problem(model, "softmax_ce", ds.X_train, ds.y_train, 1e-3, seed=0)
    d = ds.to("gpu")
    pg = Problem(model, "softmax_ce", d.X_train, d.y_train, 1e-3, seed=0)
    tg = backend.to_device(theta, "gpu")
    for oc, og in ((pc.batch(7), pg.batch(7)), (pc.sample(5), pg.sample(5)), (pc.full(), pg.full())):
        assert backend.is_cupy_array(og.X)
        assert abs(oc.value(theta) - og.value(tg)) <= 1e-12 * max(1.0, abs(oc.value(theta)))
        np.testing.assert_allclose(backend.to_numpy(og.grad(tg)), oc.grad(theta), rtol=1e-10, atol=1e-13)
    assert pc.state()["pos"] == pg.state()["pos"]
