"""Every registered optimizer takes the same 5 steps on the GPU as on the CPU (float64, ≤ 1e-10)."""
import pytest

import gpu_check
from qnref.optim import load_all

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", sorted(load_all()))
def test_five_steps_gpu_equal_cpu(name):
    gpu, cpu = gpu_check.trajectory(name, 5, "gpu"), gpu_check.trajectory(name, 5, "cpu")
    for i, (a, b) in enumerate(zip(gpu, cpu)):
        err = gpu_check.rel_err(a, b)
        assert err <= 1e-10, f"{name} step {i + 1}: GPU θ differs from CPU θ by {err:.2e}"
