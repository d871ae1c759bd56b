"""Checkpoints written on the GPU resume on the CPU and back on the GPU (float64, ≤ 1e-10).

:func:`qnref.checkpoint.load` puts the arrays that lived on a device onto ``device=``; host arrays
stay on the host."""
import numpy as np
import pytest

import gpu_check
from qnref import backend, checkpoint
from qnref.optim import make_optimizer

pytestmark = pytest.mark.gpu
NAMES = ("lbfgs", "lsr1-tr", "kfac", "adam")


def _run(name, device, steps, theta=None, state=None):
    """``steps`` steps of ``name`` on the reference MLP problem on ``device`` (from θ/state if given)."""
    theta0, problem = gpu_check.reference_problem("mlp", device)
    opt = make_optimizer(name)
    theta = theta0 if theta is None else theta
    state = opt.init(theta) if state is None else state
    for _ in range(steps):
        theta, state, _ = opt.step(theta, state, problem)
    return theta, state, opt


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("resume_on", ["cpu", "gpu"])
def test_checkpoint_written_on_gpu_resumes_on_either_device(tmp_path, name, resume_on):
    """Written after 3 GPU steps; loaded onto ``resume_on`` and continued for 2 steps, θ agrees
    (≤ 1e-10) with 5 uninterrupted GPU steps; the GPU-resumed run is the CPU-resumed one moved back."""
    theta, state, _ = _run(name, "gpu", 3)
    path = tmp_path / "ck.npz"
    checkpoint.save(path, {"theta": theta, "state": state}, {"optimizer": name}, hints={"state": type(state)})
    payload, _ = checkpoint.load(path, hints={"state": type(state)}, device=resume_on)
    th2, st2 = payload["theta"], payload["state"]
    assert backend.device_of(th2) == resume_on
    np.testing.assert_array_equal(backend.to_numpy(th2), backend.to_numpy(theta))
    a, _, _ = _run(name, resume_on, 2, th2, st2)
    b, _, _ = _run(name, "gpu", 2, theta, state)
    assert backend.device_of(a) == resume_on
    assert gpu_check.rel_err(backend.to_numpy(a), backend.to_numpy(b)) <= 1e-10
