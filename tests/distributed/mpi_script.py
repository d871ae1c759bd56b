"""Runs under ``mpiexec -n P python mpi_script.py MODE OUT`` for tests/distributed/test_mpi.py; the
test imports the same builders to compute the one-process reference.

MODE: products | train | raise | exit | kill | stall | refuse-bn | refuse-batch
"""
from __future__ import annotations

import os
import sys

import numpy as np

from qnref.curvature import kron
from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.optim import make_optimizer
from qnref.optim.base import Problem
from qnref.train import Data, train

N_DATA, BATCH = 90, 45          # 45 = 23 + 22: an uneven split over 2 ranks
L2 = 1e-3
OPT_STEPS = [
    ("lsr1-tr", {"batch_size": 40}),
    ("lbfgs", {"batch_size": 40}),
    ("kfac", {"batch_size": 30, "inv_freq": 1}),
    ("smw-ng", {"batch_size": 30, "curvature_batch": 15}),
    ("smw-gn", {"batch_size": 30, "curvature_batch": 15}),
    ("kbfgs", {"batch_size": 30}),
]
N_STEPS = 3
TRAIN_RUNS = [("lsr1-tr", {"batch_size": 100}), ("kfac", {"batch_size": 100})]
STOP_AFTER = 5


def product_setup():
    r = np.random.default_rng(7)
    model = Sequential([Dense(5), Tanh(), Dense(3)], input_shape=(6,))
    X = r.standard_normal((N_DATA, 6))
    y = r.integers(0, 3, N_DATA)
    theta = model.init(3, scheme="gaussian", std=0.5)
    v = r.standard_normal(model.n_params)
    u = r.standard_normal((BATCH, 3))
    return model, X, y, theta, v, u


def products(make_problem) -> dict:
    """Every product on one global batch, and N_STEPS steps of each optimizer in OPT_STEPS."""
    model, X, y, theta, v, u = product_setup()
    prob = make_problem(model, "softmax_ce", X, y, L2, 11)
    obj = prob.batch(BATCH)
    p = obj.at(theta)
    out = {"value": np.array(p.value), "grad": p.grad, "hvp": p.hvp(v), "ggn": p.ggn_vp(v),
           "fisher_empirical": p.fisher_vp(v, "empirical"), "fisher_sampled": p.fisher_vp(v, "sampled"),
           "fisher_exact": p.fisher_vp(v, "exact"), "jvp": p.jvp(v), "vjp": p.vjp(u),
           "per_example": p.per_example_grads(), "gram_grad": p.gram("grad"), "gram_jac": p.gram("jacobian"),
           "sampled_targets": p.sampled_targets()}
    p2 = obj.at(theta)     # fresh point: hvp computes the gradient too
    out["hvp_first"] = p2.hvp(v)
    out["grad_after_hvp"] = p2.grad
    for targets in ("empirical", "sampled"):
        taps = obj.at(theta).layer_stats(targets)
        for name, t in taps.items():
            A, G = kron.factors(t)
            out[f"A_{targets}_{name}"], out[f"G_{targets}_{name}"] = A, G
            out[f"mean_a_{targets}_{name}"] = kron.mean_a(t)
    sub = obj.subset(np.array([1, 4, 30, 44]))
    out["subset_grad"] = sub.at(theta).grad
    out["counter_ge"] = np.array(prob.counter.grad_equivalents)
    for name, kw in OPT_STEPS:
        pr = make_problem(model, "softmax_ce", X, y, L2, 5)
        opt = make_optimizer(name, **kw)
        th, st = theta.copy(), opt.init(theta)
        for k in range(N_STEPS):
            th, st, info = opt.step(th, st, pr)
            out[f"step_{name}_{k}_loss"] = np.array(info.loss)
        out[f"step_{name}_theta"] = th
        out[f"step_{name}_state"] = pr.state()["pos"] * np.ones(1)
    return out


