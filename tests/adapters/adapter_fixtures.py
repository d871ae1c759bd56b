"""Pieces shared by the adapter tests that compare a wrapper with qnref's own engine."""
from __future__ import annotations

from qnref.optim import OPTIMIZERS, load_all
from qnref.optim.base import Problem

load_all()


class FullBatchProblem(Problem):
    """The engine under closure / ``value_fn`` semantics: every draw is the whole (fixed) batch."""

    def batch(self, size):
        self.samples_drawn += self.n_samples
        return self._full

    def sample(self, size):
        return self._full

    def subset(self, idx):
        return self._full


def small_batches(name: str) -> dict:
    """Batch sizes for the 24-example test problems (the paper defaults assume thousands)."""
    fields = OPTIMIZERS[name]().hyperparameters()
    hp = {}
    if "batch_size" in fields:
        hp["batch_size"] = 12
    if "curvature_batch" in fields:
        hp["curvature_batch"] = 6
    if name == "svrg":
        hp["inner_steps"] = 2
    return hp
