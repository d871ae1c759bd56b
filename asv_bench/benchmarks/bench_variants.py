"""Per-step cost of the texts' variants that are settings of a registered optimizer (issue 20).

Registered optimizers are benchmarked by ``bench_optimizers`` / ``bench_algebra``; the variants
below are hyperparameter settings of one of them (docs/variants.md), so each gets its own row here:
the same model, problem and batch as ``bench_optimizers`` (the reduced autoencoder
64-32-16-8-16-32-64, 1000 examples, batch 256), one warm-up step made once per process.
- ``time_step``: wall time of one step (:class:`~._common.FastTiming`; each sample is the second
  step from a deep copy of the warm state);
- ``track_passes_per_step``: gradient-equivalent passes per example drawn over 3 steps (exact);
- ``track_algebra_flops``: multiplications of the optimizer's own algebra per step (its cost model).
"""
import copy
import functools

from qnref.optim.costs import algebra_flops
from qnref.optim.kbfgs import VARIANTS as KBFGS_VARIANTS

from ._common import FastTiming, autoencoder
from .bench_optimizers import BATCH, _kwargs, _setup

#: label → (registered optimizer, the setting that selects the variant)
VARIANTS = {
    "kfac ch2 (Alg. 7)": ("kfac", {"version": "ch2"}),
    "kfac type-2 factors": ("kfac", {"fisher": "exact"}),
    **{f"kbfgs {k}": ("kbfgs", dict(v)) for k, v in KBFGS_VARIANTS.items()},
    **{f"kbfgs-l {k}": ("kbfgs-l", dict(v)) for k, v in KBFGS_VARIANTS.items() if k in ("alg5", "alg10")},
    "shampoo newton roots (Alg. 16)": ("shampoo", {"root": "newton"}),
    "hf fixed lr (SOC Fig. 12)": ("hf", {"step_rule": "fixed", "lr": 0.1}),
    "lsr1-ls fixed lr (SOC Fig. 12)": ("lsr1-ls", {"step_rule": "fixed", "lr": 0.1}),
    "rmsprop full-set warm start": ("rmsprop", {"warm_start": True}),
}


@functools.lru_cache(maxsize=1)
def _warm(label):
    name, settings = VARIANTS[label]
    return _setup(name, **settings)


class VariantStep(FastTiming):
    params = [sorted(VARIANTS)]
    param_names = ["variant"]
    timeout = 300
    version = "20.1"

    def setup(self, label):
        self.opt, self.prob, self.theta, state = _warm(label)
        self.state = copy.deepcopy(state)  # a step consumes its state (docs/optimizers.md)

    def time_step(self, label):
        self.theta, self.state, _ = self.opt.step(self.theta, self.state, self.prob)


class VariantCounts:
    params = [sorted(VARIANTS)]
    param_names = ["variant"]
    unit = "gradient equivalents per example drawn"
    timeout = 120

    def track_passes_per_step(self, label):
        name, settings = VARIANTS[label]
        opt, prob, theta, state = _setup(name, **settings)
        before, drawn = prob.counter.grad_equivalents, prob.samples_drawn
        for _ in range(3):
            theta, state, _info = opt.step(theta, state, prob)
        return (prob.counter.grad_equivalents - before) / max(prob.samples_drawn - drawn, 1)


class VariantAlgebraFlops:
    params = [sorted(VARIANTS)]
    param_names = ["variant"]
    unit = "multiplications per step"
    timeout = 60

    def track_algebra_flops(self, label):
        from qnref.optim import make_optimizer

        name, settings = VARIANTS[label]
        kw = {**_kwargs(name), **settings}
        return algebra_flops(make_optimizer(name, **kw), autoencoder(64, (32, 16, 8, 16, 32)),
                             batch_size=kw.get("batch_size", BATCH))["per_step"]