def conv_products(make_problem) -> dict:
    """KFC factors (conv taps: A summed over locations, G averaged) and a KFAC step on a tiny CNN."""
    from qnref.nn.conv import Conv2d
    from qnref.nn.reshape import Flatten

    r = np.random.default_rng(8)
    model = Sequential([Conv2d(3, 3, padding=1), Tanh(), Flatten(), Dense(4)], input_shape=(2, 5, 5))
    X = r.standard_normal((30, 2, 5, 5))
    y = r.integers(0, 4, 30)
    theta = model.init(1)
    prob = make_problem(model, "softmax_ce", X, y, L2, 2)
    obj = prob.batch(21)
    out = {"grad": obj.at(theta).grad}
    for targets in ("empirical", "sampled"):
        for name, t in obj.at(theta).layer_stats(targets).items():
            out[f"A_{targets}_{name}"], out[f"G_{targets}_{name}"] = kron.factors(t)
    opt = make_optimizer("kfac", batch_size=12, inv_freq=1)
    th, st = theta.copy(), opt.init(theta)
    for _ in range(2):
        th, st, _ = opt.step(th, st, prob)
    out["kfac_theta"] = th
    return out


def train_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    X, y = d.data / 16.0, d.target
    return Data(X[:400], y[:400], X[400:500], y[400:500], "softmax_ce", "digits")


def train_model():
    return Sequential([Dense(32), Tanh(), Dense(10)], input_shape=(64,))


def run_training(name, kw, **extra):
    return train(train_model(), make_optimizer(name, **kw), train_data(), epochs=2, seed=3, l2=1e-4, eval_every=0.5, **extra)


class FailingOptimizer:
    """Wraps an optimizer; on rank 1 at step 3 it raises or kills the process."""

    def __init__(self, inner, how, rank):
        self.inner, self.how, self.rank, self.k = inner, how, rank, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def init(self, theta):
        return self.inner.init(theta)

    def hyperparameters(self):
        return self.inner.hyperparameters()

    def step(self, theta, state, problem):
        self.k += 1
        if self.rank == 1 and self.k == 3:
            if self.how == "exit":
                os._exit(3)
            if self.how == "kill":
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
            if self.how == "stall":  # alive, but never reaches the next collective
                import time

                time.sleep(10**6)
            raise RuntimeError("injected failure on rank 1")
        return self.inner.step(theta, state, problem)


def main(mode: str, out: str) -> None:
    from qnref.distributed import DistributedProblem, get_comm

    comm = get_comm()
    assert comm.size > 1, "run me under mpiexec -n 2 or more"
    if mode == "products":
        make = lambda m, loss, X, y, l2, seed: DistributedProblem(m, loss, X, y, l2, seed=seed, comm=comm)  # noqa: E731
        res = products(make)
        res.update({f"conv_{k}": v for k, v in conv_products(make).items()})
        # every rank must hold bit-identical results
        import hashlib

        h = hashlib.sha1(b"".join(np.ascontiguousarray(np.asarray(res[k], dtype=float)).tobytes() for k in sorted(res))).hexdigest()
        hashes = comm.allgather(h)
        res["ranks_identical"] = np.array(len(set(hashes)) == 1)
        if comm.is_root:
            np.savez(out, **res)
    elif mode == "train":
        res = {}
        for name, kw in TRAIN_RUNS:
            r = run_training(name, kw)
            res[f"{name}_loss"] = np.array([h["train_loss"] for h in r.history])
            res[f"{name}_test"] = np.array([h["test_loss"] for h in r.history])
            res[f"{name}_passes"] = np.array([h["passes"] for h in r.history])
            res[f"{name}_theta"] = r.theta
            part = run_training(name, kw, checkpoint=f"{out}.{name}.ckpt", stop_after_steps=STOP_AFTER)
            assert part.stopped == "interrupted"
        if comm.is_root:
            np.savez(out, **res)
    elif mode in ("raise", "exit", "kill", "stall"):
        name, kw = TRAIN_RUNS[0]
        opt = FailingOptimizer(make_optimizer(name, **kw), mode, comm.rank)
        train(train_model(), opt, train_data(), epochs=50, seed=3)
    elif mode == "refuse-bn":  # BatchNorm couples the examples of a batch: refused on every rank
        from qnref.nn.zoo import build_model

        d = train_data()
        d = Data(d.X_train.reshape(-1, 1, 8, 8), d.y_train, None, None, "softmax_ce", "digits")
        train(build_model("lenet-digits", batchnorm=True), make_optimizer("adam", batch_size=50), d, epochs=1)
    elif mode == "refuse-batch":  # a global batch of 1 cannot be split over 2 ranks
        train(train_model(), make_optimizer("sgd", batch_size=1), train_data(), epochs=1)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
