"""The engine on CuPy: the same products as on NumPy (skipped without a CUDA device)."""
import numpy as np
import pytest

from qnref import backend
from qnref.curvature.objective import Objective
from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential

pytestmark = pytest.mark.gpu


def _pair(dtype="float64"):
    r = np.random.default_rng(0)
    m = Sequential([Dense(16), Tanh(), Dense(5)], input_shape=(8,))
    X = r.standard_normal((32, 8)).astype(dtype)
    y = r.integers(0, 5, 32)
    th = m.init(0, dtype=dtype)
    cpu = Objective(m, "softmax_ce", X, y, l2=1e-3)
    gpu = Objective(m, "softmax_ce", backend.to_device(X, "gpu"), backend.to_device(y, "gpu"), l2=1e-3)
    return cpu, gpu, th, r


def test_products_match_cpu():
    cpu, gpu, th, r = _pair()
    thg = backend.to_device(th, "gpu")
    v = r.standard_normal(th.size)
    vg = backend.to_device(v, "gpu")
    pc, pg = cpu.at(th), gpu.at(thg)
    assert abs(pc.value - pg.value) < 1e-12
    for a, b in [(pc.grad, pg.grad), (pc.hvp(v), pg.hvp(vg)), (pc.ggn_vp(v), pg.ggn_vp(vg)),
                 (pc.fisher_vp(v), pg.fisher_vp(vg)), (pc.gram("grad"), pg.gram("grad")),
                 (pc.gram("jacobian"), pg.gram("jacobian"))]:
        np.testing.assert_allclose(backend.to_numpy(b), a, rtol=1e-10, atol=1e-12)


def test_mixed_backends_raise_on_gpu():
    cpu, gpu, th, _ = _pair()
    with pytest.raises(backend.BackendError, match="mixed backends"):
        gpu.value(th)


def test_float32_on_gpu():
    cpu, gpu, th, r = _pair("float32")
    g = gpu.grad(backend.to_device(th, "gpu"))
    assert g.dtype == np.float32
    np.testing.assert_allclose(backend.to_numpy(g), cpu.grad(th), rtol=1e-4, atol=1e-6)
