"""The host kernels' size threshold (qnref/host_kernels.py): operands below MIN_SIZE entries run the
NumPy expression, and a process whose optimizer algebra never reaches it does not import numba
(≈ 140 MB resident: the small autoencoder's Kronecker steps measured 3.8× an SGD step's peak)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from qnref import host_kernels


def test_kernels_only_from_min_size():
    pytest.importorskip("numba")
    for name in ("axpy", "bfgs", "ema", "dot", "axpy_dot", "scale_dot"):
        assert host_kernels.kernel(name, host_kernels.MIN_SIZE - 1) is None
        assert host_kernels.kernel(name, host_kernels.MIN_SIZE) is not None


def test_small_steps_do_not_import_numba():
    """A step of every optimizer with a host kernel (K-FAC, K-BFGS, K-BFGS(L), Shampoo, TNT, L-BFGS,
    S-LBFGS) on a 64-32-16-8 autoencoder, in a fresh process: numba is never imported."""
    code = """
import sys
import numpy as np
from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.optim import make_optimizer
from qnref.optim.base import Problem
model = Sequential([Dense(32), Tanh(), Dense(16), Tanh(), Dense(8), Tanh(), Dense(16), Tanh(), Dense(32), Tanh(),
                    Dense(64)], input_shape=(64,))
X = np.random.default_rng(0).random((300, 64))
for name in ("kfac", "kbfgs", "kbfgs-l", "shampoo", "tnt", "lbfgs", "s-lbfgs"):
    prob = Problem(model, "sigmoid_ce", X, X, seed=0)
    opt = make_optimizer(name)
    th = model.init(0)
    st = opt.init(th)
    for _ in range(3):
        th, st, info = opt.step(th, st, prob)
    assert np.isfinite(th).all(), name
print("numba" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "False"
