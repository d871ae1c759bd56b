"""The engine on CuPy: the same products as on NumPy (skipped without a CUDA device)."""
import numpy as np
import pytest

import gpu_check
from qnref import backend
from qnref.curvature.objective import Objective
from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential

pytestmark = pytest.mark.gpu
MODELS = ("mlp", "cnn", "cnn-bn", "residual", "global-pool")


def _pair(dtype="float64"):
    r = np.random.default_rng(0)
    m = Sequential([Dense(16), Tanh(), Dense(5)], input_shape=(8,))
    X = r.standard_normal((32, 8)).astype(dtype)
    y = r.integers(0, 5, 32)
    th = m.init(0, dtype=dtype)
    cpu = Objective(m, "softmax_ce", X, y, l2=1e-3)
    gpu = Objective(m, "softmax_ce", backend.to_device(X, "gpu"), backend.to_device(y, "gpu"), l2=1e-3)
    return cpu, gpu, th, r


@pytest.mark.parametrize("key", MODELS)
def test_every_product_matches_cpu(key):
    """value, grad, Hv, Gv (training mode), Fv, Gram, per-example gradients, Jv, Jᵀu, LinearOperator
    matvecs: GPU = CPU to 1e-10, results on the device."""
    model, X, y = gpu_check._models()[key]
    theta = model.init(seed=1)
    v = np.random.default_rng(2).standard_normal(theta.size)
    cpu = gpu_check.products(lambda t: Objective(model, "softmax_ce", X, y, l2=1e-3, train=t), theta, v)
    Xg, yg, tg, vg = (backend.to_device(a, "gpu") for a in (X, y, theta, v))
    gpu = gpu_check.products(lambda t: Objective(model, "softmax_ce", Xg, yg, l2=1e-3, train=t), tg, vg)
    for name in cpu:
        if name != "value":
            assert backend.is_cupy_array(gpu[name]), f"{key} {name} left the device"
        err = gpu_check.rel_err(backend.to_numpy(gpu[name]) if name != "value" else gpu[name], cpu[name])
        assert err <= 1e-10, f"{key} {name}: GPU differs from CPU by {err:.2e}"


def test_mixed_backends_raise_on_gpu():
    cpu, gpu, th, _ = _pair()
    with pytest.raises(backend.BackendError, match="mixed backends"):
        gpu.value(th)


def test_float32_on_gpu():
    cpu, gpu, th, r = _pair("float32")
    g = gpu.grad(backend.to_device(th, "gpu"))
    assert g.dtype == np.float32
    np.testing.assert_allclose(backend.to_numpy(g), cpu.grad(th), rtol=1e-4, atol=1e-6)
