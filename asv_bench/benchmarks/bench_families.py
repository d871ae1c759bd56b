"""Per-iteration cost claims of the stochastic / sampled quasi-Newton, Hessian-free, SMW and
Kronecker papers (issues 5, 6, 7). Ratios are measured side by side in one process.

- sampled QN poster: S-LSR1 / S-LBFGS vs LSR1 / LBFGS step time as a function of memory m
  (its table: the sampled methods add m gradient (option I) or Hessian-vector (option II)
  evaluations, i.e. + m·n·d-type terms, per iteration);
- HF: cost of one CG iteration in gradient evaluations on the same curvature batch (≈ 1.5);
- MB-LSR1: objective evaluations per step (progress checks, line search) — ``track_``;
- SMW: step time vs curvature batch N₂ (forming D is O(m_L² N₂² Σ mₗ)) and vs HF with the same N₂;
- Kronecker methods: step time and peak memory relative to an SGD-momentum step on the
  autoencoder and on a small CNN (thesis: memory comparable to first-order methods; TNT only
  slightly above first order).
"""
import copy
import functools

import numpy as np

from qnref.curvature.objective import Objective
from qnref.nn.zoo import build_model
from qnref.optim import make_optimizer
from qnref.optim.base import Problem
from qnref.optim.hessian_free import cg_solve

from ._common import SlowTiming, autoencoder, best_time


def _problem(kind, seed=0, n=1000):
    r = np.random.default_rng(seed)
    if kind == "autoencoder":
        model = autoencoder(64, (32, 16, 8, 16, 32))
        X = r.random((n, 64))
        return model, Problem(model, "sigmoid_ce", X, X, seed=seed)
    model = build_model("lenet-digits")
    X = r.random((n, 1, 8, 8))
    return model, Problem(model, "softmax_ce", X, r.integers(0, 10, n), seed=seed)


def _step_time(name, kind="autoencoder", repeat=3, **kw):
    model, prob = _problem(kind)
    opt = make_optimizer(name, **kw)
    th = model.init(0)
    st = opt.init(th)
    th, st, _ = opt.step(th, st, prob)  # warm-up
    times = []
    import time

    for _ in range(repeat):
        t0 = time.perf_counter()
        th, st, _ = opt.step(th, st, prob)
        times.append(time.perf_counter() - t0)
    return min(times)


class SampledVsClassical:
    """Step time of S-LSR1 / S-LBFGS / LSR1 / LBFGS (full batch, 1000 examples) vs memory m."""

    params = ([2, 5, 10, 20], ["s-lsr1", "s-lbfgs", "lsr1-tr", "lbfgs"])
    param_names = ["m", "optimizer"]
    unit = "ratio to one full gradient"
    timeout = 300
    # bump ``version`` when the measured code or a helper it calls (``_common``) changes
    version = "18.1"

    def track_step_over_gradient(self, m, name):
        model, prob = _problem("autoencoder")
        th = model.init(0)
        t_grad = best_time(lambda: prob.full_objective.grad(th))
        return _step_time(name, memory=m, batch_size=None) / t_grad


class HessianFreeCG:
    """One CG iteration on the GGN of a 100-example curvature batch, in gradient times."""

    unit = "gradient evaluations per CG iteration"
    # bump ``version`` when the measured code or a helper it calls (``_common``) changes
    version = "18.1"

    def track_cg_iteration_over_gradient(self):
        model, prob = _problem("autoencoder")
        obj = prob.sample(100)
        th = model.init(0)
        p = obj.at(th)
        g = p.grad
        t_grad = best_time(lambda: obj.at(th).grad)
        t_cg = best_time(lambda: cg_solve(lambda v: p.ggn_vp(v) + v, -g, max_iters=20, progress_eps=None))
        return t_cg / 20 / t_grad


class MBLSR1Evaluations:
    unit = "objective evaluations per step"

    def track_evals_per_step(self):
        model, prob = _problem("autoencoder")
        opt = make_optimizer("mb-lsr1", batch_size=128)
        th = model.init(0)
        st = opt.init(th)
        evals = 0
        for _ in range(10):
            th, st, info = opt.step(th, st, prob)
            evals += info.evals
        return evals / 10


