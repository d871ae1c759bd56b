"""Flops of each optimizer's own algebra per step (issue 10), from :func:`qnref.optim.costs.algebra_flops`.

Model: the reduced autoencoder 64-32-16-8-16-32-64 of ``bench_optimizers.py`` (n = 5544), the
same optimizer settings (batch 256 where the optimizer takes one, SMW batches 64 / 8 or 32).
Counts are multiplications (a multiply-add once), steady state (memory full), amortized terms
divided by their period; nominal data-dependent counts: 1 line-search trial, 10 CG iterations
(HF), coupled-Newton iterations at their cap (Shampoo, an upper bound). See docs/benchmarks.md.
- ``track_algebra_flops``: multiplications per step;
- ``track_algebra_flops_per_n``: the same divided by the number of parameters n.
"""
from qnref.optim import make_optimizer
from qnref.optim.costs import algebra_flops

from ._common import autoencoder
from .bench_optimizers import BATCH, _kwargs, names


def _flops(name):
    model = autoencoder(64, (32, 16, 8, 16, 32))
    kw = _kwargs(name)
    opt = make_optimizer(name, **kw)
    return algebra_flops(opt, model, batch_size=kw.get("batch_size", BATCH)), model.layout.size


class AlgebraFlops:
    params = [names()]
    param_names = ["optimizer"]
    unit = "multiplications per step"
    timeout = 60

    def track_algebra_flops(self, name):
        return _flops(name)[0]["per_step"]


class AlgebraFlopsPerN:
    params = [names()]
    param_names = ["optimizer"]
    unit = "multiplications per step / n"
    timeout = 60

    def track_algebra_flops_per_n(self, name):
        res, n = _flops(name)
        return res["per_step"] / n
