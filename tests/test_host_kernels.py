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


def test_a_large_mlp_gradient_and_hvp_never_load_numba():
    """all_finite takes its kernel only where numba is loaded already: on a large MLP (data, θ and
    activations well above MIN_SIZE) the data checks, a gradient and an Hv run NumPy's isfinite, so
    the process does not pay ≈ 170 MB for numba (the MNIST autoencoder's gradient peaked at 309
    instead of 138 MB when the data check loaded it); once numba is loaded, the kernel runs."""
    code = """
import sys
import numpy as np
from qnref import backend, host_kernels
from qnref.curvature.objective import Objective
from qnref.nn.zoo import build_model
model = build_model("autoencoder-mnist")
X = np.random.default_rng(0).random((200, 784)).astype("float32")
obj = Objective(model, "sigmoid_ce", X, X)
th = model.init(0, dtype="float32")
g = obj.grad(th)
obj.hvp(th, g)
assert X.size >= host_kernels.MIN_SIZE and host_kernels.all_finite(X) is None and backend.all_finite(X)
print("numba" in sys.modules)
import numba
print(host_kernels.all_finite(X))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "True"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite_kernel_finds_every_nonfinite_entry(dtype, monkeypatch):
    """backend.all_finite on the one-pass kernel (every size: MIN_SIZE 0, split from 64 entries):
    a NaN, +inf or −inf at the first, last or a range's edge entry is found; the largest finite
    values (whose sum would overflow) and subnormals are finite; 2-D arrays read as one vector;
    non-contiguous arrays and integer arrays take the expression."""
    pytest.importorskip("numba")
    from qnref import backend

    monkeypatch.setattr(host_kernels, "MIN_SIZE", 0)
    monkeypatch.setattr(host_kernels, "SPLIT_SIZE", 64)
    n = 1000
    x = np.random.default_rng(0).standard_normal(n).astype(dtype)
    assert host_kernels.all_finite(x) is True
    edges = sorted({0, n - 1} | {a for a, _ in host_kernels.split_ranges(n)} | {e - 1 for _, e in host_kernels.split_ranges(n)})
    for pos in edges:
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[pos] = bad
            assert host_kernels.all_finite(y) is False and backend.all_finite(y) is False, (pos, bad)
            assert backend.all_finite(y.reshape(40, 25)) is False
    big = np.full(n, np.finfo(dtype).max, dtype=dtype)
    big[::2] = -np.finfo(dtype).max
    big[7] = np.finfo(dtype).tiny / 4
    assert host_kernels.all_finite(big) is True and backend.all_finite(big)
    assert host_kernels.all_finite(x[::2]) is None and backend.all_finite(x[::2])  # strided: the expression
    y = x.copy()
    y[4] = np.nan
    assert host_kernels.all_finite(y[::2]) is None and backend.all_finite(y[::2]) is False
    assert host_kernels.all_finite(np.arange(n)) is None and backend.all_finite(np.arange(n))
