"""DLPack with torch-CUDA: tensors cross to CuPy and back without a copy."""
import numpy as np
import pytest

from qnref import backend

pytestmark = pytest.mark.gpu


@pytest.fixture
def torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device (CPU-only torch build)")
    return torch


def test_torch_cuda_tensor_to_cupy_and_back_shares_memory(torch_cuda):
    torch = torch_cuda
    t = torch.arange(12, dtype=torch.float64, device="cuda").reshape(3, 4)
    x = backend.from_dlpack(t)
    assert backend.is_cupy_array(x) and x.shape == (3, 4)
    x[0, 0] = 42.0  # the same memory
    torch.cuda.synchronize()
    assert float(t[0, 0]) == 42.0
    back = torch.from_dlpack(x)
    assert back.device.type == "cuda" and back.data_ptr() == t.data_ptr()


def test_torch_cuda_tensor_forced_to_host(torch_cuda):
    torch = torch_cuda
    t = torch.randn(5, dtype=torch.float64, device="cuda")
    x = backend.from_dlpack(t, device="cpu")
    assert isinstance(x, np.ndarray)
    np.testing.assert_array_equal(x, t.cpu().numpy())


def test_objective_on_torch_cuda_data_matches_cpu(torch_cuda):
    from qnref.curvature.objective import Objective
    from qnref.nn.activations import Tanh
    from qnref.nn.dense import Dense
    from qnref.nn.model import Sequential

    torch = torch_cuda
    m = Sequential([Dense(6), Tanh(), Dense(3)], input_shape=(4,))
    X = torch.randn(16, 4, dtype=torch.float64, device="cuda")
    y = torch.randint(0, 3, (16,), device="cuda")
    th = m.init(0)
    og = Objective(m, "softmax_ce", backend.from_dlpack(X), backend.from_dlpack(y))
    oc = Objective(m, "softmax_ce", X.cpu().numpy(), y.cpu().numpy())
    np.testing.assert_allclose(backend.to_numpy(og.grad(backend.to_device(th, "gpu"))), oc.grad(th), rtol=1e-10, atol=1e-13)
