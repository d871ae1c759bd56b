"""Per-step overheads of TNT and SMW-NG(-BD) (issue 21), as ``track_`` ratios measured side by side
in one process.

* TNT step / SGD-momentum step at the thesis CNN settings (Ren's thesis §4.7.1: T₁ = 10, T₂ = 100,
  batch 128): ResNet-20 (3×32×32) and the digits LeNet (1×8×8), float32, synthetic data. A TNT
  step's cost depends on the step index k (statistics when T₁ | k, inverses when T₂ | k), so the
  per-step cost is the average over one period of lcm(T₁, T₂) steps (T₁ = 10, T₂ = 100: 90 plain
  steps, 9 with statistics, 1 with statistics and inverses), each kind of step timed once by
  setting the state's step count (issue 21's target: ≤ 1.35× SGD-m);
* TNT step time / its floor (:meth:`TNT.step_floor`: the gradient, the sampled-gradient backward
  pass /T₁ and the algebra's multiplications, in gradients) × the measured gradient time, on the
  thesis's MNIST autoencoder 784-1000-500-250-30-250-500-1000-784 (float32, batch 1000) at T₁ = 1
  and T₂ ∈ {1, 20};
* SMW-NG-BD vs SMW-NG step time on the thesis's 784-500-10 MNIST classifier (sigmoid, softmax
  cross-entropy; §5.8: N₁ = 60, N₂ = 30), float64, synthetic data, and each against its floor
  (:meth:`SMWOptimizer.step_floor`).

Timing policy: each optimizer makes one untimed warm-up step (TNT: after its warm start), then
every timed call is one step from a deep copy of that state (a step consumes its state; the copy is
not timed); the best of ``REPEAT`` calls is taken (3 for ResNet-20), the numerator and the
denominator in the same process one after the other, so the ratio holds with ``--quick`` too.
"""
import copy
import functools
import math
import time

import numpy as np

from qnref.nn.activations import Sigmoid
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.nn.zoo import build_model
from qnref.optim import make_optimizer
from qnref.optim.base import Problem

from ._common import autoencoder

REPEAT = 5


def _best_step(opt, prob, th, st, repeat=REPEAT, k=None):
    """Best wall time of ``repeat`` steps, each from a deep copy of ``st`` (its step count set to
    ``k`` − 1 when given, so the timed step is step k)."""
    best = float("inf")
    for _ in range(repeat):
        s = copy.deepcopy(st)
        if k is not None:
            s.k = k - 1
        t0 = time.perf_counter()
        opt.step(th, s, prob)
        best = min(best, time.perf_counter() - t0)
    return best


def _warm(opt, prob, th):
    st = opt.init(th)
    th, st, _ = opt.step(th, st, prob)   # warm-up (TNT: the statistics warm start and one step)
    return th, st


@functools.lru_cache(maxsize=4)
def _cnn_problem(name):
    shape = {"resnet20": (3, 32, 32), "lenet-digits": (1, 8, 8)}[name]
    r = np.random.default_rng(0)
    X = r.standard_normal((256,) + shape).astype("float32")
    model = build_model(name)
    return model, Problem(model, "softmax_ce", X, r.integers(0, 10, 256), seed=0), model.init(0, dtype="float32")


def tnt_amortized_step(opt, prob, th, st, repeat):
    """The average step time over one period P = lcm(T₁, T₂) of step indices k = 1…P: each kind of
    step (statistics due: T₁ | k; inverses due: T₂ | k) timed once at a representative k, weighted
    by how often it occurs in the period."""
    T1, T2 = opt.stat_freq, opt.inv_freq
    P = math.lcm(T1, T2)
    rep, count = {}, {}
    for k in range(1, P + 1):
        key = (k % T1 == 0, k % T2 == 0)
        rep.setdefault(key, k)
        count[key] = count.get(key, 0) + 1
    return sum(count[key] * _best_step(opt, prob, th, st, repeat, k=rep[key]) for key in rep) / P


