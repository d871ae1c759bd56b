"""Every registered optimizer, with its defaults: never a NaN θ, and non-finite trials reported.

The objective is poisoned: f is NaN (or +inf) wherever ‖θ − θ₀‖ exceeds a small radius, so the
first real step of every method lands in the poisoned region.
"""
import numpy as np
import pytest

from qnref.curvature.objective import Objective, Point
from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.optim import load_all, make_optimizer
from qnref.optim.base import Problem


class PoisonedObjective(Objective):
    def at(self, theta):
        p = super().at(theta)
        if np.linalg.norm(theta - self.center) > self.radius:
            p._losses = p._losses * self.poison
        return p


class PoisonedProblem(Problem):
    def __init__(self, *a, center, radius, poison, **kw):
        super().__init__(*a, **kw)
        for obj in (self._full,):
            obj.__class__ = PoisonedObjective
            obj.center, obj.radius, obj.poison = center, radius, poison
        self._poison = (center, radius, poison)

    def subset(self, idx):
        obj = super().subset(idx)
        obj.__class__ = PoisonedObjective
        obj.center, obj.radius, obj.poison = self._poison
        return obj


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("poison", [np.nan, np.inf])
@pytest.mark.parametrize("name", sorted(load_all()))
def test_no_nan_parameters_and_nonfinite_reported(name, poison):
    r = np.random.default_rng(0)
    model = Sequential([Dense(6), Tanh(), Dense(3)], input_shape=(4,))
    X, y = r.standard_normal((300, 4)), r.integers(0, 3, 300)
    th0 = model.init(0)
    prob = PoisonedProblem(model, "softmax_ce", X, y, 1e-3, seed=0, center=th0.copy(), radius=1e-6, poison=poison)
    opt = make_optimizer(name)
    th, st = th0, opt.init(th0)
    seen_nonfinite = False
    for _ in range(6):
        th, st, info = opt.step(th, st, prob)
        assert np.all(np.isfinite(th)), f"{name} returned a non-finite θ"
        seen_nonfinite |= bool(info.nonfinite)
    assert seen_nonfinite, f"{name} never reported the non-finite trial"
