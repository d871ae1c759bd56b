"""Checkpoints written on the GPU resume on the CPU, and the other way round (float64, ≤ 1e-10)."""
import numpy as np
import pytest

import cupy_recording as cr
import gpu_check
from qnref import backend, checkpoint
from qnref.optim import make_optimizer
from qnref.optim.base import Problem

pytestmark = pytest.mark.gpu
NAMES = ("lbfgs", "lsr1-tr", "kfac", "adam")


def _run(name, device, steps, theta=None, state=None):
    """``steps`` steps of ``name`` on the reference MLP problem on ``device`` (from θ/state if given)."""
    theta0, problem = cr.small_mlp_problem(False)
    if device == "gpu":
        problem = Problem(problem.model, "softmax_ce", backend.to_device(problem.X, "gpu"),
                          backend.to_device(problem.y, "gpu"), 1e-3, seed=11)
    opt = make_optimizer(name)
    theta = backend.to_device(theta0 if theta is None else theta, device)
    state = opt.init(theta) if state is None else state
    for _ in range(steps):
        theta, state, _ = opt.step(theta, state, problem)
    return theta, state, opt


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("first,second", [("gpu", "cpu"), ("cpu", "gpu")])
def test_checkpoint_crosses_devices(tmp_path, name, first, second):
    theta, state, opt = _run(name, first, 3)
    path = tmp_path / "ck.npz"
    checkpoint.save(path, {"theta": theta, "state": state}, {"optimizer": name}, hints={"state": type(state)})
    payload, _ = checkpoint.load(path, hints={"state": type(state)}, device=second)
    th2, st2 = payload["theta"], payload["state"]
    assert backend.device_of(th2) == second
    np.testing.assert_array_equal(backend.to_numpy(th2), backend.to_numpy(theta))
    # continuing on the other device: θ after 2 more steps agrees with staying on the first device
    a, _, _ = _run(name, second, 2, th2, st2)
    b, _, _ = _run(name, first, 2, theta, state)
    assert gpu_check.rel_err(backend.to_numpy(a), backend.to_numpy(b)) <= 1e-10