class TNTOverMomentumCNN:
    """TNT (T₁ = 10, T₂ = 100, batch 128, ε = 0.01 as §4.7.1) vs SGD-momentum, per step."""

    params = (["resnet20", "lenet-digits"],)
    param_names = ["model"]
    unit = "ratio to an SGD-momentum step"
    timeout = 900
    version = "21.2"

    def track_tnt_step_over_momentum(self, name):
        model, prob, th0 = _cnn_problem(name)
        repeat = 3 if name == "resnet20" else REPEAT
        tnt = make_optimizer("tnt", stat_freq=10, inv_freq=100, batch_size=128, damping=0.01)
        th, st = _warm(tnt, prob, th0)
        t_tnt = tnt_amortized_step(tnt, prob, th, st, repeat)
        mom = make_optimizer("momentum", batch_size=128)
        th, st = _warm(mom, prob, th0)
        return t_tnt / _best_step(mom, prob, th, st, repeat)


@functools.lru_cache(maxsize=1)
def _autoencoder_problem():
    r = np.random.default_rng(0)
    X = r.random((2000, 784)).astype("float32")
    model = autoencoder(784)
    return model, Problem(model, "sigmoid_ce", X, X, seed=0), model.init(0, dtype="float32")


class TNTFloorAutoencoder:
    """TNT at T₁ = 1 on the MNIST autoencoder (batch 1000): measured step / (floor × gradient)."""

    params = ([1, 20],)
    param_names = ["inv_freq"]
    unit = "ratio of the measured step to its floor"
    timeout = 900
    version = "21.2"

    def track_tnt_over_floor(self, inv_freq):
        model, prob, th0 = _autoencoder_problem()
        tnt = make_optimizer("tnt", stat_freq=1, inv_freq=inv_freq, batch_size=1000)
        th, st = _warm(tnt, prob, th0)
        t_step = tnt_amortized_step(tnt, prob, th, st, 3)
        obj = prob.sample(1000)
        t_grad = min(_timed(lambda: obj.at(th).grad) for _ in range(3))
        return t_step / (tnt.step_floor(model)["floor"] * t_grad)

    def track_tnt_over_momentum(self, inv_freq):
        model, prob, th0 = _autoencoder_problem()
        tnt = make_optimizer("tnt", stat_freq=1, inv_freq=inv_freq, batch_size=1000)
        th, st = _warm(tnt, prob, th0)
        t_tnt = tnt_amortized_step(tnt, prob, th, st, 3)
        mom = make_optimizer("momentum", batch_size=1000)
        th, st = _warm(mom, prob, th0)
        return t_tnt / _best_step(mom, prob, th, st, 3)


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@functools.lru_cache(maxsize=1)
def _mnist_classifier():
    r = np.random.default_rng(0)
    model = Sequential([Dense(500), Sigmoid(), Dense(10)], input_shape=(784,))
    X = r.standard_normal((600, 784))
    return model, Problem(model, "softmax_ce", X, r.integers(0, 10, 600), seed=0), model.init(0)


class SMWBlockDiagonal:
    """SMW-NG-BD vs SMW-NG (N₁ = 60, N₂ = 30) on the 784-500-10 classifier, and each vs its floor."""

    unit = "ratio"
    timeout = 300
    version = "21.2"

    @staticmethod
    def _time(name):
        model, prob, th0 = _mnist_classifier()
        opt = make_optimizer(name)
        th, st = _warm(opt, prob, th0)
        return _best_step(opt, prob, th, st)

    def track_bd_over_ng(self):
        return self._time("smw-ng-bd") / self._time("smw-ng")

    def _over_floor(self, name):
        model, prob, th0 = _mnist_classifier()
        obj = prob.sample(60)
        obj.at(th0).grad
        t_grad = min(_timed(lambda: obj.at(th0).grad) for _ in range(REPEAT))
        return self._time(name) / (make_optimizer(name).step_floor(model)["floor"] * t_grad)

    def track_bd_over_floor(self):
        return self._over_floor("smw-ng-bd")

    def track_ng_over_floor(self):
        return self._over_floor("smw-ng")
