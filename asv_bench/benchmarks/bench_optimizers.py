"""Per-step cost of every registered optimizer (issue 10), measured side by side with SGD.

Model: the reduced autoencoder 64-32-16-8-16-32-64 (tanh, sigmoid cross-entropy) on 1000 random
examples in [0, 1], batch sizes as each optimizer's defaults would use at small scale (256).
- ``time_step``: wall time of one ``opt.step`` (after a warm-up step, so that the first-step
  statistics of the Kronecker methods are excluded);
- ``peakmem_step``: peak memory of a process doing a few steps;
- ``track_passes_per_step``: gradient-equivalent passes per step / batch size (exact counts);
- ``track_time_ratio_to_sgd``: step time / SGD step time in the same process, interleaved rounds.
"""
import copy
import functools
import inspect
import math

import numpy as np

from qnref.optim import load_all, make_optimizer
from qnref.optim.base import Problem

from ._common import FastTiming, autoencoder, interleaved_ratio, wall_time

BATCH = 256
# optimizers whose defaults need a different batch keyword or none
_KW = {"smw-gn": {"batch_size": 64, "curvature_batch": 8}, "smw-ng": {"batch_size": 64, "curvature_batch": 32}}


def names():
    return sorted(load_all())


def _kwargs(name):
    """The benchmark's batch size where the optimizer takes one (HF draws a data fraction)."""
    if name in _KW:
        return dict(_KW[name])
    from qnref.optim import get_optimizer_class

    params = inspect.signature(get_optimizer_class(name).__init__).parameters
    return {"batch_size": BATCH} if "batch_size" in params else {}


def _setup(name, seed=0, **settings):
    """Model, problem, optimizer (the benchmark's batch, plus ``settings``: a variant of the texts)
    and one warm-up step."""
    model = autoencoder(64, (32, 16, 8, 16, 32))
    r = np.random.default_rng(seed)
    X = r.random((1000, 64))
    prob = Problem(model, "sigmoid_ce", X, X, seed=seed)
    opt = make_optimizer(name, **{**_kwargs(name), **settings})
    theta = model.init(seed)
    state = opt.init(theta)
    theta, state, _ = opt.step(theta, state, prob)  # warm-up (first-step statistics, imports)
    return opt, prob, theta, state


@functools.lru_cache(maxsize=1)
def _warm(name):
    return _setup(name)


class OptimizerStep(FastTiming):
    """Timing: :class:`~._common.FastTiming`. Model, problem, ``opt.init`` and one warm-up step
    (which also compiles and fills the first-step statistics) are made once per process; asv
    re-runs setup before every timed call, which hands the step a deep copy of that state, so each
    sample is the second step from the same state (version 18.2)."""

    params = [names()]
    param_names = ["optimizer"]
    timeout = 300
    # bump ``version`` when the measured code or a helper it calls (``_common``) changes: asv's
    # automatic version hashes only the benchmark's own source, so old results would mix in
    version = "18.2"  # 18.2: warm state made once per process, copied per call

    def setup(self, name):
        self.opt, self.prob, self.theta, state = _warm(name)
        self.state = copy.deepcopy(state)  # a step consumes its state (docs/optimizers.md)

    def time_step(self, name):
        self.theta, self.state, _ = self.opt.step(self.theta, self.state, self.prob)

    def peakmem_step(self, name):
        th, st = self.theta, self.state
        for _ in range(3):
            th, st, _ = self.opt.step(th, st, self.prob)


class OptimizerCounts:
    params = [names()]
    param_names = ["optimizer"]
    unit = "gradient equivalents per example drawn"
    timeout = 120

    def track_passes_per_step(self, name):
        opt, prob, theta, state = _setup(name)
        before, drawn = prob.counter.grad_equivalents, prob.samples_drawn
        for _ in range(3):
            theta, state, info = opt.step(theta, state, prob)
        return (prob.counter.grad_equivalents - before) / max(prob.samples_drawn - drawn, 1)


def _stepping_timer(name, calls):
    """A timer of ``calls`` consecutive steps of ``name`` (each round goes on from the last one's
    state, as a training loop does)."""
    opt, prob, theta, state = _setup(name)
    box = [theta, state]

    def run():
        for _ in range(calls):
            box[0], box[1], _ = opt.step(box[0], box[1], prob)

    return lambda: wall_time(run)


#: the step-count attributes of periodic work (statistics, inverses and roots, SQN's curvature windows)
PERIODS = ("stat_freq", "inv_freq", "curvature_freq", "L")


def period(name):
    """Steps after which ``name``'s default schedule repeats: the lcm of its periods (1: none)."""
    opt = make_optimizer(name, **_kwargs(name))
    return math.lcm(*(int(getattr(opt, a)) for a in PERIODS if isinstance(getattr(opt, a, None), int)), 1)


class OptimizerRatios:
    """Step time / SGD step time, in interleaved rounds of ``CALLS`` steps of each, or of one period
    of the method's schedule when that is longer (:func:`period`: K-FAC, Shampoo, TNT recompute
    inverses or roots every 20 steps, SQN its curvature pair), the median of the per-round ratios
    (:func:`~._common.interleaved_ratio`; version 21.2). Steps here take 0.05–5 ms, so a single
    wake-up of a BLAS thread (3–20 ms) spoils a best-of-5 taken one method after the other: TNT
    read 13.2 in one process and 3.6 in another that way. With 5-step rounds the median skipped
    the rounds holding a periodic step, which the amortized cost includes (2–6 % of the tiny net's
    K-FAC, TNT, Shampoo and SQN steps; found in the tenth session)."""

    params = [names()]
    param_names = ["optimizer"]
    unit = "ratio to an SGD step"
    timeout = 300  # tnt-ideal: 50 steps of ≈ 3.5 s (its 180 s limit was hit in the tenth session)
    version = "21.2"
    CALLS, ROUNDS = 5, 9

    def track_time_ratio_to_sgd(self, name):
        calls = max(self.CALLS, period(name))
        return interleaved_ratio(_stepping_timer(name, calls), _stepping_timer("sgd", calls), self.ROUNDS)