@functools.lru_cache(maxsize=8)
def _smw_warm(name, n2):
    """Problem, optimizer and the state after one warm-up step, made once per process (asv re-runs
    setup before every timed call; each call then steps from a copy of the same state)."""
    model, prob = _problem("autoencoder")
    opt = make_optimizer(name, batch_size=60, curvature_batch=n2)
    th = model.init(0)
    st = opt.init(th)
    th, st, _ = opt.step(th, st, prob)  # warm-up
    return opt, prob, th, st


class SMWScaling(SlowTiming):
    """One SMW-GN / SMW-NG step (batch 60) vs the curvature batch N₂. Timing:
    :class:`~._common.SlowTiming`; the problem is built and one warm-up step made once per
    process, and each timed call is one step from a copy of that state, copied in setup (version
    18.2; before 18.1 the timed call also built the problem and made the warm-up step)."""

    params = ([5, 10, 20, 30],)
    param_names = ["curvature_batch"]
    timeout = 300
    # bump ``version`` when the measured code or a helper it calls (``_common``) changes
    version = "18.2"

    def setup(self, n2):
        self.runs = {}
        for name in ("smw-gn", "smw-ng"):
            opt, prob, th, st = _smw_warm(name, n2)
            self.runs[name] = (opt, prob, th, copy.deepcopy(st))  # a step consumes its state

    def _step(self, name):
        opt, prob, th, st = self.runs[name]
        opt.step(th, st, prob)


    def time_smw_gn_step(self, n2):
        self._step("smw-gn")

    def time_smw_ng_step(self, n2):
        self._step("smw-ng")


class SMWvsHF:
    params = ([5, 10, 20, 30],)
    param_names = ["curvature_batch"]
    unit = "ratio to an HF step with the same curvature batch"
    timeout = 300

    def track_smw_gn_over_hf(self, n2):
        return _step_time("smw-gn", batch_size=60, curvature_batch=n2) / _step_time("hf", curvature_batch=n2, max_cg_iters=10)


class KroneckerVsMomentum:
    params = (["autoencoder", "cnn"], ["kfac", "kbfgs", "kbfgs-l", "shampoo", "tnt"])
    param_names = ["model", "optimizer"]
    unit = "ratio to an SGD-momentum step"
    timeout = 300

    def track_step_time_ratio(self, kind, name):
        return _step_time(name, kind, batch_size=100) / _step_time("momentum", kind, batch_size=100)

    def peakmem_steps(self, kind, name):
        _step_time(name, kind, batch_size=100, repeat=2)


class KroneckerThesisAutoencoder:
    """Step time of K-BFGS, K-BFGS(L) and K-FAC relative to an SGD step at the thesis's autoencoder
    settings: MNIST-sized 784-1000-500-250-30-250-500-1000-784 (n ≈ 2.8·10⁶, tanh, sigmoid
    cross-entropy), float64, minibatch 1000 (Ren's thesis §2.8/§3.7, the optimizers' defaults
    otherwise), on 2000 random examples in [0, 1]. Best of 3 steps after a warm-up step, each
    method side by side with SGD in one process (so the ratio holds with ``--quick``)."""

    params = (["kbfgs", "kbfgs-l", "kfac"],)
    param_names = ["optimizer"]
    unit = "ratio to an SGD step"
    timeout = 600
    version = "18.1"

    @staticmethod
    def _time(name):
        r = np.random.default_rng(0)
        X = r.random((2000, 784))
        model = autoencoder(784)
        prob = Problem(model, "sigmoid_ce", X, X, seed=0)
        opt = make_optimizer(name, batch_size=1000)
        th = model.init(0)
        st = opt.init(th)
        th, st, _ = opt.step(th, st, prob)  # warm-up
        best = float("inf")
        import time

        for _ in range(3):
            t0 = time.perf_counter()
            th, st, _ = opt.step(th, st, prob)
            best = min(best, time.perf_counter() - t0)
        return best

    def track_step_over_sgd(self, name):
        return self._time(name) / self._time("sgd")
