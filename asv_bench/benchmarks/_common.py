"""Shared set-up for the benchmarks: thread pinning, models and data on the CPU (or GPU)."""
import os

# pin BLAS threads once per benchmark process (never switched inside a process)
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "2")

import time

import numpy as np

from qnref import backend
from qnref.curvature.objective import Objective
from qnref.nn.activations import Sigmoid, Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential

AUTOENCODER_SIZES = (1000, 500, 250, 30, 250, 500, 1000)


def autoencoder(d=784, sizes=AUTOENCODER_SIZES, act=Tanh):
    """The thesis's MNIST autoencoder 784-1000-500-250-30-250-500-1000-784 (Hinton & Salakhutdinov)."""
    layers = []
    for s in sizes:
        layers += [Dense(s), act()]
    layers.append(Dense(d))
    return Sequential(layers, input_shape=(d,), name="autoencoder")


def autoencoder_objective(batch=1000, dtype="float32", device="cpu", d=784, sizes=AUTOENCODER_SIZES, seed=0):
    model = autoencoder(d, sizes)
    r = np.random.default_rng(seed)
    X = r.random((batch, d)).astype(dtype)
    Xd = backend.to_device(X, device)
    obj = Objective(model, "sigmoid_ce", Xd, Xd)
    theta = model.init(seed, device=device, dtype=dtype)
    return obj, theta


def sync(x):
    """Block until device work is done (no-op on NumPy)."""
    if backend.is_cupy_array(x):
        import cupy

        cupy.cuda.Stream.null.synchronize()
    return x


def best_time(fn, repeat=5):
    """Best wall time of ``repeat`` calls (for ratios measured side by side in one process)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        sync(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def devices():
    return ["cpu", "gpu"] if backend.gpu_available() else ["cpu"]
